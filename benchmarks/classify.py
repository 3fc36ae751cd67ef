"""Classifying files by type: a classifier-head adapter against label generation (free and
constrained), each with fusion on and off, every choice made on validation.

    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/classify.py          # ~1 h on 2 shared cores
    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/classify.py --quick  # < 15 min

Data: ../shared/data/file-descriptions/file_type.jsonl (2010 rows, file -> ext_def), shuffled and
split train [:80%] / validation [80%:90%] / test [90%:] (benchmarks/classify_run.py says how and why).
Trained arms (benchmarks/classify_run.py): `head` and `head+fusion` (model.task=classification on
all-MiniLM-L6-v2), `gen` and `gen+fusion` (label generation on the MiniLM warm start, each adapter
decoded free and constrained to its label set). Same batches (batch 16, length-grouped), schedule
and LoRA settings in every arm.

Two phases, each run in its own process:

  select  one seed (0): every arm at each lr of its family's grid (--head-lrs, --gen-lrs; the fusion
          arms at every lr too, or with --fusion-lrs chosen at the lr chosen for the same family
          without fusion), scored on VALIDATION; per arm the run with the best validation macro-F1 is chosen
          (head: the head's; gen: constrained, then free), ties to the lower validation loss, then
          the lower lr. These runs never see the test split: it is removed from their config.
  final   each chosen arm retrained with --seeds seeds (1, 2, ...) and scored once on TEST.

The report (--out, default benchmarks/results/classify.md; a temp dir with --quick) gives per arm
accuracy and macro-F1 mean ± sd over seeds on test, trainable parameters and train seconds; paired
bootstrap 95% intervals of the differences (constrained - free, head - constrained gen, fusion on -
off for head and gen); the select table. A JSON beside it keeps every run (--from-json rewrites the
report from it, e.g. with a --note). The last line is

  RESULT head_acc=… head_f1=… gen_f1=… constrained_f1=… fusion_delta_f1=… seeds=N

test means over seeds of the arms chosen on validation: head = the head arm without fusion;
gen_f1 / constrained_f1 = the gen arm without fusion, decoded free (outputs mapped through the
tokenizer's round trip of the labels) / constrained; fusion_delta_f1 = head+fusion minus head.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify_report import result_line, write_report  # noqa: E402
from classify_run import ARMS, DATA, SHUFFLE_SEED, SPLITS  # noqa: E402
import study_common  # noqa: E402
from study_common import git_state, lr_list, version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPT = Path(__file__).resolve().parent / "classify_run.py"
SELECT_SEED = 0
# --quick: every arm and both phases in a few minutes (figures meaningless; the machinery proven).
QUICK = {"steps": 6, "head_lrs": "1e-3", "gen_lrs": "1e-3", "fusion_lrs": "chosen", "seeds": 2, "max_rows": 16}
DEFAULTS = {"steps": None, "head_lrs": "3e-4,1e-3,3e-3", "gen_lrs": "3e-4,1e-3,3e-3", "fusion_lrs": "grid", "seeds": 3,
            "max_rows": None}


def choice_key(run: dict) -> tuple:
    """Sort key of a select run, best first: validation macro-F1 (head: the head's; gen: constrained,
    then free), then the lower validation loss, then the lower lr."""
    decodings = run["decodings"]
    if run["arm"].startswith("head"):
        f1 = (decodings["head"]["scores"]["macro_f1"],)
    else:
        f1 = (decodings["constrained"]["scores"]["macro_f1"], decodings["free"]["scores"]["macro_f1"])
    return (*(-x for x in f1), run["best_val_loss"], run["lr"])


def choose(runs: list[dict]) -> dict | None:
    """The best select run by `choice_key`; only validation runs of one arm may be chosen among."""
    if any(r["split"] != "validation" or "test" in r["splits_seen"] for r in runs):
        raise ValueError("choices are made on validation runs only")
    if len({r["arm"] for r in runs}) > 1:
        raise ValueError("choose among the runs of one arm")
    return min(runs, key=choice_key) if runs else None


class Study:
    """Runs classify_run.py once per (phase, arm, lr, seed), one after another; keeps what came back,
    which runs failed, and the machine's load around each."""

    def __init__(self, args):
        self.args = args
        self.failures: list[dict] = []
        self.loads: list[float] = []

    def run(self, phase: str, arm: str, lr: float, seed: int) -> dict | None:
        args = self.args
        name = f"{phase}-{arm}-lr{lr:g}-seed{seed}"
        out = Path(args.work) / f"{name}.json"
        cmd = [sys.executable, str(RUN_SCRIPT), "--phase", phase, "--arm", arm, "--lr", repr(lr), "--seed", str(seed),
               "--epochs", str(args.epochs), "--fusion-mode", args.fusion_mode, "--work", args.work, "--json", str(out),
               *(["--steps", str(args.steps)] if args.steps else []),
               *(["--max-rows", str(args.max_rows)] if args.max_rows else []),
               *(["--keep-adapters"] if args.keep_adapters else []), *args.override]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        started, load_before = time.perf_counter(), os.getloadavg()
        code = subprocess.call(cmd, cwd=ROOT)
        load_after = os.getloadavg()
        self.loads += [load_before[0], load_after[0]]
        if code != 0:
            print(f"== {name} failed (exit {code}); continuing", flush=True)
            self.failures.append({"phase": phase, "arm": arm, "lr": lr, "seed": seed, "exit": code})
            return None
        result = json.loads(out.read_text())
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        # Above the core count, something else competed for the CPU and the run's seconds are inflated.
        result["load_avg_5min"] = [round(load_before[1], 2), round(load_after[1], 2)]
        shown = ", ".join(f"{d} acc {v['scores']['accuracy']:.4f} f1 {v['scores']['macro_f1']:.4f}"
                          for d, v in result["decodings"].items())
        print(f"== {name}: {result['split']} {shown}; train {result['train_seconds']:.0f}s "
              f"(run wall {result['wall_seconds']:.0f}s)", flush=True)
        return result


