"""benchmarks/quality.py: choices made on validation only (the select phase's runs cannot read the
test split), the final arms scored on test with several seeds, and the report and RESULT line."""

import json
import sys

import pytest

from lexlora.errors import ConfigError
from tests.conftest import ROOT, TINY_T5

sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402
import quality_arms  # noqa: E402
from quality_report import result_line, write_report  # noqa: E402

TINY_YAML = """
model: {{name_or_path: google/flan-t5-small, random_init: true, config_overrides: {overrides}}}
lora: {{r: 2}}
fusion: {{enabled: true}}
data:
  path: {data}
  input_template: "Describe the file {{filename}}:"
  target_field: description
  splits: {{train: "[:24]", validation: "[24:30]", test: "[30:36]"}}
train: {{batch_size: 8, log_every: 1, seed: 42}}
generation: {{max_new_tokens: 3}}
"""


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML.format(overrides=json.dumps(TINY_T5), data=ROOT / "examples" / "python_stdlib.jsonl"))
    return path


def test_select_config_has_no_test_split_and_the_arm_wins(tiny_config, tmp_path):
    select = quality_arms.run_config(str(tiny_config), ["train.learning_rate=9", "fusion.enabled=true"], "select",
                                     "lora", 3e-4, 7, 5, tmp_path / "x")
    assert select.data.splits == {"train": "[:24]", "validation": "[24:30]"}  # same slices, test gone
    assert (select.train.learning_rate, select.train.seed, select.train.max_steps) == (3e-4, 7, 5)
    assert select.fusion.enabled is False
    final = quality_arms.run_config(str(tiny_config), [], "final", "fusion-prefix", 1e-3, 43, 5, tmp_path / "y")
    assert final.data.splits["test"] == "[30:36]" and final.fusion.mode == "prefix" and final.fusion.enabled
    with pytest.raises(SystemExit, match="unknown arm"):
        quality_arms.run_config(str(tiny_config), [], "select", "prefix", 1e-3, 1, 5, tmp_path / "z")


