"""Where a lexlora training step spends its time, and how far it is from the floor.

    HF_HUB_CACHE=/work/shared/hf/hub HF_HUB_OFFLINE=1 python benchmarks/profile_train.py [--steps 8] [key=value ...]

The step of lexlora's default training path (configs/file_description.yaml, flan-t5-small shape with
random weights, batch 8, the first 160 train rows, the loader train() builds) under torch.profiler:
time per step, by operator group (matmul / dropout RNG / elementwise / softmax+loss / optimizer / other).

The floor is the matmul FLOPs of the useful tokens only (each of the profiled examples run alone,
without padding, forward + backward, counted by the profiler) at this machine's fp32 matmul rate
(a 1024^3 torch.mm, same threads). Trailing key=value are config overrides (e.g. lora.dropout=0.05
train.group_by_length=false) to compare settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "file-descriptions" / "file_description.jsonl"
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    # (aten::random_ and aten::ge: lexlora.fast_ops.FastDropout's masks)
    "dropout RNG": ("aten::bernoulli_", "aten::bernoulli", "aten::rand_like", "aten::uniform_", "aten::random_", "aten::ge"),
    "softmax + loss": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::_softmax",
                       "aten::_softmax_backward_data", "aten::nll_loss_forward", "aten::nll_loss_backward"),
    "elementwise": ("aten::mul", "aten::add", "aten::add_", "aten::div", "aten::div_", "aten::pow", "aten::tanh",
                    "aten::rsqrt", "aten::mean", "aten::sum", "aten::where", "aten::mul_", "aten::addcmul_",
                    "aten::addcdiv_", "aten::sqrt", "aten::tanh_backward", "aten::neg", "aten::sub", "aten::lerp_"),
    "copies / layout": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous",
                        "aten::empty_strided", "aten::fill_", "aten::zero_", "aten::embedding_dense_backward",
                        "aten::index_select", "aten::embedding"),
}


def matmul_rate(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * 1024**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--train-rows", type=int, default=160)
    parser.add_argument("--top", type=int, default=0, help="also list the N operators with the most self CPU time")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("LEXLORA_CACHE", tempfile.mkdtemp(prefix="profile_train_cache_"))
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from lexlora.config import load_config
    from lexlora.data.prepare import prepare_data
    from lexlora.data.tokenization import LexicalCollator
    from lexlora.model.factory import model_for_run
    from lexlora.model.loading import load_base_model, load_tokenizer
    from lexlora.training.launch import set_cpu_threads
    from lexlora.training.loaders import train_data_loader
    from lexlora.training.optimizer import make_optimizer

    cfg = load_config(ROOT / "configs" / "file_description.yaml", [
        f"data.path={DATA}", "model.random_init=true", "train.seed=0", *args.overrides])
    cfg.data.splits = {"train": f"[:{args.train_rows}]"}
    threads = set_cpu_threads(cfg.train.cpu_threads, 1)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer, "cpu")
    base = load_base_model(cfg.model, device=torch.device("cpu"))
    model = model_for_run(cfg, base, tokenizer, data)  # as train() builds it (train.gradient_checkpointing too)
    model.train()
    collator = LexicalCollator(tokenizer, cfg.data.pad_to_multiple_of)
    loader = train_data_loader(data.splits["train"], cfg, collator, torch.Generator().manual_seed(0))
    batches = list(loader)[: args.steps + 2]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)  # as lexlora trains (fused AdamW by default)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()

    for batch in batches[:2]:
        step(batch)
    timed = batches[2:]
    started = time.perf_counter()
    for batch in timed:
        step(batch)
    step_s = (time.perf_counter() - started) / len(timed)
    print(f"step: {step_s:.3f} s", flush=True)
    print("profiling", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in timed:
            step(batch)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for event in events:
        name = next((g for g, ops in GROUPS.items() if event.key in ops), "other")
        groups[name] += event.self_cpu_time_total
    if args.top:
        print(f"top {args.top} operators by self CPU time (% of the step, calls per step):")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"  {event.key:45s} {100 * event.self_cpu_time_total / total_us:5.1f}%  {event.count // len(timed):6d}")

    def fwd_bwd_flops(batch) -> int:
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        optimizer.zero_grad()
        return counter.get_total_flops()

    # As run (padded batches), and the useful work: each example alone, without padding
    # (counted on the first two batches: FlopCounterMode dispatches every op through Python).
    counted = timed[:2]
    flops_step = sum(fwd_bwd_flops(b) for b in counted) / len(counted)
    print("padded FLOPs counted", flush=True)
    useful_flops = 0
    for batch in counted:
        for row in range(len(batch["input_ids"])):
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].unsqueeze(0)
            labels = batch["labels"][row][batch["labels"][row] != -100].unsqueeze(0)
            one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            if "lexical_embeds" in batch:
                one["lexical_embeds"] = batch["lexical_embeds"][row : row + 1]
            useful_flops += fwd_bwd_flops(one)
    useful_flops /= len(counted)
    rate = matmul_rate(threads)

    padded = sum(int(b["attention_mask"].numel() + b["labels"].numel()) for b in counted)
    useful = sum(int(b["attention_mask"].sum() + (b["labels"] != -100).sum()) for b in counted)
    print(f"\n{threads} thread(s); {len(timed)} steps of batch {cfg.train.batch_size}; overrides {args.overrides or 'none'}")
    print(f"step: {step_s:.3f} s ({cfg.train.batch_size / step_s:.2f} ex/s); tokens useful/padded {useful}/{padded} "
          f"({100 * useful / padded:.1f}%)")
    print("| group                | % of step CPU time |")
    print("|----------------------|--------------------|")
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name:<20} | {100 * us / total_us:>18.1f} |")
    print(f"matmul FLOPs per step (as run, padded): {flops_step / 1e9:.2f} G -> {flops_step / step_s / 1e9:.1f} GFLOP/s achieved")
    print(f"machine fp32 matmul rate (1024^3 mm): {rate / 1e9:.1f} GFLOP/s")
    floor = useful_flops / rate
    print(f"useful FLOPs per step (no padding, fwd+bwd): {useful_flops / 1e9:.2f} G -> floor {floor:.3f} s/step; "
          f"the step takes {step_s / floor:.2f}x the floor")
    print(f"RESULT step_s={step_s:.4f} floor_s={floor:.4f} over_floor={step_s / floor:.3f} "
          f"matmul_pct={100 * groups['matmul'] / total_us:.1f} dropout_pct={100 * groups['dropout RNG'] / total_us:.1f}")


if __name__ == "__main__":
    main()