def select_phase(study: Study, args) -> tuple[list[dict], dict[str, dict]]:
    """Every arm's grid on validation with one seed; per arm the chosen run."""
    runs: list[dict] = []
    chosen: dict[str, dict] = {}
    for family, lrs in (("head", args.head_lrs), ("gen", args.gen_lrs)):
        for arm in (family, f"{family}+fusion"):
            if arm not in args.arms:
                continue
            grid = lrs
            if arm.endswith("+fusion") and args.fusion_lrs == "chosen" and family in chosen:
                grid = [chosen[family]["lr"]]
            done = [r for lr in grid if (r := study.run("select", arm, lr, SELECT_SEED)) is not None]
            runs += done
            if (picked := choose(done)) is not None:
                chosen[arm] = picked
    return runs, chosen


def final_phase(study: Study, chosen: dict[str, dict], seeds: list[int]) -> list[dict]:
    """Each chosen arm at its chosen lr, once per seed, scored on test."""
    return [r for arm in ARMS if arm in chosen for seed in seeds
            if (r := study.run("final", arm, chosen[arm]["lr"], seed)) is not None]


def label_counts() -> dict[str, dict[str, int]]:
    """Rows per label in each split, as every run splits the data (read once, no model)."""
    from collections import Counter

    from lexlora.config import load_config
    from lexlora.data.splits import load_splits
    from classify_run import COMMON

    cfg = load_config(None, COMMON)
    splits, _, _ = load_splits(cfg.data, fusion_enabled=False)
    return {name: dict(sorted(Counter(r.fields["ext_def"].strip() for r in rows).items())) for name, rows in splits.items()}


