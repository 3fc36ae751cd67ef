"""Checkpoints, resume, SIGINT/SIGTERM and non-finite losses (lexlora/checkpoints.py and the loop in
lexlora/training.py): an interrupted run, resumed, ends exactly as one that never was."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lexlora.cli import main
from lexlora.config import load_config
from lexlora.errors import ConfigError
from lexlora.model.lora_model import LexLoraModel
from lexlora.training.checkpoints import (
    STATE_NAME,
    TrainingInterrupted,
    list_checkpoints,
)
from lexlora.training import NonFiniteLossError, train
from tests.conftest import ROOT, tiny_train_config
from tests.helpers import write_config

STDLIB = ROOT / "examples" / "python_stdlib.jsonl"
WEIGHTS = "adapter_model.safetensors"
# Two epochs of 16 optimizer steps (32 rows in batches of 2), a checkpoint every 2 steps: long enough
# for a signal to land mid-epoch, a few seconds in all. float32 weights, so they compare exactly.
LONG_RUN = ["train.max_steps=null", "train.epochs=2", "train.batch_size=2", "train.checkpoint_every=2",
            "train.cpu_threads=1", "save_dtype=float32"]


def records(adapter_dir):
    """The training log's loss and evaluation records, without their wall-clock times."""
    lines = (adapter_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "loss" in r or "val_loss" in r]


def start(tmp_path, command, **env):
    """The command in the background, its output in files (a pipe nobody reads could fill up)."""
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)


