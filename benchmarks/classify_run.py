"""One run of the classification study (benchmarks/classify.py starts each in its own process): train
one arm at one learning rate and seed on file_type.jsonl, then score one split.

The phase decides the split a run may read, as in benchmarks/quality_arms.py:

  select  the test split is removed from the config before any data is read (training, the saved
          adapter and scoring all read that config): the run scores validation;
  final   the config as it is: the run scores test.

Arms (what is trained):

  head         model.task=classification on all-MiniLM-L6-v2: LoRA on the encoder + a new head
               (mean pooling), fusion off; decoded once (`head`: the head's argmax label);
  head+fusion  the same with the fusion projection (fusion.mode from --fusion-mode);
  gen          label generation (data.task=labels) on the MiniLM warm start (two copies of
               all-MiniLM-L6-v2, the cross-attention new), fusion off; one adapter decoded twice:
               `free` (greedy text) and `constrained` (the likeliest of the recorded label set);
  gen+fusion   the same with fusion.

The warm start's tokenizer is MiniLM's uncased one: free generation can only write a label as the
tokenizer round-trips it ("shell script" for "Shell script"). `free` maps an output equal to a
label's round trip to that label; `free_exact` keeps the raw strings (what exact matching, e.g.
`lexlora eval`, scores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import study_common  # noqa: E402  (benchmarks/ is on the path when this script runs)

ARMS = ("head", "head+fusion", "gen", "gen+fusion")
PHASES = {"select": "validation", "final": "test"}  # the split each phase scores
DATA = "../shared/data/file-descriptions/file_type.jsonl"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# The 3 extension-less rows labelled "file" all land in train with this shuffle seed (the first seed
# from 0 that puts all of them there; seeds 0 and 1 put two or one of them in validation). Chosen
# from the labels alone, before any run.
SHUFFLE_SEED = 2
SPLITS = {"train": "[:80%]", "validation": "[80%:90%]", "test": "[90%:]"}  # 1608 / 201 / 201 rows
# Shared by every arm: data, split, batching, schedule, LoRA (rank, alpha, dropout and targets: the
# warm start's of configs/minilm_file_description.yaml; the regex matches a BERT encoder's
# self-attention and feed-forward Linears as well, so head and gen arms adapt the same encoder Linears).
COMMON = [
    f"data.path={DATA}", "data.input_template='{file}'", "data.target_field=ext_def", "data.lexical_field=file",
    f"data.shuffle_seed={SHUFFLE_SEED}", "data.splits={" + ", ".join(f"{k}: '{v}'" for k, v in SPLITS.items()) + "}",
    "data.max_source_length=64", "data.max_target_length=8", "data.task=labels",
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
    r"lora.target_modules=['.*\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)']",
    "fusion.embedding_model=" + MINILM, "train.batch_size=16", "train.eval_batch_size=32", "train.warmup_ratio=0.06",
    "train.group_by_length=true", "generation.max_new_tokens=8", "generation.num_beams=1",
    # One torch thread (training and decoding): on this shared 2-core machine, with other jobs running,
    # 2 threads took 8.2 s per head step and 1 thread 0.24 s (same losses): the threads spin-wait for
    # each other while the cores are busy elsewhere.
    "train.cpu_threads=1",
]
# The head keeps the epoch with the best validation macro-F1 (ties: lower validation loss). The gen
# arms keep the lowest validation loss: one adapter serves two decodings, and a per-epoch macro-F1
# would judge the epoch by one of them (training evaluates a label task constrained).
HEAD = ["model.task=classification", f"model.name_or_path={MINILM}", "classifier.pooling=mean",
        "classifier.class_weights=none", "train.eval_metric=macro_f1"]
GEN = [f"model.name_or_path=encoder-decoder:{MINILM}+{MINILM}", "train.eval_metric=val_loss"]


def check_arm(arm: str) -> str:
    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")
    return arm


def run_config(arm: str, phase: str, lr: float, seed: int, output_dir: Path, *, steps: int | None = None,
               epochs: int = 1, fusion_mode: str = "add", eval_max_rows: int | None = None, overrides=()):
    """The run's Config: COMMON, the arm's settings, then the study's overrides, then the run's own
    (lr, seed, length, output) which win; in the select phase without its test split."""
    from lexlora.config import load_config

    check_arm(arm)
    fusion = [f"fusion.enabled={str(arm.endswith('+fusion')).lower()}", f"fusion.mode={fusion_mode}"]
    length = [f"train.max_steps={steps}"] if steps else [f"train.epochs={epochs}"]
    cfg = load_config(None, [
        *COMMON, *(HEAD if arm.startswith("head") else GEN), *fusion, *overrides, *length,
        f"train.learning_rate={lr}", f"train.seed={seed}", f"model.init_seed={seed}",
        *([f"train.eval_max_rows={eval_max_rows}"] if eval_max_rows else []),
        f"output_dir={output_dir}", "overwrite_output_dir=true",
    ])
    if phase == "select":
        # Structural: the split is gone from the config that training, the adapter and scoring read.
        cfg.data.splits = {name: spec for name, spec in cfg.data.splits.items() if name != "test"}
    return cfg


def label_scores(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    from lexlora.evaluation.metrics import classification_metrics

    figures = classification_metrics(predictions, references, labels=labels)
    return {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"]}


def as_labels(outputs: list[str], labels: list[str], tokenizer) -> list[str]:
    """Free outputs mapped to the label whose tokenizer round trip they equal (else kept as they are)."""
    round_trips = {tokenizer.decode(tokenizer(label)["input_ids"], skip_special_tokens=True).strip(): label
                   for label in labels}
    return [round_trips.get(o.strip(), o) for o in outputs]


def decode(model, arm: str, records: list[dict]) -> dict[str, tuple[list[str], float]]:
    """Each decoding's predictions and its seconds."""
    out = {}
    started = time.perf_counter()
    if arm.startswith("head"):
        out["head"] = ([p.label for p in model.classify_text(records, batch_size=32)], time.perf_counter() - started)
        return out
    raw = model.generate_text(records, batch_size=32, constrain=False, max_new_tokens=8, num_beams=1)
    seconds = time.perf_counter() - started
    out["free"] = (as_labels(raw, list(model.labels), model.tokenizer), seconds)
    out["free_exact"] = (raw, seconds)
    started = time.perf_counter()
    out["constrained"] = ([p.label for p in model.generate_labels(records, batch_size=32)], time.perf_counter() - started)
    return out


