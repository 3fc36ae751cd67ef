"""Three per-dataset adapters, side by side: three solo lexlora runs, three PEFT + Seq2SeqTrainer runs,
and one joint lexlora run that trains all three on one frozen base (issue 19's benchmark).

    HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 python benchmarks/multitrain.py [--steps 60]

Jobs: configs/file_description.yaml, configs/file_context_description.yaml, configs/file_type.yaml on
their datasets in ../shared/data/file-descriptions, each as its config says (split, template,
lengths, LoRA, fusion, learning rate, warmup, validation) except: model.random_init=true (the
flan-t5-small shape with random weights, the same seed for all), dropout_rate 0 in the base (so a
joint run and its solo twins can be compared weight by weight), train.batch_size=8, the same
train.max_steps for all (--steps), save_dtype=float32, train.log_every large, output dirs under a
temp work dir. The parent writes each job as a YAML file that every arm reads.

Arms, one after the other on the same machine, each in its own process(es):
  solo   three `python scripts/train_lora.py --config JOB.yaml`, one after another;
  peft   three `python benchmarks/multitrain_peft.py --config JOB.yaml` (peft.get_peft_model on the
         same random base, Seq2SeqTrainer, dynamic padding, length grouping, no evaluation); PEFT has
         no fusion, so this arm embeds nothing and trains LoRA alone;
  joint  one `python scripts/train_lora.py --config A.yaml --config B.yaml --config C.yaml`.
Each arm gets a fresh embedding cache (LEXLORA_CACHE), so each embeds its data as a first run does.

Measured per arm: wall time from launching each process to its adapter(s) published, summed over an
arm's processes; each process's peak RSS (its ru_maxrss, as `/usr/bin/time -f %M` prints it; without
/usr/bin/time, read with os.wait4 as it exits); training-loop examples/s (steps x batch over the loop's seconds:
lexlora's train_seconds from each adapter's lexlora.json, PEFT's train_runtime). mem_ratio is the
joint process's peak over the sum of the three solo peaks; max_weight_diff the largest absolute
difference between a joint adapter's tensors and its solo twin's. The last line is
`RESULT joint_vs_solo_wall=… joint_vs_peft_wall=… mem_ratio=… max_weight_diff=…`.

--quick: 2 jobs, 5 steps, small splits (a check that the arms run; its report goes to a temp dir).
--arms solo,peft runs a subset (the joint figures are then n/a). --from-json rewrites the report.
--threads N sets every process's torch threads (train.cpu_threads; default one per usable core): on
cores that other work keeps busy, 2 threads can run a step several times slower than 1 (measured
here: 12.7 s against 1.5 s per flan-t5-small step), as each thread waits at every op for the other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_common import default_out, git_state, machine_cores, version  # noqa: E402

JOBS = {
    "file-description": "configs/file_description.yaml",
    "file-context-description": "configs/file_context_description.yaml",
    "file-type": "configs/file_type.yaml",
}
ARMS = ("solo", "peft", "joint")
BATCH_SIZE = 8
QUICK_JOBS = ("file-description", "file-type")
QUICK_SPLITS = {"train": "[:80]", "validation": "[80:96]"}
TRAIN_SCRIPT = ROOT / "scripts" / "train_lora.py"
PEFT_SCRIPT = ROOT / "benchmarks" / "multitrain_peft.py"


# ---- the jobs ---------------------------------------------------------------------------------
def job_config(name: str, steps: int, output_dir: Path, quick: bool = False, threads: int | None = None):
    """Job `name` as its config says, with the benchmark's settings (see the module docstring)."""
    from lexlora.config import load_config

    cfg = load_config(ROOT / JOBS[name])
    cfg.model.random_init = True
    cfg.model.config_overrides = {**cfg.model.config_overrides, "dropout_rate": 0.0}
    cfg.lora.dropout = 0.0
    cfg.train.batch_size = BATCH_SIZE
    cfg.train.max_steps = steps
    cfg.train.log_every = 10**6  # a loss line at the last step only
    cfg.save_dtype = "float32"
    cfg.train.cpu_threads = threads  # None: lexlora's default, one torch thread per usable core
    data = Path(cfg.data.path)
    cfg.data.path = str(data if data.is_absolute() else (ROOT / data).resolve())  # ../shared/... from the repo root
    if quick:
        cfg.data.splits = dict(QUICK_SPLITS)
    cfg.output_dir = str(output_dir)
    cfg.check()
    return cfg


