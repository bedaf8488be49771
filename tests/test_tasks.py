import pytest
import torch

from compsearch.errors import TaskError
from compsearch.fingerprint import model_fingerprint
from compsearch.tasks import Task, get_task, move
from compsearch.tasks.teacher_cache import cached_state_dict


def test_digits_teacher_is_accurate(digits_task):
    metrics = digits_task.evaluate(digits_task.teacher())
    assert metrics["accuracy"] >= 0.97
    assert digits_task.primary_metric == "accuracy"


def test_mnist_teacher_reaches_97_percent_on_held_out_digits(mnist_task):
    assert len(mnist_task.eval_labels) == 1000
    assert len(mnist_task.train_labels) == 4000
    metrics = mnist_task.evaluate(mnist_task.teacher())
    assert metrics["accuracy"] >= 0.97


def test_mnist_example_inputs_are_a_batch_of_256(mnist_task):
    assert mnist_task.example_inputs()["images"].shape == (256, 1, 28, 28)


def test_minilm_reproduces_published_scores(minilm_task):
    metrics = minilm_task.evaluate(minilm_task.teacher())
    assert metrics["lee50_pearson"] == pytest.approx(0.656, abs=0.01)
    assert metrics["wordsim353_spearman"] == pytest.approx(0.729, abs=0.01)


def test_minilm_training_data_never_contains_evaluated_documents(minilm_task):
    evaluated = set(minilm_task._lee[0])
    assert not evaluated & set(minilm_task.sentences)
    batch = next(minilm_task.train_batches(8, seed=0))
    assert batch["input_ids"].shape[0] == 8
    assert minilm_task.example_inputs()["input_ids"].shape == (32, 128)


def test_teachers_are_fresh_and_independent(digits_task):
    first, second = digits_task.teacher(), digits_task.teacher()
    with torch.no_grad():
        first.fc1.weight.zero_()
    assert second.fc1.weight.abs().sum() > 0
    assert not first.training


def test_train_batches_are_deterministic_per_seed(digits_task):
    a = next(digits_task.train_batches(16, seed=3))
    b = next(digits_task.train_batches(16, seed=3))
    c = next(digits_task.train_batches(16, seed=4))
    assert torch.equal(a["images"], b["images"])
    assert not torch.equal(a["images"], c["images"])


def test_teacher_training_is_deterministic(digits_task, tmp_path):
    first, _ = digits_task._train_teacher()
    second, _ = digits_task._train_teacher()
    assert model_fingerprint(first) == model_fingerprint(second)


def _tiny_trainer(calls):
    def train():
        calls.append(1)
        model = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(model.weight, 0.5)
        return model, {"accuracy": 1.0}

    return train


def test_cache_trains_once_then_loads(tmp_path):
    calls = []
    state, metrics = cached_state_dict(tmp_path, "t", {"a": 1}, _tiny_trainer(calls))
    assert metrics == {"accuracy": 1.0}
    again, metrics_again = cached_state_dict(tmp_path, "t", {"a": 1}, _tiny_trainer(calls))
    assert calls == [1]
    assert torch.equal(state["weight"], again["weight"])
    assert metrics_again == {"accuracy": 1.0}
    cached_state_dict(tmp_path, "t", {"a": 2}, _tiny_trainer(calls))
    assert calls == [1, 1], "changed settings must train a new teacher"


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path, caplog):
    calls = []
    cached_state_dict(tmp_path, "t", {"a": 1}, _tiny_trainer(calls))
    (weights,) = tmp_path.glob("t-*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits inside a weight
    weights.write_bytes(bytes(data))
    state, _ = cached_state_dict(tmp_path, "t", {"a": 1}, _tiny_trainer(calls))
    assert calls == [1, 1]
    assert "failed its checksum" in caplog.text
    assert torch.all(state["weight"] == 0.5)


def test_truncated_cache_is_rebuilt(tmp_path):
    calls = []
    cached_state_dict(tmp_path, "t", {"a": 1}, _tiny_trainer(calls))
    (weights,) = tmp_path.glob("t-*.safetensors")
    weights.write_bytes(weights.read_bytes()[:20])
    cached_state_dict(tmp_path, "t", {"a": 1}, _tiny_trainer(calls))
    assert calls == [1, 1]


def test_unknown_task_names_the_built_ins():
    with pytest.raises(TaskError) as caught:
        get_task("mnsit")
    assert "expected a built-in task (digits, minilm, mnist, smollm, vlm-mnist)" in str(
        caught.value
    )


def test_plugin_module_missing_is_a_task_error():
    with pytest.raises(TaskError, match="expected an importable module 'no_such_pkg.mod'"):
        get_task("no_such_pkg.mod:make")


def test_plugin_factory_must_return_a_task():
    with pytest.raises(TaskError, match="expected the factory to return a compsearch.tasks.Task"):
        get_task("collections:OrderedDict")


def test_plugin_by_import_path(runs_root):
    task = get_task("compsearch.tasks.digits:make_task", runs_root=runs_root)
    assert isinstance(task, Task)
    assert task.name == "digits"


def test_forward_gives_logits_for_a_batch(digits_task):
    model = digits_task.teacher()
    batch = move(digits_task.calibration_batches(1)[0], "cpu")
    outputs = digits_task.forward(model, batch)
    assert outputs.logits.shape == (64, 10)
