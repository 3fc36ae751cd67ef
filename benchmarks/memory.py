"""Peak training memory: a plain full fine-tune against LoRA + fusion, with and without gradient
checkpointing (and, on a GPU with bitsandbytes, on an 8-bit and a 4-bit base). Not a timed test.

    HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 python benchmarks/memory.py

flan-t5-small shape with random weights (the real weights are not on these machines; memory depends
on the shapes alone), batch 8 of the file_description data (../shared/data/file-descriptions) with
the seed's prompt (configs/file_description.yaml), the same batches in the same order for every
variant (the first rows of the train split, no shuffle, each padded to its longest row). Variants:

  full       every base weight trained (AdamW), no fusion: the baseline (a);
  lora       frozen base + LoRA r=8 alpha 16 on q, k, v, o + an `add` fusion projection (b);
  lora_ckpt  the same with gradient checkpointing on the base (c);
  on CUDA with bitsandbytes, also lora / lora_ckpt on an 8-bit and a 4-bit base.

Each variant runs in its own process. One more process tokenizes the batches and computes their
lexical vectors (all-MiniLM-L6-v2, through lexlora's embedding cache) once and hands them over in a
file, so each child holds the same things before its model is built and never loads the embedding
model. A child imports everything it will use, loads the batches, takes its baseline just before
building the model, runs --steps optimizer steps and reports the growth of its peak over that
baseline:

  - CPU: peak RSS growth = the kernel's high-water mark of the process's resident memory
    (getrusage ru_maxrss, which catches every transient peak, however short) at the end, minus the
    current RSS (/proc/self/statm) at the baseline. The high-water mark cannot be reset (and a
    child's starts at its parent's RSS, hence the small parent), so the child checks it was no
    higher than the baseline RSS before the model was built and says so if it was;
  - CUDA: torch.cuda.max_memory_allocated at the end minus memory_allocated at the baseline (peak
    statistics reset there); reserved memory is shown beside it.

Ratios are each variant's growth over the full fine-tune's. On the CPU each variant runs in
--repeats processes (default 3) and the median peak is taken: glibc keeps freed tensor memory in its
heaps in a pattern that varies from run to run. Seconds per step are the median of the steps after
the first (and of the processes). The last line is `RESULT lora_ratio=… ckpt_ratio=…` ((b)/(a) and (c)/(a)),
with `lora_8bit_ratio=… ckpt_8bit_ratio=… lora_4bit_ratio=… ckpt_4bit_ratio=…` added on a GPU.

One variant by hand (it tokenizes and embeds the data itself, freeing the embedding model before
its baseline): python benchmarks/memory.py --variant lora_ckpt [--device cuda --precision bf16
--quantization 4bit --steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lexlora.training.memory import current_rss_bytes, peak_rss_bytes

MODEL_ID = "google/flan-t5-small"
DATA = ROOT.parent / "shared" / "data" / "file-descriptions" / "file_description.jsonl"
CONFIG = ROOT / "configs" / "file_description.yaml"
BATCH_SIZE = 8
MB = 1024 * 1024
VARIANTS = ("full", "lora", "lora_ckpt")


# ---- data (the parent, or a child run by hand) -------------------------------------------------
def prepare_batches(steps: int, batch_size: int, data: Path = DATA) -> list[dict[str, torch.Tensor]]:
    """The first steps * batch_size rows of the seed's train split (the file's first rows: the split
    is `[:85%]`, unshuffled), tokenized and embedded as training does, collated into fixed batches."""
    from lexlora.config import load_config
    from lexlora.data.embeddings import LexicalEncoder
    from lexlora.data.prompts import required_fields
    from lexlora.data.records import read_records
    from lexlora.data.tokenization import LexicalCollator, encode_split
    from lexlora.model.loading import load_tokenizer

    if not data.is_file():
        sys.exit(
            f"error: {data} is missing; this benchmark reads the shared file_description data "
            "(../shared/data/file-descriptions beside the repo; --data names another copy)"
        )
    cfg = load_config(CONFIG, [f"data.path={data}"])
    template, lexical_field, fields = required_fields(cfg.data, fusion_enabled=True)
    rows = steps * batch_size
    records = read_records(cfg.data.path, fields, cfg.data.target_field, cfg.data.format, cfg.data.skip_invalid)
    train_rows = int(len(records) * 0.85)
    if rows > train_rows:
        sys.exit(f"error: the train split has {train_rows} rows; {rows} are needed for {steps} steps of {batch_size}")
    records = records[:rows]
    encoder = LexicalEncoder(cfg.fusion.embedding_model, cfg.fusion.cache_dir, cfg.fusion.embedding_batch_size, "cpu")
    vectors = encoder.encode([r.fields[lexical_field] for r in records])
    tokenizer = load_tokenizer(cfg.model)
    split = encode_split(records, template, cfg.data.target_field, tokenizer, cfg.data, vectors)
    collate = LexicalCollator(tokenizer)
    batches = [collate([split[i] for i in range(start, start + batch_size)]) for start in range(0, rows, batch_size)]
    del encoder, split, vectors
    gc.collect()
    return [{k: v.contiguous() for k, v in b.items()} for b in batches]


# ---- one variant (a child process) -------------------------------------------------------------
def build(variant: str, quantization: str, device: torch.device):
    from lexlora.config import LoraSettings, ModelConfig
    from lexlora.data.spec import AdapterSpec
    from lexlora.model.factory import build_model
    from lexlora.model.loading import load_base_model, load_tokenizer

    model_config = ModelConfig(name_or_path=MODEL_ID, random_init=True, quantization=quantization)
    base = load_base_model(model_config, device=device if quantization != "none" else None)
    if variant == "full":
        base.requires_grad_(True)
        model = base.to(device)
    else:
        spec = AdapterSpec(
            input_template="{filename}", target_field="file_desc", lexical_field="filename",
            fusion_mode="add", embedding_model="sentence-transformers/all-MiniLM-L6-v2", embedding_dim=384,
        )
        lora = LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=["q", "k", "v", "o"])
        model = build_model(base, load_tokenizer(model_config), spec, lora, base_id=MODEL_ID,
                            gradient_checkpointing=variant == "lora_ckpt").to(device)
    model.train()
    return model


def import_everything(quantization: str) -> None:
    """Import what building and training import, so the imports are not counted as model memory."""
    modules = ["peft", "transformers.models.t5.modeling_t5", "lexlora.model.loading", "lexlora.model.factory"]
    if quantization != "none":
        modules.append("bitsandbytes")
    for module in modules:
        importlib.import_module(module)


def run_variant(args, batches: list[dict[str, torch.Tensor]]) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    import_everything(args.quantization)
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        torch.set_num_threads(args.threads)
    gc.collect()
    # Baseline: just before the model is built.
    base_rss = current_rss_bytes()
    peak_rss_before = peak_rss_bytes()
    base_cuda = torch.cuda.memory_allocated() if cuda else 0

    torch.manual_seed(0)
    model = build(args.variant, args.quantization, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    )
    seconds = []
    losses = []
    for batch in batches[: args.steps]:
        started = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        if args.variant == "full":
            batch.pop("lexical_embeds")
            batch["use_cache"] = False
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # a host sync: the step is finished
        seconds.append(time.perf_counter() - started)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_cuda
        reserved = torch.cuda.max_memory_reserved()
    else:
        peak = peak_rss_bytes() - base_rss
        reserved = None
    trainable = sum(p.numel() for p in params)
    return {
        "variant": args.variant,
        "quantization": args.quantization,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": args.precision,
        "steps": len(seconds),
        "peak_growth_bytes": int(peak),
        "peak_cuda_reserved_bytes": reserved,
        "baseline_bytes": int(base_cuda if cuda else base_rss),
        # CPU: how far the high-water mark already stood above the baseline RSS (0: a clean baseline).
        "pre_baseline_excess_bytes": max(0, peak_rss_before - base_rss) if not cuda else 0,
        "trainable_params": trainable,
        "seconds_per_step": statistics.median(seconds[1:] or seconds),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def child(args) -> None:
    if args.batches:
        batches = torch.load(args.batches)
    else:
        batches = prepare_batches(args.steps, args.batch_size, Path(args.data))
        gc.collect()
    result = run_variant(args, batches)
    print("MEMORY_JSON " + json.dumps(result), flush=True)


# ---- the parent -------------------------------------------------------------------------------
def run_child(variant: str, quantization: str, args, batch_file: str) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--quantization", quantization,
        "--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
        "--threads", str(args.threads), "--batches", batch_file,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY_JSON ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        sys.exit(f"error: variant {variant} ({quantization}) failed with exit code {done.returncode}")
    result = json.loads(lines[-1].removeprefix("MEMORY_JSON "))
    result["process_seconds"] = time.perf_counter() - started
    return result


def summarize(repeats: list[dict]) -> dict:
    """One variant's processes as one row: the median peak and step time, and the spread."""
    peaks = [r["peak_growth_bytes"] for r in repeats]
    result = dict(repeats[0])
    result["peak_growth_bytes"] = statistics.median(peaks)
    result["peak_range_bytes"] = (min(peaks), max(peaks))
    result["seconds_per_step"] = statistics.median(r["seconds_per_step"] for r in repeats)
    result["pre_baseline_excess_bytes"] = max(r["pre_baseline_excess_bytes"] for r in repeats)
    return result


