"""benchmarks/classify.py: the select phase's runs cannot read the test split, choices follow
validation, the report and RESULT line come from the final runs; and stats.paired_bootstrap_metric
(macro-F1 / accuracy differences recomputed on resampled rows). No model is trained here."""

import json
import sys

import numpy as np
import pytest

from lexlora.evaluation.metrics import classification_metrics
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import classify  # noqa: E402
import classify_run  # noqa: E402
from classify_report import result_line, write_report  # noqa: E402
from stats import paired_bootstrap_metric  # noqa: E402

LABELS = ["Application log", "Shell script", "XML document", "file"]


# ---- paired_bootstrap_metric ----------------------------------------------------------------------

def noisy(refs, rate, rng):
    return [r if rng.random() > rate else LABELS[rng.integers(0, 3)] for r in refs]


def test_bootstrap_metric_point_estimate_is_the_seed_mean_difference_of_lexloras_metric():
    rng = np.random.default_rng(0)
    refs = [LABELS[i] for i in rng.integers(0, 3, 150)]
    a = [noisy(refs, 0.1, rng) for _ in range(3)]
    b = [noisy(refs, 0.4, rng) for _ in range(2)]
    a[0][0], a[1][1], b[0][2] = "a shell script", "file", "(nonsense)"  # out of the set; a label no reference has
    for metric in ("macro_f1", "accuracy"):
        expected = (np.mean([classification_metrics(p, refs, labels=LABELS)[metric] for p in a])
                    - np.mean([classification_metrics(p, refs, labels=LABELS)[metric] for p in b]))
        diff, low, high = paired_bootstrap_metric(a, b, refs, metric, labels=LABELS, resamples=2000, seed=0)
        assert diff == pytest.approx(expected, abs=1e-12)
        assert 0 < low < diff < high  # a is clearly better on 150 rows
        assert paired_bootstrap_metric(a, b, refs, metric, labels=LABELS, resamples=2000, seed=0) == (diff, low, high)


def test_bootstrap_metric_cannot_tell_an_arm_from_itself_and_checks_its_input():
    refs = ["file", "Shell script", "XML document", "Shell script"]
    preds = [["file", "Shell script", "Shell script", "Shell script"]]
    assert paired_bootstrap_metric(preds, preds, refs, resamples=500) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same 4 reference rows"):
        paired_bootstrap_metric(preds, [refs[:3]], refs)
    with pytest.raises(ValueError, match="metric must be one of"):
        paired_bootstrap_metric(preds, preds, refs, "rouge1")
    with pytest.raises(ValueError, match="outside the given labels"):
        paired_bootstrap_metric(preds, preds, refs, labels=["file"])


# ---- the runs' configs -----------------------------------------------------------------------------

def test_select_config_has_no_test_split_and_the_run_settings_win(tmp_path):
    select = classify_run.run_config("head+fusion", "select", 3e-4, 0, tmp_path / "x", epochs=2,
                                     overrides=["train.learning_rate=9", "lora.r=4"])
    assert select.data.splits == {"train": "[:80%]", "validation": "[80%:90%]"}  # same slices, test gone
    assert (select.train.learning_rate, select.train.seed, select.train.epochs, select.train.max_steps) == (3e-4, 0, 2, None)
    assert select.model.task == "classification" and select.fusion.enabled and select.lora.r == 4
    assert select.train.eval_metric == "macro_f1" and select.data.shuffle_seed == classify_run.SHUFFLE_SEED
    final = classify_run.run_config("gen", "final", 1e-3, 2, tmp_path / "y", steps=5, eval_max_rows=16)
    assert final.data.splits["test"] == "[90%:]" and not final.fusion.enabled
    assert final.model.name_or_path.startswith("encoder-decoder:") and final.model.init_seed == 2
    assert (final.train.max_steps, final.train.eval_max_rows, final.train.eval_metric) == (5, 16, "val_loss")
    # the same batching in every arm
    assert (select.train.batch_size, select.train.group_by_length) == (final.train.batch_size, final.train.group_by_length) == (16, True)
    assert select.train.cpu_threads == final.train.cpu_threads == 1
    with pytest.raises(SystemExit, match="unknown arm"):
        classify_run.run_config("fusion", "select", 1e-3, 0, tmp_path / "z")


