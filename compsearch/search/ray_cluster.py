"""Which Ray cluster a study runs on, and whether every node of it can run the study's trials.

:func:`connect` starts Ray on this machine (``local``) or joins one cluster — ``host:port`` (its GCS),
``ray://host:port`` (Ray Client) or ``auto`` (the one cluster this machine belongs to; refused when
several run here) — with the job environment every trial needs, and says what it attached to.
:func:`check_nodes` runs a tiny task on every node before the first trial: the runs root is there
and is the one this machine writes (not a stale copy), compsearch and torch are the same versions as here, the GPUs
Ray counts are the GPUs torch sees, and some node offers what one trial asks for. It runs before
the study is prepared, so a bad node costs seconds, not a teacher's training; a node that fails any
of these is one line of the refusal, and nothing has been queued or run.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from compsearch.errors import ConfigError
from compsearch.paths import runs_root
from compsearch.search.config import RaySettings

CHECK_PREFIX = ".node-check-"
CHECK_TIMEOUT_S = 120


def job_environment() -> dict:
    """The job's ``runtime_env``: every worker (and, under Ray Client, the remote Tune driver) sees
    the runs root this machine uses, Tune accepts reports without the objectives (a stopped
    trial's), and Tune's own progress tables stay off (compsearch prints one line per event)."""
    return {
        "env_vars": {
            "COMPSEARCH_RUNS": str(runs_root().resolve()),
            "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
            "RAY_AIR_NEW_OUTPUT": "0",
        }
    }


def connect(address: str) -> str:
    """Start or join Ray for a study; returns one line naming the cluster (address, nodes,
    resources). Refuses an ``auto`` that could mean more than one cluster."""
    env = job_environment()
    os.environ.update(env["env_vars"])  # the Tune controller runs here unless under Ray Client
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # "Wrote the latest version of …"
    if ray.is_initialized():
        return describe("using this process's Ray")
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env)
        return describe("started Ray on this machine")
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        from ray._private.services import find_gcs_addresses

        found = sorted(find_gcs_addresses())
        if len(found) > 1:
            raise ConfigError(
                f"search.ray.address: 'auto' is ambiguous here — Ray clusters run at "
                f"{', '.join(found)}. Name the study's cluster: search.ray.address: "
                f"'{found[0]}' (its head's host:port)."
            )
    try:
        _join(address, env)
    except ImportError as error:  # Ray Client needs grpcio
        raise ConfigError(
            f"search.ray.address {address!r}: expected Ray Client to be installed, but "
            f"{error.name or 'a module'!r} is missing. Install it with: pip install "
            "'compsearch[ray]'."
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ConfigError(
            f"search.ray.address {address!r}: expected a running Ray cluster there, but joining it "
            f"failed ({type(error).__name__}: {first}). Start it with 'ray start --head' on the "
            "head node, or set search.ray.address to 'local'."
        ) from None
    return describe(f"joined the Ray cluster at {address}")


def _join(address: str, env: dict) -> None:
    """``ray.init`` on a cluster; a Ray Client connection is tried three times — its server
    occasionally fails to start a client's session process on the first try."""
    attempts = 3 if address.startswith("ray://") else 1
    for attempt in range(attempts):
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
            return
        except ConnectionError:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(2.0)


def describe(what: str) -> str:
    """``what`` and the cluster's live nodes and resources, on one line."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    parts = [f"{_amount(total.get('CPU', 0))} CPUs"]
    if total.get("GPU"):
        parts.append(f"{_amount(total['GPU'])} GPUs")
    each = ", ".join(f"{_node_name(n)}: {_resources(n)}" for n in nodes)
    return f"{what}: {len(nodes)} node(s), {', '.join(parts)} ({each})"


def _amount(value: float) -> str:
    return f"{value:g}"


def _resources(node: dict) -> str:
    resources = node.get("Resources", {})
    text = f"{_amount(resources.get('CPU', 0))} CPU"
    if resources.get("GPU"):
        text += f", {_amount(resources['GPU'])} GPU"
    return text


def _node_name(node: dict) -> str:
    return f"{node.get('NodeManagerHostname', '?')}/{node.get('NodeManagerAddress', '?')}"


def node_report(root: str, token: str) -> dict:
    """What one node sees (runs there, as a Ray task): the runs root and the check file this
    machine just wrote in it, the versions that must match, and the GPUs torch finds."""
    path = Path(root)
    report = {
        "host": socket.gethostname(),
        "root": path.is_dir(),
        "shared": (path / f"{CHECK_PREFIX}{token}").is_file(),
        "compsearch": importlib.metadata.version("compsearch"),
        "torch": importlib.metadata.version("torch"),
    }
    import torch

    report["gpus"] = torch.cuda.device_count()
    return report


def check_nodes(settings: RaySettings) -> list[str]:
    """Run :func:`node_report` on every live node; returns one line per problem ([] when every node
    can run the study's trials)."""
    root = runs_root().resolve()
    token = uuid.uuid4().hex
    check = root / f"{CHECK_PREFIX}{token}"
    root.mkdir(parents=True, exist_ok=True)
    check.write_text(token + "\n")
    try:
        return _check(root, token, settings)
    finally:
        check.unlink(missing_ok=True)


def _check(root: Path, token: str, settings: RaySettings) -> list[str]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(node_report)
    pending = {
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(str(root), token): n
        for n in nodes
    }
    problems: list[str] = []
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=CHECK_TIMEOUT_S)
    here = {"compsearch": importlib.metadata.version("compsearch"),
            "torch": importlib.metadata.version("torch")}  # fmt: skip
    for ref in late:
        problems.append(f"node {_node_name(pending[ref])}: did not answer the node check within "
                        f"{CHECK_TIMEOUT_S} s; check that its raylet is healthy.")  # fmt: skip
    for ref in ready:
        node = pending[ref]
        name = f"node {_node_name(node)}"
        try:
            report = ray.get(ref)
        except Exception as error:  # the task itself could not run there (e.g. no compsearch)
            cause = str(error).strip().splitlines()[-1][:200]
            problems.append(f"{name}: the node check could not run there ({cause}); install the "
                            "same compsearch on every node.")  # fmt: skip
            continue
        problems += [f"{name}: {p}" for p in _node_problems(report, node, root, here)]
    problems += _capacity_problems(nodes, settings)
    return problems


def _node_problems(report: dict, node: dict, root: Path, here: dict) -> list[str]:
    problems = []
    if not report["root"]:
        problems.append(
            f"does not see the runs root {root}; every node must see it at the same path (a "
            "shared file system), or set COMPSEARCH_RUNS to a path they all share."
        )
    elif not report["shared"]:
        problems.append(
            f"sees a different {root} (a copy, not the shared file system this machine writes "
            "to); mount the shared runs root there instead."
        )
    for package in ("compsearch", "torch"):
        if report[package] != here[package]:
            problems.append(
                f"runs {package} {report[package]}, this machine {here[package]}; install the "
                "same version on every node."
            )
    ray_gpus = node.get("Resources", {}).get("GPU", 0)
    if ray_gpus and report["gpus"] < ray_gpus:
        problems.append(
            f"Ray offers {ray_gpus:g} GPUs but torch sees {report['gpus']} there; install a CUDA "
            "build of torch on that node or start its raylet with --num-gpus matching."
        )
    return problems


def _capacity_problems(nodes: list[dict], settings: RaySettings) -> list[str]:
    def fits(node: dict) -> bool:
        resources = node.get("Resources", {})
        return (resources.get("CPU", 0) >= settings.cpus_per_trial
                and resources.get("GPU", 0) >= settings.gpus_per_trial)  # fmt: skip

    if any(fits(n) for n in nodes):
        return []
    largest = max(nodes, key=lambda n: (n.get("Resources", {}).get("GPU", 0),
                                        n.get("Resources", {}).get("CPU", 0)), default=None)  # fmt: skip
    return [
        f"no node offers cpus_per_trial={settings.cpus_per_trial:g} and gpus_per_trial="
        f"{settings.gpus_per_trial:g} (the largest: "
        f"{_resources(largest) if largest else 'none'}); trials would wait forever. Lower "
        "search.ray.cpus_per_trial / gpus_per_trial or add such a node."
    ]
