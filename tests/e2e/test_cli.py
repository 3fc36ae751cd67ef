"""The main job as a user runs it: `accelerate launch scripts/train_lora.py`, then `lexlora generate`."""

import json
import os
import subprocess
import sys

import pytest

from lexlora.cli import main
from tests.conftest import ROOT
from tests.helpers import write_config

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


def test_accelerate_launch_q_ends_with_lexloras_one_line_error(tmp_path):
    """Without -q, accelerate's launcher re-raises the child's exit status as a CalledProcessError
    traceback printed after lexlora's line; the README's commands pass -q (single process)."""
    config = write_config(tmp_path, ROOT / "examples" / "python_stdlib.jsonl")
    launched = run([sys.executable, "-m", "accelerate.commands.launch", "-q", "scripts/train_lora.py",
                    "--config", str(config), f"output_dir={tmp_path / 'x'}", "lora.r=abc"])
    assert launched.returncode != 0
    assert "Traceback" not in launched.stderr and "CalledProcessError" not in launched.stderr
    last = [line for line in launched.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"lexlora: error: {config}") and "lora.r" in last, launched.stderr[-2000:]


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
        (["data.on_long_target=sometimes"], "data.on_long_target must be one of truncate, refuse; got 'sometimes'"),
        (["data.splits.validation=[90%:]"], "override 'data.splits.validation=[90%:]': the value is not valid YAML "
                                            "(while scanning a plain scalar); quote it, e.g. data.splits.validation='[90%:]'"),
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


GOOD_ROW = {"id": "1", "filename": "a.py", "description": "A module."}


def rows(*items):
    return "".join(json.dumps(item) + "\n" for item in items)


BAD_DATA = [
    # (file name, contents, overrides, what the user reads on stderr)
    ("empty.jsonl", "", [], "empty.jsonl: the file is empty (no records)"),
    ("m.jsonl", rows(GOOD_ROW) + '{"filename": "b.py", "description": \n', [],
     "m.jsonl line 2: malformed JSON: Expecting value (column 37)"),
    ("s.jsonl", rows(GOOD_ROW, ["b.py", "x"]), [], "s.jsonl line 2: expected an object with fields, got list"),
    ("n.jsonl", rows(GOOD_ROW, {"filename": None, "description": "x"}), [], "n.jsonl line 2: field 'filename' is null"),
    ("t.jsonl", rows(GOOD_ROW, {"filename": "b.py", "description": "  "}), [],
     "t.jsonl line 2: target field 'description' is empty"),
    ("u.jsonl", rows(GOOD_ROW).encode() + b'{"filename": "\xe9.py", "description": "x"}\n', [],
     "u.jsonl line 2: not valid UTF-8"),
    ("d.jsonl", rows(GOOD_ROW, GOOD_ROW), ["data.on_duplicate_id=refuse"],
     "d.jsonl: 1 record(s) repeat an earlier 'id' (data.on_duplicate_id=refuse): id \"1\" on lines 1 and 2"),
    ("c.csv", "filename,desc\na.py,A module.\n", [],
     "c.csv line 1: column(s) 'description' missing from the header (it has: filename, desc)"),
    ("f.jsonl", rows(*[GOOD_ROW] * 4), ["data.input_template='{file} in {dir}'", "data.lexical_field=file"],
     "f.jsonl: field 'file' is missing from every record (so are 'dir'); the records have: id, filename, description"),
    ("p.jsonl", rows(*[GOOD_ROW] * 4), ["data.splits.validation='[100%:]'", "data.on_duplicate_id=ignore"],
     "data.splits.validation='[100%:]' leaves the validation split of"),
    ("l.jsonl", rows(GOOD_ROW, {"filename": "b.py", "description": "word " * 40}),
     ["data.max_target_length=8", "data.on_long_target=refuse", "fusion.enabled=false",
      "data.splits.train='[:100%]'", "data.splits.validation='[:1]'"],
     "1 of 2 targets of the train split are longer than data.max_target_length=8 tokens "
     "(data.on_long_target=refuse): line 2 (41 tokens)"),
]