def test_free_outputs_map_through_the_tokenizers_round_trip():
    class Uncased:  # what MiniLM's BERT tokenizer does to a label: lower case
        def __call__(self, text):
            return {"input_ids": text.lower()}

        def decode(self, ids, skip_special_tokens=True):
            return ids

    out = classify_run.as_labels(["shell script", " file ", "Shell script", "a shell"], LABELS, Uncased())
    assert out == ["Shell script", "file", "Shell script", "a shell"]  # the exact label is not a round trip


# ---- the study's choices, on fake runs --------------------------------------------------------------

# Validation macro-F1 per (arm, lr): ties at 1.0 for head are broken by the validation loss.
VALIDATION = {("head", 3e-4): (0.9, 0.5), ("head", 1e-3): (1.0, 0.2), ("head", 3e-3): (1.0, 0.1),
              ("head+fusion", 3e-3): (1.0, 0.1), ("gen", 3e-4): (0.5, 0.3), ("gen", 1e-3): (0.8, 0.3),
              ("gen+fusion", 1e-3): (0.8, 0.3)}
REFS = ["Shell script", "XML document", "Application log", "Shell script"]


def predictions(arm, phase, seed):
    """Test predictions: head perfect, gen constrained one row wrong, free two rows wrong."""
    if arm.startswith("head"):
        return {"head": list(REFS)}
    constrained = ["Shell script", "Shell script", "Application log", "Shell script"]
    free = ["Shell script", "shell", "xml", "Shell script"] if seed == 1 else list(constrained)
    return {"free": free, "free_exact": [p.lower() for p in free], "constrained": constrained}


class FakeStudy:
    def __init__(self):
        self.calls, self.failures = [], []

    def run(self, phase, arm, lr, seed):
        self.calls.append((phase, arm, lr, seed))
        f1, loss = VALIDATION[(arm, lr)] if phase == "select" else (0.0, 0.1)
        decodings = {name: {"predictions": preds, "seconds": 1.0, "scores": {
            "macro_f1": f1 if phase == "select" else classification_metrics(preds, REFS, labels=LABELS)["macro_f1"],
            "accuracy": f1 if phase == "select" else classification_metrics(preds, REFS, labels=LABELS)["accuracy"]}}
            for name, preds in predictions(arm, phase, seed).items()}
        return {"phase": phase, "arm": arm, "lr": lr, "seed": seed, "split": classify_run.PHASES[phase],
                "splits_seen": ["train", "validation"] if phase == "select" else ["test", "train", "validation"],
                "rows": 4, "labels": LABELS, "trainable_params": 800_000 if arm.startswith("head") else 5_000_000,
                "total_params": 23_000_000 if arm.startswith("head") else 50_000_000, "train_seconds": 100.0 + seed,
                "best_epoch": 1, "best_val_loss": loss, "wall_seconds": 130.0, "inputs": ["a.sh", "b.xml", "c.log", "d.sh"],
                "references": REFS, "decodings": decodings}


def test_the_fusion_arms_get_the_whole_grid_by_default(tmp_path, monkeypatch):
    args = classify.parse_args(["--head-lrs", "1e-3,3e-3", "--gen-lrs", "3e-4,1e-3", "--out", str(tmp_path / "c.md")])
    monkeypatch.setitem(VALIDATION, ("head+fusion", 1e-3), (1.0, 0.3))
    monkeypatch.setitem(VALIDATION, ("gen+fusion", 3e-4), (0.9, 0.3))
    study = FakeStudy()
    _, chosen = classify.select_phase(study, args)
    assert [c[1:3] for c in study.calls if c[1].endswith("+fusion")] == [
        ("head+fusion", 1e-3), ("head+fusion", 3e-3), ("gen+fusion", 3e-4), ("gen+fusion", 1e-3)]
    assert chosen["gen+fusion"]["lr"] == 3e-4 and args.seeds == 3


