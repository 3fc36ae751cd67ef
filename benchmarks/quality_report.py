"""The quality study's report and RESULT line, from the record benchmarks/quality.py saves (so that
`--from-json` rewrites them without training)."""

from __future__ import annotations

from study_common import failures_lines

import datetime
import math

from stats import format_mean_sd, mean_sd, paired_bootstrap, seed_mean_rows

FAMILIES = ("full", "lora", "fusion")
# The differences the README states: what fusion adds to LoRA, what LoRA gives up (or gains) against
# a full fine-tune, and the two together.
PAIRS = (("fusion", "lora"), ("lora", "full"), ("fusion", "full"))
RESAMPLES = 10_000
ANCHORS = [
    ("notebook: flan-t5-small, full fine-tune (seed 001)", 0.389, 0.099, 0.373),
    ("notebook: flan-t5-small, base model", 0.187, None, None),
]


def family(arm: str) -> str:
    return "fusion" if arm.startswith("fusion-") else arm


def label(arm: str) -> str:
    if arm == "fusion":
        return "LoRA + fusion"
    return {"full": "full fine-tune", "lora": "LoRA, no fusion"}.get(arm, f"LoRA + fusion ({arm.removeprefix('fusion-')})")


def final_by_family(saved: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in saved["final"]:
        runs.setdefault(family(r["arm"]), []).append(r)
    return {fam: sorted(runs[fam], key=lambda r: r["seed"]) for fam in FAMILIES if fam in runs}


def row_scores(runs: list[dict]) -> tuple[list[str], list[float]]:
    """The arm's test rows and, per row, ROUGE-1 averaged over its seeds."""
    from lexlora.evaluation.metrics import per_example_rouge

    inputs = runs[0]["inputs"]
    if any(r["inputs"] != inputs for r in runs):
        raise ValueError(f"{runs[0]['arm']}: the seeds' runs scored different test rows")
    return inputs, list(seed_mean_rows([per_example_rouge(r["outputs"], r["references"]) for r in runs]))


def result_line(saved: dict) -> str:
    final = final_by_family(saved)

    def r1(fam: str) -> str:
        return f"{mean_sd([r['scores']['rouge1'] for r in final[fam]])[0]:.4f}" if fam in final else "nan"

    fusion = final.get("fusion")
    pct = f"{100 * fusion[0]['trainable_params'] / fusion[0]['total_params']:.2f}" if fusion else "nan"
    mode = saved["chosen"]["fusion"]["arm"].removeprefix("fusion-") if "fusion" in saved["chosen"] else "none"
    seeds = min((len(runs) for runs in final.values()), default=0)  # seeds every reported arm completed
    return (f"RESULT full_r1={r1('full')} lora_r1={r1('lora')} fusion_r1={r1('fusion')} best_mode={mode} "
            f"trainable_pct={pct} selected_on=validation seeds={seeds}")


def write_report(saved: dict, note: str = "") -> str:
    settings, final = saved["settings"], final_by_family(saved)
    started = datetime.datetime.fromisoformat(saved["date"])
    versions = settings.get("versions", {})
    lines = [
        "# Quality: does a lexlora adapter make the model better at its task?",
        "",
        f"Command: `{saved['command']}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; wall time {saved['wall_seconds'] / 60:.1f} min; machine: "
        f"{saved['cores']} CPU cores ({settings.get('processor', '?')}); git commit {saved['commit']}; "
        + ", ".join(f"{name} {v}" for name, v in versions.items()) + ".",
        "",
        setup_paragraph(saved),
    ]
    lines += final_table(saved, final)
    lines += difference_table(final)
    lines += select_table(saved)
    lines += failures_lines(saved)
    if note:
        lines += ["", note]
    lines += ["", "Anchors (not rerun here):", "", "| | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
    for name, a, b, c in ANCHORS:
        lines.append(f"| {name} | {a} | {'-' if b is None else b} | {'-' if c is None else c} |")
    lines += sample_rows(final)
    return "\n".join(lines) + "\n"


def setup_paragraph(saved: dict) -> str:
    s = saved["settings"]
    base = s["base"]
    warm = (f" (warm-started encoder-decoder: its cross-attention is new, initialised from seed {s['init_seed']} in every "
            "run, and trained in full in every arm)") if base.startswith("encoder-decoder:") else ""
    splits = " / ".join(f"{name} {spec}" for name, spec in s["splits"].items())
    lora = s["lora"]
    fusion_grid = ("every mode × every LoRA lr" if s["fusion_lrs"] == "grid"
                   else "every mode at the lr chosen for LoRA without fusion")
    val_rows = f"the first {s['max_val_rows']} validation rows" if s["max_val_rows"] else "the validation split"
    test_rows = f"the first {s['max_test_rows']} test rows" if s["max_test_rows"] else "the test split"
    return (
        f"Base: `{base}`{warm}, config `{s['config']}`{' with ' + ' '.join(s['overrides']) if s['overrides'] else ''}; "
        f"data `{s['data_path']}`, split {splits}. Every run: {s['steps']} optimizer steps, batch {s['batch_size']} "
        f"({'length-grouped' if s['group_by_length'] else 'shuffled'} batches from lexlora's train loader in every arm), "
        f"linear schedule with {100 * s['warmup_ratio']:g}% warmup, clipping at {s['max_grad_norm']:g}, "
        f"model.fast_ops={str(s['fast_ops']).lower()}, train.fused_optimizer={str(s['fused_optimizer']).lower()}, "
        f"the epoch with the lowest validation loss kept; greedy decoding (max_new_tokens {s['max_new_tokens']}), "
        f"ROUGE F-measures (Porter stemming, mean over rows). LoRA: r={lora['r']}, alpha={lora['alpha']}, "
        f"dropout={lora['dropout']:g}, targets {lora['targets'] or 'the default for the architecture'}.\n\n"
        f"**Select** (seed {s['select_seed']}, validation only; these runs' config has no test split): full fine-tune lr "
        f"in {_lrs(s['full_lrs'])}; LoRA lr in {_lrs(s['lora_lrs'])}; LoRA + fusion: {fusion_grid} (modes "
        f"{', '.join(s['modes'])}); per family the run with the highest ROUGE-1 on {val_rows} is chosen (ties: lower "
        f"validation loss). **Final**: each chosen arm retrained with seeds {', '.join(map(str, saved['seeds']))} "
        f"(none of them the selection seed) and scored once on {test_rows}."
    )


def _lrs(values) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def final_table(saved: dict, final: dict[str, list[dict]]) -> list[str]:
    lines = ["", "## Test: the arms chosen on validation, mean ± sd over seeds", "",
             "| arm | chosen on validation | seeds | ROUGE-1 | ROUGE-2 | ROUGE-L | trainable params | trainable % of model "
             "| share of full FT's trainable | train s | best epoch per seed | load avg (5 min) during |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    full = final.get("full")
    for fam, runs in final.items():
        first = runs[0]
        share = f"{first['trainable_params'] / full[0]['trainable_params']:.3f}" if full else "-"
        loads = [x for r in runs for x in r.get("load_avg_5min", [])]
        lines.append(
            f"| {label(fam)} | {_choice(first)} | {len(runs)} | "
            + " | ".join(format_mean_sd([r["scores"][k] for r in runs]) for k in ("rouge1", "rouge2", "rougeL"))
            + f" | {first['trainable_params']:,} | {100 * first['trainable_params'] / first['total_params']:.2f} | {share} | "
            f"{format_mean_sd([r['train_seconds'] for r in runs], 0)} | {', '.join(str(r['best_epoch']) for r in runs)} | "
            f"{f'{min(loads):.2f}-{max(loads):.2f}' if loads else '-'} |"
        )
    return lines


def _choice(run: dict) -> str:
    mode = f"mode {run['arm'].removeprefix('fusion-')}, " if run["arm"].startswith("fusion-") else ""
    return f"{mode}lr {run['lr']:g}"


def difference_table(final: dict[str, list[dict]]) -> list[str]:
    rows = {fam: row_scores(runs) for fam, runs in final.items()}
    pairs = [(a, b) for a, b in PAIRS if a in rows and b in rows and rows[a][0] == rows[b][0]]
    if not pairs:
        return []
    lines = ["", f"ROUGE-1 differences on the same {len(rows[pairs[0][0]][1])} test rows, each row's score first averaged "
             "over its arm's seeds "
             f"(95% interval: paired bootstrap over rows, {RESAMPLES:,} resamples, seed 0; an interval that contains 0 "
             "does not tell the two arms apart on these rows):", "",
             "| arm | minus | ROUGE-1 difference | 95% interval |", "|---|---|---|---|"]
    for a, b in pairs:
        diff, low, high = paired_bootstrap(rows[a][1], rows[b][1], RESAMPLES, 0)
        lines.append(f"| {label(a)} | {label(b)} | {diff:+.3f} | [{low:+.3f}, {high:+.3f}] |")
    return lines


def select_table(saved: dict) -> list[str]:
    chosen = {(c["arm"], c["lr"]) for c in saved["chosen"].values()}
    lines = ["", f"## Select phase: validation only (seed {saved['settings']['select_seed']})", "",
             "| family | arm | lr | val ROUGE-1 | val ROUGE-2 | val ROUGE-L | rows | best epoch (val loss) | train s | run wall s | chosen |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(saved["select"], key=lambda r: (FAMILIES.index(family(r["arm"])), r["arm"], r["lr"])):
        s = r["scores"]
        lines.append(
            f"| {family(r['arm'])} | {label(r['arm'])} | {r['lr']:g} | {s['rouge1']:.3f} | {s['rouge2']:.3f} | "
            f"{s['rougeL']:.3f} | {r['rows']} | {r['best_epoch']} ({r['best_val_loss']:.4f}) | {r['train_seconds']:.0f} | "
            f"{r.get('wall_seconds', math.nan):.0f} | {'**chosen**' if (r['arm'], r['lr']) in chosen else ''} |"
        )
    return lines


def sample_rows(final: dict[str, list[dict]], count: int = 5) -> list[str]:
    if not final:
        return []
    runs = {fam: r[0] for fam, r in final.items()}
    first = next(iter(runs.values()))
    lines = ["", f"Sample test rows (first {count}; each arm's first seed):", "",
             "| input | reference | " + " | ".join(label(r["arm"]) for r in runs.values()) + " |",
             "|" + "---|" * (2 + len(runs))]
    for i in range(min(count, len(first["inputs"]))):
        outputs = " | ".join(r["outputs"][i].replace("|", "/") for r in runs.values())
        lines.append(f"| {first['inputs'][i]} | {first['references'][i]} | {outputs} |")
    return lines
