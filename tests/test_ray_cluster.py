"""The cluster path on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
a head and a worker node, one CPU each, and a Ray Client server on the head). Every search runs as
its own process, joined to the cluster the way a user's would be, against the study storage."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from optuna.trial import TrialState

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed: pip install 'compsearch[ray]'"
)
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytest.importorskip("grpc", reason="Ray Client needs grpcio: pip install 'compsearch[ray]'")

NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024**2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    client_port = _free_port()
    made = cluster_utils.Cluster(initialize_head=True,
                                 head_node_args={**NODE, "ray_client_server_port": client_port})  # fmt: skip
    worker = made.add_node(**NODE)
    made.wait_for_nodes()
    made.client_port, made.worker = client_port, worker
    yield made
    made.shutdown()


def study_config(tmp_path, name, address, steps, trials=2, **search):
    data = {
        "study": name,
        "task": "digits",
        "objectives": ["accuracy", "latency_ms", "size_bytes"],
        "latency": {"repeats": 3, "warmup": 1, "max_repeats": 6},
        "constraints": {"accuracy_drop": "10%"},
        "space": {"w_bits": [4, 8], "keep_ratio": {"low": 0.5, "high": 1.0, "step": 0.25},
                  "calibration_batches": 1},
        "search": {"driver": "ray", "sampler": "random", "trials": trials, "finetune_steps": steps,
                   "cache_batches": 2, "baselines": False, "preflight": False,
                   "ray": {"address": address, "max_concurrent": 2, "cpus_per_trial": 1},
                   **search},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def search(path, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "compsearch", "search", str(path), *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def trials_of(runs_root, name):
    from compsearch.search import StudyFolder
    from compsearch.search.study import open_study

    folder = StudyFolder(runs_root / name)
    return open_study(folder.frozen(), folder).get_trials()


def output(run) -> str:
    return run.stdout[-4000:] + run.stderr[-4000:]


def test_trials_land_on_both_nodes_and_a_finished_study_runs_more(tmp_path, runs_root, cluster):
    name = f"rc-{uuid.uuid4().hex[:6]}"
    path = study_config(tmp_path, name, cluster.address, 60)
    first = search(path)
    assert first.returncode == 0, output(first)
    assert f"joined the Ray cluster at {cluster.address}: 2 node(s), 2 CPUs" in first.stderr
    assert "Number of trials" not in first.stdout and "tensorboard" not in first.stdout
    assert "trials requested 2; this run: 2 completed" in first.stdout
    more = search(path, "--trials", "4")  # a finished study, extended
    assert more.returncode == 0, output(more)
    assert "trials requested 4; this run: 2 completed" in more.stdout
    trials = trials_of(runs_root, name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["node"] for t in trials}) == 2, "trials ran on both nodes"


def test_ray_client_address_runs_the_search(tmp_path, runs_root, cluster):
    name = f"rcc-{uuid.uuid4().hex[:6]}"
    address = f"ray://127.0.0.1:{cluster.client_port}"
    run = search(study_config(tmp_path, name, address, 20))
    assert run.returncode == 0, output(run)
    assert f"joined the Ray cluster at {address}" in run.stderr
    assert [t.state for t in trials_of(runs_root, name)] == [TrialState.COMPLETE] * 2


def _checkpointed_on(runs_root, name, node_id):
    """The number of a running trial on ``node_id`` that saved a checkpoint, or None."""
    try:
        trials = trials_of(runs_root, name)
    except Exception:  # the study is not written yet
        return None
    for trial in trials:
        on_node = node_id[:12] in trial.user_attrs.get("node", "")
        saved = runs_root / name / "trials" / f"{trial.number:05d}" / "checkpoints"
        if trial.state == TrialState.RUNNING and on_node and list(saved.glob("stage-*/*.json")):
            return trial.number
    return None


def test_a_lost_node_costs_only_its_trials_progress(tmp_path, runs_root, cluster):
    name = f"rcl-{uuid.uuid4().hex[:6]}"
    path = study_config(tmp_path, name, cluster.address, 1200)
    driver = subprocess.Popen([sys.executable, "-m", "compsearch", "search", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline, lost = time.monotonic() + 300, None
        while lost is None and time.monotonic() < deadline and driver.poll() is None:
            lost = _checkpointed_on(runs_root, name, cluster.worker.node_id)
            time.sleep(0.2)
        assert lost is not None, "no trial on the worker node saved a checkpoint"
        cluster.remove_node(cluster.worker, allow_graceful=False)  # its raylet and workers die
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
    trials = trials_of(runs_root, name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, "exactly the requested trials"
    retried = trials[lost]
    assert retried.user_attrs["retries"], "the loss is recorded"
    assert cluster.worker.node_id[:12] in retried.user_attrs["retries"][0]["node"]
    assert "actor" in retried.user_attrs["retries"][0]["cause"].lower(), "the cause, in words"
    assert retried.user_attrs["resumed_from_step"] >= 300, "resumed from its checkpoint"
    assert "1 retried after a lost worker" in stdout


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) to hide a path")
def test_a_node_without_the_runs_root_is_refused_before_any_trial(tmp_path, runs_root, cluster):
    """A third node whose processes see an empty file system where the runs root should be (a
    private mount namespace with a tmpfs over the runs root's parent)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path}"],
                           capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip("mount namespaces are not permitted here (unshare -m + mount as root)")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    hidden = runs_root.parent
    start = (f"mount -t tmpfs tmpfs {hidden} && exec {ray_cli} start --address={cluster.address} "
             f"--num-cpus=1 --object-store-memory={NODE['object_store_memory']} --block")  # fmt: skip
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", start], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    name = f"rcn-{uuid.uuid4().hex[:6]}"
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        before = len(cluster.list_all_nodes())
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) <= before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert sum(n["Alive"] for n in ray.nodes()) > before, "the extra node joined"
        ray.shutdown()
        run = search(study_config(tmp_path, name, cluster.address, 20))
    finally:
        ray.shutdown()
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
    assert run.returncode == 2, output(run)
    lines = [line for line in run.stderr.splitlines() if "does not see the runs root" in line]
    assert len(lines) == 1, output(run)
    assert not (runs_root / name).exists(), "nothing was written for the study"