@pytest.mark.parametrize("name, contents, overrides, message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_stops_training_with_one_clear_line(tmp_path, capsys, name, contents, overrides, message):
    data = tmp_path / name
    data.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    config = write_config(tmp_path, data)
    code = main(["train", "--config", str(config), f"output_dir={tmp_path / 'x'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_existing_adapter_disk_full_and_overwrite(tmp_path, capsys, monkeypatch):
    """A second run into the same output dir is refused; with --overwrite but a full disk, the first
    adapter is left exactly as it was."""
    import lexlora.adapters.files as adapters

    config = write_config(tmp_path, ROOT / "examples" / "python_stdlib.jsonl")
    out = tmp_path / "adapter"
    args = ["train", "--config", str(config), f"output_dir={out}", "fusion.enabled=false", "train.max_steps=2"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert main(args) == 2
    assert f"output dir {out} already exists and holds an adapter; choose another output_dir or set " \
           "overwrite_output_dir=true (lexlora train --overwrite)" in capsys.readouterr().err

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_file", disk_full)
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the adapter files into" in err and "(No space left on device); nothing was published" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # only the failed run's log is kept

    real_access = os.access
    monkeypatch.setattr(adapters.os, "access", lambda p, mode: p != tmp_path and real_access(p, mode))
    assert main([*args, f"output_dir={tmp_path / 'new'}"]) == 2
    assert f"output dir {tmp_path / 'new'}: {tmp_path} is not writable (Permission denied)" in capsys.readouterr().err


def tiny_adapter(path, tokenizer, mode=None):
    """A perturbed tiny-T5 adapter saved to `path` (no training: fast)."""
    from lexlora.adapters.files import save_adapter
    from lexlora.adapters.fingerprint import fingerprint
    from lexlora.model.loading import load_base_model
    from tests.conftest import tiny_model_config
    from tests.helpers import make_model, perturb_

    base = load_base_model(tiny_model_config())
    model = make_model(base, tokenizer, mode=mode)
    perturb_(model)
    return save_adapter(model, path, {"base": fingerprint(base, tiny_model_config())})


def test_generate_prints_each_input_beside_its_quoted_output_or_json(tmp_path, capsys, tokenizer):
    from lexlora.cli import format_generated

    assert format_generated("shutil.py", "") == 'shutil.py → ""'  # an empty output is visible
    assert format_generated("a.py", 'Say "hi"\nnow') == 'a.py → "Say \\"hi\\"\\nnow"'  # one line, unambiguous
    path = tiny_adapter(tmp_path / "a", tokenizer, mode="add")
    inputs = ["shutil.py", '{"filename": "json/decoder.py"}']
    command = ["generate", "--adapter", str(path), *inputs, "--max-new-tokens", "3"]
    assert main(command) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    outputs = []
    for given, line in zip(inputs, lines):
        assert line.startswith(f"{given} → \"")
        outputs.append(json.loads(line[len(f"{given} → "):]))
    assert main([*command, "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"input": "shutil.py", "output": outputs[0]}, {"input": {"filename": "json/decoder.py"}, "output": outputs[1]},
    ]


def test_generate_raises_no_deprecation_warnings_of_lexloras_own_calls(tmp_path, capsys, tokenizer):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` when lexlora builds the model:
    a FutureWarning on every run, filtered where lexlora makes that call."""
    import warnings

    path = tiny_adapter(tmp_path / "a", tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "--adapter", str(path), "a.py", "--max-new-tokens", "2"]) == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]


def test_generate_refuses_a_pickle_adapter_unless_allowed(tmp_path, capsys, tokenizer):
    import torch
    from safetensors.torch import load_file

    from lexlora.adapters.format import WEIGHTS_NAME

    path = tiny_adapter(tmp_path / "old", tokenizer)
    command = ["generate", "--adapter", str(path), "a.py", "--max-new-tokens", "3"]
    assert main(command) == 0
    safetensors_output = capsys.readouterr().out
    torch.save(load_file(str(path / WEIGHTS_NAME)), path / "adapter_model.bin")
    (path / WEIGHTS_NAME).unlink()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "only a pickle adapter_model.bin is present; lexlora loads safetensors only" in err and "--allow-pickle" in err
    assert main([*command, "--allow-pickle"]) == 0
    assert capsys.readouterr().out == safetensors_output


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=-1", "train.learning_rate must be more than 0, got -1.0"),
        ("train.num_workers=-1", "train.num_workers must be at least 0, got -1"),
        ("generation.batch_size=0", "generation.batch_size must be at least 1, got 0"),
    ],
)
def test_out_of_range_config_value_exits_2_before_any_work(tmp_path, capsys, monkeypatch, override, message):
    import lexlora.training.recipe as recipe

    def no_work(*_args, **_kwargs):
        raise AssertionError("training started with a bad config")

    monkeypatch.setattr(recipe, "train", no_work)
    config = write_config(tmp_path, ROOT / "examples" / "python_stdlib.jsonl")
    code = main(["train", "--config", str(config), f"output_dir={tmp_path / 'x'}", override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("lexlora:")] == [f"lexlora: error: {config}: {message}"]
    assert not (tmp_path / "x").exists()
