"""benchmarks/multitrain.py and multitrain_peft.py: the PEFT arm trains a plain PEFT adapter on a tiny
random base; the jobs carry the benchmark's settings; a process's peak memory is its own; the
weight check compares matching tensors only; the ratios, report and RESULT line come from the arms'
records (fabricated here), and a failed joint arm is said plainly."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import ROOT, requires_shared_data, tiny_train_config

sys.path.insert(0, str(ROOT / "benchmarks"))

import multitrain  # noqa: E402
import multitrain_peft  # noqa: E402

MB = 2**20


# ---- the PEFT arm's child ---------------------------------------------------------------------
def test_the_peft_child_trains_plain_peft_lora_for_max_steps_and_saves_it(tmp_path, stdlib_data):
    from peft import PeftConfig

    cfg = tiny_train_config(tmp_path, stdlib_data, max_steps=3)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules = 4, 8, ["q", "v"]
    cfg.train.cpu_threads = 1
    config_file = tmp_path / "job.yaml"
    from lexlora.config import config_to_yaml

    config_file.write_text(config_to_yaml(cfg))
    record_file = tmp_path / "record.json"
    assert multitrain_peft.main(["--config", str(config_file), "--json", str(record_file), "--cpu"]) == 0
    record = json.loads(record_file.read_text())
    assert record["steps"] == 3 and record["batch_size"] == 8 and record["train_runtime"] > 0
    assert record["torch_threads"] == 1  # train.cpu_threads, as lexlora's runs read it
    assert np.isfinite(record["train_loss"])
    saved = PeftConfig.from_pretrained(cfg.output_dir)
    assert (saved.r, saved.lora_alpha, sorted(saved.target_modules)) == (4, 8, ["q", "v"])
    from safetensors.numpy import load_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # LoRA alone (PEFT has no fusion), on q and v of the tiny T5's 2 + 2 layers (decoder: self + cross).
    assert all("lora_A" in k or "lora_B" in k for k in weights) and not any("fusion" in k for k in weights)
    assert len(weights) == 2 * 2 * (2 + 4)
    # B starts at zero: a non-zero B shows the optimizer stepped.
    assert max(np.abs(w).max() for k, w in weights.items() if "lora_B" in k) > 0
    with pytest.raises(SystemExit, match="already exists"):
        multitrain_peft.train_peft(cfg, use_cpu=True)


# ---- the jobs ---------------------------------------------------------------------------------
@requires_shared_data()
def test_each_job_is_its_config_with_the_benchmarks_settings(tmp_path):
    from lexlora.config import load_config

    cfg = multitrain.job_config("file-type", 60, tmp_path / "out")
    original = load_config(ROOT / "configs" / "file_type.yaml")
    assert original.train.batch_size == 16 and cfg.train.batch_size == 8
    assert cfg.model.random_init and cfg.model.config_overrides == {"dropout_rate": 0.0}
    assert (cfg.train.max_steps, cfg.save_dtype, cfg.lora.dropout) == (60, "float32", 0.0)
    assert cfg.data.path == str((ROOT.parent / "shared" / "data" / "file-descriptions" / "file_type.jsonl").resolve())
    assert cfg.data.splits == original.data.splits and cfg.data.input_template == original.data.input_template
    assert cfg.output_dir == str(tmp_path / "out") and cfg.train.cpu_threads is None
    yamls = multitrain.write_jobs(tmp_path, "joint", ["file-description", "file-type"], 5, quick=True, threads=1)
    written = load_config(yamls[1])  # what an arm's process reads
    assert written.data.splits == multitrain.QUICK_SPLITS and written.train.max_steps == 5
    assert written.train.cpu_threads == 1
    assert written.output_dir == str(tmp_path / "joint" / "file-type")


def test_arguments_refuse_unknown_jobs_and_arms(capsys):
    assert multitrain.parse_args(["--quick"]).jobs == list(multitrain.QUICK_JOBS)
    assert multitrain.parse_args(["--arms", "joint,solo"]).arms == ["solo", "joint"]
    for bad in (["--jobs", "file-type,nope"], ["--arms", "solo,lora"], ["--jobs", "file-type,file-type"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            multitrain.parse_args(bad)
    assert "--jobs must name distinct jobs" in capsys.readouterr().err


# ---- measuring a process ----------------------------------------------------------------------
GROW = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b; time.sleep(0.1)"


@pytest.mark.skipif(not multitrain.GNU_TIME.is_file(), reason="no /usr/bin/time here")
def test_under_gnu_time_a_process_peak_is_its_own_not_its_parents(tmp_path):
    done = multitrain.run_process([sys.executable, "-c", GROW], tmp_path / "grow.log", {}, method="time")
    # This pytest process holds far more than 100 MB (torch, peft): none of it reaches the child's figure.
    small = multitrain.run_process([sys.executable, "-c", "print('hi')"], tmp_path / "small.log", {}, method="time")
    assert done["returncode"] == 0 and done["peak_bytes"] >= 300 * MB  # freed before exit, still counted
    assert small["peak_bytes"] < 100 * MB and (tmp_path / "small.log").read_text() == "hi\n"
    failed = multitrain.run_process([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "f.log", {}, method="time")
    assert failed["returncode"] == 3 and failed["peak_bytes"] < 100 * MB and failed["peak_method"] == "time"


def test_without_gnu_time_wait4_reads_the_peak_and_exit_code(tmp_path):
    done = multitrain.run_process([sys.executable, "-c", GROW], tmp_path / "grow.log", {}, method="wait4")
    failed = multitrain.run_process([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "f.log", {}, method="wait4")
    assert done["returncode"] == 0 and done["peak_bytes"] >= 300 * MB and done["peak_method"] == "wait4"
    assert failed["returncode"] == 3


# ---- the weight check -------------------------------------------------------------------------
def _adapter(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_weight_diff_is_the_largest_over_matching_tensors_and_refuses_other_keys(tmp_path):
    a = _adapter(tmp_path / "a", {"x": np.zeros((2, 2), np.float32), "y": np.ones(3, np.float32)})
    b = _adapter(tmp_path / "b", {"x": np.array([[0, 2e-5], [0, -3e-5]], np.float32), "y": np.ones(3, np.float32)})
    c = _adapter(tmp_path / "c", {"x": np.zeros((2, 2), np.float32)})
    assert multitrain.max_abs_diff(a, b) == pytest.approx(3e-5, rel=1e-6)
    assert multitrain.max_abs_diff(a, a) == 0.0
    with pytest.raises(ValueError, match="different tensors.*y"):
        multitrain.max_abs_diff(a, c)


# ---- figures, report, RESULT ------------------------------------------------------------------
def _process(job, seconds, peak_mb):
    return {"job": job, "seconds": seconds, "peak_bytes": peak_mb * MB, "returncode": 0, "log": "x.log", "command": "c"}


def _job(job, train_seconds, steps=60):
    return {"job": job, "output_dir": f"/w/{job}", "steps": steps, "train_seconds": train_seconds,
            "train_loss": 1.5, "batch_size": 8, "optimizer": "adamw_torch_fused"}


def fabricated(joint_failed=False):
    jobs = ["a", "b", "c"]
    # The later jobs leave the pass after the earlier ones' evaluation and publishing: longer train_seconds.
    joint = {"arm": "joint", "processes": [_process("all", 150.0, 1200)],
             "jobs": [_job(j, 120.0 + 5 * i) for i, j in enumerate(jobs)]}
    if joint_failed:
        joint = {"arm": "joint", "processes": [{**_process("all", 20.0, 500), "returncode": 1}], "jobs": [],
                 "failed": "joint all exited with code 1 (log: j.log)"}
    record = {
        "command": "python benchmarks/multitrain.py", "date": "2026-01-01T00:00:00+00:00", "commit": "abc1234",
        "machine": {"cores": 2, "platform": "Linux", "python": "3.11", "gpu": None,
                    "versions": dict.fromkeys(["torch", "transformers", "peft", "accelerate", "sentence-transformers"], "1")},
        "steps": 60, "batch_size": 8, "jobs": dict.fromkeys(jobs, "configs/x.yaml"), "quick": False,
        "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [2.0, 2.0, 2.0], "parent_peak_bytes": 25 * MB,
        "arms": {
            "solo": {"arm": "solo", "processes": [_process(j, 100.0, 1000) for j in jobs], "jobs": [_job(j, 40.0) for j in jobs]},
            "peft": {"arm": "peft", "processes": [_process(j, 80.0, 900) for j in jobs], "jobs": [_job(j, 50.0) for j in jobs]},
            "joint": joint,
        },
        "weight_diffs": None if joint_failed else {"a": 1e-7, "b": 3e-6, "c": 2e-7},
        "weight_scales": {"a": 0.5, "b": 0.25, "c": 1.0},
    }
    record["summary"] = multitrain.summarize(record)
    return record


def test_ratios_come_from_summed_walls_and_peaks_and_one_joint_loop():
    record = fabricated()
    s = record["summary"]
    assert s["arms"]["solo"]["wall_seconds"] == 300.0 and s["arms"]["solo"]["peak_sum_bytes"] == 3000 * MB
    assert s["arms"]["solo"]["peak_max_bytes"] == 1000 * MB
    assert s["arms"]["solo"]["examples_per_s"] == pytest.approx(3 * 60 * 8 / 120.0)  # loops add up
    assert s["arms"]["joint"]["examples_per_s"] == pytest.approx(3 * 60 * 8 / 120.0)  # one loop: the first to leave
    assert s["arms"]["peft"]["examples_per_s"] == pytest.approx(3 * 60 * 8 / 150.0)
    assert s["joint_vs_solo_wall"] == pytest.approx(0.5) and s["joint_vs_peft_wall"] == pytest.approx(150 / 240)
    assert s["mem_ratio"] == pytest.approx(0.4) and s["max_weight_diff"] == 3e-6
    assert multitrain.result_line(record) == (
        "RESULT joint_vs_solo_wall=0.500 joint_vs_peft_wall=0.625 mem_ratio=0.400 max_weight_diff=3e-06")


def test_the_report_has_the_arm_table_machine_and_targets(tmp_path):
    report = multitrain.write_report(fabricated())
    assert "| (a) 3 solo lexlora runs | 300.0 | 3000 | 1000 | 12.00 | 0.500 | 0.400 |" in report
    assert "| (c) 1 joint lexlora run | 150.0 | 1200 | 1200 | 12.00 | 1.000 | 1.000 |" in report
    assert "| b | 100.0 / 40.0 / 1.5000 | 80.0 / 50.0 / 1.5000 | 150.0 / 125.0 / 1.5000 | 3e-06 | 0.25 |" in report
    assert "2 CPU cores" in report and "before 1.00, 1.00, 1.00, after 2.00, 2.00, 2.00" in report
    assert "commit abc1234" in report and "PEFT has no fusion projection" in report
    assert "mem_ratio 0.400 (≤ 0.5: met)" in report and "joint_vs_peft_wall 0.625 (≤ 0.75: met)" in report


def test_a_failed_joint_arm_is_said_plainly_and_exits_non_zero(tmp_path, capsys):
    record = fabricated(joint_failed=True)
    assert record["summary"]["joint_vs_solo_wall"] is None and record["summary"]["mem_ratio"] is None
    line = multitrain.result_line(record)
    assert line.startswith("joint arm FAILED: joint all exited with code 1") and "RESULT" not in line.split(";")[0]
    assert "(c) 1 joint lexlora run — FAILED" in multitrain.write_report(record)
    saved = tmp_path / "multitrain.json"
    saved.write_text(json.dumps(record))
    assert multitrain.main(["--from-json", str(saved)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == line


def test_the_script_refuses_bad_arguments_before_any_work():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multitrain.py"), "--steps", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--steps must be at least 1" in done.stderr
