"""Every kernel on one zoo architecture, as a user bringing that model would use them; the rows of
``benchmarks/zoo_matrix.py``'s table and of the zoo tests.

``check(name)`` returns one row: what pruning at keep 0.5 did (and refused, with why), whether the
masked-equivalence check holds on re-randomized weights and fails on a deliberately mis-traced
group (its negative control), whether the pruned model runs at another batch and sequence (image)
size and generates, how the 4- and 8-bit deploy forms match the fake-quant model, W8A8, and which
weights stay in float with why. Every step that raises is recorded with its one-line error.

*Full success*: every step passes, no group is refused, and the weights with no quantized form
(listed with why) hold under 2 % of the weights: class tokens, position tables and relative-bias
tables are added to activations, not multiplied, and stay float in every int8 tool.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from zoo import KIND, _ids, build

from compsearch.kernels._prune_groups import Group
from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.observers import calibrate
from compsearch.kernels.prune import analyze, prune_, zero_removed_
from compsearch.kernels.quant import (
    KEPT_BY_RECIPE,
    left_in_float,
    quantize_,
    quantized_weights,
    unquantize_uncalled_,
)
from compsearch.recipes import LayerPlan, Recipe

EQUAL = 1e-4  # relative error of "equal" (float32 rounding)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def sqnr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    noise = (actual - expected).pow(2).mean()
    return math.inf if noise == 0 else float(10 * torch.log10(expected.pow(2).mean() / noise))


def rerandomized(model: nn.Module) -> nn.Module:
    """Weights drawn afresh so nothing is zero (zero-initialized biases and projections would make
    an equivalence vacuous) and activations keep their scale through depth (a deep net whose
    signal dies out answers with its last bias whatever the layers before it do): matrices with
    variance 2 / fan-in, biases small, norm scales near one."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                fan_in = param[0].numel() if param.shape[0] > 1 else param.shape[-1]
                param.copy_(noise * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model


def _step(row: dict, key: str, fn: Callable[[], object]) -> object:
    try:
        value = fn()
    except Exception as error:  # recorded: the table shows what broke, in one line
        row[key] = f"FAIL {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        row.setdefault("failures", []).append(key)
        return None
    return value


def check(name: str) -> dict:
    row: dict = {"model": name, "kind": KIND[name], "no_form_share": 1.0}
    model, run = build(name)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    row["params"] = params
    pruned = _step(row, "prune", lambda: _prune(row, model, run))
    _step(row, "masked", lambda: _masked(row, name))
    if pruned is not None:
        _step(row, "other_sizes", lambda: _other_sizes(row, name, pruned))
        _step(row, "generate", lambda: _generate(row, name, pruned))
    for label, plan in (("w8", LayerPlan(w_bits=8)), ("w4", LayerPlan(w_bits=4)),
                        ("w8a8", LayerPlan(w_bits=8, a_bits=8))):  # fmt: skip
        _step(row, label, lambda p=plan, k=label: _quantized(row, name, k, p))
    row["full"] = not row.get("failures") and not row.get("refused") and row["no_form_share"] < 0.02
    return row


def _prune(row: dict, model: nn.Module, run) -> nn.Module:
    analysis = analyze(model, run)
    asked = [g.name for g in analysis.groups.values() if g.prunable]
    row["blocked"] = {g.name: g.reason for g in analysis.groups.values() if not g.prunable}
    if not asked:
        raise RuntimeError("no prunable group")
    pruned = copy.deepcopy(model)
    _, report = prune_(pruned, {n: LayerPlan(keep_ratio=0.5) for n in asked}, run)
    row["refused"] = {n: r for n, r in report.skipped.items() if n in asked}
    row["untouched"] = report.untouched
    row["prune"] = f"{len(report.pruned)}/{len(asked)} groups"
    after = sum(p.numel() for p in pruned.parameters())
    row["params_after"] = after / row["params"]
    with torch.no_grad():
        out = run(pruned)
    if not torch.isfinite(out).all():
        raise RuntimeError("the pruned model's output is not finite")
    return pruned


def _masked(row: dict, name: str) -> None:
    """Inner groups on re-randomized weights equal the masked model; a mis-traced group (its
    consumers keep other units than its producers) is refused — the check is not vacuous."""
    model, run = build(name)
    rerandomized(model.eval())
    analysis = analyze(model, run)
    inner = [g.name for g in analysis.groups.values() if g.prunable and g.kind != "stream"]
    if not inner:
        row["masked"] = "no inner group"
        return
    reference, pruned = copy.deepcopy(model), copy.deepcopy(model)
    record, _ = prune_(pruned, {n: LayerPlan(keep_ratio=0.5) for n in inner}, run)
    decisions = {n: torch.tensor(e["kept"]) for n, e in record.groups.items()}
    zero_removed_(reference, analyze(reference, run), decisions)
    with torch.no_grad():
        error = relative_error(run(pruned), run(reference))
    row["masked"] = f"{error:.1e}" + ("" if error < EQUAL else " WRONG")
    if error >= EQUAL:
        raise RuntimeError(f"pruned != masked reference ({error:.2g})")
    target = next((n for n in inner if analysis.groups[n].size > 2 and n in decisions), None)
    if target is None:
        row["negative"] = "n/a"
        return
    indices = Group.indices

    def misread(self, member, width, units):
        found = indices(self, member, width, units)
        if self.name != target or member.role != "in":
            return found
        return (found - member.offset + width) % (self.size * width) + member.offset

    Group.indices = misread
    try:
        _, report = prune_(copy.deepcopy(model), {target: LayerPlan(keep_ratio=0.5)}, run)
    finally:
        Group.indices = indices
    caught = "masked-equivalence" in report.skipped.get(target, "")
    row["negative"] = "caught" if caught else "MISSED"
    if not caught:
        raise RuntimeError(f"a mis-traced {target} passed the check")


def _other_sizes(row: dict, name: str, pruned: nn.Module) -> None:
    fresh, run = build(name, batch=3, length=7)
    with torch.no_grad():
        expected, out = run(fresh.eval()), run(pruned)
    if out.shape != expected.shape or not torch.isfinite(out).all():
        raise RuntimeError(f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
    row["other_sizes"] = "ok"


def _generate(row: dict, name: str, pruned: nn.Module) -> None:
    kind = KIND[name]
    if kind not in ("causal", "seq2seq", "audio-seq2seq") or name.startswith("llava"):
        row["generate"] = "n/a"
        return
    if kind == "audio-seq2seq":
        inputs = {"input_features": torch.randn(1, 16, 32, generator=torch.Generator())}
    else:
        inputs = {"input_ids": _ids(shape=(1, 5))}
    out = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    # a causal model returns the prompt too; a decoder its start token, or (Whisper) not
    expected = {inputs["input_ids"].shape[-1] + 3} if kind == "causal" else {3, 4}
    if out.shape[-1] not in expected:
        raise RuntimeError(f"generated {tuple(out.shape)}, expected {sorted(expected)} tokens")
    row["generate"] = "ok"


def _quantized(row: dict, name: str, label: str, plan: LayerPlan) -> None:
    model, run = build(name)
    rerandomized(model.eval())
    with torch.no_grad():
        expected = run(model)
    report = quantize_(model, Recipe(layers={"re:.*": plan}))
    report.skipped.update(unquantize_uncalled_(model, run))
    calibrate(model, [None], lambda m, _: run(m))
    left, share = left_in_float(model, report.skipped)
    quantized = quantized_weights(model)
    unreported = [k for k, p in model.named_parameters() if p.dim() >= 2 and k not in quantized
                  and k not in left]  # fmt: skip
    if unreported:
        raise RuntimeError(f"weights neither quantized nor listed: {unreported[:3]}")
    if label == "w8":
        row["float_share"] = share
        row["no_form"] = {k: r for k, r in left.items() if r != KEPT_BY_RECIPE}
        sizes = dict(model.named_parameters())
        total = sum(p.numel() for p in sizes.values() if p.dim() >= 2)
        row["no_form_share"] = sum(sizes[k].numel() for k in row["no_form"]) / total
    with torch.no_grad():
        fake = run(model)
        deployed, _ = to_deploy(model, "cpu", run)
        shipped = run(deployed)
    row[label] = f"{sqnr(fake, expected):.0f} dB; deploy {sqnr(shipped, fake):.0f} dB"
    floor = 25 if label == "w8a8" else 50  # the deploy form computes what was trained
    if sqnr(shipped, fake) < floor:
        raise RuntimeError(f"deploy form differs from the fake-quant model ({row[label]})")
