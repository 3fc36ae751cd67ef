"""Does a lexlora adapter make a model better at its task? The seed's quality study, on a base that
loads here (no flan-t5-small weights reach these machines).

    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/quality.py

Base: the warm-started encoder-decoder of configs/minilm_file_description.yaml (two copies of
all-MiniLM-L6-v2, cross-attention new). Data and split: the seed's (file_description.jsonl,
train [:85%] / validation [85%:95%] / test [95%:] = 1707 / 201 / 100 rows), filename -> file_desc.
Every arm trains with the same seed, batch size (16), number of optimizer steps (600), linear
schedule with 6% warmup, gradient clipping at 1.0, and keeps the epoch with the lowest validation
loss (checked at each epoch end and at the last step); each is then scored on the test split with
ROUGE-1/2/L (lexlora.metrics, greedy decoding, max_new_tokens 48). Arms:

  full         a plain full fine-tune of the same base (every weight trainable), AdamW lr 1e-4
               (--full-lr), written here as a short loop over lexlora's data pipeline;
  lora         lexlora.training.train(cfg) with fusion.enabled=false (LoRA + the trained
               cross-attention only), lr of the config (1e-3);
  fusion-MODE  lexlora.training.train(cfg) with fusion.mode=MODE, for add, first and prefix.

Each arm runs in its own process, one after another; the train seconds exclude evaluation. Results go
to benchmarks/results/quality.md (--out) and a JSON beside it; per-arm predictions and adapters to
--work (a temp dir by default). The last line is
`RESULT full_r1=… lora_r1=… fusion_r1=… best_mode=… trainable_pct=…` (fusion_r1: the best fusion
mode; trainable_pct: that arm's trainable share of its model, in %).

For a quick check of the machinery: --steps 4 --max-test-rows 8 --out /tmp/q.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "minilm_file_description.yaml"
MODES = ("add", "first", "prefix")
ANCHORS = [
    ("notebook: flan-t5-small, full fine-tune (seed 001)", 0.389, 0.099, 0.373),
    ("notebook: flan-t5-small, base model", 0.187, None, None),
    ("measured here before: MiniLM warm start, full fine-tune, lr 1e-4, 600 steps", 0.408, 0.146, 0.371),
]


# ---- one arm (child process) ---------------------------------------------------------------------


def load_cfg(args, arm: str):
    from lexlora.config import load_config

    overrides = [f"train.max_steps={args.steps}", f"output_dir={Path(args.work) / arm}", "overwrite_output_dir=true"]
    if arm == "lora":
        overrides.append("fusion.enabled=false")
    elif arm.startswith("fusion-"):
        overrides += ["fusion.enabled=true", f"fusion.mode={arm.removeprefix('fusion-')}"]
    elif arm == "full":
        overrides.append("fusion.enabled=false")
    return load_config(args.config, overrides + list(args.override))


def run_lora_arm(args, arm: str) -> dict:
    from lexlora.adapters.files import load_adapter
    from lexlora.evaluation.metrics import score
    from lexlora.evaluation.runner import eval_rows
    from lexlora.training.recipe import train

    cfg = load_cfg(args, arm)
    result = train(cfg)
    metrics = result.metrics
    model = load_adapter(result.output_dir)
    rows = eval_rows(result.output_dir, "test", max_rows=args.max_test_rows)
    started = time.perf_counter()
    predictions = model.generate_text(
        rows.records, batch_size=32, max_source_length=cfg.data.max_source_length,
        max_new_tokens=cfg.generation.max_new_tokens, num_beams=1,
    )
    generate_seconds = time.perf_counter() - started
    scores = score("text", predictions, rows.references)
    return {
        "arm": arm, "scores": scores, "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"], "train_seconds": metrics["train_seconds"],
        "eval_seconds": metrics.get("eval_seconds"), "generate_seconds": round(generate_seconds, 3),
        "steps": metrics["steps"], "best_epoch": metrics.get("best_epoch"), "best_val_loss": metrics.get("best_val_loss"),
        "learning_rate": cfg.train.learning_rate, "adapter_dir": str(result.output_dir),
        "predictions": [{"input": r[model.spec.input_fields[0]], "reference": ref, "output": out}
                        for r, ref, out in zip(rows.records, rows.references, predictions)],
    }


def run_full_arm(args) -> dict:
    """A plain full fine-tune: every weight of the same base trainable, the same batches, steps,
    schedule, clipping and best-epoch rule as lexlora's loop."""
    import math

    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from lexlora.data.splits import load_splits
    from lexlora.data.tokenization import LexicalCollator, encode_split
    from lexlora.evaluation.metrics import score
    from lexlora.model.loading import load_base_model, load_tokenizer
    from lexlora.training.launch import set_cpu_threads

    cfg = load_cfg(args, "full")
    train_cfg = cfg.train
    set_cpu_threads(train_cfg.cpu_threads, 1)
    torch.manual_seed(train_cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    splits, template, _ = load_splits(cfg.data, fusion_enabled=False)
    encoded = {name: encode_split(records, template, cfg.data.target_field, tokenizer, cfg.data, None, name)
               for name, records in splits.items()}
    model = load_base_model(cfg.model)
    model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    collator = LexicalCollator(tokenizer, cfg.data.pad_to_multiple_of)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    loader = DataLoader(encoded["train"], batch_size=train_cfg.batch_size, shuffle=True, collate_fn=collator, generator=generator)
    val_loader = DataLoader(encoded["validation"], batch_size=train_cfg.eval_batch_size, collate_fn=collator)
    steps = train_cfg.max_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.full_lr, weight_decay=train_cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train_cfg.warmup_ratio * steps), steps)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        total_loss, tokens = 0.0, 0
        for batch in val_loader:
            count = int((batch["labels"] != -100).sum())
            total_loss += float(model(**batch).loss) * count
            tokens += count
        model.train()
        return total_loss / max(tokens, 1)

    step, epoch, best, best_state, train_seconds, eval_seconds = 0, 0, None, None, 0.0, 0.0
    model.train()
    while step < steps:
        generator.manual_seed(train_cfg.seed + epoch)  # as lexlora: an epoch's order from seed + epoch
        started = time.perf_counter()
        for batch in loader:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % train_cfg.log_every == 0:
                print(f"full step {step}/{steps} loss {loss.item():.4f}", flush=True)
            if step >= steps:
                break
        train_seconds += time.perf_counter() - started
        epoch += 1
        started = time.perf_counter()
        value = val_loss()
        print(f"full epoch {epoch} step {step} val_loss {value:.4f}", flush=True)
        if best is None or value < best[1]:
            best = (epoch, value)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        eval_seconds += time.perf_counter() - started
    model.load_state_dict(best_state)
    model.eval()

    test = splits["test"][: args.max_test_rows] if args.max_test_rows else splits["test"]
    references = [r.fields[cfg.data.target_field] for r in test]
    predictions: list[str] = []
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(test), 32):
            chunk = test[start : start + 32]
            enc = tokenizer([template.format(r.fields) for r in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=cfg.data.max_source_length)
            ids = model.generate(**enc, max_new_tokens=cfg.generation.max_new_tokens, num_beams=1)
            predictions += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    generate_seconds = time.perf_counter() - started
    return {
        "arm": "full", "scores": score("text", predictions, references), "trainable_params": trainable,
        "total_params": total, "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
        "generate_seconds": round(generate_seconds, 3), "steps": step, "best_epoch": best[0], "best_val_loss": best[1],
        "learning_rate": args.full_lr, "epochs_seen": math.ceil(step / len(loader)),
        "predictions": [{"input": r.fields[cfg.data.lexical_field or template.fields[0]], "reference": ref, "output": out}
                        for r, ref, out in zip(test, references, predictions)],
    }


def child(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arm = args.arm
    result = run_full_arm(args) if arm == "full" else run_lora_arm(args, arm)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# ---- the study (parent process) --------------------------------------------------------------------


def arms_for(args) -> list[str]:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    expanded: list[str] = []
    for arm in arms:
        if arm == "fusion":
            expanded += [f"fusion-{m}" for m in args.modes.split(",") if m.strip()]
        else:
            expanded.append(arm)
    for arm in expanded:
        if arm not in ("full", "lora") and arm.removeprefix("fusion-") not in MODES:
            raise SystemExit(f"unknown arm {arm!r}: full, lora, fusion (or fusion-add / fusion-first / fusion-prefix)")
    return expanded


def arm_order(result: dict) -> int:
    order = ["full", "lora", *(f"fusion-{m}" for m in MODES)]
    return order.index(result["arm"]) if result["arm"] in order else len(order)


def label(arm: str) -> str:
    return {"full": "full fine-tune", "lora": "LoRA, no fusion"}.get(arm, f"LoRA + fusion ({arm.removeprefix('fusion-')})")


def write_report(args, results: list[dict], command: str, started: datetime.datetime, wall: float) -> str:
    from lexlora.config import load_config

    cfg = load_config(args.config, list(args.override))
    results = sorted(results, key=arm_order)  # the table reads the same whatever order the arms ran in
    full = next((r for r in results if r["arm"] == "full"), None)
    lines = [
        "# Quality: does a lexlora adapter make the model better at its task?",
        "",
        f"Command: `{command}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min; "
        f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}); torch {_version('torch')}, transformers {_version('transformers')}, "
        f"peft {_version('peft')}.",
        "",
        f"Base: `{cfg.model.name_or_path}`{' (warm-started encoder-decoder: its cross-attention is new, initialised from seed ' + str(cfg.model.init_seed) + ', and trained in full in every arm)' if cfg.model.name_or_path.startswith('encoder-decoder:') else ''}, config "
        f"`{Path(args.config).relative_to(ROOT) if Path(args.config).resolve().is_relative_to(ROOT) else args.config}`"
        f"{' with ' + ' '.join(args.override) if args.override else ''}. "
        f"Seed's data and split: {args.data_note}. Same seed ({cfg.train.seed}), batch {cfg.train.batch_size}, "
        f"{args.steps} optimizer steps, linear schedule with {100 * cfg.train.warmup_ratio:g}% warmup, clipping at "
        f"{cfg.train.max_grad_norm:g}, the epoch with the lowest validation loss kept; greedy decoding "
        f"(max_new_tokens {cfg.generation.max_new_tokens}) on the test split, ROUGE F-measures (Porter stemming, mean over rows). "
        f"LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout:g}, targets "
        f"{cfg.lora.target_modules or 'the default for the architecture'}.",
        "",
        "| arm | ROUGE-1 | ROUGE-2 | ROUGE-L | trainable params | trainable % of model | share of full FT's trainable | lr | train s | best epoch (val loss) | load avg (5 min) before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["scores"]
        share = f"{r['trainable_params'] / full['trainable_params']:.3f}" if full else "-"
        lines.append(
            f"| {label(r['arm'])} | {s['rouge1']:.3f} | {s['rouge2']:.3f} | {s['rougeL']:.3f} | "
            f"{r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f} | {share} | "
            f"{r['learning_rate']:g} | {r['train_seconds']:.0f} | {r['best_epoch']} ({r['best_val_loss']:.4f}) | "
            f"{' / '.join(str(x) for x in r.get('load_avg_5min', []))} |"
        )
    lines += paired_differences(results)
    if getattr(args, "note", ""):
        lines += ["", args.note]
    lines += ["", "Anchors (not rerun here):", "", "| | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
    for name, r1, r2, rl in ANCHORS:
        lines.append(f"| {name} | {r1} | {r2 if r2 is not None else '-'} | {rl if rl is not None else '-'} |")
    lines += ["", "Sample test rows (first 5):", ""]
    if results:
        header = "| input | reference | " + " | ".join(label(r["arm"]) for r in results) + " |"
        lines += [header, "|" + "---|" * (2 + len(results))]
        for i in range(min(5, len(results[0]["predictions"]))):
            row = results[0]["predictions"][i]
            outs = " | ".join(r["predictions"][i]["output"].replace("|", "/") for r in results)
            lines.append(f"| {row['input']} | {row['reference']} | {outs} |")
    return "\n".join(lines) + "\n"


def paired_differences(results: list[dict]) -> list[str]:
    """ROUGE-1 differences between arms on the same test rows, with 95% paired-bootstrap intervals
    (scipy.stats.bootstrap over the per-row differences): 100 rows tell only large gaps apart."""
    import numpy as np
    from scipy.stats import bootstrap

    from lexlora.evaluation.metrics import per_example_rouge

    by_arm = {r["arm"]: r for r in results}
    rows = {arm: np.array(per_example_rouge([p["output"] for p in r["predictions"]], [p["reference"] for p in r["predictions"]]))
            for arm, r in by_arm.items()}
    pairs = [(arm, "lora") for arm in by_arm if arm.startswith("fusion-")]
    pairs += [(arm, "full") for arm in by_arm if arm != "full"]
    pairs = [(a, b) for a, b in pairs if b in by_arm and len(rows[a]) == len(rows[b])]
    if not pairs:
        return []
    lines = ["", "ROUGE-1 differences on the same test rows (95% interval: paired bootstrap over rows, 10,000 resamples, "
             "seed 0; an interval that contains 0 does not tell the two arms apart):", "",
             "| arm | minus | ROUGE-1 difference | 95% interval |", "|---|---|---|---|"]
    for a, b in pairs:
        diff = rows[a] - rows[b]
        ci = bootstrap((diff,), np.mean, n_resamples=10_000, random_state=0, method="percentile").confidence_interval
        lines.append(f"| {label(a)} | {label(b)} | {diff.mean():+.3f} | [{ci.low:+.3f}, {ci.high:+.3f}] |")
    return lines


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def result_line(results: list[dict]) -> str:
    by_arm = {r["arm"]: r for r in results}
    fusion = [r for r in results if r["arm"].startswith("fusion-")]
    best = max(fusion, key=lambda r: r["scores"]["rouge1"]) if fusion else None
    def r1(r):
        return f"{r['scores']['rouge1']:.4f}" if r else "nan"
    pct = f"{100 * best['trainable_params'] / best['total_params']:.2f}" if best else "nan"
    return (f"RESULT full_r1={r1(by_arm.get('full'))} lora_r1={r1(by_arm.get('lora'))} fusion_r1={r1(best)} "
            f"best_mode={best['arm'].removeprefix('fusion-') if best else 'none'} trainable_pct={pct}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per arm (default 600)")
    parser.add_argument("--arms", default="full,lora,fusion", help="comma list of full, lora, fusion, fusion-MODE")
    parser.add_argument("--modes", default=",".join(MODES), help="fusion modes for the 'fusion' arm")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the full fine-tune")
    parser.add_argument("--max-test-rows", type=int, default=None, help="score only the first N test rows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    parser.add_argument("--work", default=None, help="adapters and per-arm JSON (default: a temp dir)")
    parser.add_argument("--from-json", help="rewrite --out from a finished study's JSON (no training)")
    parser.add_argument("--note", default="", help="a paragraph added under the table (how the run went)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("override", nargs="*", help="dotted config overrides for every lexlora arm, e.g. lora.r=8")
    args = parser.parse_args(argv)
    args.data_note = "file_description.jsonl, train [:85%] / validation [85%:95%] / test [95%:] (1707 / 201 / 100 rows)"
    if args.arm:
        return child(args)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        started_at = datetime.datetime.fromisoformat(saved["date"])
        args.steps = saved.get("steps", args.steps)
        report = write_report(args, saved["results"], saved["command"], started_at, saved.get("wall_seconds", float("nan")))
        line = result_line(saved["results"])
        Path(args.out).write_text(report + f"\n```\n{line}\n```\n")
        print(line)
        return 0

    os.environ.setdefault("LEXLORA_CACHE", tempfile.mkdtemp(prefix="lexlora-quality-cache-"))
    args.work = args.work or tempfile.mkdtemp(prefix="lexlora-quality-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started_at = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    results = []
    for arm in arms_for(args):
        out = Path(args.work) / f"{arm}.json"
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--full-lr", str(args.full_lr),
               "--work", args.work, "--arm", arm, "--json", str(out), *args.override]
        if args.max_test_rows:
            cmd += ["--max-test-rows", str(args.max_test_rows)]
        print(f"== {arm}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        load_before = os.getloadavg()[1]
        code = subprocess.call(cmd, cwd=ROOT)
        if code != 0:
            print(f"== {arm} failed (exit {code}); continuing with the other arms", flush=True)
            continue
        result = json.loads(out.read_text())
        # The machine's 5-minute load average around the arm: above the core count, something else
        # was competing for the CPU and the arm's seconds are inflated.
        result["load_avg_5min"] = [round(load_before, 2), round(os.getloadavg()[1], 2)]
        results.append(result)
        s = result["scores"]
        print(f"== {arm}: rouge1 {s['rouge1']:.4f} rouge2 {s['rouge2']:.4f} rougeL {s['rougeL']:.4f} "
              f"train {result['train_seconds']:.0f}s (arm wall {time.perf_counter() - t0:.0f}s)", flush=True)
    report = write_report(args, results, command.strip(), started_at, time.perf_counter() - wall)
    line = result_line(results)
    report += f"\n```\n{line}\n```\n"
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(report)
    out_md.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "date": started_at.isoformat(), "steps": args.steps,
         "wall_seconds": time.perf_counter() - wall, "results": results, "result_line": line}, indent=1) + "\n")
    print(report)
    print(line, flush=True)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
