"""The PEFT + transformers arm of benchmarks/multitrain.py: one job's adapter trained the way a PEFT
user trains it, in a process of its own (the parent times the process and reads its peak memory).

    python benchmarks/multitrain_peft.py --config JOB.yaml --json OUT.json

JOB.yaml is a lexlora config (the parent writes one per job). From it this script takes the base
(lexlora.model.loading.load_base_model with the same ModelConfig, so the random-init weights are the
very ones the lexlora arms train on), the data, split, prompt template and lengths (lexlora.data's
reader and tokenizer), the LoRA r / alpha / dropout / targets, and the batch size, learning rate,
warmup, max_steps, grad clipping, seed and CPU threads (train.cpu_threads). The rest is plain PEFT and transformers:
`peft.get_peft_model`, `Seq2SeqTrainer` with `DataCollatorForSeq2Seq` (dynamic padding), length-
grouped batches, no evaluation and no checkpoints during training, `save_pretrained` at the end into
the config's output_dir. PEFT has no fusion projection: this arm embeds nothing and trains LoRA alone.

The record written to --json: the Trainer's train_runtime (the training loop's seconds), steps,
batch size, the last logged loss, trainable parameters and the adapter's path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lexlora.config import Config, load_config  # noqa: E402


def sampler_argument() -> dict:
    """Length-grouped batches: transformers 5 spells it train_sampling_strategy, 4.x group_by_length."""
    from dataclasses import fields

    from transformers import Seq2SeqTrainingArguments

    names = {f.name for f in fields(Seq2SeqTrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def train_split(cfg: Config, tokenizer):
    """The job's train split, read, prompted and tokenized as lexlora does (unpadded ids)."""
    from lexlora.data.splits import load_splits
    from lexlora.data.tokenization import encode_split

    splits, template, _ = load_splits(cfg.data, fusion_enabled=False)
    return encode_split(splits["train"], template, cfg.data.target_field, tokenizer, cfg.data, None, "train")


def train_peft(cfg: Config, use_cpu: bool | None = None) -> dict:
    """Train cfg's job with PEFT + Seq2SeqTrainer and save the adapter to cfg.output_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from lexlora.model.loading import load_base_model, load_tokenizer

    if cfg.train.max_steps is None:
        raise SystemExit(f"{cfg.output_dir}: the PEFT arm needs train.max_steps (the benchmark sets it)")
    if Path(cfg.output_dir).exists():
        raise SystemExit(f"output dir {cfg.output_dir} already exists; the PEFT arm writes a fresh one")
    cuda = torch.cuda.is_available() if use_cpu is None else not use_cpu
    if not cuda:  # as lexlora's CPU runs do (set_cpu_threads): train.cpu_threads, else one per usable core
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(cfg.train.cpu_threads or cores)
    tokenizer = load_tokenizer(cfg.model)
    dataset = train_split(cfg, tokenizer)
    base = load_base_model(cfg.model)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules or ["q", "k", "v", "o"], task_type="SEQ_2_SEQ_LM",
    )
    model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = cfg.train.max_steps
    with tempfile.TemporaryDirectory(prefix="multitrain-peft-") as scratch:  # Trainer wants an output_dir
        args = Seq2SeqTrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=cfg.train.batch_size,
            learning_rate=cfg.train.learning_rate,
            weight_decay=cfg.train.weight_decay,
            warmup_steps=int(cfg.train.warmup_ratio * steps),  # lexlora's warmup: int(ratio * steps)
            lr_scheduler_type="linear",
            max_steps=steps,
            max_grad_norm=cfg.train.max_grad_norm,
            seed=cfg.train.seed,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=max(1, steps),  # one loss at the end
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            bf16=cuda and torch.cuda.is_bf16_supported(),  # lexlora's mixed_precision=auto on a GPU
            use_cpu=not cuda,
            **sampler_argument(),
        )
        trainer = Seq2SeqTrainer(
            model=model, args=args, train_dataset=dataset,
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        )
        result = trainer.train()
    model.save_pretrained(cfg.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "output_dir": str(cfg.output_dir),
        "train_runtime": float(result.metrics["train_runtime"]),
        "steps": int(trainer.state.global_step),
        "batch_size": cfg.train.batch_size,
        "train_loss": losses[-1] if losses else None,
        "trainable_params": trainable,
        "device": "cuda" if cuda else "cpu",
        "optimizer": args.optim if isinstance(args.optim, str) else args.optim.value,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the job's lexlora YAML (written by multitrain.py)")
    parser.add_argument("--json", required=True, help="where this run's record goes")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where there is a GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    record = train_peft(load_config(args.config), use_cpu=True if args.cpu else None)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"adapter saved to {record['output_dir']} ({record['steps']} steps, {record['train_runtime']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
