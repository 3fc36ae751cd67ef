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