def run(args) -> dict:
    """Train and score one run; the record classify.py keeps."""
    from lexlora.adapters.files import load_adapter
    from lexlora.evaluation.runner import eval_rows
    from lexlora.training.recipe import train

    output_dir = Path(args.work) / f"{args.phase}-{args.arm}-lr{args.lr:g}-seed{args.seed}"
    cfg = run_config(args.arm, args.phase, args.lr, args.seed, output_dir, steps=args.steps, epochs=args.epochs,
                     fusion_mode=args.fusion_mode, eval_max_rows=args.max_rows, overrides=args.override)
    split = PHASES[args.phase]
    metrics = train(cfg).metrics
    model = load_adapter(output_dir)  # the adapter as saved (and verified), not the training copy
    labels = list(model.labels)
    rows = eval_rows(output_dir, split, max_rows=args.max_rows)
    references = [r.strip() for r in rows.references]
    decodings = {
        name: {"predictions": preds, "seconds": round(seconds, 3), "scores": label_scores(preds, references, labels)}
        for name, (preds, seconds) in decode(model, args.arm, rows.records).items()
    }
    if not args.keep_adapters:
        shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "phase": args.phase, "arm": args.arm, "lr": args.lr, "seed": args.seed, "split": split,
        "splits_seen": sorted(cfg.data.splits), "rows": len(references), "labels": labels,
        "fusion_mode": cfg.fusion.mode if cfg.fusion.enabled else None,
        "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
        "train_seconds": metrics["train_seconds"], "eval_seconds": metrics.get("eval_seconds"),
        "steps": metrics["steps"], "epochs": metrics.get("epochs"), "eval_metric": metrics.get("eval_metric"),
        "best_epoch": metrics.get("best_epoch"), "best_val_loss": metrics.get("best_val_loss"),
        "inputs": [r["file"] for r in rows.records], "references": references, "decodings": decodings,
    }


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), required=True)
    parser.add_argument("--arm", type=check_arm, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (otherwise --epochs)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fusion-mode", default="add")
    study_common.add_run_arguments(parser, "score (and evaluate each epoch on) the first N rows")
    return study_common.finish_run(parser.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
