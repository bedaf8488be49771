"""The study config: one YAML file that says what to compress, against what, and how to search.

Strict: unknown keys, wrong types and impossible values are errors that name the field, before
anything runs. See ``configs/`` for commented examples. Sections: ``study`` (name), ``task``,
``device``, ``space`` (see compsearch.spaces.config), ``objectives``, ``latency``, ``constraints``,
``search`` and ``final``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compsearch._schema import Schema, child, yaml_error
from compsearch.errors import ConfigError
from compsearch.objectives.constraints import Constraint, parse_constraint
from compsearch.objectives.registry import OBJECTIVES
from compsearch.spaces.config import SpaceConfig, parse_space

_S = Schema(ConfigError)
SAMPLERS = (
    "surrogate",
    "nsga2",
    "tpe",
    "gp",
    "random",
    "qmc",
)  # or a plug-in, "module.path:factory"
DRIVERS = ("optuna", "ray")  # or a plug-in, "module.path:Class"
#: fields that may change when a study is resumed (everything else must match the frozen config)
SAFE_TO_CHANGE = (
    "search.trials", "search.time_limit", "search.failure_limit", "search.step_budget",
    "search.heartbeat_grace",
    "search.driver", "search.ray.address", "search.ray.cpus_per_trial", "search.ray.gpus_per_trial",
    "search.ray.max_concurrent", "search.ray.max_retries",
)  # fmt: skip


@dataclass(frozen=True)
class Halving:
    enabled: bool = False
    eta: int = 3
    min_steps: int = 0  # first rung; 0 = finetune_steps / eta**2


@dataclass(frozen=True)
class LatencySettings:
    mode: str = "measured"  # measured | table
    #: torch: the deploy form in PyTorch; onnxruntime: exported to ONNX, timed in an ONNX Runtime
    #: session (CPU; the onnx extra), the final report's latency too
    runtime: str = "torch"
    threads: int = 2
    warmup: int = 3
    repeats: int = 20  # at least; more until the median's interval is within `ci`
    ci: float = 0.05  # relative half-width of the 95 % interval of the median latency ratio
    max_repeats: int = 60
    drift: float = 0.25  # the teacher's time moved more than this: the trial is measured again
    # table mode: the median relative error of the checks that keeps the table trusted, and which
    # trials are checked (the first `check_first`, then every `check_every`-th)
    table_bound: float = 0.15
    check_first: int = 5
    check_every: int = 10


@dataclass(frozen=True)
class RaySettings:
    address: str = "local"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 2
    #: times Tune restarts a trial whose worker or node was lost (it resumes from its checkpoint)
    max_retries: int = 3


@dataclass(frozen=True)
class SearchSettings:
    driver: str = "optuna"
    sampler: str = "nsga2"
    trials: int = 20
    time_limit: float | None = None  # seconds, per invocation
    step_budget: int | None = None  # total fine-tune steps over all trials
    seed: int = 0
    storage: str | None = None  # None: SQLite in the study folder; "journal"; or a database URL
    finetune_steps: int = 100
    cache_batches: int = 64
    baselines: bool = True
    #: a candidate whose latency or size breaks a hard bound is recorded, not fine-tuned
    screen: bool = True
    #: a new study first checks that its latency and size bounds are reachable at all
    #: (compsearch.search.preflight) and stops with the fix where they are not
    preflight: bool = True
    #: one-shot ILP recipes (along a ladder of cost bounds) enqueued after the baselines; 0 = none
    plans: int = 4
    #: teacher-cache batches each sensitivity measurement averages over
    sensitivity_batches: int = 2
    #: keep every trained trial's artifact (trials/<n>/model.safetensors), e.g. to evaluate a
    #: front on the test split later; off by default, since a large model's artifacts add up
    save_models: bool = False
    failure_limit: int = 10
    #: seconds without a heartbeat after which a running trial's worker counts as dead (any host)
    heartbeat_grace: float = 120.0
    population_size: int = 8
    halving: Halving = field(default_factory=Halving)
    ray: RaySettings = field(default_factory=RaySettings)


@dataclass(frozen=True)
class FinalSettings:
    steps: int = 1000
    checkpoint_every: int = 100


@dataclass(frozen=True)
class StudyConfig:
    study: str
    task: str
    device: str = "cpu"
    space: SpaceConfig = field(default_factory=SpaceConfig)
    objectives: tuple[str, ...] = ("accuracy", "latency_ms", "size_bytes")
    latency: LatencySettings = field(default_factory=LatencySettings)
    constraints: tuple[Constraint, ...] = ()
    search: SearchSettings = field(default_factory=SearchSettings)
    final: FinalSettings = field(default_factory=FinalSettings)
    raw: dict = field(default_factory=dict, compare=False)  # the plain data it was read from


def config_digest(raw: dict) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _duration(value: Any, path: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", str(value))
    if not match or isinstance(value, bool):
        raise _S.fail(path, "a positive duration like 600, '10m' or '2h'", value)
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def _storage(value: Any, path: str) -> str | None:
    if value is None:
        return None
    text = _S.string(what="'journal' or a database URL")(value, path)
    if re.fullmatch(r"sqlite(\+\w+)?://(/(:memory:)?)?", text):
        raise ConfigError(
            f"{path}: expected a storage that outlives this process, but {text!r} is an in-memory "
            "SQLite database. Leave storage out for a SQLite file in the study folder, or give "
            "sqlite:///path/to/study.db."
        )
    if text == "journal" or re.match(r"^(sqlite|postgresql|postgres|mysql|redis)(\+\w+)?://", text):
        return text
    raise ConfigError(
        f"{path}: expected 'journal' (a journal file in the study folder) or a database URL "
        "(sqlite:///path.db, postgresql://user@host/db, mysql://..., redis://host:port/0), "
        f"but got {text!r}. Leave it out for the embedded SQLite default."
    )


def _plugin_or(names: tuple[str, ...], what: str):
    """A built-in name, or a plug-in named 'module.path:attribute' (imported when it is used)."""

    def check(value: Any, path: str) -> str:
        if isinstance(value, str) and (value in names or re.fullmatch(r"[\w.]+:\w+", value)):
            return value
        raise _S.fail(path, f"one of {', '.join(repr(n) for n in names)} or 'module.path:{what}'",
                      value)  # fmt: skip

    return check


def _objectives(value: Any, path: str) -> tuple[str, ...]:
    names = _S.list_of(_plugin_or(tuple(OBJECTIVES), "Class"))(value, path)
    if "accuracy" not in names or len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(
            f"{path}: expected 'accuracy' and at least one cost objective "
            f"({', '.join(n for n in OBJECTIVES if n != 'accuracy')} or 'module.path:Class'), "
            f"each once, but got {list(names)}."
        )
    return names


def _constraints(value: Any, path: str) -> tuple[Constraint, ...]:
    data = _S.mapping(value, path)
    return tuple(parse_constraint(k, v, f"{path}.{k}") for k, v in data.items())


def parse_config(data: Any, source: str = "config") -> StudyConfig:
    """Check plain data (a parsed YAML mapping) and build the :class:`StudyConfig`."""
    halving_fields = {
        "enabled": _S.boolean(),
        "eta": _S.integer(2, 10),
        "min_steps": _S.integer(0, None),
    }
    ray_fields = {
        "address": _S.string(
            r"local|auto|ray://[^\s:/]+:\d+|[^\s:/]+:\d+",
            "'local', 'auto', 'host:port' (a cluster's GCS) or 'ray://host:port' (Ray Client)",
        ),
        "cpus_per_trial": _S.number(0.0, None, lo_open=True),
        "gpus_per_trial": _S.number(0.0, None),
        "max_concurrent": _S.integer(1, 10_000),
        "max_retries": _S.integer(0, 100),
    }
    search_fields = {
        "driver": _plugin_or(DRIVERS, "Class"),
        "sampler": _plugin_or(SAMPLERS, "factory"),
        "trials": _S.integer(1, 1_000_000),
        "time_limit": _duration,
        "step_budget": _S.integer(1, None),
        "seed": _S.integer(0, 2**31 - 1),
        "storage": _storage,
        "finetune_steps": _S.integer(0, None),
        "cache_batches": _S.integer(1, 100_000),
        "baselines": _S.boolean(),
        "screen": _S.boolean(),
        "preflight": _S.boolean(),
        "plans": _S.integer(0, 20),
        "sensitivity_batches": _S.integer(1, 1000),
        "save_models": _S.boolean(),
        "failure_limit": _S.integer(1, None),
        "heartbeat_grace": _S.number(5.0, None),
        "population_size": _S.integer(2, 10_000),
        "halving": lambda v, p: Halving(**_S.record(v, p, halving_fields)),
        "ray": lambda v, p: RaySettings(**_S.record(v, p, ray_fields)),
    }
    latency_fields = {
        "mode": _S.one_of(("measured", "table")),
        "runtime": _S.one_of(("torch", "onnxruntime")),
        "threads": _S.integer(1, 1024),
        "warmup": _S.integer(0, 1000),
        "repeats": _S.integer(1, 10_000),
        "ci": _S.number(0.0, 1.0),
        "max_repeats": _S.integer(1, 100_000),
        "drift": _S.number(0.0, 10.0, lo_open=True),
        "table_bound": _S.number(0.0, 1.0, lo_open=True),
        "check_first": _S.integer(1, 1_000_000),
        "check_every": _S.integer(1, 1_000_000),
    }
    fields = {
        "study": _S.string(
            r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", "a name of letters, digits, '_', '.', '-'"
        ),
        "task": _S.string(what="a built-in task name or 'module.path:factory'"),
        "device": _S.one_of(("cpu", "cuda")),
        "space": parse_space,
        "objectives": _objectives,
        "latency": lambda v, p: LatencySettings(**_S.record(v, p, latency_fields)),
        "constraints": _constraints,
        "search": lambda v, p: SearchSettings(**_S.record(v, p, search_fields)),
        "final": lambda v, p: FinalSettings(
            **_S.record(
                v, p, {"steps": _S.integer(0, None), "checkpoint_every": _S.integer(1, None)}
            )
        ),
    }
    parsed = _S.record(data, source, fields, required=("study", "task"))
    config = StudyConfig(**parsed, raw=json.loads(json.dumps(data, default=str)))
    _check_runtime(config, source)
    halving = config.search.halving
    if halving.enabled and halving.min_steps and halving.min_steps >= config.search.finetune_steps:
        raise ConfigError(
            f"{child(source, 'search')}.halving.min_steps: expected fewer than search.finetune_steps "
            f"({config.search.finetune_steps}), but got {halving.min_steps}."
        )
    return config


def _check_runtime(config: StudyConfig, source: str) -> None:
    latency = config.latency
    if latency.runtime == "torch":
        return
    where = f"{child(source, 'latency')}.runtime"
    if config.device != "cpu":
        raise ConfigError(f"{where}: onnxruntime is timed on the CPU; expected device: cpu, but "
                          f"got {config.device!r}. Use runtime: torch on a GPU.")  # fmt: skip
    if latency.mode != "measured":
        raise ConfigError(f"{where}: expected latency.mode: measured with onnxruntime (the table "
                          f"predicts PyTorch latencies), but got {latency.mode!r}.")  # fmt: skip
    import importlib.util

    missing = [
        m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ConfigError(f"{where}: onnxruntime needs the onnx extra ({', '.join(missing)} not "
                          f"installed): pip install 'compsearch[onnx]'")  # fmt: skip


def read_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"expected a study config file, but {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(yaml_error(path, error)) from None
    if data is None:
        raise ConfigError(f"{path}: expected a study config, but the file is empty.")
    return parse_config(data, source=str(path))


def diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff(a, b, path)
        elif a != b:
            changes.append((path, a, b))
    return changes
