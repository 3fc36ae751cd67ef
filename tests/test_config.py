import re

import pytest

from lexlora.config import config_to_yaml, load_config
from lexlora.errors import ConfigError
from tests.conftest import ROOT

ROOT_CONFIGS = ["configs/smoke.yaml", "configs/file_description.yaml", "configs/file_context_description.yaml", "configs/file_type.yaml"]


def test_public_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\ndata:\n  path: a.jsonl\n")
    config = load_config(path, ["lora.r=16", "data.path=other.jsonl", "train.max_steps=20", "output_dir=out/x"])
    assert (config.lora.r, config.data.path, config.train.max_steps, config.output_dir) == (16, "other.jsonl", 20, "out/x")


def test_yaml_values_kept_when_not_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\n  target_modules: [q, v]\nfusion:\n  mode: prefix\n")
    config = load_config(path)
    assert config.lora.r == 4 and config.lora.target_modules == ["q", "v"] and config.fusion.mode == "prefix"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.r=abc", "lora.r"),
        ("lora.rank=3", "rank"),
        ("fusion.mode=middle", "fusion.mode"),
        ("lora.r=0", "lora.r"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("no_equals_sign", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


@pytest.mark.parametrize("path", ROOT_CONFIGS)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    from tests.conftest import ROOT

    config = load_config(ROOT / path)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_config(saved) == config


def test_file_description_config_is_the_seed_setup():
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs/file_description.yaml")
    assert config.data.target_field == "file_desc" and config.data.lexical_field == "filename"
    assert config.data.splits == {"train": "[:85%]", "validation": "[85%:95%]", "test": "[95%:]"}
    assert config.data.input_template.startswith("Given the following filename")
    assert config.model.random_init is False


def test_evaluation_and_tracking_defaults():
    config = load_config(None)
    train = config.train
    assert (train.eval_metric, train.eval_generate, train.eval_max_rows, train.report_to, train.logging_dir) == (
        "val_loss", None, None, "none", None)
    assert config.data.task == "auto" and train.trackers() == [] and not train.generates
    assert load_config(None, ["train.eval_metric=rougeL"]).train.generates
    assert load_config(None, ["train.eval_generate=true"]).train.generates
    assert load_config(None, ["train.report_to=wandb,tensorboard"]).train.trackers() == ["wandb", "tensorboard"]
    assert load_config(None, ["train.report_to=all"]).train.trackers() == ["tensorboard", "wandb"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.task=regression"], "data.task"),
        (["train.eval_max_rows=0"], "train.eval_max_rows"),
        (["train.report_to=mlflow"], "train.report_to"),
        (["train.report_to=none,wandb"], "train.report_to"),
        (["train.eval_metric=rouge1", "train.eval_generate=false"], "train.eval_generate"),
        (["train.eval_metric= "], "train.eval_metric"),
    ],
)
def test_bad_evaluation_settings_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("train", [{"eval_metric": "rouge1"}, {"eval_generate": True}])
def test_generated_metrics_need_a_validation_split(train):
    from lexlora.config import Config, DataConfig, TrainConfig

    with pytest.raises(ConfigError, match="validation split"):
        Config(data=DataConfig(splits={"train": "[:90%]"}), train=TrainConfig(**train))


@pytest.mark.parametrize("name, kind", [("ddp_multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_example_accelerate_configs_load_with_accelerate(name, kind):
    """configs/accelerate/*.yaml are read by accelerate's own loader (multi-GPU runs cannot be tested here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert loaded.distributed_type.name == kind
    assert loaded.num_processes == 2 and loaded.mixed_precision == "bf16"


# ---- every numeric key has a range, checked on load with the key named ------------------------------

def numeric_keys(cls=None, prefix=""):
    """The dotted keys of every int / float field (Optional or not, bools excluded), recursively."""
    import dataclasses
    import typing

    from lexlora.config import Config

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_keys(hint, f"{prefix}{item.name}.")
            continue
        types = set(typing.get_args(hint)) - {type(None)} or {hint}
        if types & {int, float}:  # bool is a subclass of int, but {bool} & {int, float} is empty
            yield f"{prefix}{item.name}"


def test_every_numeric_key_has_a_rule():
    from lexlora.config import NUMERIC_RULES

    keys = set(numeric_keys())
    assert {"train.learning_rate", "lora.alpha", "data.pad_to_multiple_of", "model.init_seed"} <= keys
    assert "train.fused_optimizer" not in keys and "train.eval_generate" not in keys  # bools
    assert keys == set(NUMERIC_RULES)  # a new numeric key needs a rule; a rule needs a key


def just_outside(rule):
    """A value just outside a Range: below its low end (or at it, when open), else above its high end."""
    return rule.low if rule.low_open else rule.low - 1


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n")
    return path


def rule_keys():
    from lexlora.config import NUMERIC_RULES

    return sorted(NUMERIC_RULES)


@pytest.mark.parametrize("key", rule_keys())
def test_a_value_below_each_range_names_the_key(config_file, key):
    from lexlora.config import NUMERIC_RULES

    rule = NUMERIC_RULES[key]
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config_file))}: {re.escape(key)} must be "):
        load_config(config_file, [f"{key}={just_outside(rule)}"])
    if rule.high is not None:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be in "):
            load_config(config_file, [f"{key}={rule.high + 1}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=-1", "train.learning_rate must be more than 0, got -1.0"),
        ("train.learning_rate=0", "train.learning_rate must be more than 0, got 0.0"),
        ("train.learning_rate=.nan", "train.learning_rate must be a finite number, got nan"),
        ("train.learning_rate=.inf", "train.learning_rate must be a finite number, got inf"),
        ("train.warmup_ratio=2", "train.warmup_ratio must be in [0, 1], got 2.0"),
        ("train.weight_decay=-1", "train.weight_decay must be at least 0, got -1.0"),
        ("train.max_grad_norm=-0.5", "train.max_grad_norm must be at least 0 (0: no clipping), got -0.5"),
        ("lora.alpha=0", "lora.alpha must be more than 0, got 0"),
        ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
        ("fusion.embedding_batch_size=0", "fusion.embedding_batch_size must be at least 1, got 0"),
        ("train.num_workers=-1", "train.num_workers must be at least 0, got -1"),
        ("generation.batch_size=0", "generation.batch_size must be at least 1, got 0"),
        ("train.cpu_threads=0", "train.cpu_threads must be at least 1, got 0"),
        ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of must be at least 1, got 0"),
        ("train.epochs=-2", "train.epochs must be at least 0 (0 only with train.max_steps), got -2"),
        ("train.seed=4294967296", "train.seed must be in [0, 4294967295], got 4294967296"),
        ("data.shuffle_seed=-1", "data.shuffle_seed must be in [0, 4294967295], got -1"),
        ("train.checkpoint_every=-1", "train.checkpoint_every must be at least 0 (0 as null: at epoch ends only), got -1"),
        ("lora.bias=some", "lora.bias must be one of none, all, lora_only; got 'some'"),
    ],
)
def test_out_of_range_values_are_config_errors_naming_the_key(config_file, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    assert str(info.value) == f"{config_file}: {message}"


def test_epochs_zero_needs_max_steps():
    with pytest.raises(ConfigError, match=r"train\.epochs must be at least 1 \(or set train\.max_steps\), got 0"):
        load_config(None, ["train.epochs=0"])
    assert load_config(None, ["train.epochs=0", "train.max_steps=3"]).train.epochs == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.warmup_ratio=0", "train.weight_decay=0", "train.max_grad_norm=0", "train.num_workers=0"],
        ["train.warmup_ratio=1", "train.checkpoint_every=0", "train.seed=0", "model.init_seed=4294967295"],
        ["data.shuffle_seed=0", "data.pad_to_multiple_of=1", "train.cpu_threads=1", "lora.alpha=1"],
        ["train.max_steps=null", "train.epochs=1", "lora.dropout=0.99", "train.learning_rate=1e-8"],
    ],
)
def test_values_at_the_ends_of_the_ranges_load(overrides):
    config = load_config(None, overrides)
    for item in overrides:
        key, _, value = item.partition("=")
        expected = None if value == "null" else float(value)
        assert config.value(key) == expected


def test_python_built_configs_are_checked_too():
    from lexlora.config import Config, TrainConfig

    with pytest.raises(ConfigError, match=r"^train\.learning_rate must be more than 0, got -1$"):
        Config(train=TrainConfig(learning_rate=-1))
    config = Config()
    config.generation.batch_size = 0  # attribute assignment skips __post_init__; training calls check()
    with pytest.raises(ConfigError, match=r"generation\.batch_size must be at least 1, got 0"):
        config.check()
    config.generation.batch_size = None  # not Optional: None is not "unset" here
    with pytest.raises(ConfigError, match=r"generation\.batch_size must be a number, got None"):
        config.check()
    config.generation.batch_size = "8"
    with pytest.raises(ConfigError, match=r"generation\.batch_size must be a number, got '8'"):
        config.check()