def wait_for_checkpoint(directory, process, step=1, timeout=300):
    """Until a checkpoint at `step` or later is complete."""
    deadline = time.monotonic() + timeout
    while not any(int(p.name[4:12]) >= step for p in list_checkpoints(directory)):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def leftovers(directory, name="adapter"):
    """Staging / failed dirs of the adapter `name` (none may be left behind)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    config = write_config(tmp_path, STDLIB)
    whole = train(load_config(config, [f"output_dir={tmp_path / 'whole'}", *LONG_RUN]))

    out = tmp_path / "adapter"
    process = start(tmp_path, [sys.executable, "scripts/train_lora.py", "--config", str(config), f"output_dir={out}", *LONG_RUN])
    checkpoints = tmp_path / "adapter.checkpoints"
    # Killed in the second epoch: resuming must then redo that epoch's shuffle, skip the batches
    # already done, and bring back the first epoch's evaluation (the best so far).
    wait_for_checkpoint(checkpoints, process, step=18)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    newest = list_checkpoints(checkpoints)[-1]
    position = json.loads((newest / STATE_NAME).read_text())["loop"]
    assert position["epoch"] == 1 and 0 < position["batches_done"] < 16  # mid-epoch
    assert not out.exists() and leftovers(tmp_path)  # the killed run's staging dir

    resumed = train(load_config(config, [f"output_dir={out}", *LONG_RUN, "train.resume=true"]))
    expected, got = load_file(str(whole.output_dir / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert expected.keys() == got.keys()
    diff = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert diff <= 1e-6, diff  # measured: 0.0 on CPU
    # The resumed run logged the same losses, step by step, and the same evaluation of each epoch.
    assert records(out) == records(whole.output_dir)
    assert resumed.metrics["resumed_at_steps"] == [position["step"]]
    assert resumed.metrics["best_val_loss"] == whole.metrics["best_val_loss"]
    # Published: the checkpoints and the killed run's staging dir are gone.
    assert not checkpoints.exists() and leftovers(tmp_path) == []


def test_sigterm_saves_a_checkpoint_and_exits_143_leaving_the_existing_adapter_alone(tmp_path):
    config = write_config(tmp_path, STDLIB)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "marker").write_text("the adapter of an earlier run")
    process = start(tmp_path, [sys.executable, "scripts/train_lora.py", "--config", str(config), f"output_dir={out}",
                               "overwrite_output_dir=true", *LONG_RUN])
    checkpoints = tmp_path / "adapter.checkpoints"
    wait_for_checkpoint(checkpoints, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    newest = list_checkpoints(checkpoints)[-1]
    assert f"stopped by SIGTERM after step {int(newest.name[4:12])}" in stderr
    assert f"saved in {newest}" in stderr and "--resume" in stderr and "No adapter was written" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["marker"] and leftovers(tmp_path) == []


def interrupt_at(monkeypatch, call, signum=signal.SIGINT):
    """Send `signum` to this process during the `call`-th training forward pass."""
    forward, calls = LexLoraModel.forward, iter(range(1, 1 << 30))

    def interrupting(self, *args, **kwargs):
        if self.training and next(calls) == call:
            os.kill(os.getpid(), signum)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LexLoraModel, "forward", interrupting)


def test_sigint_stops_after_the_current_step_and_keeps_the_newest_checkpoints(tmp_path, monkeypatch):
    config = tiny_train_config(tmp_path, STDLIB, checkpoint_every=1, keep_checkpoints=2)
    handler = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config)
    assert stopped.value.code == 130 and "--resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is handler  # put back after the loop
    checkpoints = list_checkpoints(tmp_path / "adapter.checkpoints")
    assert [p.name for p in checkpoints] == ["step00000002-epoch000", "step00000003-epoch000"]
    assert stopped.value.checkpoint == checkpoints[-1]
    assert not (tmp_path / "adapter").exists() and leftovers(tmp_path) == []


def test_a_stop_at_the_last_batch_of_an_epoch_with_gradient_accumulation_resumes_exactly(tmp_path, monkeypatch):
    def config(name):
        config = tiny_train_config(tmp_path, STDLIB, max_steps=None, epochs=2, batch_size=4,
                                   gradient_accumulation_steps=2, cpu_threads=1)
        config.data.splits = {"train": "[:36]", "validation": "[36:44]"}  # 9 batches: 5 steps an epoch
        config.save_dtype, config.output_dir = "float32", str(tmp_path / name)
        return config

    whole = train(config("whole"))
    interrupt_at(monkeypatch, 9)  # the epoch's last (unpaired) batch: stopped before its evaluation
    cut = config("adapter")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cut)
    assert stopped.value.checkpoint.name == "step00000005-epoch000"
    monkeypatch.undo()
    cut.train.resume = True
    train(cut)
    expected, got = load_file(str(whole.output_dir / WEIGHTS)), load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert records(tmp_path / "adapter") == records(whole.output_dir)


@pytest.fixture()
def interrupted(tmp_path, monkeypatch):
    """A config whose run was stopped by SIGINT at step 3 (checkpoints after steps 2 and 3)."""
    config = tiny_train_config(tmp_path, STDLIB, checkpoint_every=2)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        train(config)
    monkeypatch.undo()
    return config


def test_a_changed_setting_or_a_forgotten_resume_is_refused(interrupted, tmp_path):
    config = interrupted
    config.train.resume = True
    config.lora.r = 4
    config.train.learning_rate = 1e-4
    config.train.log_every = 1  # free to change
    with pytest.raises(ConfigError) as refused:
        train(config)
    assert "lora.r: 8 in the checkpoint, 4 now" in str(refused.value)
    assert "train.learning_rate: 0.003 in the checkpoint, 0.0001 now" in str(refused.value)
    assert "log_every" not in str(refused.value)
    config.lora.r, config.train.learning_rate, config.train.resume = 8, 3e-3, False
    with pytest.raises(ConfigError, match=r"holds checkpoints of an interrupted run \(newest: step00000003-epoch000\); add --resume"):
        train(config)
    assert len(list_checkpoints(tmp_path / "adapter.checkpoints")) == 2


def test_resume_ignores_incomplete_checkpoints_and_cleans_up_when_done(interrupted, tmp_path):
    config = interrupted
    checkpoints = tmp_path / "adapter.checkpoints"
    (checkpoints / ".tmp-step00000009-epoch001").mkdir()  # a save cut short by a kill
    (checkpoints / ".tmp-step00000009-epoch001" / STATE_NAME).write_text("{}")
    (checkpoints / "step00000009-epoch001").mkdir()  # the final name, but no state file
    config.train.resume = True
    result = train(config)
    assert result.metrics["resumed_at_steps"] == [3] and result.metrics["steps"] == 8
    log = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line).get("step") for line in log if '"loss"' in line] == [2, 4, 6, 8]
    assert not checkpoints.exists()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path, STDLIB)
    code = main(["train", "--config", str(config), f"output_dir={tmp_path / 'x'}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and f"train.resume: no checkpoint in {tmp_path / 'x.checkpoints'}" in err
    assert "Traceback" not in err


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_weights(tmp_path, monkeypatch):
    config = tiny_train_config(tmp_path, STDLIB)  # 8 steps, one per batch, the loss checked every 2
    config.save_dtype = "float32"
    forward, calls, good = LexLoraModel.forward, [], {}

    def nan_from_step_5(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # the weights after step 4, the last check before the NaN
                good.update({k: v.detach().clone() for k, v in self.trainable_state_dict().items()})
            if len(calls) >= 5:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(LexLoraModel, "forward", nan_from_step_5)
    with pytest.raises(NonFiniteLossError) as stopped:
        train(config)
    message = str(stopped.value)
    assert "non-finite loss at step 5" in message and "from step 4" in message
    assert f"saved as the adapter {tmp_path / 'adapter'}" in message
    assert "learning_rate" in message and "bf16" in message and "max_grad_norm" in message
    saved = load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in good)
    metrics = json.loads((tmp_path / "adapter" / "lexlora.json").read_text())["metrics"]
    assert (metrics["stopped"], metrics["weights_step"], metrics["steps"]) == ("non-finite loss at step 5", 4, 4)
    assert not (tmp_path / "adapter.checkpoints").exists() and leftovers(tmp_path) == []
