import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compsearch.errors import TaskError
from compsearch.kernels.prune import analyze, prune_
from compsearch.recipes import LayerPlan
from compsearch.search import parse_config
from compsearch.spaces import Space, discover
from compsearch.tasks import get_task


@pytest.fixture(scope="module")
def vlm_task(runs_root):
    return get_task("vlm-mnist", runs_root=runs_root)


@pytest.fixture(scope="module")
def vlm_info(vlm_task):
    return discover(vlm_task)


def test_vlm_teacher_answers_held_out_digits(vlm_task):
    metrics = vlm_task.evaluate(vlm_task.teacher())
    assert metrics["answer_accuracy"] >= 0.95
    assert len(vlm_task.eval_labels) == 1000


def test_regions_of_the_llava_model(vlm_info):
    assert vlm_info.regions == {
        "vision": ["model.vision_tower"],
        "projector": ["model.multi_modal_projector"],
        "language": ["model.language_model", "lm_head"],
    }
    assert vlm_info.region_of("model.vision_tower.encoder.layers.0.mlp.fc1") == "vision"
    assert vlm_info.region_of("model.multi_modal_projector.linear_1") == "projector"
    assert vlm_info.region_of("lm_head") == "language"
    heads = vlm_info.groups["model.language_model.layers.0.self_attn"]
    assert heads.kind == "heads" and heads.size == 2 and heads.q_per_kv == 3


def test_projector_stays_at_8_bits_and_unpruned_by_default(vlm_info):
    config = parse_config({"study": "v", "task": "vlm-mnist",
                           "space": {"w_bits": [4, 8, 16], "grouping": "per_region"}})  # fmt: skip
    space = Space.build(config.space, vlm_info, "vlm-mnist")
    projector = [u for u in space.quant_units if "multi_modal_projector" in u.name]
    assert projector and all(f.w_bits >= 8 for u in projector for f in u.choices)
    kept = {g for u in space.keep_units for g in u.groups}
    for name, group in vlm_info.groups.items():
        if any(layer.startswith("model.multi_modal_projector") for layer in group.layers):
            assert name not in kept, f"{name} touches the projector and must stay unpruned"
    off = parse_config({"study": "v", "task": "vlm-mnist",
                        "space": {"w_bits": [4, 8], "defaults": {"projector": False}}})  # fmt: skip
    relaxed = Space.build(off.space, vlm_info, "vlm-mnist")
    assert any(
        f.w_bits == 4 for u in relaxed.quant_units if "projector" in u.name for f in u.choices
    )


def test_pruning_grouped_query_heads_keeps_generation_working(vlm_task):
    model = vlm_task.teacher()
    batch = vlm_task.calibration_batches(1)[0]

    def run(m):
        return vlm_task.forward(m, batch)

    analysis = analyze(model, run)
    plans = {name: LayerPlan(keep_ratio=0.5) for name, group in analysis.groups.items()
             if group.kind == "heads" and name.startswith("model.language_model")}  # fmt: skip
    prune_(model, plans, run)
    attention = model.model.language_model.layers[0].self_attn
    assert attention.k_proj.out_features == 16 and attention.q_proj.out_features == 48
    prompt = vlm_task.encode(vlm_task.eval_images[:2], vlm_task.eval_labels[:2], [0, 1])
    length = int(prompt["attention_mask"][0].sum()) - 2  # up to "answer :"
    with torch.no_grad():
        generated = model.generate(input_ids=prompt["input_ids"][:, :length],
                                   pixel_values=prompt["pixel_values"],
                                   max_new_tokens=2, do_sample=False)  # fmt: skip
    assert generated.shape == (2, length + 2)


def _tiny_causal_lm(folder):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(Path(_lee()).read_text(encoding="latin-1").lower().split()))[:500]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>")  # fmt: skip
    config = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1100)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def _lee():
    import gensim

    return os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee.cor")


