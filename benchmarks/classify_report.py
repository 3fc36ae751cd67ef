"""The classification study's report and RESULT line, from the record benchmarks/classify.py saves (so
that `--from-json` rewrites them without training)."""

from __future__ import annotations

from study_common import failures_lines

import datetime
import math

from classify_run import ARMS
from stats import format_mean_sd, mean_sd, paired_bootstrap_metric

RESAMPLES = 10_000
# What is reported: (name, trained arm, decoding). A gen adapter is decoded twice.
REPORTED = (
    ("head", "head", "head"),
    ("head+fusion", "head+fusion", "head"),
    ("gen free", "gen", "free"),
    ("gen constrained", "gen", "constrained"),
    ("gen+fusion free", "gen+fusion", "free"),
    ("gen+fusion constrained", "gen+fusion", "constrained"),
)
# The differences the README states: what constraining adds to free decoding, a head against the
# best generation, and what fusion adds (head and gen).
PAIRS = (
    ("gen constrained", "gen free"),
    ("gen+fusion constrained", "gen+fusion free"),
    ("head", "gen constrained"),
    ("head+fusion", "head"),
    ("gen+fusion constrained", "gen constrained"),
    ("gen+fusion free", "gen free"),
)
METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))


def final_by_arm(saved: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in saved["final"]:
        runs.setdefault(r["arm"], []).append(r)
    return {arm: sorted(rs, key=lambda r: r["seed"]) for arm, rs in runs.items()}


def reported(saved: dict) -> dict[str, tuple[list[dict], str]]:
    """Reported name -> (its trained arm's final runs, the decoding read from them)."""
    final = final_by_arm(saved)
    return {name: (final[arm], decoding) for name, arm, decoding in REPORTED if arm in final}


def test_scores(runs: list[dict], decoding: str, metric: str) -> list[float]:
    return [r["decodings"][decoding]["scores"][metric] for r in runs]


def result_line(saved: dict) -> str:
    arms = reported(saved)

    def mean(name: str, metric: str = "macro_f1") -> float:
        return mean_sd(test_scores(*arms[name], metric))[0] if name in arms else math.nan

    delta = mean("head+fusion") - mean("head")
    seeds = min((len(runs) for runs, _ in arms.values()), default=0)  # seeds every reported arm completed
    return (f"RESULT head_acc={mean('head', 'accuracy'):.4f} head_f1={mean('head'):.4f} gen_f1={mean('gen free'):.4f} "
            f"constrained_f1={mean('gen constrained'):.4f} fusion_delta_f1={delta:+.4f} seeds={seeds}")


def write_report(saved: dict, note: str = "") -> str:
    settings = saved["settings"]
    started = datetime.datetime.fromisoformat(saved["date"])
    versions = settings.get("versions", {})
    load = saved.get("load_avg", {})
    lines = [
        "# Classification: a classifier head vs label generation (free and constrained), fusion on and off",
        "",
        f"Command: `{saved['command']}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; wall time {saved['wall_seconds'] / 60:.1f} min; machine: "
        f"{saved['cores']} CPU cores ({settings.get('processor', '?')}), shared: load average (1 min) "
        f"{load.get('min', math.nan):.1f}-{load.get('max', math.nan):.1f} during the study; git commit {saved['commit']}; "
        + ", ".join(f"{name} {v}" for name, v in versions.items()) + ".",
        "",
        setup_paragraph(saved),
    ]
    lines += final_table(saved)
    lines += difference_table(saved)
    lines += select_table(saved)
    lines += failures_lines(saved)
    if note:
        lines += ["", note]
    lines += errors_seen(saved)
    return "\n".join(lines) + "\n"


def setup_paragraph(saved: dict) -> str:
    s = saved["settings"]
    counts = s.get("label_counts", {})
    where = ", ".join(f"{split} {n.get('file', 0)}" for split, n in counts.items())
    sizes = " / ".join(f"{split} {sum(n.values())}" for split, n in counts.items())
    length = f"{s['steps']} optimizer steps" if s.get("steps") else f"{s['epochs']} epoch(s)"
    fusion_lrs = ("every lr of the grid" if s["fusion_lrs"] == "grid"
                  else "the lr chosen for the same family without fusion")
    val_rows = f"the first {s['max_rows']} rows of" if s.get("max_rows") else "all of"
    return (
        f"Data: `{s['data_path']}` (file name -> ext_def), shuffled with data.shuffle_seed={s['shuffle_seed']} and split "
        f"{' / '.join(f'{k} {v}' for k, v in s['splits'].items())} = {sizes} rows. The label is a function of the "
        "file's extension in every row (8 extensions, 8 labels; the 3 rows without an extension are labelled \"file\"); "
        f"shuffle seed {s['shuffle_seed']} is the first that puts all three \"file\" rows in train (rows per split: {where}), "
        "chosen from the labels before any run, so validation and test carry the 8 other labels.\n\n"
        f"Every run: {length}, batch {s['batch_size']} (lexlora's length-grouped train loader in every arm), linear "
        f"schedule with 6% warmup, fused AdamW, model.fast_ops on; LoRA r={s['lora']['r']}, alpha={s['lora']['alpha']}, "
        f"dropout={s['lora']['dropout']:g} on the self-attention and feed-forward Linears of every encoder (and decoder) "
        f"layer; fusion (where on): mode `{s['fusion_mode']}`, the all-MiniLM-L6-v2 embedding of the file name. **head**: "
        "model.task=classification on all-MiniLM-L6-v2 (mean pooling, a new Linear head trained in full), the epoch with "
        "the best validation macro-F1 kept (ties: lower validation loss). **gen**: label generation on the MiniLM warm "
        "start (two copies of all-MiniLM-L6-v2, the new cross-attention trained in full), the epoch with the lowest "
        "validation loss kept; each adapter decoded twice: *free* (greedy, 8 new tokens at most) and *constrained* (the "
        "likeliest label of the adapter's recorded label set, lexlora's default for label adapters). The warm start's "
        "tokenizer is uncased, so free generation writes \"shell script\" for \"Shell script\": *free* counts an output "
        "equal to a label's round trip through the tokenizer as that label; *free, exact strings* (the raw outputs, as "
        "exact matching scores them) is shown too. Accuracy and macro-F1 over the 9-label set (a wrong \"file\" "
        "prediction counts as a class).\n\n"
        f"**Select** (seed {s['select_seed']}, {val_rows} validation; these runs' config has no test split): head lr in "
        f"{_lrs(s['head_lrs'])}, gen lr in {_lrs(s['gen_lrs'])}; the fusion arms at {fusion_lrs}. Per trained arm the "
        "run with the highest validation macro-F1 is chosen (head: the head's; gen: constrained, then free); ties go to "
        "the lower validation loss, then the lower lr. **Final**: each chosen arm retrained with seeds "
        f"{', '.join(map(str, saved['seeds']))} (none of them the selection seed; the seed also draws the head's and the "
        "warm start's new weights) and scored once on test"
        + (f" (its first {s['max_rows']} rows)" if s.get("max_rows") else "") + "."
    )


def _lrs(values) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def final_table(saved: dict) -> list[str]:
    lines = ["", "## Test: the arms chosen on validation, mean ± sd over seeds", "",
             "| arm | chosen lr | seeds | accuracy | macro-F1 | trainable params | trainable % | train s | decode s "
             "| best epoch per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (runs, decoding) in reported(saved).items():
        first = runs[0]
        lines.append(
            f"| {name} | {first['lr']:g} | {len(runs)} | {format_mean_sd(test_scores(runs, decoding, 'accuracy'))} | "
            f"{format_mean_sd(test_scores(runs, decoding, 'macro_f1'))} | {first['trainable_params']:,} | "
            f"{100 * first['trainable_params'] / first['total_params']:.2f} | "
            f"{format_mean_sd([r['train_seconds'] for r in runs], 0)} | "
            f"{format_mean_sd([r['decodings'][decoding]['seconds'] for r in runs], 1)} | "
            f"{', '.join(str(r['best_epoch']) for r in runs)} |"
        )
    for name, (runs, decoding) in reported(saved).items():
        if decoding == "free":
            lines.append(f"| {name}, exact strings | | {len(runs)} | {format_mean_sd(test_scores(runs, 'free_exact', 'accuracy'))} "
                         f"| {format_mean_sd(test_scores(runs, 'free_exact', 'macro_f1'))} | | | | | |")
    return lines


def difference_table(saved: dict) -> list[str]:
    arms = reported(saved)
    pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    if not pairs:
        return []
    refs = arms[pairs[0][0]][0][0]["references"]
    lines = ["", f"Differences on the same {len(refs)} test rows (an arm's value: the mean over its seeds; 95% interval: "
             f"paired bootstrap over rows, {RESAMPLES:,} resamples, seed 0, both arms' metrics recomputed on each "
             "resample; an interval that contains 0 does not tell the two arms apart on these rows):", "",
             "| arm | minus | accuracy diff | 95% interval | macro-F1 diff | 95% interval |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
        (runs_a, dec_a), (runs_b, dec_b) = arms[a], arms[b]
        if any(r["inputs"] != runs_a[0]["inputs"] for r in [*runs_a, *runs_b]):
            raise ValueError(f"{a} and {b}: the runs scored different test rows")
        cells = []
        for metric, _ in METRICS:
            diff, low, high = paired_bootstrap_metric(
                [r["decodings"][dec_a]["predictions"] for r in runs_a], [r["decodings"][dec_b]["predictions"] for r in runs_b],
                refs, metric, labels=runs_a[0]["labels"], resamples=RESAMPLES, seed=0)
            cells.append(f"{diff:+.4f} | [{low:+.4f}, {high:+.4f}]")
        lines.append(f"| {a} | {b} | {' | '.join(cells)} |")
    return lines


def select_table(saved: dict) -> list[str]:
    chosen = {(c["arm"], c["lr"]) for c in saved["chosen"].values()}
    lines = ["", f"## Select phase: validation only (seed {saved['settings']['select_seed']})", "",
             "| arm | lr | val macro-F1 (head / constrained) | val macro-F1 (free) | val accuracy (head / constrained) | rows "
             "| best epoch (val loss) | train s | run wall s | chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(saved["select"], key=lambda r: (ARMS.index(r["arm"]), r["lr"])):
        main = r["decodings"]["head" if r["arm"].startswith("head") else "constrained"]["scores"]
        free = r["decodings"].get("free", {}).get("scores", {}).get("macro_f1")
        lines.append(
            f"| {r['arm']} | {r['lr']:g} | {main['macro_f1']:.4f} | {'-' if free is None else f'{free:.4f}'} | "
            f"{main['accuracy']:.4f} | {r['rows']} | {r['best_epoch']} ({r['best_val_loss']:.4f}) | {r['train_seconds']:.0f} | "
            f"{r.get('wall_seconds', math.nan):.0f} | {'**chosen**' if (r['arm'], r['lr']) in chosen else ''} |"
        )
    return lines


def errors_seen(saved: dict, count: int = 10) -> list[str]:
    """The test rows some final run got wrong (file, reference, the wrong predictions by arm)."""
    wrong: dict[int, list[str]] = {}
    first = None
    for name, (runs, decoding) in reported(saved).items():
        for r in runs:
            first = first or r
            for i, (p, ref) in enumerate(zip(r["decodings"][decoding]["predictions"], r["references"])):
                if p != ref:
                    wrong.setdefault(i, []).append(f"{name} (seed {r['seed']}): {p!r}")
    if first is None:
        return []
    if not wrong:
        return ["", "No final run got any test row wrong."]
    lines = ["", f"Test rows some final run got wrong ({len(wrong)} rows; the first {min(count, len(wrong))}):", "",
             "| file | reference | wrong predictions |", "|---|---|---|"]
    for i in sorted(wrong)[:count]:
        lines.append(f"| {first['inputs'][i]} | {first['references'][i]} | {'; '.join(wrong[i]).replace('|', '/')} |")
    return lines
