"""What the quality studies (quality.py, classify.py) share: the code's commit and versions for the
report header, learning-rate grids from the command line, the run scripts' common arguments, and
writing the report with its RESULT line."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed(name)
    except PackageNotFoundError:
        return "?"


def git_state() -> str:
    """HEAD's short commit, and whether the code the runs import had uncommitted changes."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "lexlora", "benchmarks", "configs")
    return f"{commit} (with uncommitted changes under lexlora/, benchmarks/ or configs/)" if dirty else commit


def lr_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"learning rates must be a comma list of numbers, e.g. 3e-4,1e-3 (got {text!r})") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"learning rates must be a non-empty comma list of positive numbers (got {text!r})")
    return values


def add_run_arguments(parser: argparse.ArgumentParser, max_rows_help: str) -> None:
    """The arguments every study's one-run script takes besides its arm's."""
    parser.add_argument("--max-rows", type=int, default=None, help=max_rows_help)
    parser.add_argument("--work", required=True)
    parser.add_argument("--json", required=True, help="where the run's record goes")
    parser.add_argument("--keep-adapters", action="store_true")
    parser.add_argument("override", nargs="*")


def finish_run(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict]) -> int:
    """Run one arm and write its record where the study reads it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    Path(args.json).write_text(json.dumps(run(args), indent=1) + "\n")
    return 0


def failures_lines(saved: dict) -> list[str]:
    if not saved.get("failures"):
        return []
    return ["", "Runs that failed (left out above): " + "; ".join(
        f"{f['phase']} {f['arm']} lr {f['lr']:g} seed {f['seed']} (exit {f['exit']})" for f in saved["failures"]) + "."]


def write_outputs(out: str | Path, saved: dict, note: str, write_report: Callable[..., str],
                  result_line: Callable[[dict], str]) -> str:
    """The report with its RESULT line last; returns that line."""
    line = result_line(saved)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(write_report(saved, note=note) + f"\n```\n{line}\n```\n")
    return line


def start_study(args, name: str, argv) -> tuple[str, datetime.datetime, float]:
    """A study's private embedding cache and work dir; returns its command line, start date and clock."""
    os.environ.setdefault("LEXLORA_CACHE", tempfile.mkdtemp(prefix=f"lexlora-{name}-cache-"))
    args.work = args.work or tempfile.mkdtemp(prefix=f"lexlora-{name}-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return command.strip(), datetime.datetime.now(datetime.timezone.utc), time.perf_counter()


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_out(quick: bool, name: str) -> str:
    """The report's path: benchmarks/results/NAME.md, or a temp dir for a --quick run (whose figures
    must never replace a full study's)."""
    if quick:
        return str(Path(tempfile.mkdtemp(prefix=f"lexlora-{name}-quick-")) / f"{name}.md")
    return str(ROOT / "benchmarks" / "results" / f"{name}.md")


def rewrite_from_json(path: str, write: Callable[[dict], str]) -> int:
    """--from-json: the report again from a finished study's record, no training."""
    print(write(json.loads(Path(path).read_text())))
    return 0
