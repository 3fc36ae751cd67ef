"""`lexlora` command line: train, generate, adapters list/show, serve. Errors from bad input are
printed without a traceback."""

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


def run_adapters_list(args: argparse.Namespace) -> int:
    from lexlora.catalog import format_table, list_adapters

    rows = list_adapters(args.dir)
    for row in rows:
        if "error" in row:
            print(f"lexlora: warning: {row['error']}", file=sys.stderr)
    if not rows:
        print(f"lexlora: no adapter dirs in {args.dir}", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def run_adapters_show(args: argparse.Namespace) -> int:
    from lexlora.catalog import describe_adapter, format_details

    info = describe_adapter(args.dir, verify=True)
    if info["checksum"] != "ok":
        print(f"lexlora: warning: {args.dir}: weights checksum: {info['checksum']}", file=sys.stderr)
    print(json.dumps(info, indent=2) if args.json else format_details(info))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from lexlora.serve import serve  # fastapi/uvicorn are only imported by the server

    return serve(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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

    adapters = sub.add_parser("adapters", help="what each adapter is: base, dataset, rank, size, metrics")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = adapters_sub.add_parser("list", help="one line per adapter dir in DIR")
    listing.add_argument("dir", metavar="DIR", nargs="?", default="adapters", help="default: adapters")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_adapters_list)
    show = adapters_sub.add_parser("show", help="everything about one adapter; verifies its weights checksum")
    show.add_argument("dir", metavar="DIR", help="adapter directory")
    show.add_argument("--json", action="store_true", help="print JSON instead of key/value lines")
    show.set_defaults(func=run_adapters_show)

    srv = sub.add_parser("serve", help="HTTP JSON API over every adapter in a dir (mixed-adapter batching)")
    srv.add_argument(
        "--adapters", required=True, metavar="DIR", help="dir of adapter dirs; each is loaded under its dir name"
    )
    srv.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="default: 8000")
    srv.add_argument("--base", metavar="MODEL_ID", help="base model id or path (default: the first adapter's)")
    srv.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    srv.add_argument("--max-inputs", type=_positive_int, default=64, help="inputs per request (default: 64)")
    srv.add_argument(
        "--max-input-chars", type=_positive_int, default=1000, help="characters per input string (default: 1000)"
    )
    srv.add_argument("--max-batch-rows", type=_positive_int, default=32, help="rows per model call (default: 32)")
    srv.add_argument(
        "--batch-wait-ms", type=float, default=5.0,
        help="how long a request waits for others to join its batch (default: 5)",
    )
    srv.set_defaults(func=run_serve)
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
