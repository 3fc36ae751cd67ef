"""Joint training (lexlora/training/joint.py, joint_loop.py): several adapters in one pass over one
frozen base equal their solo runs, through an interruption and resume too; a job that stops early
leaves the pass; jobs that cannot share a base or a process are refused before any work."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lexlora.cli import main
from lexlora.config import config_to_yaml
from lexlora.errors import ConfigError
from lexlora.model.joint_lora import JointModel
from lexlora.training import train
from lexlora.training.checkpoints import TrainingInterrupted, list_checkpoints
from lexlora.training.joint import JointTrainingError, train_jobs
from tests.conftest import tiny_model_config, tiny_train_config
from tests.training.runs import STDLIB, WEIGHTS, leftovers, read_log

# Three jobs that differ in rank, fusion mode, seed, data slice, learning rate and length (20, 17
# and 14 steps: the shorter ones leave the pass first). Dropout off, so that joint and solo runs
# draw nothing different (joint.py's docstring); float32 weights, so rounding alone separates them.
JOBS = [
    {"r": 4, "mode": "add", "seed": 40, "lr": 3e-3, "steps": 20},
    {"r": 8, "mode": "prefix", "seed": 41, "lr": 2e-3, "steps": 17},
    {"r": 2, "mode": "first", "seed": 42, "lr": 4e-3, "steps": 14},
]


def job_configs(root, tag, **train):
    configs = []
    for index, job in enumerate(JOBS):
        config = tiny_train_config(root, STDLIB, max_steps=job["steps"], log_every=1, cpu_threads=1, **train)
        config.model = tiny_model_config(dropout_rate=0.0)
        config.lora.r, config.lora.alpha = job["r"], 2 * job["r"]
        config.fusion.mode = job["mode"]
        config.train.seed, config.train.learning_rate = job["seed"], job["lr"]
        config.data.splits = {"train": f"[{10 * index}:{10 * index + 40}]", "validation": "[64:80]"}
        config.save_dtype, config.output_dir = "float32", str(root / f"{tag}{index}")
        configs.append(config)
    return configs


def step_losses(adapter_dir):
    return [r["loss"] for r in read_log(adapter_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def solo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("solo")
    return [train(config).output_dir for config in job_configs(root, "solo")]


def assert_twins(joint_dir, solo_dir):
    """Each step's loss within 1e-5 relative, each weight within 1e-4, the same files and configs."""
    joint, solo = load_file(str(joint_dir / WEIGHTS)), load_file(str(solo_dir / WEIGHTS))
    assert joint.keys() == solo.keys()
    assert max((joint[k] - solo[k]).abs().max().item() for k in joint) < 1e-4
    assert any(solo[k].abs().max() > 0 for k in solo if "lora_B" in k)  # trained, not still zero
    joint_losses, solo_losses = step_losses(joint_dir), step_losses(solo_dir)
    assert len(joint_losses) == len(solo_losses) > 0
    assert max(abs(a - b) / abs(b) for a, b in zip(joint_losses, solo_losses)) < 1e-5
    assert sorted(p.name for p in joint_dir.iterdir()) == sorted(p.name for p in solo_dir.iterdir())
    assert json.loads((joint_dir / "adapter_config.json").read_text()) == json.loads((solo_dir / "adapter_config.json").read_text())
    meta = [json.loads((d / "lexlora.json").read_text()) for d in (joint_dir, solo_dir)]
    assert meta[0]["adapter"] == meta[1]["adapter"] and meta[0]["base"] == meta[1]["base"]


def test_a_joint_run_publishes_each_adapter_as_its_solo_run_would(tmp_path, solo_runs):
    results = train_jobs(job_configs(tmp_path, "joint"))
    assert [r.output_dir.name for r in results] == ["joint0", "joint1", "joint2"]
    for result, solo_dir, job in zip(results, solo_runs, JOBS):
        assert result.metrics["steps"] == job["steps"] and result.metrics["joint_jobs"] == 3
        assert_twins(result.output_dir, solo_dir)
    assert leftovers(tmp_path, "joint0") == [] and not (tmp_path / "joint0.joint-checkpoints").exists()


