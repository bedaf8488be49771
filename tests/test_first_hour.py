"""A newcomer's first hour, as README.md and configs/ tell it: the README's commands on digits-tiny,
and an own Hugging Face model with a data hook from search to evaluate, with no extra flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from compsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every ``compsearch`` command on the demo study in README.md's shell blocks, in order (the
    own-model example has its own test below)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0].endswith("compsearch") and any("mnist" in w for w in words):
                commands.append(words[1:])
    return commands


def test_the_readme_commands_work_as_written_on_digits_tiny(tmp_path, runs_root, capsys):
    commands = readme_commands()
    assert [c[0] for c in commands][:2] == ["status", "pareto"], "README's quickstart moved"
    assert {"search", "export", "train", "evaluate", "worker"} <= {c[0] for c in commands}
    config = yaml.safe_load((ROOT / "configs" / "digits-tiny.yaml").read_text())
    config["study"] = "readme-digits"
    path = tmp_path / "readme-digits.yaml"
    path.write_text(yaml.safe_dump(config))
    study = str(runs_root / "readme-digits")
    assert main(["search", str(path)]) == 0  # what `make demo` runs, on the tiny config
    for words in commands:
        argv = [w.replace("configs/mnist.yaml", str(path)).replace("runs/mnist", study)
                for w in words]  # fmt: skip
        assert main(argv) == 0, f"README command failed: compsearch {' '.join(words)}"
    out = capsys.readouterr().out
    assert "feasible" in out
    assert (Path(study) / "final" / "knee" / "report.md").exists()


def _tiny_classifier(folder: Path) -> None:
    """A 1-layer BERT classifier saved with a word-level tokenizer, and data.csv of texts whose
    label is which of three words they contain."""
    import transformers as tf

    words = ["red", "green", "blue", "the", "a", "car", "sky", "leaf", "is", "very"]
    vocab = folder / "vocab.txt"
    folder.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = tf.BertTokenizer(str(vocab))
    config = tf.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, num_labels=3,
                           max_position_embeddings=64)  # fmt: skip
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = ["text,label"]
    fillers = ["the car is very", "a sky is", "the leaf", "a car is", "very very"]
    for index in range(240):
        label = index % 3
        rows.append(f"{fillers[index % 5]} {['red', 'green', 'blue'][label]},{label}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_own_hf_model_with_a_data_hook_goes_search_to_evaluate(tmp_path, runs_root,
                                                                  monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # as the example says: run where the hook and the model are
    (tmp_path / "hf_example_hook.py").write_text(
        (ROOT / "configs" / "hf_example_hook.py").read_text()
    )
    _tiny_classifier(tmp_path / "my-classifier")
    config = yaml.safe_load((ROOT / "configs" / "hf-example.yaml").read_text())
    config["study"] = "my-hf-classifier"
    config["search"].update(trials=2, finetune_steps=3, cache_batches=2, sampler="random",
                            plans=0)  # fmt: skip
    config["latency"]["repeats"] = 5
    config["final"]["steps"] = 3
    config["constraints"] = {"accuracy_drop": "50%", "size_bytes": "0.9x"}
    (tmp_path / "hf-example.yaml").write_text(yaml.safe_dump(config))
    study = runs_root / "my-hf-classifier"
    assert main(["search", "hf-example.yaml"]) == 0
    assert main(["export", str(study), "--knee"]) == 0
    recipe = yaml.safe_load((study / "recipes" / "knee.yaml").read_text())
    assert recipe["provenance"]["task"].endswith("@hf_example_hook:text_classification")
    assert main(["train", str(study / "recipes" / "knee.yaml")]) == 0
    assert main(["evaluate", str(study / "final" / "knee")]) == 0


def test_the_readme_python_snippet_runs_from_any_folder(tmp_path, runs_root):
    import os
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "COMPSEARCH_RUNS": str(runs_root)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "my-model.safetensors").exists()
    assert (runs_root / "my-first-study" / "study.db").exists()


def test_the_progress_line_keeps_done_of_total_visible_at_80_columns():
    from rich.console import Console

    from compsearch.search.progress import ProgressBar
    from compsearch.search.results import StudyResults

    console = Console(width=80, force_terminal=True, record=True, color_system=None)
    bar = ProgressBar(100, "a-study-name-longer-than-most", console)
    bar.update(StudyResults(["accuracy", "latency_ms", "size_bytes"], "accuracy", "maximize",
                            {"accuracy": 0.9, "latency_ms": 1.0, "size_bytes": 1.0}))  # fmt: skip
    bar.close()
    line = "a-study-name-lon" + console.export_text().strip().split("a-study-name-lon")[-1]
    assert "0/100" in line and "front 0" in line and len(line) <= 80, line