def _child(tiny_config, tmp_path, phase, arm, *extra):
    out = tmp_path / f"{phase}-{arm}.json"
    assert quality_arms.main(["--config", str(tiny_config), "--phase", phase, "--arm", arm, "--lr", "3e-3",
                              "--seed", "42", "--steps", "2", "--max-rows", "4", "--work", str(tmp_path / "work"),
                              "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_a_select_run_scores_validation_and_its_adapter_cannot_reach_test(tiny_config, tmp_path):
    from lexlora.evaluation.runner import eval_rows

    result = _child(tiny_config, tmp_path, "select", "lora", "--keep-adapters")
    assert result["split"] == "validation" and result["splits_seen"] == ["train", "validation"]
    assert result["rows"] == 4 and len(result["outputs"]) == 4
    assert result["inputs"] == ["bdb.py", "bisect.py", "bz2.py", "cProfile.py"]  # validation rows 24..27
    assert result["settings"] == {"fast_ops": True, "fused_optimizer": True, "group_by_length": True, "batch_size": 8}
    adapter = tmp_path / "work" / "select-lora-lr0.003-seed42"
    with pytest.raises(ConfigError, match="'test' is not one of this adapter's splits"):
        eval_rows(adapter, "test")


def test_the_full_arm_trains_every_weight_and_scores_test_in_the_final_phase(tiny_config, tmp_path):
    result = _child(tiny_config, tmp_path, "final", "full")
    assert result["split"] == "test" and result["rows"] == 4
    assert result["trainable_params"] == result["total_params"]
    assert result["steps"] == 2 and result["best_epoch"] == 1
    assert result["inputs"] == ["cgitb.py", "chunk.py", "cmd.py", "code.py"]  # test rows 30..33
    assert not (tmp_path / "work" / "final-full-lr0.003-seed42").exists()  # nothing kept without --keep-adapters


# ---- the study's choices, on fake runs ------------------------------------------------------------

# Validation ROUGE-1 of each (arm, lr) in the select phase; test ROUGE-1 of the final runs. The
# fusion mode best on test (add) is not the one best on validation (first): the report must follow
# validation.
VALIDATION = {("full", 1e-4): 0.30, ("full", 3e-4): 0.35, ("lora", 1e-3): 0.40, ("lora", 3e-3): 0.38,
              ("fusion-add", 1e-3): 0.39, ("fusion-first", 1e-3): 0.41, ("fusion-prefix", 1e-3): 0.41}
TEST = {"full": 0.33, "lora": 0.42, "fusion-first": 0.43, "fusion-add": 0.50}


class FakeStudy:
    def __init__(self):
        self.calls, self.failures = [], []

    def run(self, phase, arm, lr, seed):
        self.calls.append((phase, arm, lr, seed))
        r1 = VALIDATION[(arm, lr)] if phase == "select" else TEST[arm] + 0.01 * (seed - 43)
        outputs = ["a config file", "a log"] if arm == "full" else ["a backup of the config", "a log file"]
        # prefix ties first on ROUGE-1; first wins on the lower validation loss.
        loss = 2.0 if arm != "fusion-prefix" else 2.5
        return {"phase": phase, "arm": arm, "lr": lr, "seed": seed, "split": quality_arms.PHASES[phase], "rows": 2,
                "scores": {"rouge1": r1, "rouge2": r1 / 2, "rougeL": r1 - 0.01}, "best_epoch": 3, "best_val_loss": loss,
                "trainable_params": 49_000_000 if arm == "full" else 5_000_000, "total_params": 49_000_000,
                "train_seconds": 100.0 + seed, "wall_seconds": 120.0, "inputs": ["backup_config", "app_log"],
                "references": ["a backup of the config", "a log file"], "outputs": outputs}


def test_choices_are_made_on_validation_and_only_chosen_arms_reach_test(tmp_path):
    args = quality.parse_args(["--full-lrs", "1e-4,3e-4", "--lora-lrs", "1e-3,3e-3", "--fusion-lrs", "lora",
                               "--seeds", "2", "--out", str(tmp_path / "q.md")])
    study = FakeStudy()
    select, chosen = quality.select_phase(study, args, 42)
    assert {c[0] for c in study.calls} == {"select"} and {c[3] for c in study.calls} == {42}
    # --fusion-lrs lora: the modes tried at the lr chosen for LoRA (1e-3) only.
    assert [c[2] for c in study.calls if c[1].startswith("fusion-")] == [1e-3, 1e-3, 1e-3]
    assert {fam: (r["arm"], r["lr"]) for fam, r in chosen.items()} == {
        "full": ("full", 3e-4), "lora": ("lora", 1e-3), "fusion": ("fusion-first", 1e-3)}
    final = quality.final_phase(study, chosen, [43, 44])
    assert [c for c in study.calls if c[0] == "final"] == [
        ("final", "full", 3e-4, 43), ("final", "full", 3e-4, 44), ("final", "lora", 1e-3, 43),
        ("final", "lora", 1e-3, 44), ("final", "fusion-first", 1e-3, 43), ("final", "fusion-first", 1e-3, 44)]

    saved = {"command": "python benchmarks/quality.py", "date": "2026-12-02T10:00:00+00:00", "commit": "abc1234",
             "cores": 2, "wall_seconds": 600.0, "settings": quality.study_settings(args), "seeds": [43, 44],
             "chosen": {fam: {"arm": r["arm"], "lr": r["lr"]} for fam, r in chosen.items()},
             "select": select, "final": final, "failures": []}
    line = result_line(saved)
    assert line == ("RESULT full_r1=0.3350 lora_r1=0.4250 fusion_r1=0.4350 best_mode=first "
                    "trainable_pct=10.20 selected_on=validation seeds=2")
    report = write_report(saved)
    assert "git commit abc1234" in report and "2 CPU cores" in report and "wall time 10.0 min" in report
    assert "| LoRA + fusion | mode first, lr 0.001 | 2 | 0.435 ± 0.007 |" in report
    assert "| fusion | LoRA + fusion (first) | 0.001 | 0.410 |" in report and report.count("**chosen**") == 3
    assert "| LoRA + fusion | LoRA, no fusion | +0.000 | [+0.000, +0.000] |" in report  # same outputs row by row
    assert "| LoRA, no fusion | full fine-tune |" in report

    # --from-json rewrites the same report from the saved record.
    (tmp_path / "q.json").write_text(json.dumps(saved))
    assert quality.main(["--from-json", str(tmp_path / "q.json"), "--out", str(tmp_path / "again.md")]) == 0
    text = (tmp_path / "again.md").read_text()
    assert text.startswith(report) and text.rstrip().splitlines()[-2] == line


def test_choose_refuses_test_runs():
    study = FakeStudy()
    run = study.run("final", "lora", 1e-3, 43)
    with pytest.raises(ValueError, match="validation runs only"):
        quality.choose([run])


def test_quick_defaults_and_bad_grids(tmp_path):
    args = quality.parse_args(["--quick"])
    assert (args.steps, args.seeds, args.fusion_lrs) == (8, 2, "lora")
    assert "benchmarks/results" not in args.out  # quick figures never land on the committed results
    with pytest.raises(SystemExit, match="learning rates"):
        quality.parse_args(["--full-lrs", "fast"])
    with pytest.raises(SystemExit, match="--modes"):
        quality.parse_args(["--modes", "add,sideways"])


def test_resume_reuses_only_runs_of_the_same_command(tmp_path, monkeypatch):
    calls = []

    def fake_call(cmd, cwd=None):
        calls.append(cmd)
        out = cmd[cmd.index("--json") + 1]
        scores = {"rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.1}
        (tmp_path / out).write_text(json.dumps({"split": "validation", "scores": scores, "train_seconds": 1.0}))
        return 0

    monkeypatch.setattr(quality.subprocess, "call", fake_call)
    args = quality.parse_args(["--quick", "--work", str(tmp_path), "--out", str(tmp_path / "q.md"), "--resume"])
    study = quality.Study(args)
    first = study.run("select", "lora", 1e-3, 42)
    again = study.run("select", "lora", 1e-3, 42)
    assert len(calls) == 1 and again["command"] == first["command"] and again["scores"] == first["scores"]
    study.run("select", "lora", 3e-3, 42)  # another run: trained
    args.steps += 1  # the same name with other settings: stale, retrained
    study.run("select", "lora", 1e-3, 42)
    assert len(calls) == 3
