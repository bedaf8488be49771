import pytest
import yaml

from compsearch.errors import RecipeError
from compsearch.recipes import (
    DistillPlan,
    LayerPlan,
    Provenance,
    Recipe,
    dumps,
    loads,
    read_recipe,
    validate,
    write_recipe,
)
from compsearch.tasks.models import DigitsCNN


def full_recipe() -> Recipe:
    return Recipe(
        layers={
            "re:features\\.\\d+": LayerPlan(w_bits=4, a_bits=8),
            "fc1": LayerPlan(w_bits=8, granularity="per_group", group_size=32, keep_ratio=0.5),
            "fc2": LayerPlan(w_bits=16),
        },
        order="quantize_first",
        distill=DistillPlan(alpha=0.7, temperature=3.0, feature_layers=("fc1",)),
        provenance=Provenance(task="digits", study="s", trial=3, measured={"accuracy": 0.97}),
    )


def recipe_text(layers: str) -> str:
    return f"version: 1\nlayers:\n{layers}\n"


def test_round_trip_through_yaml_is_identity(tmp_path):
    recipe = full_recipe()
    assert loads(dumps(recipe)) == recipe
    path = write_recipe(recipe, tmp_path / "r.yaml")
    assert read_recipe(path) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_written_file_is_plain_yaml_with_version():
    data = yaml.safe_load(dumps(full_recipe()))
    assert data["version"] == 1
    assert data["layers"]["fc1"] == {
        "w_bits": 8,
        "granularity": "per_group",
        "group_size": 32,
        "keep_ratio": 0.5,
    }


def test_exact_key_wins_then_regex_fills_unset_fields():
    recipe = Recipe(layers={"re:.*": LayerPlan(w_bits=4, a_bits=8), "fc2": LayerPlan(w_bits=8)})
    assert recipe.plan_for("fc2") == LayerPlan(w_bits=8, a_bits=8)
    assert recipe.plan_for("fc1") == LayerPlan(w_bits=4, a_bits=8)


def test_group_size_implies_per_group():
    plan = LayerPlan.from_dict({"group_size": 64})
    assert plan.granularity == "per_group"


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            "  fc1: {w_bit: 4}",
            "recipe.layers['fc1']: unknown key 'w_bit'; the allowed keys are: a_bits, "
            "granularity, group_size, keep, keep_ratio, method, smooth, w_bits, w_format. Did you mean 'w_bits'?",
        ),
        (
            "  fc1: {w_bits: 7.5}",
            "recipe.layers['fc1'].w_bits: expected one of 2, 3, 4, 5, 6, 7, 8, 16 "
            "(16 keeps the weight in float), but got 7.5.",
        ),
        (
            "  fc1: {keep_ratio: 1.4}",
            "recipe.layers['fc1'].keep_ratio: expected a number in (0.0, 1.0], but got 1.4.",
        ),
        (
            "  fc1: {keep_ratio: 0}",
            "recipe.layers['fc1'].keep_ratio: expected a number in (0.0, 1.0], but got 0.0.",
        ),
        (
            "  fc1: {w_bits: true}",
            "recipe.layers['fc1'].w_bits: expected one of 2, 3, 4, 5, 6, 7, 8, 16",
        ),
        ("  fc1: {a_bits: 4}", "recipe.layers['fc1'].a_bits: expected one of 8, 16"),
        ("  fc1: {group_size: 48}", "recipe.layers['fc1'].group_size: expected one of 32, 64, 128"),
        (
            "  fc1: {granularity: per_group}",
            "recipe.layers['fc1'].group_size: expected one of 32, 64, 128 because granularity",
        ),
        ("  're:(': {w_bits: 4}", "expected a valid regular expression after 're:'"),
        ("  fc1: {w_format: 'int 4'}", "recipe.layers['fc1'].w_format: expected a weight format"),
    ],
)
def test_bad_layer_fields_name_the_field_and_what_is_allowed(layers, message):
    with pytest.raises(RecipeError) as caught:
        loads(recipe_text(layers))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 2\nlayers: {}\n", "recipe.version: expected 1"),
        ("layers: {}\n", "recipe: the key 'version' is required but missing."),
        ("version: 1\nlayer: {}\n", "recipe: unknown key 'layer'"),
        (
            "version: 1\ndistill: {alpha: -0.1}\n",
            "recipe.distill.alpha: expected a number in [0.0, 1.0]",
        ),
        (
            "version: 1\ndistill: {temperature: 0}\n",
            "recipe.distill.temperature: expected a number > 0.0",
        ),
        ("version: 1\nfinetune: {steps: -1}\n", "recipe.finetune.steps: expected an integer >= 0"),
        (
            "version: 1\nprune: {importance: magnitude}\n",
            "recipe.prune.importance: expected one of 'l1', 'l2', 'taylor', 'random'",
        ),
        (
            "version: 1\norder: sideways\n",
            "recipe.order: expected one of 'prune_first', 'quantize_first'",
        ),
        (
            "version: 1\nprovenance: {model_fingerprint: abc}\n",
            "recipe.provenance.model_fingerprint: expected 'sha256:<hex>'",
        ),
        ("- 1\n- 2\n", "recipe: expected a mapping"),
        ("", "the file is empty"),
        ("version: [1\n", "does not parse"),
    ],
)
def test_bad_recipes_fail_with_a_message_naming_the_field(text, message):
    with pytest.raises(RecipeError) as caught:
        loads(text)
    assert message in str(caught.value)


