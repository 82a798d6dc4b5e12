"""The recipe: YAML loading, defaults, `a.b=value` overrides, and errors that name the key and the fix."""

import pytest
import yaml

from finetune.config import Recipe, build_recipe, load_recipe, parse_override
from finetune.errors import UserError

MINIMAL = {"model": {"path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}, "data": {"path": "./clips"}}


def _write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- loading and defaults ------------------------------------------------------------------------


def test_load_recipe_reads_every_section_from_yaml(tmp_path):
    path = _write(
        tmp_path,
        """
model: {family: wan, path: ./base}
data: {path: ./clips, width: 320, height: 192, frames: 17, trigger: ohwx}
lora: {rank: 8, alpha: 4, targets: [attn1.to_q, attn1.to_k]}
train: {steps: 300, lr: 2.0e-4, optimizer: adamw, schedule: cosine, gradient_checkpointing: false}
memory: {base_dtype: fp8}
output: {dir: ./out, save_every: 0}
""",
    )

    r = load_recipe(path)

    assert (r.model.family, r.model.path) == ("wan", "./base")
    assert (r.data.width, r.data.height, r.data.frames, r.data.trigger) == (320, 192, 17, "ohwx")
    assert (r.lora.rank, r.lora.alpha, r.lora.targets) == (8, 4.0, ["attn1.to_q", "attn1.to_k"])
    assert (r.train.steps, r.train.lr, r.train.optimizer, r.train.schedule) == (300, 2e-4, "adamw", "cosine")
    assert r.train.gradient_checkpointing is False
    assert r.memory.base_dtype == "fp8"
    assert (r.output.dir, r.output.save_every) == ("./out", 0)


def test_only_the_two_paths_are_needed_everything_else_defaults(tmp_path):
    path = _write(tmp_path, "model:\n  path: owner/name\ndata:\n  path: ./clips\n")

    r = load_recipe(path)

    assert r.model.path == "owner/name" and r.model.family is None and r.model.base is None
    assert (r.data.path, r.data.width, r.data.height, r.data.frames) == ("./clips", 832, 480, 81)
    assert (r.data.trigger, r.data.strict) == ("", False)
    assert (r.cache.dir, r.cache.max_sequence_length) == ("./cache", 512)
    assert (r.lora.rank, r.lora.alpha, r.lora.dropout, r.lora.targets) == (32, 32.0, 0.0, "blocks")
    t = r.train
    assert (t.steps, t.lr, t.batch_size, t.grad_accum) == (2000, 1e-4, 1, 1)
    assert (t.optimizer, t.schedule, t.warmup_steps, t.seed) == ("adamw8bit", "constant", 0, 42)
    assert (t.gradient_checkpointing, t.timestep_sampling, t.flow_shift) == (True, "shift", None)
    assert r.memory.base_dtype == "bf16"
    assert (r.output.dir, r.output.save_every) == ("./adapters/my-style", 250)


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_parse_ints_floats_lists_and_booleans(tmp_path):
    path = _write(tmp_path, "model: {path: a/b}\ndata: {path: ./clips, strict: false}\ntrain: {steps: 5}\n")

    r = load_recipe(
        path,
        ["train.steps=10", "train.lr=1e-4", "lora.targets=[a, b]", "data.strict=true", "lora.alpha=0.5"],
    )

    assert r.train.steps == 10 and isinstance(r.train.steps, int)
    assert r.train.lr == pytest.approx(1e-4) and isinstance(r.train.lr, float)
    assert r.lora.targets == ["a", "b"]
    assert r.data.strict is True
    assert r.lora.alpha == 0.5
    assert r.data.path == "./clips"  # a sibling key in the section the override touched is kept


def test_override_creates_a_section_missing_from_the_yaml():
    r = build_recipe({"model": {"path": "a/b"}}, ["data.path=./clips", "output.dir=/tmp/x=y"])

    assert r.data.path == "./clips"
    assert r.output.dir == "/tmp/x=y"  # only the first '=' separates key from value


def test_build_recipe_does_not_mutate_the_given_tree():
    tree = {"model": {"path": "a/b"}, "data": {"path": "./clips"}, "train": {"steps": 5}}

    build_recipe(tree, ["train.steps=7"])

    assert tree["train"]["steps"] == 5


def test_parse_override_returns_key_and_yaml_value():
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override(" train.seed =3") == ("train.seed", 3)
    assert parse_override("data.trigger=") == ("data.trigger", "")


def test_override_without_equals_is_an_error():
    message = _error(build_recipe, MINIMAL, ["train.steps"])

    assert "train.steps" in message and "KEY=VALUE" in message


# --- unknown keys --------------------------------------------------------------------------------


def test_unknown_key_in_yaml_names_it_and_suggests_the_closest(tmp_path):
    path = _write(tmp_path, "model: {path: a/b}\ndata: {path: ./clips}\ntrain: {stpes: 10}\n")

    message = _error(load_recipe, path)

    assert "unknown key 'train.stpes'" in message
    assert "did you mean 'train.steps'" in message
    assert str(path) in message


def test_unknown_section_in_yaml_suggests_the_section(tmp_path):
    path = _write(tmp_path, "model: {path: a/b}\ndata: {path: ./clips}\ntrian: {steps: 10}\n")

    message = _error(load_recipe, path)

    assert "unknown key 'trian'" in message and "did you mean 'train'" in message


def test_unknown_key_in_override_names_it_and_suggests_the_closest():
    message = _error(build_recipe, MINIMAL, ["train.stpes=10"])

    assert "unknown key 'train.stpes'" in message
    assert "did you mean 'train.steps'" in message


def test_unknown_key_with_nothing_close_has_no_suggestion():
    message = _error(build_recipe, MINIMAL, ["zzzz.qqqq=1"])

    assert "unknown key 'zzzz.qqqq'" in message
    assert "did you mean" not in message


# --- wrong values --------------------------------------------------------------------------------


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    path = _write(tmp_path, "model: {path: a/b}\ndata: {path: ./clips}\ntrain: {steps: ten}\n")

    message = _error(load_recipe, path)

    assert "train.steps" in message and "'ten'" in message
    assert "expected an integer" in message


def test_fractional_integer_and_bad_boolean_are_rejected():
    assert "train.steps = 1.5: expected an integer" in _error(build_recipe, MINIMAL, ["train.steps=1.5"])
    message = _error(build_recipe, MINIMAL, ["train.gradient_checkpointing=maybe"])
    assert "train.gradient_checkpointing" in message and "expected true or false" in message


def test_union_type_error_is_one_line_listing_both_types():
    message = _error(build_recipe, MINIMAL, ["lora.targets=5"])

    assert message.count("\n") == 0
    assert "lora.targets" in message and "a string" in message and "a list" in message


def test_literal_error_lists_the_allowed_values():
    message = _error(build_recipe, MINIMAL, ["train.optimizer=sgd"])

    assert "train.optimizer" in message and "'sgd'" in message
    assert "'adamw'" in message and "'adamw8bit'" in message


def test_out_of_range_value_is_an_error():
    message = _error(build_recipe, MINIMAL, ["lora.rank=0"])

    assert "lora.rank" in message


def test_missing_data_section_names_data_path(tmp_path):
    path = _write(tmp_path, "model: {path: a/b}\n")

    message = _error(load_recipe, path)

    assert "'data.path' is required" in message
    assert "model.path" not in message  # only what is missing


def test_empty_recipe_names_both_required_keys(tmp_path):
    message = _error(load_recipe, _write(tmp_path, ""))

    assert "'model.path' is required" in message and "'data.path' is required" in message


# --- files ---------------------------------------------------------------------------------------


def test_missing_recipe_file_is_a_user_error(tmp_path):
    message = _error(load_recipe, tmp_path / "nope.yaml")

    assert "nope.yaml" in message and "not found" in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "model:\n  path: a/b\ndata:\n  path: ./clips\ntrain:\n  steps: [1\n")

    message = _error(load_recipe, path)

    assert "not valid YAML" in message
    assert "line 7" in message  # the unclosed list runs to the end of the file: line 7


def test_yaml_that_is_not_a_mapping_is_a_user_error(tmp_path):
    message = _error(load_recipe, _write(tmp_path, "- model\n- data\n"))

    assert "mapping" in message


# --- round trip and digest -----------------------------------------------------------------------


def test_to_yaml_round_trips_to_an_equal_recipe():
    r = build_recipe(
        MINIMAL,
        ["lora.targets=[attn1.to_q, ffn.net.2]", "train.lr=3e-5", "train.flow_shift=5", "data.trigger=ohwx"],
    )

    again = build_recipe(yaml.safe_load(r.to_yaml()))

    assert isinstance(again, Recipe)
    assert again == r
    assert again.digest() == r.digest()


def test_digest_changes_when_any_value_changes():
    base = build_recipe(MINIMAL)

    assert build_recipe(MINIMAL).digest() == base.digest()
    assert len(base.digest()) == 12
    changed = {
        build_recipe(MINIMAL, [o]).digest() for o in ["train.steps=2001", "lora.rank=16", "data.trigger=x"]
    }
    assert base.digest() not in changed
    assert len(changed) == 3


# --- the model section: families and where the weights are (finetune.models) -----------------------


def test_wan_frame_rule_and_size_multiple():
    from finetune.models import get_family

    wan = get_family("wan")

    assert [wan.valid_frames(n) for n in (81, 80, 77, 5, 4, 3, 1)] == [81, 77, 77, 5, 1, 1, 1]
    assert wan.size_multiple == 16  # VAE 8x times patch 2


def test_unknown_family_is_a_user_error():
    from finetune.models import get_family

    assert "known: cogvideox, hunyuan, ltx, wan" in _error(get_family, "sora")


def test_resolve_source_hub_id(tmp_path, monkeypatch):
    from finetune.config import ModelConfig
    from finetune.models import resolve_source

    monkeypatch.chdir(tmp_path)
    source = resolve_source(ModelConfig(path="owner/name"))

    assert (source.transformer, source.transformer_is_file, source.base) == (
        "owner/name",
        False,
        "owner/name",
    )


def test_resolve_source_local_pipeline_folder(tmp_path):
    from finetune.config import ModelConfig
    from finetune.models import resolve_source

    (tmp_path / "model_index.json").write_text("{}")

    source = resolve_source(ModelConfig(path=str(tmp_path)))

    assert (source.transformer, source.transformer_is_file, source.base) == (
        str(tmp_path),
        False,
        str(tmp_path),
    )


def test_resolve_source_single_file_with_base(tmp_path):
    from finetune.config import ModelConfig
    from finetune.models import resolve_source

    weights = tmp_path / "wan.safetensors"
    weights.write_bytes(b"")

    source = resolve_source(ModelConfig(path=str(weights), base="owner/name"))

    assert (source.transformer, source.transformer_is_file, source.base) == (str(weights), True, "owner/name")


def test_resolve_source_errors(tmp_path, monkeypatch):
    from finetune.config import ModelConfig
    from finetune.models import resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "not-a-pipeline").mkdir()

    assert ".safetensors" in _error(resolve_source, ModelConfig(path="model.bin"))
    assert "model.base" in _error(resolve_source, ModelConfig(path="model.safetensors"))
    assert "'./nope'" in _error(resolve_source, ModelConfig(path="./nope"))
    assert "model_index.json" in _error(resolve_source, ModelConfig(path="not-a-pipeline"))
    assert "model.base" in _error(resolve_source, ModelConfig(path="model.safetensors", base="./nope"))


def test_an_empty_section_means_its_defaults():
    recipe = build_recipe({"model": {"path": "o/n"}, "data": {"path": "d"}, "train": None})
    assert recipe.train.steps == 2000


@pytest.mark.parametrize("typed,expected", [("2024", "2024"), ("yes", "yes"), ("#x", "#x"), ("a b", "a b")])
def test_text_keys_keep_the_text_typed(typed, expected):
    assert (
        build_recipe(
            {"model": {"path": "o/n"}, "data": {"path": "d"}}, [f"data.trigger={typed}"]
        ).data.trigger
        == expected
    )