def test_hf_task_loads_a_users_causal_lm_from_a_folder(tmp_path):
    from compsearch.pipeline import compress
    from compsearch.recipes import FinetuneBudget, Recipe

    _tiny_causal_lm(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    assert task.primary_metric == "perplexity" and task.direction == "minimize"
    teacher = task.evaluate(task.teacher())
    assert 1 < teacher["perplexity"] < 1e6
    recipe = Recipe(layers={"re:.*mlp.*": LayerPlan(w_bits=4)},
                    finetune=FinetuneBudget(steps=2, lr=1e-4))  # fmt: skip
    result = compress(task, recipe)
    assert torch.isfinite(torch.tensor(task.evaluate(result.deployed)["perplexity"]))


def test_causal_lm_validation_and_test_are_disjoint_halves_of_lee(tmp_path):
    _tiny_causal_lm(tmp_path)
    task = get_task(f"hf:{tmp_path}")
    with open(_lee(), encoding="latin-1") as stream:
        documents = [line for line in stream.read().splitlines() if line.strip()]
    validation = task.eval_part("validation").split("\n")
    test = task.eval_part("test").split("\n")
    assert len(validation) == len(test) == 25
    assert not set(validation) & set(test) and set(validation) | set(test) == set(documents)
    assert not [d for d in documents if d[:200] in task.train_text], "Lee-50 text is trained on"
    teacher = task.teacher()
    assert task.evaluate(teacher, "validation") != task.evaluate(teacher, "test")


def test_hf_task_from_an_unreachable_hub_says_how_to_fix_it():
    code = (
        "from compsearch.tasks import get_task\n"
        "try:\n    get_task('hf:some-org/not-here')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120).stdout  # fmt: skip
    assert out.startswith("TaskError")
    assert "huggingface-cli download some-org/not-here --local-dir DIR" in out


def test_hf_classifier_without_a_data_hook_asks_for_one(tmp_path):
    import transformers as tf

    config = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=3)  # fmt: skip
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(TaskError, match="needs its data from a hook: hf:.*@module.path:function"):
        get_task(f"hf:{tmp_path}")


@pytest.mark.slow
def test_smollm_perplexity_on_both_halves():
    task = get_task("smollm")
    teacher = task.teacher()
    validation = task.evaluate(teacher, "validation")["perplexity"]
    test = task.evaluate(teacher, "test")["perplexity"]
    assert 10 < validation < 60 and 10 < test < 60 and validation != test


def tiny_classifier_data(model_path, kind, processor):
    """A data hook for a tiny sequence classifier: fixed random token batches, labels 0-2."""
    from compsearch.tasks.language import HFData

    generator = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(3, 50, (8, 12), generator=generator)
        labels = torch.randint(0, 3, (8,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return HFData(train=[batch() for _ in range(4)], eval=[batch() for _ in range(4)])


def test_an_hf_task_with_a_data_hook_keeps_the_hook_in_its_name_and_splits(tmp_path):
    import transformers as tf

    config = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=3)  # fmt: skip
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path)
    spec = f"hf:{tmp_path}@test_vlm_llm:tiny_classifier_data"
    task = get_task(spec)
    assert task.name == spec, "recipes name the task with its hook, so train and evaluate replay it"
    validation, test = task.data.part("validation"), task.data.part("test")
    assert len(validation) == len(test) == 2 and not any(v is t for v in validation for t in test)
    teacher = task.teacher()
    assert task.evaluate(teacher, "validation") != task.evaluate(teacher, "test")


def test_vlm_regions_search_calibration_methods_and_the_projector_keeps_8_bits(vlm_task, vlm_info):
    from compsearch.pipeline import compress
    from compsearch.recipes import FinetuneBudget, Recipe

    config = parse_config({"study": "v", "task": "vlm-mnist", "space": {
        "w_bits": [4, 8], "a_bits": [16], "granularity": ["per_group"], "group_size": [32],
        "method": ["rtn", "gptq", "awq"], "grouping": "per_region"}})  # fmt: skip
    space = Space.build(config.space, vlm_info, "vlm-mnist")
    by_region = {u.name: {f.label for f in u.choices} for u in space.quant_units}
    language = set().union(*(labels for name, labels in by_region.items() if "language" in name))
    assert {"w4g32", "w4g32-gptq", "w4g32-awq"} <= language
    projector = [labels for name, labels in by_region.items() if "projector" in name]
    assert projector and all(not any(x.startswith("w4") for x in p) for p in projector)
    plan = LayerPlan(w_bits=4, group_size=32, method="gptq")
    recipe = Recipe(layers={"re:model\\.language_model\\..*_proj$": plan},
                    finetune=FinetuneBudget(steps=0))  # fmt: skip
    result = compress(vlm_task, recipe)
    assert result.quant_report.rounding and all(
        k.startswith("model.language_model.") for k in result.quant_report.rounding
    )
    teacher = vlm_task.evaluate(vlm_task.teacher())["answer_accuracy"]
    assert vlm_task.evaluate(result.deployed)["answer_accuracy"] >= teacher - 0.05
