"""The masked-equivalence check: before a prune inside the blocks is committed, the pruned model
must give, on the run's inputs, what the unpruned model gives with the removed units zeroed on the
producing side. Equal means the trace saw every use of those units; a group that fails is refused
with the error it showed, and the model is left as it was before that group.

Residual streams are not checked: zeroing part of a normalized width is not what removing it does.
Quant modules compute in float while checking (a grid that depends on a layer's width is not a
structural difference). See :mod:`compsearch.kernels.prune`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from compsearch.errors import KernelError
from compsearch.kernels._modules import transaction
from compsearch.kernels._prune_groups import Analysis, Run, _tensor_table
from compsearch.kernels._quant_modules import float_forward

Apply = Callable[[nn.Module, Analysis, dict[str, torch.Tensor], Run], Any]

# largest relative difference (over all output tensors) between the pruned model and the masked
# unpruned one that still counts as equal: float rounding of the smaller matrix products, not a bug
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 3e-2


class _Rollback(Exception):
    pass


def apply_checked(
    model: nn.Module, analysis: Analysis, decisions: dict[str, torch.Tensor], run: Run, apply: Apply
) -> dict[str, str]:
    """Apply ``decisions`` with ``apply`` (which returns the output of its run): groups inside
    blocks only where they pass the masked-equivalence check, residual streams only where the
    pruned model still runs. Returns the refused groups with their reasons; the model holds every
    other decision."""
    inner = {n: k for n, k in decisions.items() if analysis.groups[n].kind != "stream"}
    rest = {n: k for n, k in decisions.items() if n not in inner}
    refused = _apply_or_refuse(model, analysis, inner, run, apply, compare=True)
    refused.update(_apply_or_refuse(model, analysis, rest, run, apply, compare=False))
    return refused


def _apply_or_refuse(
    model, analysis, decisions, run, apply: Apply, compare: bool
) -> dict[str, str]:
    """All of ``decisions`` if they pass together; else each alone, and those that pass together."""
    what = "the masked-equivalence check" if compare else "the check that the pruned model runs"
    if not decisions or _try(model, analysis, decisions, run, apply, True, compare) is None:
        return {}
    refused = {}
    for name, kept in decisions.items():
        problem = _try(model, analysis, {name: kept}, run, apply, False, compare)
        if problem is not None:
            refused[name] = f"refused by {what}: {problem}"
    passing = {n: k for n, k in decisions.items() if n not in refused}
    if passing:
        problem = _try(model, analysis, passing, run, apply, True, compare)
        if problem is not None:  # each passes alone, not together: refuse them all
            refused.update(
                (n, f"refused by {what}, with the other groups: {problem}") for n in passing
            )
    return refused


def _try(model, analysis, decisions, run, apply: Apply, keep: bool, compare: bool) -> str | None:
    """Apply ``decisions`` (and with ``compare``, compare with the masked reference). None if all
    is well (the pruning stays when ``keep``); else what went wrong, the model left as it was."""
    reference = _masked_outputs(model, analysis, decisions, run) if compare else []
    found: list[str] = []
    try:
        with transaction(model):
            try:
                with _evaluating(model):
                    actual = apply(model, analysis, decisions, run)
            except KernelError as error:
                cause = error.__cause__
                found.append(
                    f"the pruned model no longer runs ({type(cause).__name__}: "
                    f"{str(cause).splitlines()[0] if str(cause) else ''})"
                    if cause is not None
                    else str(error)
                )
                raise _Rollback from error
            error = _difference(_float_tensors(actual), reference) if compare else None
            if error is not None:
                found.append(
                    f"the pruned model's output differs by {error:.2g} (relative) from the "
                    "unpruned model's with the removed units zeroed, so these units are used "
                    "somewhere the trace did not see"
                )
            if found or not keep:
                raise _Rollback
    except _Rollback:
        pass
    return found[0] if found else None


def zero_removed_(
    model: nn.Module, analysis: Analysis, decisions: dict[str, torch.Tensor], saved=None
) -> None:
    """Zero what pruning would remove on the producing side (rows, biases, per-channel parameters),
    leaving shapes alone: the reference that pruning inside blocks must equal. ``saved`` (a dict)
    receives each tensor written, with a copy of what it held."""
    tensors = _tensor_table(model)
    with torch.no_grad():
        for name, kept in decisions.items():
            group = analysis.groups[name]
            units = group.removed(kept)
            for member, width in group.members:
                if member.role == "in" and not group.queries_only:
                    continue  # (query heads around a shared value: their output columns too)
                tensor = tensors[member.key]
                if saved is not None:
                    saved.setdefault(id(tensor), (tensor, tensor.detach().clone()))
                index = group.indices(member, width, units).to(tensor.device)
                tensor.index_fill_(member.dim, index, 0.0)


def _masked_outputs(model, analysis, decisions, run) -> list[torch.Tensor]:
    """The model's outputs with the units ``decisions`` remove zeroed on the producing side; every
    tensor written is restored before returning."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        zero_removed_(model, analysis, decisions, saved)
        with torch.no_grad(), _evaluating(model):
            return [t.clone() for t in _float_tensors(run(model))]
    finally:
        with torch.no_grad():
            for tensor, original in saved.values():
                tensor.copy_(original)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), no gradients, and Quant modules in float (a grid that depends on the
    layer's width is not a structural difference); each module's own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), float_forward():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _float_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _float_tensors(item)]
    return []


def _difference(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float | None:
    """None when ``actual`` equals ``expected`` within the tolerance of their dtype, else the
    relative error (infinite for another structure or a non-finite value the reference lacks)."""
    if len(actual) != len(expected) or not expected:
        return float("inf") if len(actual) != len(expected) else None
    worst = 0.0
    for a, b in zip(actual, expected, strict=True):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.detach().double(), b.detach().double()
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return float("inf")
        finite = torch.isfinite(b)
        scale = b[finite].norm().clamp(min=1e-12)
        worst = max(worst, float((a[finite] - b[finite]).norm() / scale))
    tolerance = TOLERANCE.get(expected[0].dtype, HALF_TOLERANCE)
    return worst if worst > tolerance else None