def name_of(result: dict) -> str:
    return result["variant"] + ("" if result["quantization"] == "none" else f"_{result['quantization']}")


def check_switch(quantization: str, cuda: bool) -> None:
    """lexlora's own up-front check of model.quantization, before any process is started."""
    from lexlora.config import ModelConfig
    from lexlora.errors import ConfigError
    from lexlora.model.loading import check_quantization

    try:
        check_quantization(ModelConfig(quantization=quantization))
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    if quantization != "none" and not cuda:
        sys.exit(f"error: --quantization {quantization} needs --device cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (the parent runs all)")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on a GPU that supports it (as training's default), else fp32")
    parser.add_argument("--quantization", default=None,
                        help="the base's weights for the LoRA variants: none, 8bit, 4bit (a child), or a comma "
                             "list (the parent; default none, plus 8bit,4bit on CUDA with bitsandbytes)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="processes per variant, the median is reported (default 3 on CPU, 1 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--data", default=str(DATA), help="file_description.jsonl (default: ../shared/data/file-descriptions/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores)")
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but this machine has no CUDA device")
    if args.precision == "auto":
        args.precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    args.steps = args.steps or (20 if cuda else 5)
    args.repeats = args.repeats or (1 if cuda else 3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.threads = args.threads or cores
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.prepare:
        torch.save(prepare_batches(args.steps, args.batch_size, Path(args.data)), args.prepare)
        return
    if args.variant:
        args.quantization = args.quantization or "none"
        if args.variant == "full" and args.quantization != "none":
            sys.exit("error: a full fine-tune trains every base weight: it cannot use a quantized base")
        check_switch(args.quantization, cuda)
        child(args)
        return

    if args.quantization is None:
        quantizations = ["none"]
        if cuda and importlib.util.find_spec("bitsandbytes") is not None:
            quantizations += ["8bit", "4bit"]
    else:
        quantizations = [q.strip() for q in args.quantization.split(",") if q.strip()]
    for quantization in quantizations:
        check_switch(quantization, cuda)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lexlora-memory-") as tmp:
        # The batches are made in a process of their own: a child's peak-RSS counter starts from its
        # parent's RSS, so the parent stays small (it imports torch and nothing else heavy).
        batch_file = str(Path(tmp) / "batches.pt")
        prepare = [sys.executable, str(Path(__file__).resolve()), "--prepare", batch_file,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--data", args.data]
        done = subprocess.run(prepare, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            sys.exit(done.returncode or 1)
        batches = torch.load(batch_file)
        shapes = [tuple(b["input_ids"].shape) for b in batches]
        label_shapes = [tuple(b["labels"].shape) for b in batches]
        del batches
        runs = [("full", "none")] + [(v, q) for q in quantizations for v in ("lora", "lora_ckpt")]
        results = []
        for variant, quantization in runs:
            repeats = []
            for _ in range(args.repeats):
                repeats.append(run_child(variant, quantization, args, batch_file))
                r = repeats[-1]
                print(f"  {name_of(r)}: {r['peak_growth_bytes'] / MB:.1f} MB, {r['seconds_per_step']:.3f} s/step "
                      f"({r['process_seconds']:.0f}s)", flush=True)
            results.append(summarize(repeats))

    full = results[0]["peak_growth_bytes"]
    device = results[0]["device"]
    kind = "peak CUDA memory allocated" if cuda else "peak RSS"
    print()
    print(f"flan-t5-small shape (random init), batch {args.batch_size}, {args.steps} AdamW steps on the same "
          f"batches (source lengths {sorted({s[1] for s in shapes})}, target lengths {sorted({s[1] for s in label_shapes})})")
    print(f"device {device}, precision {args.precision}, torch {torch.__version__}"
          + ("" if cuda else f", {args.threads} CPU threads") + f", Python {platform.python_version()}")
    print(f"growth of {kind} over the baseline taken just before the model is built"
          + (f"; median of {args.repeats} processes per variant" if args.repeats > 1 else ""))
    print()
    spread = args.repeats > 1
    print(f"| variant | base weights | trainable params | peak growth (MB){' [min-max]' if spread else ''} "
          f"| ratio to full | seconds/step |{' peak reserved (MB) |' if cuda else ''}")
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for r in results:
        weights = r["quantization"] if r["quantization"] != "none" else "fp32" + (", bf16 autocast" if r["precision"] == "bf16" else "")
        low, high = r["peak_range_bytes"]
        shown = f"{r['peak_growth_bytes'] / MB:.1f}" + (f" [{low / MB:.0f}-{high / MB:.0f}]" if spread else "")
        print(f"| {r['variant']} | {weights} | {r['trainable_params']:,} | {shown} | {r['peak_growth_bytes'] / full:.3f} "
              f"| {r['seconds_per_step']:.3f} |" + (f" {r['peak_cuda_reserved_bytes'] / MB:.1f} |" if cuda else ""))
    for r in results:
        if r["pre_baseline_excess_bytes"] > 8 * MB:
            print(f"note: {name_of(r)}: the process's high-water mark stood {r['pre_baseline_excess_bytes'] / MB:.0f} MB "
                  "above its baseline RSS before the model was built; its figure may be understated by up to that")
    print(f"\nwhole run: {time.perf_counter() - started:.0f}s")
    ratios = {name_of(r): r["peak_growth_bytes"] / full for r in results}
    parts = [f"lora_ratio={ratios['lora']:.3f}", f"ckpt_ratio={ratios['lora_ckpt']:.3f}"]
    for q in quantizations:
        if q != "none":
            parts += [f"lora_{q}_ratio={ratios[f'lora_{q}']:.3f}", f"ckpt_{q}_ratio={ratios[f'lora_ckpt_{q}']:.3f}"]
    print("RESULT " + " ".join(parts))


if __name__ == "__main__":
    main()