def interrupt_joint_at(monkeypatch, call):
    """SIGINT to this process during the `call`-th joint training forward."""
    forward, calls = JointModel.forward, iter(range(1, 1 << 30))

    def interrupting(self, *args, **kwargs):
        if next(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(JointModel, "forward", interrupting)


def test_an_interrupted_joint_run_resumes_from_the_command_line_to_the_same_adapters(tmp_path, solo_runs, monkeypatch, capsys):
    configs = job_configs(tmp_path, "joint", checkpoint_every=3)
    interrupt_joint_at(monkeypatch, 16)  # after job 3 (14 steps) was published, mid-epoch for the others
    with pytest.raises(TrainingInterrupted) as stopped:
        train_jobs(configs)
    assert "1 of 3 jobs published" in str(stopped.value) and "--resume" in str(stopped.value)
    checkpoints = list_checkpoints(tmp_path / "joint0.joint-checkpoints")
    assert checkpoints[-1].name == "step00000016-epoch000" and stopped.value.checkpoint == checkpoints[-1]
    assert (tmp_path / "joint2" / WEIGHTS).is_file() and not (tmp_path / "joint0").exists()
    monkeypatch.undo()
    paths = []
    for index, config in enumerate(configs):  # the same jobs as YAML files, resumed by the CLI
        paths += ["--config", str(tmp_path / f"job{index}.yaml")]
        (tmp_path / f"job{index}.yaml").write_text(config_to_yaml(config))
    assert main(["train", *paths, "--resume"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("adapter: ")] == [
        f"adapter: {tmp_path / f'joint{i}'}" for i in range(3)
    ]
    for index, solo_dir in enumerate(solo_runs):
        assert_twins(tmp_path / f"joint{index}", solo_dir)
    resumed = [json.loads((tmp_path / f"joint{i}" / "lexlora.json").read_text())["metrics"] for i in range(2)]
    assert [m["resumed_at_steps"] for m in resumed] == [[16], [16]]
    assert not (tmp_path / "joint0.joint-checkpoints").exists()
    assert all(leftovers(tmp_path, f"joint{i}") == [] for i in range(3))


def test_a_job_whose_loss_stops_being_finite_leaves_the_pass_and_the_others_finish(tmp_path, monkeypatch):
    configs = job_configs(tmp_path, "joint")[:2]
    forward, rounds = JointModel.forward, []

    def nan_for_job_2_from_round_6(self, indices, batches):
        losses = forward(self, indices, batches)
        rounds.append(1)
        return [loss * float("nan") if index == 1 and len(rounds) >= 6 else loss for index, loss in zip(indices, losses)]

    monkeypatch.setattr(JointModel, "forward", nan_for_job_2_from_round_6)
    with pytest.raises(JointTrainingError) as stopped:
        train_jobs(configs)
    assert f"{tmp_path / 'joint1'}" in str(stopped.value) and "non-finite loss at step 6" in str(stopped.value)
    first = json.loads((tmp_path / "joint0" / "lexlora.json").read_text())["metrics"]
    second = json.loads((tmp_path / "joint1" / "lexlora.json").read_text())["metrics"]
    assert first["steps"] == 20 and "stopped" not in first
    assert second["weights_step"] == 5 and "non-finite" in second["stopped"]  # the last verified weights


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.model, "init_seed", 1), "model.* settings differ from job 1's: model.init_seed 1 (job 1: 0)"),
        (lambda c: setattr(c, "output_dir", c.output_dir.replace("joint1", "joint0")), "is also job 1's"),
        (lambda c: setattr(c.train, "gradient_accumulation_steps", 2), "gradient_accumulation_steps must be 1"),
        (lambda c: setattr(c.train, "mixed_precision", "bf16"), "train.mixed_precision='bf16', job 1 has 'auto'"),
        (lambda c: setattr(c.train, "report_to", "tensorboard"), "train.report_to is not supported in a joint run"),
    ],
)
def test_jobs_that_cannot_share_a_base_or_a_process_are_refused_before_any_work(tmp_path, change, message):
    configs = job_configs(tmp_path, "joint")[:2]
    change(configs[1])
    with pytest.raises(ConfigError, match="job 2") as refused:
        train_jobs(configs)
    assert message in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_the_command_line_names_a_refused_job_without_a_traceback(tmp_path, capsys):
    configs = job_configs(tmp_path, "joint")[:2]
    configs[1].lora.bias = "all"
    paths = []
    for index, config in enumerate(configs):
        (tmp_path / f"job{index}.yaml").write_text(config_to_yaml(config))
        paths += ["--config", str(tmp_path / f"job{index}.yaml")]
    assert main(["train", *paths]) == 2
    err = capsys.readouterr().err
    assert "job 2" in err and "lora.bias=all" in err and "Traceback" not in err


def test_one_config_is_a_solo_run(tmp_path):
    config = job_configs(tmp_path, "one")[2]
    [result] = train_jobs([config])
    assert "joint_jobs" not in result.metrics and torch.is_tensor(load_file(str(result.output_dir / WEIGHTS))["lexical_fusion.proj.weight"])


def test_a_joint_run_trains_in_bf16_with_gradient_checkpointing(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a process's first Accelerator fixes its precision; tests run many
    configs = job_configs(tmp_path, "joint", mixed_precision="bf16", gradient_checkpointing=True)[:2]
    for config in configs:
        config.train.max_steps = 4
    results = train_jobs(configs)
    for result in results:
        assert result.metrics["mixed_precision"] == "bf16" and result.metrics["gradient_checkpointing"] is True
        losses = step_losses(result.output_dir)
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        assert any(v.abs().max() > 0 for k, v in load_file(str(result.output_dir / WEIGHTS)).items() if "lora_B" in k)
    AcceleratorState._reset_state()  # the next test's runs are in full precision again
