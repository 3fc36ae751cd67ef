"""`lexlora` command line: train, generate. Errors from bad input are printed without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from lexlora.errors import LexloraError

EXIT_BAD_INPUT = 2


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Third-party INFO chatter drowns our own lines.
    for noisy in ("sentence_transformers", "httpx", "datasets", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides, e.g. lora.r=16 data.path=other.jsonl train.max_steps=20 output_dir=out/x",
    )


def run_train(args: argparse.Namespace) -> int:
    from lexlora.config import load_config
    from lexlora.training import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    print(f"adapter: {result.output_dir}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from lexlora.adapters import base_config_from_metadata, load_adapter, read_metadata
    from lexlora.embeddings import LexicalEncoder

    base_config = None
    if args.base:
        base_config = base_config_from_metadata(read_metadata(args.adapter))
        base_config.name_or_path = args.base
    model = load_adapter(args.adapter, base_config=base_config)
    meta = model.metadata
    if args.device:
        model.to(args.device)
    spec = model.spec
    if spec.fusion_enabled:
        model.lexical_encoder = LexicalEncoder(spec.embedding_model, device=args.device)
    inputs = [_parse_input(text) for text in args.inputs]
    generation = meta.get("generation", {})
    outputs = model.generate_text(
        inputs,
        batch_size=args.batch_size,
        max_source_length=meta.get("data", {}).get("max_source_length", 128),
        max_new_tokens=args.max_new_tokens or generation.get("max_new_tokens", 48),
        num_beams=args.num_beams or generation.get("num_beams", 1),
    )
    for text in outputs:
        print(text)
    return 0


def _parse_input(text: str):
    """A JSON object is a record (for multi-field templates); anything else is the input field."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(value, dict):
            return value
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train_parser = sub.add_parser("train", help="train an adapter (same as scripts/train_lora.py)")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=run_train)

    gen = sub.add_parser("generate", help="generate with an adapter, one output line per input")
    gen.add_argument("--adapter", required=True, help="adapter directory")
    gen.add_argument("inputs", nargs="+", metavar="TEXT", help="input field value, or a JSON record")
    gen.add_argument("--base", help="base model id or path (default: the adapter's)")
    gen.add_argument("--num-beams", type=int, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=32)
    gen.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    gen.set_defaults(func=run_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except LexloraError as exc:
        print(f"lexlora: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lexlora: interrupted", file=sys.stderr)
        return 130


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of scripts/train_lora.py (works under `accelerate launch` and plain `python`)."""
    parser = argparse.ArgumentParser(prog="train_lora.py", description="Train a lexlora adapter.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return run_train(args)
    except LexloraError as exc:
        print(f"lexlora: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
