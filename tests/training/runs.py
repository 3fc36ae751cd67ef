"""What the training tests (here and in tests/e2e) read of a run: its log, the staging dirs it may
leave behind, and the long tiny run that a signal can land in the middle of."""

import json

from tests.conftest import ROOT

STDLIB = ROOT / "examples" / "python_stdlib.jsonl"
WEIGHTS = "adapter_model.safetensors"
# Two epochs of 16 optimizer steps (32 rows in batches of 2), a checkpoint every 2 steps: long enough
# for a signal to land mid-epoch, a few seconds in all. float32 weights, so they compare exactly.
LONG_RUN = ["train.max_steps=null", "train.epochs=2", "train.batch_size=2", "train.checkpoint_every=2",
            "train.cpu_threads=1", "save_dtype=float32"]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def records(adapter_dir):
    """The training log's loss and evaluation records, without their wall-clock times."""
    rows = read_log(adapter_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "loss" in r or "val_loss" in r]


def leftovers(directory, name="adapter"):
    """Staging / failed dirs of the adapter `name` (none may be left behind)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))