def test_choices_follow_validation_and_only_chosen_arms_reach_test(tmp_path, monkeypatch):
    monkeypatch.setattr(classify, "label_counts", lambda: {"train": {"Shell script": 3, "file": 3}, "validation": {"Shell script": 1}})
    args = classify.parse_args(["--head-lrs", "3e-4,1e-3,3e-3", "--gen-lrs", "3e-4,1e-3", "--fusion-lrs", "chosen",
                                "--seeds", "2", "--out", str(tmp_path / "c.md")])
    study = FakeStudy()
    select, chosen = classify.select_phase(study, args)
    assert {c[0] for c in study.calls} == {"select"} and {c[3] for c in study.calls} == {0}
    # --fusion-lrs chosen: each fusion arm at the lr chosen without fusion only
    assert [c[2] for c in study.calls if c[1].endswith("+fusion")] == [3e-3, 1e-3]
    assert {arm: r["lr"] for arm, r in chosen.items()} == {"head": 3e-3, "head+fusion": 3e-3, "gen": 1e-3, "gen+fusion": 1e-3}
    final = classify.final_phase(study, chosen, [1, 2])
    assert [c for c in study.calls if c[0] == "final"] == [
        ("final", arm, chosen[arm]["lr"], seed) for arm in classify_run.ARMS for seed in (1, 2)]
    with pytest.raises(ValueError, match="validation runs only"):
        classify.choose(final[:1])

    saved = {"command": "python benchmarks/classify.py", "date": "2026-12-02T10:00:00+00:00", "commit": "abc1234",
             "cores": 2, "wall_seconds": 600.0, "settings": classify.study_settings(args), "seeds": [1, 2],
             "load_avg": {"min": 1.5, "max": 2.5}, "chosen": {arm: {"arm": arm, "lr": r["lr"]} for arm, r in chosen.items()},
             "select": select, "final": final, "failures": []}
    # gen free: seed 1 gets 2 of 4 rows (macro-F1 over Shell script, XML document, Application log
    # and the wrong "shell"/"xml" outputs' absence), seed 2 the constrained outputs.
    free = np.mean([classification_metrics(predictions("gen", "final", s)["free"], REFS, labels=LABELS)["macro_f1"] for s in (1, 2)])
    constrained = classification_metrics(predictions("gen", "final", 1)["constrained"], REFS, labels=LABELS)["macro_f1"]
    assert result_line(saved) == (f"RESULT head_acc=1.0000 head_f1=1.0000 gen_f1={free:.4f} constrained_f1={constrained:.4f} "
                                  "fusion_delta_f1=+0.0000 seeds=2")
    report = write_report(saved, note="What the data says.")
    assert "git commit abc1234" in report and "2 CPU cores" in report and "load average (1 min) 1.5-2.5" in report
    assert "| head | 0.003 | 2 | 1.000 ± 0.000 | 1.000 ± 0.000 | 800,000 | 3.48 |" in report
    assert "| head+fusion | head | +0.0000 | [+0.0000, +0.0000] |" in report  # same outputs row by row
    assert "| gen constrained | gen free |" in report and "| head | gen constrained | +0.2500 |" in report
    assert "| gen free, exact strings |" in report and report.count("**chosen**") == 4
    assert "What the data says." in report and "| b.xml | XML document |" in report

    (tmp_path / "c.json").write_text(json.dumps(saved))
    assert classify.main(["--from-json", str(tmp_path / "c.json"), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text().startswith(write_report(saved))
