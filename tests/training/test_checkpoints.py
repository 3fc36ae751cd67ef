"""Checkpoints, resume, SIGINT and non-finite losses (lexlora/training/checkpoints.py and the loop in
lexlora/training/loop.py), in-process: an interrupted run, resumed, ends exactly as one that never
was. The runs killed or stopped from outside (SIGKILL, SIGTERM) are in tests/e2e/test_train_runs.py."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lexlora.cli import main
from lexlora.errors import ConfigError
from lexlora.model.lora_model import LexLoraModel
from lexlora.training.checkpoints import (
    STATE_NAME,
    TrainingInterrupted,
    list_checkpoints,
)
from lexlora.training import NonFiniteLossError, train
from tests.conftest import tiny_train_config
from tests.helpers import write_config
from tests.training.runs import STDLIB, WEIGHTS, leftovers, records

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