def test_truncated_written_recipe_is_refused(tmp_path):
    path = write_recipe(full_recipe(), tmp_path / "r.yaml")
    text = path.read_text()
    cut = text[: text.index("distill:")]
    assert yaml.safe_load(cut)  # the surviving part would parse as a smaller recipe
    path.write_text(cut)
    with pytest.raises(RecipeError, match="truncated"):
        read_recipe(path)


def test_hand_written_recipe_without_markers_is_read():
    recipe = loads("version: 1\nlayers:\n  fc1: {w_bits: 4}\n")
    assert recipe.plan_for("fc1").w_bits == 4


def test_missing_recipe_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        read_recipe(tmp_path / "nope.yaml")


def test_validate_rejects_a_layer_the_model_lacks():
    recipe = Recipe(layers={"fc3": LayerPlan(w_bits=4)})
    with pytest.raises(RecipeError) as caught:
        validate(recipe, DigitsCNN())
    assert str(caught.value) == (
        "recipe.layers['fc3']: expected the fully qualified name of a module of the model, but the "
        "model has no module 'fc3'. Close names: 'fc2', 'fc1'."
    )


def test_validate_rejects_a_pattern_matching_nothing():
    recipe = Recipe(layers={"re:encoder\\..*": LayerPlan(w_bits=4)})
    with pytest.raises(RecipeError, match="matches none"):
        validate(recipe, DigitsCNN())


def test_validate_checks_the_model_fingerprint():
    from compsearch.fingerprint import model_fingerprint

    model = DigitsCNN()
    recipe = Recipe(
        layers={"fc1": LayerPlan(w_bits=4)},
        provenance=Provenance(model_fingerprint=model_fingerprint(model)),
    )
    validate(recipe, model)
    other = DigitsCNN()
    with pytest.raises(RecipeError, match="recipe was made for sha256:"):
        validate(recipe, other)
    validate(recipe, other, check_fingerprint=False)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (LayerPlan(w_bits=4, w_format="fp8"), "recipe.layers['fc1']: expected w_bits 8 with fp8"),
        (LayerPlan(w_bits=4, w_format="int5"), "recipe.layers['fc1'].w_format: expected one of"),
    ],
)
def test_formats_are_checked_by_their_own_class_before_any_work(plan, message):
    from compsearch.pipeline import checked

    with pytest.raises(RecipeError) as caught:
        checked(Recipe(layers={"fc1": plan}))
    assert message in str(caught.value)
