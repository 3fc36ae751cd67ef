"""Whole training runs from outside: a run killed (SIGKILL) and resumed, a run stopped by SIGTERM,
and two CPU processes through `accelerate launch` (subprocesses of scripts/train_lora.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from safetensors.torch import load_file

from lexlora.adapters.files import load_adapter
from lexlora.config import load_config
from lexlora.training import train
from lexlora.training.checkpoints import STATE_NAME, list_checkpoints
from tests.conftest import ROOT
from tests.helpers import write_config
from tests.training.runs import LONG_RUN, STDLIB, WEIGHTS, leftovers, read_log, records


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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_through_accelerate_launch_are_one_data_parallel_run(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: one gloo
    data-parallel run, not two copies of one racing for output_dir; it checkpoints (every process
    its RNG states) and cleans up like a single process. (Stopping with SIGTERM and resuming with two
    processes was checked by hand: same weights as an uninterrupted 2-process run, max diff 0.0.)"""
    out = tmp_path / "adapter"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "scripts/train_lora.py",
              "--config", str(write_config(tmp_path, STDLIB)),
              f"output_dir={out}", *LONG_RUN]
    done = subprocess.run(launch, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("adapter saved to") == 1
    metrics = json.loads((out / "lexlora.json").read_text())["metrics"]
    assert metrics["num_processes"] == 2
    assert metrics["steps"] == 16  # 32 rows in batches of 2 per process, 2 epochs
    assert [r["epoch"] for r in read_log(out / "metrics.jsonl") if "val_loss" in r] == [1, 2]
    assert leftovers(tmp_path) == [] and not (tmp_path / "adapter.checkpoints").exists()
    assert load_adapter(out).spec.fusion_enabled


def test_a_joint_run_over_two_cpu_processes_equals_its_jobs_solo_runs(tmp_path):
    """Two jobs in one 2-process (gloo DDP) joint run: the second job's adapter equals its own
    2-process solo run's (dropout off: joint.py's docstring)."""
    from lexlora.config import config_to_yaml

    paths = []
    for name, extra in [("a", []), ("b", ["lora.r=4", "fusion.mode=prefix", "train.seed=7", "train.learning_rate=2e-3"])]:
        config = load_config(write_config(tmp_path, STDLIB), [*LONG_RUN, "train.log_every=1", f"output_dir={tmp_path / name}",
                                                              "model.config_overrides.dropout_rate=0.0", *extra])
        (tmp_path / f"{name}.yaml").write_text(config_to_yaml(config))
        paths += ["--config", str(tmp_path / f"{name}.yaml")]

    def launch(*args):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", str(free_port()), "scripts/train_lora.py", *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    joint = launch(*paths)
    assert joint.stdout.count("adapter saved to") == 2
    launch("--config", str(tmp_path / "b.yaml"), f"output_dir={tmp_path / 'solo_b'}")
    got, expected = load_file(str(tmp_path / "b" / WEIGHTS)), load_file(str(tmp_path / "solo_b" / WEIGHTS))
    assert got.keys() == expected.keys() and max((got[k] - expected[k]).abs().max().item() for k in got) < 1e-4
    losses = [[r["loss"] for r in read_log(d / "metrics.jsonl") if "loss" in r] for d in (tmp_path / "b", tmp_path / "solo_b")]
    assert len(losses[0]) == len(losses[1]) == 16
    assert max(abs(a - b) / abs(b) for a, b in zip(*losses)) < 1e-5
    assert json.loads((tmp_path / "a" / "lexlora.json").read_text())["metrics"]["num_processes"] == 2
    assert leftovers(tmp_path, "a") == [] and not (tmp_path / "a.joint-checkpoints").exists()
