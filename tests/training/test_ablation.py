"""`lexlora ablate`: the grid's variants, and one tiny grid trained, evaluated and tabulated."""

import json

import pytest

from lexlora.cli import main
from lexlora.errors import ConfigError
from lexlora.training.ablation import parse_grid, run_ablation
from tests.conftest import ROOT, TINY_T5

TINY_YAML = """
model: {{name_or_path: google/flan-t5-small, random_init: true, config_overrides: {overrides}}}
data:
  path: {data}
  input_template: "Describe the file {{filename}}:"
  target_field: description
  splits: {{train: "[:24]", validation: "[24:30]"}}
train: {{max_steps: 2, batch_size: 8, log_every: 1}}
generation: {{max_new_tokens: 3}}
"""


def test_grid_expands_every_combination():
    variants = parse_grid(["fusion=off,prefix", "lora.r=4,8"])
    assert [v.name for v in variants] == ["fusion-off_r-4", "fusion-off_r-8", "fusion-prefix_r-4", "fusion-prefix_r-8"]
    assert variants[0].overrides == ["fusion.enabled=false", "lora.r=4"]
    assert variants[3].overrides == ["fusion.enabled=true", "fusion.mode=prefix", "lora.r=8"]


@pytest.mark.parametrize("axis, message", [("lora.r", "expected KEY=VALUE"), ("fusion=sideways", "fusion takes off or one of")])
def test_bad_grid_axis(axis, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([axis])


def test_tiny_grid_trains_evaluates_and_tabulates(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(overrides=json.dumps(TINY_T5), data=ROOT / "examples" / "python_stdlib.jsonl"))
    rows, table = run_ablation(config, grid=["fusion=off,add"], overrides=["lora.r=2"], out_dir=tmp_path / "abl")
    assert [r["run"] for r in rows] == ["base (no adapter)", "fusion-off", "fusion-add"]
    assert rows[1]["fusion"] == "off" and rows[2]["fusion"] == "add" and rows[1]["r"] == 2
    # Fusion adds the projection's parameters (384 * 64 + 64 on the tiny base) to LoRA's.
    assert rows[2]["trainable_params"] - rows[1]["trainable_params"] == 384 * 64 + 64
    assert all(isinstance(r["rouge1"], float) for r in rows)
    text = table.read_text()
    assert "| fusion-add | add | 2 |" in text
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "abl" / "fusion-off" / "lexlora.json").is_file()


def test_ablate_command_refuses_a_bad_axis_before_training(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(overrides=json.dumps(TINY_T5), data=ROOT / "examples" / "python_stdlib.jsonl"))
    assert main(["ablate", "--config", str(config), "--grid", "lora.r=abc", "--out", str(tmp_path / "x")]) == 2
    assert "lora.r" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_ablate_scores_validation_unless_test_is_asked_for():
    import inspect

    from lexlora.cli import build_parser

    args = build_parser().parse_args(["ablate", "--config", "x.yaml"])
    assert args.split == "validation"
    assert inspect.signature(run_ablation).parameters["split"].default == "validation"
    assert build_parser().parse_args(["ablate", "--config", "x.yaml", "--split", "test"]).split == "test"


def test_ablate_on_test_warns_that_choices_belong_on_validation(tmp_path, caplog):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(overrides=json.dumps(TINY_T5), data=ROOT / "examples" / "python_stdlib.jsonl"))
    with pytest.raises(ConfigError, match="not one of this adapter's splits"):  # the tiny config has no test split
        run_ablation(config, grid=["fusion=off"], overrides=["lora.r=2"], out_dir=tmp_path / "abl", split="test")
    assert "choose on validation" in caplog.text