def write_jobs(work: Path, arm: str, names: list[str], steps: int, quick: bool, threads: int | None = None) -> list[Path]:
    """One YAML per job for `arm`, its adapter under work/arm/."""
    from lexlora.config import config_to_yaml

    paths = []
    for name in names:
        cfg = job_config(name, steps, work / arm / name, quick, threads)
        path = work / "jobs" / f"{arm}-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_to_yaml(cfg))
        paths.append(path)
    return paths


# ---- processes --------------------------------------------------------------------------------
GNU_TIME = Path("/usr/bin/time")


def peak_method() -> str:
    return "time" if GNU_TIME.is_file() else "wait4"


def run_process(command: list[str], log: Path, env: dict[str, str], method: str | None = None) -> dict:
    """Run one process to its end: its wall seconds, exit code and peak RSS (its ru_maxrss). Under
    `/usr/bin/time -f %M` (method "time", where it is installed) the process starts from that small
    program; with method "wait4" (read here with os.wait4) Linux starts a child's high-water mark at
    this process's own, so the figure is at least this process's peak (small in the benchmark)."""
    method = method or peak_method()
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_file = log.with_suffix(".maxrss")
    wrapped = [str(GNU_TIME), "-f", "%M", "-o", str(peak_file), *command] if method == "time" else command
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
    seconds = time.perf_counter() - started
    process.returncode = code = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # time's and its child's, the larger
    if method == "time":  # KB on the last line ("Command exited with non-zero status N" may come first)
        try:
            peak = int(peak_file.read_text().split()[-1]) * 1024
        except (OSError, ValueError, IndexError):
            method = "wait4"  # time wrote nothing (killed): wait4's figure, which covers its child too
    return {"command": " ".join(command), "seconds": seconds, "returncode": code, "peak_bytes": peak,
            "peak_method": method, "log": str(log)}


def tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def adapter_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "lexlora.json").read_text())["metrics"]


def lexlora_job(name: str, output_dir: Path) -> dict:
    metrics = adapter_metrics(output_dir)
    return {"job": name, "output_dir": str(output_dir), "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
            "train_loss": metrics.get("train_loss"), "batch_size": BATCH_SIZE}


def run_arm(arm: str, yamls: list[Path], names: list[str], work: Path, env: dict[str, str]) -> dict:
    """One arm's processes; a record of each process and each job (or the failure)."""
    env = {**env, "LEXLORA_CACHE": str(work / f"cache-{arm}")}  # a fresh embedding cache per arm
    record: dict = {"arm": arm, "processes": [], "jobs": [], "loadavg_before": list(os.getloadavg())}
    if arm == "joint":
        command = [sys.executable, str(TRAIN_SCRIPT)] + [part for y in yamls for part in ("--config", str(y))]
        runs = [("all", command)]
    elif arm == "solo":
        runs = [(n, [sys.executable, str(TRAIN_SCRIPT), "--config", str(y)]) for n, y in zip(names, yamls)]
    else:
        runs = [(n, [sys.executable, str(PEFT_SCRIPT), "--config", str(y), "--json", str(work / "peft" / f"{n}.json")])
                for n, y in zip(names, yamls)]
    for label, command in runs:
        print(f"  {arm}: {label} ...", flush=True)
        done = run_process(command, work / "logs" / f"{arm}-{label}.log", env)
        done["job"] = label
        record["processes"].append(done)
        if done["returncode"] != 0:
            record["failed"] = f"{arm} {label} exited with code {done['returncode']} (log: {done['log']})"
            print(f"  {record['failed']}\n{tail(done['log'])}", flush=True)
            break
        print(f"  {arm}: {label} done in {done['seconds']:.0f}s, peak {done['peak_bytes'] / 2**20:.0f} MB", flush=True)
    record["loadavg_after"] = list(os.getloadavg())
    if record.get("failed"):
        return record
    for name in names:
        if arm == "peft":
            peft = json.loads((work / "peft" / f"{name}.json").read_text())
            record["jobs"].append({"job": name, "output_dir": peft["output_dir"], "steps": peft["steps"],
                                   "train_seconds": peft["train_runtime"], "train_loss": peft["train_loss"],
                                   "batch_size": peft["batch_size"], "optimizer": peft["optimizer"]})
        else:
            record["jobs"].append(lexlora_job(name, work / arm / name))
    return record


