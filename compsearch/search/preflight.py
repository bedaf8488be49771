"""Pre-flight: before a new study's first trial, every latency and size bound is checked against the
teacher and against the cheapest points of the space — every unit at its narrowest format (with and
without int8 activations, and at w8a8, often the fastest on a CPU), every keep ratio at its lowest,
every droppable block dropped — compressed and measured untrained, as a trial would be. A bound that
not even those reach stops the study with one line naming the bound, the best reachable value and
the fix, before any trial is trained and before anything is stored.

A latency bound is refused only where the fastest point misses it by more than ``SLACK`` (the
measurement's own noise); a size bound, exact in bytes, whenever the smallest file is larger. The
check costs little: a point's timing stops at its sixth pair once its interval lies wholly past
that refusal line (as a screened trial's does), and the points after one that meets every bound
are not measured.
"""

from __future__ import annotations

from compsearch._steps import say
from compsearch.errors import ConfigError
from compsearch.objectives.constraints import Constraint, format_bytes, ratio_to_teacher
from compsearch.search.config import StudyConfig
from compsearch.search.sensitivity import untrained_measure
from compsearch.search.trial import SearchContext

#: a latency bound within this much (relative) of the fastest point measured is left to the search
SLACK = 0.10
#: the cheapest points tried: the format label each uniform recipe comes nearest to
EXTREMES = ("w2", "w2a8", "w8a8")


def cheapest_points(ctx: SearchContext) -> list[dict[str, object]]:
    """The parameters of the space's cheapest points (see the module docstring), without repeats."""
    points: list[dict[str, object]] = []
    for label in EXTREMES:
        params = ctx.space.uniform_params(label, keep=0.0)
        params.update({f"drop:{block}": True for block in ctx.space.drop_blocks})
        if params not in points:
            points.append(params)
    return points


def preflight(config: StudyConfig, ctx: SearchContext) -> dict[str, float]:
    """Check every latency and size bound (see the module docstring); return the best value of
    each measured, as a multiple of the teacher's. Raises ConfigError for an unreachable one."""
    bounds = [c for c in config.constraints if c.name in ("latency_ms", "size_bytes")]
    if not bounds:
        return {}
    say("pre-flight: measuring the cheapest points of the space against the bounds")
    refusal = {b.name: b.fraction(ctx.teacher) * (1 + _slack(b)) for b in bounds}
    above = (refusal["latency_ms"], True) if "latency_ms" in refusal else None
    best: dict[str, tuple[float, str]] = {}
    for params in cheapest_points(ctx):
        measured, _ = untrained_measure(ctx, params, predicted=False, above=above)
        label = _describe(params)
        for bound in bounds:
            ratio = ratio_to_teacher(bound.name, measured)
            if bound.name not in best or ratio < best[bound.name][0]:
                best[bound.name] = (ratio, label)
        if all(best[b.name][0] <= b.fraction(ctx.teacher) for b in bounds):
            break  # every bound is met by a point measured: the others cannot refuse the study
    for bound in bounds:
        ratio, label = best[bound.name]
        if ratio > refusal[bound.name]:
            raise ConfigError(_unreachable(bound, ratio, label, ctx.teacher))
    return {name: ratio for name, (ratio, _) in best.items()}


def _slack(bound: Constraint) -> float:
    return SLACK if bound.name == "latency_ms" else 0.0


def _describe(params: dict[str, object]) -> str:
    formats = sorted({str(v) for k, v in params.items() if k.startswith("fmt:")})
    keeps = [float(v) for k, v in params.items() if k.startswith("keep:")]
    parts = [f"formats {'/'.join(formats)}" if formats else "formats as fixed"]
    if keeps:
        parts.append(f"keep {min(keeps):g}")
    if any(k.startswith("drop:") for k in params):
        parts.append("droppable blocks dropped")
    return ", ".join(parts)


def _unreachable(bound: Constraint, ratio: float, label: str, teacher: dict[str, float]) -> str:
    key = f"constraints.{bound.name}"
    teacher_value = teacher[bound.name]
    if bound.name == "latency_ms":
        wanted = f"{bound.absolute(teacher):.3g} ms" if not bound.relative else f"{bound.limit:g}x"
        reached = f"{ratio:.2f}x the teacher's {teacher_value:.3g} ms"
        fix = (
            "raise the bound (a multiple such as '0.5x' holds on any machine), or widen the "
            "space: lower keep_ratio.low, offer int8 activations (a_bits: [8, 16]) or depth"
        )
    else:
        wanted = (
            format_bytes(bound.absolute(teacher)) if not bound.relative else f"{bound.limit:g}x"
        )
        reached = f"{ratio:.3f}x = {format_bytes(ratio * teacher_value)}"
        fix = "raise the bound, or widen the space: fewer w_bits (e.g. 4), a lower keep_ratio.low"
    return (
        f"{key}: {wanted} is out of reach — the cheapest point of the space ({label}) "
        f"measured {reached}; {fix}."
    )
