"""Does a lexlora adapter make a model better at its task? The seed's quality study, on a base that
loads here (no flan-t5-small weights reach these machines), with every choice made on validation.

    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/quality.py          # hours
    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/quality.py --quick  # < 15 min

Base: the warm-started encoder-decoder of configs/minilm_file_description.yaml (two copies of
all-MiniLM-L6-v2, cross-attention new). Data and split: the seed's (file_description.jsonl,
train [:85%] / validation [85%:95%] / test [95%:] = 1707 / 201 / 100 rows), filename -> file_desc.
Every run trains the same number of optimizer steps (600) with the same batches (lexlora's
length-grouped train loader), linear schedule with warmup, clipping, AdamW as train.fused_optimizer
says, the base's model.fast_ops, and keeps the epoch with the lowest validation loss. Arm families:

  full    every weight of the base trainable (benchmarks/quality_arms.py), lr from --full-lrs;
  lora    lexlora.training.train with fusion off, lr from --lora-lrs;
  fusion  train with fusion on, mode from --modes x lr from --lora-lrs (--fusion-lrs lora: the modes
          at the lr chosen for lora only).

Two phases, each run in its own process (benchmarks/quality_arms.py):

  select  one seed (the config's train.seed): every grid point trains and is scored on VALIDATION
          (greedy decoding, ROUGE); per family the point with the highest validation ROUGE-1 is
          chosen (ties: lower validation loss). These runs never see the test split: it is removed
          from their config before any data is read.
  final   each chosen arm retrained with --seeds seeds (train.seed + 1 ...: seeds that took no part
          in the choice) and scored once on TEST.

The report (--out, default benchmarks/results/quality.md; a temp file with --quick) gives per final
arm the mean ± sd over seeds of ROUGE-1/2/L on test, trainable parameters and train seconds; paired
bootstrap 95% intervals of the ROUGE-1 differences fusion - lora, lora - full and fusion - full over
the test rows (each row's score first averaged over seeds); and the select phase's table. A JSON
beside it keeps every run (--from-json rewrites the report from it). The last line is

  RESULT full_r1=… lora_r1=… fusion_r1=… best_mode=… trainable_pct=… selected_on=validation seeds=N

(test ROUGE-1 means over seeds of the arms chosen on validation; best_mode: the fusion mode chosen on
validation; trainable_pct: the fusion arm's trainable share of its model, in %).

Cost: a run's fixed part (start, model loads, data, scoring) is ~35-45 s on 2 idle cores, its 600
steps ~330-470 s (benchmarks/results/quality.md's last single-seed run), so the default study's 24
runs take ~3 h (~2.2 h with --fusion-lrs lora). --quick makes 12 runs of 8 steps: ~10 min idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_common  # noqa: E402
from quality_arms import MODES  # noqa: E402
from quality_report import FAMILIES, result_line, write_report  # noqa: E402
from study_common import git_state, lr_list, version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS_SCRIPT = Path(__file__).resolve().parent / "quality_arms.py"
DEFAULT_CONFIG = ROOT / "configs" / "minilm_file_description.yaml"
# --quick: every family and both phases in a few minutes (figures meaningless; the machinery proven).
QUICK = {"steps": 8, "full_lrs": "3e-4", "lora_lrs": "1e-3,3e-3", "fusion_lrs": "lora", "seeds": 2,
         "max_val_rows": 16, "max_test_rows": 16}


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise SystemExit(f"--modes takes a comma list of {', '.join(MODES)} (got {text!r})")
    return modes


def choose(runs: list[dict]) -> dict | None:
    """The select-phase run with the highest validation ROUGE-1; ties go to the lower validation loss,
    then the lower learning rate. Only validation runs may be chosen among."""
    if any(r["split"] != "validation" for r in runs):
        raise ValueError("choices are made on validation runs only")
    if not runs:
        return None
    return min(runs, key=lambda r: (-r["scores"]["rouge1"], r["best_val_loss"], r["lr"]))


class Study:
    """Runs quality_arms.py once per (phase, arm, lr, seed), one after another; keeps what came back
    and which runs failed."""

    def __init__(self, args):
        self.args = args
        self.failures: list[dict] = []

    def run(self, phase: str, arm: str, lr: float, seed: int) -> dict | None:
        args = self.args
        name = f"{phase}-{arm}-lr{lr:g}-seed{seed}"
        out = Path(args.work) / f"{name}.json"
        max_rows = args.max_val_rows if phase == "select" else args.max_test_rows
        cmd = [sys.executable, str(ARMS_SCRIPT), "--config", args.config, "--phase", phase, "--arm", arm,
               "--lr", repr(lr), "--seed", str(seed), "--steps", str(args.steps), "--work", args.work,
               "--json", str(out), *(["--max-rows", str(max_rows)] if max_rows else []),
               *(["--keep-adapters"] if args.keep_adapters else []), *args.override]
        if args.resume and out.is_file():
            saved = json.loads(out.read_text())
            if saved.get("command") == cmd[1:]:  # the same run (script, settings, seed), not a stale one
                print(f"== {name}: finished before, reused from {out} (--resume)", flush=True)
                return saved
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        started, load_before = time.perf_counter(), os.getloadavg()[1]
        code = subprocess.call(cmd, cwd=ROOT)
        if code != 0:
            print(f"== {name} failed (exit {code}); continuing", flush=True)
            self.failures.append({"phase": phase, "arm": arm, "lr": lr, "seed": seed, "exit": code})
            return None
        result = json.loads(out.read_text())
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        # The 5-minute load average around the run: above the core count, something else competed
        # for the CPU and its seconds are inflated.
        result["load_avg_5min"] = [round(load_before, 2), round(os.getloadavg()[1], 2)]
        result["command"] = cmd[1:]  # what --resume compares (the interpreter's path may differ)
        out.write_text(json.dumps(result, indent=1) + "\n")
        s = result["scores"]
        print(f"== {name}: {result['split']} rouge1 {s['rouge1']:.4f} rouge2 {s['rouge2']:.4f} rougeL {s['rougeL']:.4f} "
              f"train {result['train_seconds']:.0f}s (run wall {result['wall_seconds']:.0f}s)", flush=True)
        return result


def select_phase(study: Study, args, seed: int) -> tuple[list[dict], dict[str, dict]]:
    """Every grid point on validation with one seed; per family the chosen run."""
    runs: list[dict] = []

    def grid(arm: str, lrs: list[float]) -> list[dict]:
        done = [study.run("select", arm, lr, seed) for lr in lrs]
        runs.extend(r for r in done if r is not None)
        return [r for r in done if r is not None]

    chosen: dict[str, dict] = {}
    for name, arms, lrs in (("full", ["full"], args.full_lrs), ("lora", ["lora"], args.lora_lrs)):
        if name in args.families:
            picked = choose([r for arm in arms for r in grid(arm, lrs)])
            if picked:
                chosen[name] = picked
    if "fusion" in args.families:
        if args.fusion_lrs == "lora" and "lora" not in chosen:
            print("== no lora run finished: the fusion modes are tried at every lora lr instead", flush=True)
        lrs = [chosen["lora"]["lr"]] if args.fusion_lrs == "lora" and "lora" in chosen else args.lora_lrs
        picked = choose([r for mode in args.modes for r in grid(f"fusion-{mode}", lrs)])
        if picked:
            chosen["fusion"] = picked
    return runs, chosen


def final_phase(study: Study, chosen: dict[str, dict], seeds: list[int]) -> list[dict]:
    """Each chosen arm at its chosen lr, once per seed, scored on test."""
    return [r for fam in FAMILIES if fam in chosen for seed in seeds
            if (r := study.run("final", chosen[fam]["arm"], chosen[fam]["lr"], seed)) is not None]


def study_settings(args) -> dict:
    """What the report says about the setup, read once from the config the runs use."""
    from lexlora.config import load_config

    cfg = load_config(args.config, list(args.override))
    config = Path(args.config).resolve()
    return {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else args.config),
        "overrides": list(args.override), "base": cfg.model.name_or_path, "init_seed": cfg.model.init_seed,
        "data_path": cfg.data.path, "splits": dict(cfg.data.splits), "steps": args.steps,
        "batch_size": cfg.train.batch_size, "warmup_ratio": cfg.train.warmup_ratio, "max_grad_norm": cfg.train.max_grad_norm,
        "group_by_length": cfg.train.group_by_length, "fast_ops": cfg.model.fast_ops,
        "fused_optimizer": cfg.train.fused_optimizer, "max_new_tokens": cfg.generation.max_new_tokens,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "targets": cfg.lora.target_modules},
        "select_seed": cfg.train.seed, "full_lrs": args.full_lrs, "lora_lrs": args.lora_lrs, "modes": args.modes,
        "fusion_lrs": args.fusion_lrs, "max_val_rows": args.max_val_rows, "max_test_rows": args.max_test_rows,
        "quick": args.quick, "processor": platform.processor() or platform.machine(),
        "versions": {name: version(name) for name in ("torch", "transformers", "peft")},
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--quick", action="store_true", help="tiny steps, small grids, 2 seeds, few rows; out to a temp dir")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 600)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of full, lora, fusion")
    parser.add_argument("--full-lrs", help="full fine-tune lr grid (default 3e-5,1e-4,3e-4)")
    parser.add_argument("--lora-lrs", help="LoRA lr grid, also fusion's (default 3e-4,1e-3,3e-3)")
    parser.add_argument("--modes", default=",".join(MODES), help="fusion modes tried (default add,first,prefix)")
    parser.add_argument("--fusion-lrs", choices=("grid", "lora"),
                        help="grid: every mode x every LoRA lr (default); lora: the modes at the lr chosen for lora")
    parser.add_argument("--seeds", type=int, help="seeds per final arm (default 3)")
    parser.add_argument("--max-val-rows", type=int, help="select phase: score only the first N validation rows")
    parser.add_argument("--max-test-rows", type=int, help="final phase: score only the first N test rows")
    parser.add_argument("--out", help="report (default benchmarks/results/quality.md; --quick: a temp dir)")
    parser.add_argument("--work", default=None, help="run records and adapters (default: a temp dir)")
    parser.add_argument("--keep-adapters", action="store_true", help="keep every run's adapter dir in --work")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs --work already holds from the same command (a study interrupted and restarted)")
    parser.add_argument("--from-json", help="rewrite --out from a finished study's JSON (no training)")
    parser.add_argument("--note", default="", help="a paragraph added under the tables (how the run went)")
    parser.add_argument("override", nargs="*", help="dotted config overrides for every run, e.g. lora.r=8")
    args = parser.parse_args(argv)
    defaults = {"steps": 600, "full_lrs": "3e-5,1e-4,3e-4", "lora_lrs": "3e-4,1e-3,3e-3", "fusion_lrs": "grid", "seeds": 3,
                "max_val_rows": None, "max_test_rows": None}
    for key, value in (QUICK if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.steps < 1:
        raise SystemExit("--seeds and --steps must be at least 1")
    args.full_lrs, args.lora_lrs, args.modes = lr_list(args.full_lrs), lr_list(args.lora_lrs), mode_list(args.modes)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.families or set(args.families) - set(FAMILIES):
        raise SystemExit(f"--families takes a comma list of {', '.join(FAMILIES)} (got {','.join(args.families)!r})")
    args.out = args.out or study_common.default_out(args.quick, "quality")
    return args


def write_outputs(args, saved: dict) -> str:
    return study_common.write_outputs(args.out, saved, args.note, write_report, result_line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return study_common.rewrite_from_json(args.from_json, lambda saved: write_outputs(args, saved))

    command, started_at, wall = study_common.start_study(args, "quality", argv)
    settings = study_settings(args)
    commit = git_state()  # the code the runs start from (others may commit while the study runs)
    study = Study(args)
    select, chosen = select_phase(study, args, settings["select_seed"])
    seeds = [settings["select_seed"] + 1 + i for i in range(args.seeds)]
    final = final_phase(study, chosen, seeds)
    saved = {
        "command": command, "date": started_at.isoformat(), "commit": commit,
        "cores": study_common.machine_cores(),
        "wall_seconds": time.perf_counter() - wall, "settings": settings, "seeds": seeds,
        "chosen": {fam: {"arm": r["arm"], "lr": r["lr"]} for fam, r in chosen.items()},
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
