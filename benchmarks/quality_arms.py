"""One run of the quality study (benchmarks/quality.py starts each in its own process): train one arm
at one learning rate and seed, then score one split with greedy decoding and ROUGE.

A run is in one of two phases, and the phase decides the split it may read:

  select  the config's test split is removed before any data is read: the run trains on train, keeps
          the epoch with the lowest validation loss and scores validation; its adapter records no
          test split, so nothing downstream can score it on test either;
  final   the config as it is: trains the same way and scores the test split.

Arms: `full` (every weight of the base trainable; lexlora's own data, loaders, optimizer and
schedule, in a short loop, as lexlora has no full fine-tune), `lora` (lexlora.training.train with
fusion off), `fusion-MODE` (train with fusion on, in that mode).
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

MODES = ("add", "first", "prefix")
ARMS = ("full", "lora", *(f"fusion-{mode}" for mode in MODES))
PHASES = {"select": "validation", "final": "test"}  # the split each phase scores


def check_arm(arm: str) -> str:
    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}: full, lora or fusion-MODE with MODE one of {', '.join(MODES)}")
    return arm


def run_config(config: str, overrides, phase: str, arm: str, lr: float, seed: int, steps: int, output_dir: Path):
    """The run's Config: the study's config and overrides, then the arm's settings (which win); in the
    select phase without its test split."""
    from lexlora.config import load_config

    check_arm(arm)
    fusion = ["fusion.enabled=false"] if arm in ("full", "lora") else ["fusion.enabled=true", f"fusion.mode={arm.removeprefix('fusion-')}"]
    cfg = load_config(config, [
        *overrides, *fusion, f"train.max_steps={steps}", f"train.learning_rate={lr}", f"train.seed={seed}",
        f"output_dir={output_dir}", "overwrite_output_dir=true",
    ])
    if phase == "select":
        # Structural, not a convention: the split is gone from the config that training, the saved
        # adapter and scoring all read.
        cfg.data.splits = {name: spec for name, spec in cfg.data.splits.items() if name != "test"}
    scored = PHASES[phase]
    if scored not in cfg.data.splits:
        raise SystemExit(f"{config}: the {phase} phase scores data.splits.{scored}, which the config does not define")
    return cfg


def run_lora(cfg, split: str, max_rows: int | None) -> dict:
    from lexlora.adapters.files import load_adapter
    from lexlora.evaluation.runner import eval_rows
    from lexlora.training.recipe import train

    metrics = train(cfg).metrics
    model = load_adapter(cfg.output_dir)  # the adapter as saved (and verified), not the training copy
    rows = eval_rows(cfg.output_dir, split, max_rows=max_rows)
    started = time.perf_counter()
    predictions = model.generate_text(
        rows.records, batch_size=32, max_source_length=cfg.data.max_source_length,
        max_new_tokens=cfg.generation.max_new_tokens, num_beams=1,
    )
    field = model.spec.input_fields[0]
    return {
        "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
        "train_seconds": metrics["train_seconds"], "eval_seconds": metrics.get("eval_seconds"),
        "generate_seconds": round(time.perf_counter() - started, 3), "steps": metrics["steps"],
        "best_epoch": metrics.get("best_epoch"), "best_val_loss": metrics.get("best_val_loss"),
        "inputs": [r[field] for r in rows.records], "references": rows.references, "outputs": predictions,
    }


def run_full(cfg, split: str, max_rows: int | None) -> dict:
    """Every weight of the base trainable, through the pieces lexlora's recipe uses: the same
    records and tokens (prepare_data), the same length-grouped train batches reseeded per epoch
    (train_data_loader), AdamW as train.fused_optimizer says, the same schedule, clipping,
    Accelerate setup and validation loss; the epoch with the lowest validation loss is kept."""
    import torch
    from accelerate.utils import set_seed

    from lexlora.data.prepare import prepare_data
    from lexlora.data.prompts import PromptTemplate
    from lexlora.data.tokenization import LexicalCollator
    from lexlora.model.loading import load_base_model, load_tokenizer
    from lexlora.training.evaluator import validation_loss
    from lexlora.training.launch import make_accelerator, resolve_mixed_precision, set_cpu_threads
    from lexlora.training.loaders import train_data_loader, validation_loader
    from lexlora.training.optimizer import make_optimizer, make_scheduler, total_steps

    train_cfg = cfg.train
    if train_cfg.eval_metric != "val_loss":
        raise SystemExit(f"the full arm keeps its epoch by val_loss only (train.eval_metric={train_cfg.eval_metric})")
    cfg.check()
    accelerator = make_accelerator(cfg, resolve_mixed_precision(train_cfg.mixed_precision), [])
    if accelerator.device.type == "cpu":
        set_cpu_threads(train_cfg.cpu_threads, accelerator.num_processes)
    set_seed(train_cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg, tokenizer, accelerator.device)
    model = load_base_model(cfg.model, device=accelerator.device)  # model.fast_ops applied here, as for LoRA
    model.requires_grad_(True)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    collator = LexicalCollator(tokenizer, cfg.data.pad_to_multiple_of)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    loader = train_data_loader(prepared.splits["train"], cfg, collator, generator)
    val_loader = validation_loader(prepared.splits["validation"], cfg, collator)
    steps = total_steps(train_cfg, len(loader))
    optimizer = make_optimizer(list(model.parameters()), train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg, steps, accelerator.num_processes)
    model, optimizer, scheduler, loader, val_loader = accelerator.prepare(model, optimizer, scheduler, loader, val_loader)

    step, epoch, best, best_state, train_seconds, eval_seconds = 0, 0, None, None, 0.0, 0.0
    while step < steps:
        generator.manual_seed(train_cfg.seed + epoch)  # as TrainingRun.epoch_batches: epoch k's order from seed + k
        started = time.perf_counter()
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % train_cfg.log_every == 0:
                print(f"full step {step}/{steps} loss {loss.item():.4f}", flush=True)
            if step >= steps:
                break
        train_seconds += time.perf_counter() - started
        epoch += 1
        started = time.perf_counter()
        value = validation_loss(model, val_loader, accelerator)
        print(f"full epoch {epoch} step {step} val_loss {value:.4f}", flush=True)
        if best is None or value < best[1]:
            best = (epoch, value)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in accelerator.unwrap_model(model).state_dict().items()}
        eval_seconds += time.perf_counter() - started
    model = accelerator.unwrap_model(model)
    model.load_state_dict(best_state)
    model.eval()

    records = prepared.splits[split].records[:max_rows] if max_rows else prepared.splits[split].records
    template = PromptTemplate(cfg.data.input_template)
    references = [r.fields[cfg.data.target_field] for r in records]
    outputs: list[str] = []
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(records), 32):
            chunk = records[start : start + 32]
            enc = tokenizer([template.format(r.fields) for r in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=cfg.data.max_source_length).to(accelerator.device)
            ids = model.generate(**enc, max_new_tokens=cfg.generation.max_new_tokens, num_beams=1)
            outputs += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    field = cfg.data.lexical_field or template.fields[0]
    return {
        "trainable_params": trainable, "total_params": total, "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3), "generate_seconds": round(time.perf_counter() - started, 3),
        "steps": step, "best_epoch": best[0], "best_val_loss": best[1],
        "inputs": [r.fields[field] for r in records], "references": references, "outputs": outputs,
    }


def run(args) -> dict:
    """Train and score one run; the record quality.py keeps (scores, sizes, seconds, outputs)."""
    from lexlora.evaluation.metrics import score

    output_dir = Path(args.work) / f"{args.phase}-{args.arm}-lr{args.lr:g}-seed{args.seed}"
    cfg = run_config(args.config, args.override, args.phase, args.arm, args.lr, args.seed, args.steps, output_dir)
    split = PHASES[args.phase]
    result = (run_full if args.arm == "full" else run_lora)(cfg, split, args.max_rows)
    if not args.keep_adapters:
        shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "phase": args.phase, "arm": args.arm, "lr": args.lr, "seed": args.seed, "split": split,
        "splits_seen": sorted(cfg.data.splits), "rows": len(result["outputs"]),
        "scores": score("text", result["outputs"], result["references"]),
        "settings": {"fast_ops": cfg.model.fast_ops, "fused_optimizer": cfg.train.fused_optimizer,
                     "group_by_length": cfg.train.group_by_length, "batch_size": cfg.train.batch_size},
        **result,
    }


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--phase", choices=sorted(PHASES), required=True)
    parser.add_argument("--arm", type=check_arm, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    study_common.add_run_arguments(parser, "score only the first N rows of the phase's split")
    return study_common.finish_run(parser.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
