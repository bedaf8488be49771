"""Every kernel on every zoo architecture (tests/zoo.py, 35 of them): nothing silently wrong,
nothing silently left in float, every refusal one line with its reason. The table of the same
checks is ``benchmarks/zoo_matrix.py``'s, in RESULTS.md."""

import warnings

import pytest
from zoo import ALL
from zoo_check import check

# architectures on which every kernel fully succeeds (a regression guard; see RESULTS.md for the
# others and why)
FULL = {
    "digits-cnn", "mnist-resnet", "bert", "roberta", "distilbert", "albert", "gpt2", "llama",
    "mistral", "qwen2", "phi3", "gemma", "opt", "falcon", "bloom", "gpt-neox", "gptj", "bart",
    "resnet", "mobilenetv2", "convnext", "regnet", "clip", "llava", "whisper", "vit", "dinov2",
    "deberta-v2", "mixtral", "qwen2-moe", "swin", "t5",
}  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_every_kernel_on_the_zoo(name):
    warnings.filterwarnings("ignore")
    row = check(name)
    broken = {key: row[key] for key in row.get("failures", [])}
    assert not broken, f"{name}: {broken}"  # a refusal is a finding; a broken step is a bug
    assert row.get("negative") in (None, "caught", "n/a"), "the masked check can fail here"
    for reason in {**row.get("refused", {}), **row.get("no_form", {})}.values():
        assert reason and "\n" not in reason
    assert row["full"] == (name in FULL), f"{name}: {row}"
