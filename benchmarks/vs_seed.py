"""The seed notebook's recipe against lexlora's default training path, same machine, same data.

    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/vs_seed.py [--full]

Both recipes train the flan-t5-small shape with random weights (AutoConfig + from_config, seed 0) on
the same rows of ../shared/data/file-descriptions/file_description.jsonl (filename -> file_desc, the
seed prompt of configs/file_description.yaml), batch 8, the same epochs; by default the first 160
train rows and 1 epoch (--full: the whole train split, 1707 rows). Validation: rows [1707:1747] for
both; generation: the first 40 rows of the test split ([95%:]), greedy, exactly 48 new tokens per row (min_new_tokens = max_new_tokens: random weights stop at
different points, which would time different amounts of decoding), batch 8.
Preprocessing is timed on the whole train split + the validation rows (1747 rows, what a run
preprocesses; --prep-rows N: the first N train rows instead), then training uses its first rows.

  seed     per-example SentenceTransformer(all-MiniLM-L6-v2).encode(filename) inside an unbatched
           datasets.Dataset.map, followed by a random, untrained nn.Linear(384, 512) per example;
           padding="max_length", max_length=128 for inputs and labels (label pad -> -100); a full
           fine-tune with transformers.Trainer of a wrapper that adds the 512-d vector to every
           encoder input embedding; trainer.save_model to a temp dir.
  lexlora  lexlora.training.train(cfg) with configs/file_description.yaml + model.random_init=true,
           train.seed=0, the same splits, epochs and batch; preprocessing timed by
           lexlora.training.prepare_data cold (empty LEXLORA_CACHE) and warm (the same cache again).
Both children import sentence_transformers before their preprocessing clock starts (a one-off
~1.6 s here, mostly its scikit-learn/scipy imports); loading the model is inside the clock for both.

Each recipe runs in its own process (the parent imports no torch, so a child's RSS high-water mark
starts low). Peak memory = the process's peak RSS at the end of training (and saving) minus its RSS
just before the model is built (lexlora: patched around lexlora.training.load_base_model).
Preprocessing examples/s counts the train + validation rows. Training tokens/s counts non-pad
input + label tokens. Validation loss is the token-weighted mean cross-entropy over the validation
labels (the seed's on its max_length-padded inputs with -100 labels).

The last line is
`RESULT train_speedup=… prep_speedup_cold=… prep_speedup_warm=… ckpt_shrink=… mem_ratio=… val_loss_lexlora=… val_loss_seed=…`
(speeds lexlora/seed, ckpt size seed/lexlora, memory lexlora/seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "file-descriptions" / "file_description.jsonl"
CONFIG = ROOT / "configs" / "file_description.yaml"
MODEL_ID = "google/flan-t5-small"
EMBED_ID = "sentence-transformers/all-MiniLM-L6-v2"
BATCH = 8
TRAIN_SPLIT = 1707  # [:85%] of the 2008 rows
VAL = (1707, 1747)
TEST_ROWS = 40
MAX_NEW = 48
MB = 1024 * 1024


def read_rows() -> list[dict]:
    with open(DATA, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- the seed recipe ---------------------------------------------------------------------------
def child_seed(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import gc

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from torch import nn
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    from lexlora.config import load_config
    from lexlora.training.memory import current_rss_bytes, peak_rss_bytes

    template = load_config(CONFIG).data.input_template
    rows = read_rows()
    prep_rows = rows[: args.prep_rows]
    val_rows = rows[VAL[0] : VAL[1]]
    test_start = int(len(rows) * 0.95)
    test_rows = rows[test_start : test_start + TEST_ROWS]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)

    def preprocess(split_rows, st, proj):
        ds = Dataset.from_list([{"filename": r["filename"], "file_desc": r["file_desc"]} for r in split_rows])

        def add_embedding(example):  # the notebook: one text at a time, a random projection
            emb = torch.tensor(st.encode(example["filename"]))
            with torch.no_grad():
                example["lexical"] = proj(emb).tolist()
            return example

        def tok(example):
            enc = tokenizer(template.format(filename=example["filename"]), padding="max_length",
                            truncation=True, max_length=128)
            lab = tokenizer(text_target=example["file_desc"], padding="max_length", truncation=True, max_length=128)
            enc["labels"] = [t if t != tokenizer.pad_token_id else -100 for t in lab["input_ids"]]
            return enc

        ds = ds.map(add_embedding)
        ds = ds.map(tok, remove_columns=["filename", "file_desc"])
        ds.set_format("torch")
        return ds

    def prep():
        started = time.perf_counter()
        torch.manual_seed(0)
        st = SentenceTransformer(EMBED_ID, device="cpu")
        proj = nn.Linear(384, 512)
        out = preprocess(prep_rows, st, proj), preprocess(val_rows, st, proj)
        return time.perf_counter() - started, out, st, proj

    prep_cold, _, st, proj = prep()
    del st, proj
    gc.collect()
    prep_warm, (prep_ds, val_ds), st, proj = prep()  # no cache: the same work again
    train_ds = prep_ds.select(range(args.train_rows))
    del prep_ds
    gc.collect()

    class FusedT5(nn.Module):
        def __init__(self, t5):
            super().__init__()
            self.t5 = t5

        def forward(self, input_ids, attention_mask, labels=None, lexical=None):
            embeds = self.t5.get_input_embeddings()(input_ids)
            if lexical is not None:
                embeds = embeds + lexical.unsqueeze(1).to(embeds.dtype)
            return self.t5(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

        def generate(self, input_ids, attention_mask, lexical, **kw):
            embeds = self.t5.get_input_embeddings()(input_ids) + lexical.unsqueeze(1)
            return self.t5.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kw)

    baseline = current_rss_bytes()
    peak_before = peak_rss_bytes()
    torch.manual_seed(0)
    t5 = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(MODEL_ID))
    model = FusedT5(t5)
    out_dir = tempfile.mkdtemp(prefix="vs_seed_seed_")
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, num_train_epochs=args.epochs,
        learning_rate=5e-4, eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
        remove_unused_columns=False, logging_steps=10**9, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    save_dir = Path(out_dir) / "final"
    try:
        trainer.save_model(str(save_dir))
    except Exception as exc:  # shared tensors (tied embeddings) refused by safetensors: save as torch
        import safetensors.torch

        print(f"seed: trainer.save_model failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
              "safetensors.torch.save_model (shared tensors once) instead", flush=True)
        save_dir.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_model(model, str(save_dir / "model.safetensors"))
    peak = peak_rss_bytes()
    ckpt = dir_bytes(save_dir)

    whole = train_ds[:]
    useful = int(whole["attention_mask"].sum() + (whole["labels"] != -100).sum()) * args.epochs

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val_ds), BATCH):
            b = val_ds[s : s + BATCH]
            logits = model(b["input_ids"], b["attention_mask"], labels=b["labels"], lexical=b["lexical"]).logits
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            total += float(ce)
            count += int((b["labels"] != -100).sum())

    # generation as the seed would: encode + project each filename, pad to 128, greedy
    started = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for s in range(0, len(test_rows), BATCH):
            chunk = test_rows[s : s + BATCH]
            lex = torch.stack([proj(torch.tensor(st.encode(r["filename"]))) for r in chunk])
            enc = tokenizer([template.format(filename=r["filename"]) for r in chunk], padding="max_length",
                            truncation=True, max_length=128, return_tensors="pt")
            ids = model.generate(enc["input_ids"], enc["attention_mask"], lex, max_new_tokens=MAX_NEW, num_beams=1,
                                 do_sample=False, min_new_tokens=MAX_NEW)
            outputs.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    gen_s = time.perf_counter() - started
    return {
        "prep_rows": len(prep_rows) + len(val_rows), "prep_cold_s": prep_cold, "prep_warm_s": prep_warm,
        "train_rows": len(train_ds) * args.epochs, "train_s": train_s, "useful_tokens": useful,
        "peak_growth": peak - baseline, "peak_before_over_baseline": peak_before > baseline,
        "peak_rose_after_baseline": peak > peak_before,
        "ckpt_bytes": ckpt, "val_loss": total / count, "gen_rows": len(test_rows), "gen_s": gen_s,
        "sample": outputs[:2],
    }


# ---- lexlora -----------------------------------------------------------------------------------
def child_lexlora(args) -> dict:
    cache = tempfile.mkdtemp(prefix="vs_seed_cache_")
    os.environ["LEXLORA_CACHE"] = cache
    sys.path.insert(0, str(ROOT))
    import gc

    import sentence_transformers  # noqa: F401  (imported before the clock, as in the seed child)

    import lexlora.training.recipe as training
    from lexlora.config import load_config
    from lexlora.data.prepare import prepare_data
    from lexlora.model.loading import load_tokenizer
    from lexlora.model.lora_model import LexLoraModel
    from lexlora.training.memory import current_rss_bytes, peak_rss_bytes

    out_dir = Path(tempfile.mkdtemp(prefix="vs_seed_lexlora_")) / "adapter"
    cfg = load_config(CONFIG, [
        f"data.path={DATA}", "model.random_init=true", f"train.epochs={args.epochs}", f"train.batch_size={BATCH}",
        "train.seed=0", f"output_dir={out_dir}",
    ])
    cfg.data.splits = {"train": f"[:{args.train_rows}]", "validation": f"[{VAL[0]}:{VAL[1]}]"}
    prep_cfg = copy.deepcopy(cfg)
    prep_cfg.data.splits = {"train": f"[:{args.prep_rows}]", "validation": f"[{VAL[0]}:{VAL[1]}]"}
    tokenizer = load_tokenizer(cfg.model)

    def prep():
        started = time.perf_counter()
        data = prepare_data(prep_cfg, tokenizer, "cpu")
        return time.perf_counter() - started, data

    prep_cold, data = prep()
    del data
    gc.collect()
    prep_warm, data = prep()
    train_split = data.splits["train"]
    n = args.train_rows
    useful = (sum(len(x) for x in train_split.input_ids[:n]) + sum(len(x) for x in train_split.labels[:n])) * args.epochs
    prep_rows = sum(len(s) for s in data.splits.values())
    del data
    gc.collect()

    # The memory baseline just before the model phase loads the base, and the model it builds
    # (lexlora.model.factory.model_for_run), kept to generate with after the run.
    marks: dict = {}
    real_load, real_build = training.load_base_model, training.model_for_run

    def load_base_model(*a, **kw):
        marks["baseline"] = current_rss_bytes()
        marks["peak_before"] = peak_rss_bytes()
        return real_load(*a, **kw)

    def model_for_run(*a, **kw):
        marks["model"] = real_build(*a, **kw)
        return marks["model"]

    training.load_base_model = load_base_model
    training.model_for_run = model_for_run
    result = training.train(cfg)
    peak = peak_rss_bytes()
    metrics = result.metrics
    model: LexLoraModel = marks["model"]
    rows = read_rows()
    test_start = int(len(rows) * 0.95)
    test_rows = rows[test_start : test_start + TEST_ROWS]
    started = time.perf_counter()
    outputs = model.generate_text([{"filename": r["filename"]} for r in test_rows], batch_size=BATCH,
                                  max_new_tokens=MAX_NEW, num_beams=1, do_sample=False, min_new_tokens=MAX_NEW)
    gen_s = time.perf_counter() - started
    return {
        "prep_rows": prep_rows, "prep_cold_s": prep_cold, "prep_warm_s": prep_warm,
        "train_rows": args.train_rows * args.epochs, "train_s": metrics["train_seconds"], "useful_tokens": useful,
        "peak_growth": peak - marks["baseline"], "peak_before_over_baseline": marks["peak_before"] > marks["baseline"],
        "peak_rose_after_baseline": peak > marks["peak_before"],
        "ckpt_bytes": (out_dir / "adapter_model.safetensors").stat().st_size,
        "val_loss": metrics.get("final_val_loss", metrics.get("best_val_loss")),
        "gen_rows": len(test_rows), "gen_s": gen_s, "sample": outputs[:2],
    }


# ---- parent ------------------------------------------------------------------------------------
def run_child(name: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    cmd = [sys.executable, __file__, "--child", name, "--result", result_path,
           "--train-rows", str(args.train_rows), "--prep-rows", str(args.prep_rows), "--epochs", str(args.epochs)]
    started = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        sys.exit(f"error: the {name} child failed (exit {proc.returncode})")
    result = json.loads(Path(result_path).read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole train split (1707 rows)")
    parser.add_argument("--train-rows", type=int, default=160)
    parser.add_argument("--prep-rows", type=int, default=TRAIN_SPLIT, help="train rows preprocessed (timed)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--child", choices=["seed", "lexlora"])
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.full:
        args.train_rows = TRAIN_SPLIT
    args.prep_rows = max(args.prep_rows, args.train_rows)
    if args.child:
        out = child_seed(args) if args.child == "seed" else child_lexlora(args)
        Path(args.result).write_text(json.dumps(out))
        return
    if not DATA.is_file():
        sys.exit(f"error: {DATA} is missing")
    print(f"preprocess {args.prep_rows} train rows + validation; train rows {args.train_rows}, epochs {args.epochs}, "
          f"batch {BATCH}, validation rows {VAL[0]}:{VAL[1]}, "
          f"generation {TEST_ROWS} test rows; {os.cpu_count()} cores", flush=True)
    res = {name: run_child(name, args) for name in ("seed", "lexlora")}
    s, l = res["seed"], res["lexlora"]

    def rate(r, n, t):
        return r[n] / r[t]

    rows = [
        ("preprocess ex/s (cold)", rate(s, "prep_rows", "prep_cold_s"), rate(l, "prep_rows", "prep_cold_s")),
        ("preprocess ex/s (warm)", rate(s, "prep_rows", "prep_warm_s"), rate(l, "prep_rows", "prep_warm_s")),
        ("train ex/s", rate(s, "train_rows", "train_s"), rate(l, "train_rows", "train_s")),
        ("train useful tok/s", rate(s, "useful_tokens", "train_s"), rate(l, "useful_tokens", "train_s")),
        ("train seconds", s["train_s"], l["train_s"]),
        ("peak RSS growth MB", s["peak_growth"] / MB, l["peak_growth"] / MB),
        ("checkpoint MB", s["ckpt_bytes"] / MB, l["ckpt_bytes"] / MB),
        ("generate ex/s", rate(s, "gen_rows", "gen_s"), rate(l, "gen_rows", "gen_s")),
        ("validation loss", s["val_loss"], l["val_loss"]),
        ("process wall s", s["wall_s"], l["wall_s"]),
    ]
    print(f"\n| {'figure':<24} | {'seed':>12} | {'lexlora':>12} | {'lexlora/seed':>12} |")
    print(f"|{'-' * 26}|{'-' * 14}|{'-' * 14}|{'-' * 14}|")
    for name, a, b in rows:
        print(f"| {name:<24} | {a:>12.4g} | {b:>12.4g} | {b / a:>12.4g} |")
    for name, r in res.items():
        if r["peak_before_over_baseline"]:
            rose = "it rose again in training, so the growth is training's" if r["peak_rose_after_baseline"] else (
                "it never rose again, so the growth is an upper bound set by preprocessing")
            print(f"note: {name}: the RSS high-water mark was already above the baseline before the model was built; {rose}")
        print(f"{name} samples: {r['sample']}")
    print(
        f"RESULT train_speedup={rows[2][2] / rows[2][1]:.3f} prep_speedup_cold={rows[0][2] / rows[0][1]:.3f} "
        f"prep_speedup_warm={rows[1][2] / rows[1][1]:.3f} ckpt_shrink={s['ckpt_bytes'] / l['ckpt_bytes']:.3f} "
        f"mem_ratio={l['peak_growth'] / s['peak_growth']:.3f} val_loss_lexlora={l['val_loss']:.4f} "
        f"val_loss_seed={s['val_loss']:.4f}"
    )


if __name__ == "__main__":
    main()