# ---- the weight check -------------------------------------------------------------------------
def adapter_tensors(directory: str | Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def max_abs(directory: str | Path) -> float:
    """The largest absolute weight of an adapter (the scale its differences are read against)."""
    import numpy as np

    return max(float(np.max(np.abs(t), initial=0.0)) for t in adapter_tensors(directory).values())


def max_abs_diff(joint_dir: str | Path, solo_dir: str | Path) -> float:
    """The largest absolute difference between two adapters' tensors (their key sets must match)."""
    import numpy as np

    joint, solo = adapter_tensors(joint_dir), adapter_tensors(solo_dir)
    if joint.keys() != solo.keys():
        only = sorted(joint.keys() ^ solo.keys())
        raise ValueError(f"{joint_dir} and {solo_dir} hold different tensors (in one only: {', '.join(only[:5])})")
    if not joint:
        raise ValueError(f"{joint_dir}: no tensors")
    return max(float(np.max(np.abs(joint[k].astype(np.float64) - solo[k].astype(np.float64)), initial=0.0)) for k in joint)


def weight_diffs(arms: dict[str, dict]) -> dict[str, float] | None:
    solo, joint = arms.get("solo"), arms.get("joint")
    if not solo or not joint or solo.get("failed") or joint.get("failed"):
        return None
    solo_dirs = {j["job"]: j["output_dir"] for j in solo["jobs"]}
    return {j["job"]: max_abs_diff(j["output_dir"], solo_dirs[j["job"]]) for j in joint["jobs"]}


# ---- figures and the report -------------------------------------------------------------------
MB = 2**20
TARGETS = {"joint_vs_solo_wall": 0.75, "joint_vs_peft_wall": 0.75, "mem_ratio": 0.5}  # issue 19: at most


def arm_figures(arm: dict) -> dict:
    """An arm's wall seconds (its processes' sum), peaks (sum, largest) and training-loop examples/s."""
    processes = arm["processes"]
    figures = {
        "processes": len(processes), "wall_seconds": sum(p["seconds"] for p in processes),
        "peak_sum_bytes": sum(p["peak_bytes"] for p in processes),
        "peak_max_bytes": max((p["peak_bytes"] for p in processes), default=0),
    }
    jobs = arm.get("jobs") or []
    if jobs and not arm.get("failed"):
        examples = sum(j["steps"] * j["batch_size"] for j in jobs)
        # The sequential arms' loops add up. One joint loop trains every job at once: the jobs train
        # the same steps, so they end in the same round and leave the pass one after another, each
        # evaluated and published in turn; the first to leave has only its own evaluation taken out
        # of its train_seconds, the later ones also count the earlier ones' evaluation and publishing.
        loop = min(j["train_seconds"] for j in jobs) if arm["arm"] == "joint" else sum(j["train_seconds"] for j in jobs)
        figures.update(examples=examples, train_seconds=loop, examples_per_s=examples / loop if loop else None)
    return figures


def summarize(record: dict) -> dict:
    """Each arm's figures, and the joint run's ratios against the others (None where not measured)."""
    arms = record["arms"]
    figures = {name: arm_figures(arm) for name, arm in arms.items()}
    ok = {name for name, arm in arms.items() if not arm.get("failed")}
    joint = figures.get("joint") if "joint" in ok else None

    def ratio(top, bottom):
        return top / bottom if top is not None and bottom else None

    diffs = record.get("weight_diffs")
    return {
        "arms": figures,
        "joint_vs_solo_wall": ratio(joint and joint["wall_seconds"], "solo" in ok and figures["solo"]["wall_seconds"]),
        "joint_vs_peft_wall": ratio(joint and joint["wall_seconds"], "peft" in ok and figures["peft"]["wall_seconds"]),
        "mem_ratio": ratio(joint and joint["peak_max_bytes"], "solo" in ok and figures["solo"]["peak_sum_bytes"]),
        "joint_vs_peft_mem": ratio(joint and joint["peak_max_bytes"], "peft" in ok and figures["peft"]["peak_sum_bytes"]),
        "max_weight_diff": max(diffs.values()) if diffs else None,
    }


def _num(value, form: str = ".3f") -> str:
    return "n/a" if value is None else format(value, form)


def result_line(record: dict) -> str:
    joint = record["arms"].get("joint")
    if joint and joint.get("failed"):
        return f"joint arm FAILED: {joint['failed']}; no RESULT"
    s = record["summary"]
    diff = "n/a" if s["max_weight_diff"] is None else f"{s['max_weight_diff']:.3g}"
    return (f"RESULT joint_vs_solo_wall={_num(s['joint_vs_solo_wall'])} joint_vs_peft_wall={_num(s['joint_vs_peft_wall'])} "
            f"mem_ratio={_num(s['mem_ratio'])} max_weight_diff={diff}")


ARM_NAMES = {"solo": "(a) 3 solo lexlora runs", "peft": "(b) 3 PEFT + Seq2SeqTrainer runs", "joint": "(c) 1 joint lexlora run"}


def write_report(record: dict) -> str:
    s, m = record["summary"], record["machine"]
    joint = s["arms"].get("joint") if not record["arms"].get("joint", {}).get("failed") else None
    v = m["versions"]
    lines = [
        f"# {len(record['jobs'])} adapters: solo lexlora, PEFT + Seq2SeqTrainer, one joint lexlora run",
        "",
        f"Command: `HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 {record['command']}`",
        "",
        f"Date {record['date']}, commit {record['commit']}. Machine: {m['cores']} CPU cores"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f", {m['platform']}; Python {m['python']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}, "
        f"sentence-transformers {v['sentence-transformers']}. Load average (1, 5, 15 min) before "
        f"{_loads(record['loadavg_before'])}, after {_loads(record['loadavg_after'])}"
        + (f"; the whole benchmark took {record['benchmark_seconds']:.0f}s." if "benchmark_seconds" in record else "."),
        "",
        f"Jobs ({', '.join(f'{name}: {path}' for name, path in record['jobs'].items())}): flan-t5-small shape with "
        f"random weights, base dropout 0, batch {record['batch_size']}, {record['steps']} optimizer steps each, "
        "validation as each config says (val_loss at the epoch's end and on the final weights), adapters saved in float32; "
        f"{record.get('threads', '?')} torch thread(s) per process."
        + (" --quick: small splits." if record.get("quick") else ""),
        "",
        "| arm | wall s | peak memory, sum of processes (MB) | peak memory, largest process (MB) | train-loop ex/s "
        "| joint ÷ arm, wall | joint ÷ arm, peak (sum) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in record["arms"].items():
        f = s["arms"][name]
        label = ARM_NAMES[name] + (" — FAILED" if arm.get("failed") else "")
        wall_ratio = joint["wall_seconds"] / f["wall_seconds"] if joint and f["wall_seconds"] else None
        mem_ratio = joint["peak_max_bytes"] / f["peak_sum_bytes"] if joint and f["peak_sum_bytes"] else None
        lines.append(
            f"| {label} | {f['wall_seconds']:.1f} | {f['peak_sum_bytes'] / MB:.0f} | {f['peak_max_bytes'] / MB:.0f} "
            f"| {_num(f.get('examples_per_s'), '.2f')} | {_num(wall_ratio)} | {_num(mem_ratio)} |"
        )
    lines += ["", "Per job (seconds of the process / of its training loop; final logged train loss):", "",
              "| job | " + " | ".join(f"{n} s / loop s / loss" for n in record["arms"])
              + " | max \\|joint − solo\\| | max \\|solo weight\\| |",
              "|---|" + "---|" * (len(record["arms"]) + 2)]
    diffs, scales = record.get("weight_diffs") or {}, record.get("weight_scales") or {}
    for job in record["jobs"]:
        cells = []
        for name, arm in record["arms"].items():
            process = next((p for p in arm["processes"] if p["job"] in (job, "all")), None)
            entry = next((j for j in arm.get("jobs", []) if j["job"] == job), None)
            cells.append("—" if entry is None else
                         f"{process['seconds']:.1f} / {entry['train_seconds']:.1f} / {_num(entry['train_loss'], '.4f')}")
        lines.append(f"| {job} | " + " | ".join(cells) + f" | {_num(diffs.get(job), '.3g')} | {_num(scales.get(job), '.3g')} |")
    lines += ["", "Against issue 19's targets (at most): " + "; ".join(
        f"{key} {_num(s[key])} (≤ {limit}: {'met' if s[key] is not None and s[key] <= limit else 'not met' if s[key] is not None else 'n/a'})"
        for key, limit in TARGETS.items()) + f"; joint peak ÷ sum of PEFT peaks {_num(s['joint_vs_peft_mem'])}.", ""]
    failed = [arm["failed"] for arm in record["arms"].values() if arm.get("failed")]
    if failed:
        lines += ["**Failed:** " + "; ".join(failed) + ".", ""]
    lines += [
        "How it was measured:",
        "- wall: from launching each process to its exit (its adapters published), summed over an arm's processes, "
        "so it includes imports, base load, data reading, tokenizing, embedding (a fresh embedding cache per arm), "
        "validation and saving;",
        "- peak memory: each process's peak RSS (ru_maxrss), " + _peak_how(record) + ";",
        "- train-loop ex/s: steps × batch × jobs over the training loop's seconds (lexlora: train_seconds from each "
        "adapter's lexlora.json, evaluation excluded; the joint run's one loop: the train_seconds of the first job to "
        "leave the pass, as the later ones also count its evaluation and publishing; PEFT: trainer.train()'s train_runtime);",
        "- max |joint − solo|: the largest absolute difference between a joint adapter's tensors and its solo "
        "twin's (adapter_model.safetensors, the same keys checked).",
        "- PEFT has no fusion projection: its arm embeds nothing and trains LoRA alone, and it evaluates nothing; "
        "the lexlora arms load all-MiniLM-L6-v2, embed their data, train the fusion projection with LoRA and compute "
        f"val_loss. PEFT's optimizer: {_peft_optimizer(record)}; lexlora's: fused AdamW.",
        "- The machine's cores were shared with other work (see the load averages): timings are contended.",
    ]
    return "\n".join(lines) + "\n"


def _peak_how(record: dict) -> str:
    methods = {p.get("peak_method", "wait4") for arm in record["arms"].values() for p in arm["processes"]}
    parent = f"{record['parent_peak_bytes'] / MB:.0f} MB"
    if methods == {"time"}:
        return "as `/usr/bin/time -f %M` reports it"
    return (f"read with os.wait4 as the process exits (no /usr/bin/time{' for some' if 'time' in methods else ''}); "
            f"Linux starts a child's figure at its parent's high-water mark, {parent} here")


def _loads(values) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _peft_optimizer(record: dict) -> str:
    jobs = record["arms"].get("peft", {}).get("jobs") or []
    return jobs[0].get("optimizer", "?") if jobs else "n/a"


# ---- the run ----------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    hub = ROOT.parent / "shared" / "hf" / "hub"
    if hub.is_dir():  # the offline cache this project's machines use, unless the caller set one
        env.setdefault("HF_HUB_CACHE", str(hub))
        env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def machine() -> dict:
    info = {"cores": machine_cores(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": {name: version(name) for name in ("torch", "transformers", "peft", "accelerate", "sentence-transformers")}}
    try:  # a GPU, named without importing torch in this small parent (see main)
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["gpu"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 60; --quick 5)")
    parser.add_argument("--jobs", default=None, help=f"comma list of jobs (default all: {', '.join(JOBS)}; --quick: 2)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of arms to run (default solo,peft,joint)")
    parser.add_argument("--quick", action="store_true", help="2 jobs, 5 steps, small splits; report to a temp dir")
    parser.add_argument("--out", default=None, help="report path (default benchmarks/results/multitrain.md; .json beside it)")
    parser.add_argument("--work", default=None, help="work dir for configs, adapters and logs (default: a temp dir, removed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every process (train.cpu_threads; default: one per usable core). "
                             "On cores busy with other work, 1 can be several times faster than 2")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--from-json", help="rewrite the report from a finished run's .json, no training")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.quick else 60
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    names = [n.strip() for n in (args.jobs.split(",") if args.jobs else (QUICK_JOBS if args.quick else JOBS)) if n.strip()]
    unknown = [n for n in names if n not in JOBS]
    if unknown or not names or len(set(names)) != len(names):
        parser.error(f"--jobs must name distinct jobs among {', '.join(JOBS)}; got {args.jobs!r}")
    args.jobs = names
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or any(a not in ARMS for a in args.arms):
        parser.error(f"--arms must be a comma list of {', '.join(ARMS)}; got {args.arms!r}")
    args.arms = [a for a in ARMS if a in args.arms]  # always in the order solo, peft, joint
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM ends the running child too (run_process kills it on the way out).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        print(write_report(record))
        print(result_line(record))
        return 0 if not record["arms"].get("joint", {}).get("failed") else 1
    out = Path(args.out or default_out(args.quick, "multitrain"))
    data_dir = ROOT.parent / "shared" / "data" / "file-descriptions"
    command = "python benchmarks/multitrain.py " + " ".join(argv if argv is not None else sys.argv[1:])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lexlora-multitrain-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yamls = {arm: write_jobs(work, arm, args.jobs, args.steps, args.quick, args.threads) for arm in args.arms}
    except Exception as exc:  # ConfigError and friends: name the job config at fault
        sys.exit(f"error: could not build the job configs ({exc}); the data is read from {data_dir}")
    record = {
        "command": command.strip(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_state(), "machine": machine(), "steps": args.steps, "batch_size": BATCH_SIZE,
        "threads": args.threads or machine_cores(),
        "jobs": {name: JOBS[name] for name in args.jobs}, "quick": args.quick,
        "loadavg_before": list(os.getloadavg()), "arms": {},
        # A child's ru_maxrss starts at this process's high-water mark (Linux keeps it across fork + exec).
        "parent_peak_bytes": None,
    }
    import resource

    record["parent_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    env = child_env()
    started = time.perf_counter()
    for arm in args.arms:
        print(f"arm {arm}:", flush=True)
        record["arms"][arm] = run_arm(arm, yamls[arm], args.jobs, work, env)
        if record["arms"][arm].get("failed") and arm != "joint":
            sys.exit(f"error: the {arm} arm failed: {record['arms'][arm]['failed']}")
    record["loadavg_after"] = list(os.getloadavg())
    record["benchmark_seconds"] = time.perf_counter() - started
    record["weight_diffs"] = weight_diffs(record["arms"])
    if "solo" in record["arms"]:
        record["weight_scales"] = {j["job"]: max_abs(j["output_dir"]) for j in record["arms"]["solo"]["jobs"]}
    record["summary"] = summarize(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = write_report(record)
    line = result_line(record)
    out.write_text(report + f"\n```\n{line}\n```\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    if args.keep or args.work:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    print(f"report: {out}")
    print(line)
    return 1 if record["arms"].get("joint", {}).get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
