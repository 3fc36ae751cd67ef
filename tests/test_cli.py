"""The main job as a user runs it: `accelerate launch scripts/train_lora.py`, then `lexlora generate`."""

import json
import os
import subprocess
import sys

import pytest

from lexlora.cli import main
from tests.conftest import ROOT, TINY_T5

TINY_YAML = """
model:
  name_or_path: google/flan-t5-small
  random_init: true
  config_overrides: {overrides}
data:
  path: {data}
  input_template: "Describe the file {{filename}}:"
  target_field: description
  splits: {{train: "[:32]", validation: "[32:40]"}}
train:
  max_steps: 4
  batch_size: 8
  log_every: 2
generation:
  max_new_tokens: 6
"""


def write_config(tmp_path, data):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML.format(overrides=json.dumps(TINY_T5), data=data))
    return path


def run(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kwargs)


def test_accelerate_launch_trains_and_lexlora_generates(tmp_path):
    config = write_config(tmp_path, ROOT / "examples" / "python_stdlib.jsonl")
    out = tmp_path / "adapter"
    launched = run([sys.executable, "-m", "accelerate.commands.launch", "scripts/train_lora.py",
                    "--config", str(config), f"output_dir={out}", "lora.r=4"])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "trainable params" in launched.stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "lora:\n  r: 4" in (out / "config.yaml").read_text()

    generated = run([sys.executable, "-m", "lexlora.cli", "generate", "--adapter", str(out),
                     "backup_config", "shutil.py", "--max-new-tokens", "4"])
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert len(generated.stdout.strip("\n").split("\n")) == 2


def test_plain_python_entry_point_runs(tmp_path):
    config = write_config(tmp_path, ROOT / "examples" / "python_stdlib.jsonl")
    done = run([sys.executable, "scripts/train_lora.py", "--config", str(config),
                f"output_dir={tmp_path / 'a'}", "fusion.enabled=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "a" / "lexlora.json").read_text())["adapter"]["fusion_mode"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.r=abc"], "lora.r"),
        (["data.path=/nonexistent.jsonl"], "data file not found: /nonexistent.jsonl"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_traceback(tmp_path, capsys, overrides, message):
    config = write_config(tmp_path, ROOT / "examples" / "python_stdlib.jsonl")
    code = main(["train", "--config", str(config), f"output_dir={tmp_path / 'x'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_record_through_the_script(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"filename": "a", "description": "b"}\n{"filename": "a", "description": 5}\n')
    done = run([sys.executable, "scripts/train_lora.py", "--config", str(write_config(tmp_path, data)),
                f"output_dir={tmp_path / 'x'}"])
    assert done.returncode == 2
    assert "bad.jsonl line 2: field 'description' must be a string, got int" in done.stderr
    assert "Traceback" not in done.stderr


def test_generate_refuses_a_missing_adapter(capsys, tmp_path):
    assert main(["generate", "--adapter", str(tmp_path / "none"), "x"]) == 2
    assert "adapter dir not found" in capsys.readouterr().err