def study_settings(args) -> dict:
    import platform

    return {
        "data_path": DATA, "splits": SPLITS, "shuffle_seed": SHUFFLE_SEED, "label_counts": label_counts(),
        "steps": args.steps, "epochs": args.epochs, "batch_size": 16, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "fusion_mode": args.fusion_mode, "select_seed": SELECT_SEED, "head_lrs": args.head_lrs, "gen_lrs": args.gen_lrs,
        "fusion_lrs": args.fusion_lrs, "max_rows": args.max_rows, "arms": args.arms, "overrides": list(args.override),
        "quick": args.quick, "processor": platform.processor() or platform.machine(),
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "sentence-transformers")},
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one lr, 2 seeds, 16 rows; out to a temp dir")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: --epochs)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run when --steps is not given (default 2)")
    parser.add_argument("--head-lrs", help="head lr grid (default 3e-4,1e-3,3e-3)")
    parser.add_argument("--gen-lrs", help="gen lr grid (default 3e-4,1e-3,3e-3)")
    parser.add_argument("--fusion-lrs", choices=("grid", "chosen"),
                        help="the fusion arms at every lr (grid, default) or at the lr chosen without fusion (chosen)")
    parser.add_argument("--fusion-mode", default="add", choices=("add", "first", "prefix"))
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, help="seeds per final arm (default 3)")
    parser.add_argument("--max-rows", type=int, help="score only the first N rows of validation / test")
    parser.add_argument("--out", help="report (default benchmarks/results/classify.md; --quick: a temp dir)")
    parser.add_argument("--work", default=None, help="run records and adapters (default: a temp dir)")
    parser.add_argument("--keep-adapters", action="store_true", help="keep every run's adapter dir in --work")
    parser.add_argument("--from-json", help="rewrite --out from a finished study's JSON (no training)")
    parser.add_argument("--note", default="", help="a paragraph added under the tables (what the data says)")
    parser.add_argument("override", nargs="*", help="dotted config overrides for every run, e.g. lora.r=8")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.epochs < 1 or (args.steps is not None and args.steps < 1):
        raise SystemExit("--seeds, --epochs and --steps must be at least 1")
    args.head_lrs, args.gen_lrs = lr_list(args.head_lrs), lr_list(args.gen_lrs)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or set(args.arms) - set(ARMS):
        raise SystemExit(f"--arms takes a comma list of {', '.join(ARMS)} (got {','.join(args.arms)!r})")
    args.out = args.out or study_common.default_out(args.quick, "classify")
    return args


def write_outputs(args, saved: dict) -> str:
    return study_common.write_outputs(args.out, saved, args.note, write_report, result_line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return study_common.rewrite_from_json(args.from_json, lambda saved: write_outputs(args, saved))

    command, started_at, wall = study_common.start_study(args, "classify", argv)
    settings = study_settings(args)
    commit = git_state()  # the code the runs start from (others may commit while the study runs)
    study = Study(args)
    select, chosen = select_phase(study, args)
    seeds = [SELECT_SEED + 1 + i for i in range(args.seeds)]
    final = final_phase(study, chosen, seeds)
    saved = {
        "command": command, "date": started_at.isoformat(), "commit": commit,
        "cores": study_common.machine_cores(),
        "wall_seconds": time.perf_counter() - wall, "settings": settings, "seeds": seeds,
        "load_avg": {"min": min(study.loads, default=float("nan")), "max": max(study.loads, default=float("nan"))},
        "chosen": {arm: {"arm": r["arm"], "lr": r["lr"]} for arm, r in chosen.items()},
        "select": select, "final": final, "failures": study.failures,
    }
    out_json = Path(args.out).with_suffix(".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(saved, indent=1) + "\n")
    line = write_outputs(args, saved)
    print(Path(args.out).read_text())
    print(f"report: {args.out}; runs: {out_json}", flush=True)
    print(line, flush=True)
    return 0 if final and not study.failures else 1


if __name__ == "__main__":
    sys.exit(main())
