"""`lexlora` command line: train, generate, eval, ablate, embeddings, adapters list/show, serve, export.
It only parses arguments and calls into the packages; errors from bad input are printed as one line,
without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from lexlora.config import TASKS
from lexlora.errors import LexloraError
from lexlora.export.layout import EXPORT_DTYPES  # names only: no torch
from lexlora.serving.settings import ServeSettings  # a plain dataclass: no fastapi or torch

EXIT_BAD_INPUT = 2


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Third-party INFO chatter drowns our own lines.
    for noisy in ("sentence_transformers", "httpx", "datasets", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_train_arguments(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides, e.g. lora.r=16 data.path=other.jsonl train.max_steps=20 output_dir=out/x",
    )
    if resume:
        parser.add_argument(
            "--resume", action="store_true",
            help="continue an interrupted run from its newest checkpoint (same config; sets train.resume=true)",
        )
        parser.add_argument(
            "--overwrite", action="store_true",
            help="replace an adapter already in output_dir once the new one is complete (sets overwrite_output_dir=true)",
        )


def run_train(args: argparse.Namespace) -> int:
    from lexlora.config import load_config
    from lexlora.training.recipe import train

    config = load_config(args.config, args.overrides)
    if args.resume:
        config.train.resume = True
    if getattr(args, "overwrite", False):
        config.overwrite_output_dir = True
    result = train(config)
    print(f"adapter: {result.output_dir}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from lexlora.adapters.files import base_config_from_metadata, load_adapter
    from lexlora.adapters.format import read_metadata

    base_config = None
    if args.base:
        base_config = base_config_from_metadata(read_metadata(args.adapter))
        base_config.name_or_path = args.base
    model = load_adapter(args.adapter, base_config=base_config, allow_pickle=args.allow_pickle)
    if args.device:
        model.to(args.device)
    inputs = [_parse_input(text) for text in args.inputs]
    # Settings not given on the command line are the adapter's own (its lexlora.json).
    outputs = model.generate_text(inputs, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams)
    for given, value, text in zip(args.inputs, inputs, outputs):
        print(json.dumps({"input": value, "output": text}, ensure_ascii=False) if args.json
              else format_generated(given, text))
    return 0


def format_generated(given: str, output: str) -> str:
    """`INPUT → "OUTPUT"`: the output quoted as a JSON string, so an empty one reads `""` and a
    newline inside it stays on its line."""
    return f"{given} → {json.dumps(output, ensure_ascii=False)}"


def run_adapters_list(args: argparse.Namespace) -> int:
    from lexlora.adapters.catalog import format_table, list_adapters

    rows = list_adapters(args.dir)
    for row in rows:
        if "error" in row:
            print(f"lexlora: warning: {row['error']}", file=sys.stderr)
    if not rows:
        print(f"lexlora: no adapter dirs in {args.dir}", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def run_adapters_show(args: argparse.Namespace) -> int:
    from lexlora.adapters.catalog import describe_adapter, format_details

    info = describe_adapter(args.dir, verify=True)
    if info["checksum"] != "ok":
        print(f"lexlora: warning: {args.dir}: weights checksum: {info['checksum']}", file=sys.stderr)
    print(json.dumps(info, indent=2) if args.json else format_details(info))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lexlora.evaluation.reports import REPORT_NAME
    from lexlora.evaluation.runner import default_split, run_evaluation

    split = args.split
    if not split:  # said before any model loads, so a long run is known to score the right rows
        split = default_split(args.adapter)
        why = "the default" if split == "test" else "this adapter has no test split"
        print(f"lexlora: scoring the {split} split ({why}; --split NAME for another)", flush=True)
    generation = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v}
    result, out = run_evaluation(
        args.adapter, split=split, data_path=args.data, out_dir=args.out, task=args.task,
        max_rows=args.max_rows, with_base=not args.no_base, bleu=args.bleu, base=args.base, device=args.device,
        batch_size=args.batch_size, allow_data_change=args.allow_data_change, **generation,
    )
    print(f"{result.adapter}: {result.count} rows of {result.data_path} [{result.split}], task {result.task}")
    note = result.data_check.note(result.data_path) if result.data_check else None
    if note:
        print(f"  data: {note}")
    for row in result.table():
        gain = "" if row["gain"] is None else f"  gain {row['gain']:+.4f}"
        base = "" if row["base"] is None else f"  base {row['base']:.4f}"
        print(f"  {row['metric']:<10} adapter {row['adapter']:.4f}{base}{gain}")
    print(f"report: {out / REPORT_NAME}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from lexlora.training.ablation import DEFAULT_GRID, run_ablation

    rows, table = run_ablation(
        args.config, grid=args.grid or DEFAULT_GRID, overrides=args.overrides, out_dir=args.out,
        split=args.split, max_rows=args.max_rows, task=args.task,
    )
    print(table.read_text())
    print(f"table: {table}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from lexlora.export.writer import export_adapter

    inputs = [_parse_input(text) for text in args.inputs] if args.inputs else None
    report = export_adapter(args.adapter, args.out, dtype=args.dtype, inputs=inputs, max_rows=args.max_rows,
                            overwrite=args.overwrite)
    check = report.verification
    print(f"verified on {check.rows} rows ({check.source}): {check.differing_outputs} greedy outputs differ, "
          f"max abs logit diff {check.max_abs_logit_diff:.2e} (float32)")
    load = "lexlora.export.load_export(OUT) (fusion)" if report.fusion else "AutoModelForSeq2SeqLM.from_pretrained(OUT)"
    print(f"export: {report.path} ({report.dtype}; load with {load})")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory")
    parser.add_argument(
        "--split", default=None,
        help="one of the adapter's data.splits, or 'all' (default: test, or validation when the adapter has no test split)",
    )
    parser.add_argument("--data", help="data file (default: the one the adapter was trained on)")
    parser.add_argument(
        "--allow-data-change", action="store_true",
        help="score the training data file even if it changed since training (its sha256 differs from the "
             "one in lexlora.json); the report says so",
    )
    parser.add_argument("--out", help="report dir (default: ADAPTER/eval/SPLIT)")
    parser.add_argument("--task", choices=TASKS, default="auto",
                        help="text: ROUGE; labels: accuracy/F1 (default: as trained, else detected)")
    parser.add_argument("--max-rows", type=_positive_int, help="first N rows of the split only")
    parser.add_argument("--no-base", action="store_true", help="skip the base-model comparison")
    parser.add_argument("--bleu", action="store_true", help="also BLEU (needs sacrebleu)")
    parser.add_argument("--base", help="base model id or path (default: the adapter's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    parser.add_argument("--num-beams", type=_positive_int, default=None)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None)
    parser.add_argument("--batch-size", type=_positive_int, default=32)


def run_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from lexlora.serving.server import (
        run_server,  # fastapi/uvicorn are only imported by the server
    )

    # The serve sub-parser has one option per setting, under the setting's name.
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    return run_server(settings)


# --- lexlora embeddings: lexical embedding diagnostics (lexlora/diagnostics.py) ---
def run_embeddings(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lexlora.errors import ConfigError, DataError
    from lexlora.evaluation.diagnostics import (
        DEFAULT_MODEL,
        adapter_settings,
        diagnose_file,
    )

    given = {"data": args.data, "field": args.field, "model": args.model, "format": "auto"}
    settings = {**adapter_settings(args.adapter), **{k: v for k, v in given.items() if v}} if args.adapter else given
    if not settings["data"] or not settings["field"]:
        raise ConfigError("lexlora embeddings needs --data FILE and --field NAME, or --adapter DIR")
    if args.adapter and not args.data and not Path(settings["data"]).exists():
        raise DataError(f"{args.adapter}: its training data {settings['data']} was not found "
                        "(a relative path is taken from the current dir); pass --data FILE")
    out = args.out or (Path(args.adapter) / "eval" / "embeddings" if args.adapter
                       else Path("runs") / "embeddings" / f"{Path(settings['data']).stem}-{settings['field']}")
    result = diagnose_file(
        settings["data"], settings["field"], settings["model"] or DEFAULT_MODEL, out, sample=args.sample,
        seed=args.seed, neighbours=args.neighbours, queries=args.queries, color_field=args.color_field,
        fmt=settings["format"],
    )
    edited = result["edited"]
    kinds = ", ".join(f"{kind} {s['mean']:.3f}" for kind, s in edited["by_kind"].items() if s["n"])
    print(f"{result['source']['sample']} texts of field {settings['field']!r} in {settings['data']}")
    print(f"  cosine with itself (re-encoded) {result['self']['mean']:.4f}")
    print(f"  cosine with a random other text {result['random_pair']['mean']:.4f}")
    print(f"  cosine with a light edit        {edited['overall']['mean']:.4f} ({kinds})")
    print(f"report: {Path(out) / 'embeddings.md'}")
    return 0
# --- end lexlora embeddings ---


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
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

    gen = sub.add_parser(
        "generate", help='generate with an adapter: one line per input, INPUT → "OUTPUT" (the output quoted)'
    )
    gen.add_argument("--adapter", required=True, help="adapter directory")
    gen.add_argument("inputs", nargs="+", metavar="TEXT", help="input field value, or a JSON record")
    gen.add_argument("--base", help="base model id or path (default: the adapter's)")
    gen.add_argument("--num-beams", type=int, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=32)
    gen.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    gen.add_argument("--json", action="store_true",
                     help='one JSON object per line instead, {"input": ..., "output": ...} (for scripts)')
    gen.add_argument(
        "--allow-pickle", action="store_true",
        help="read a pickle adapter_model.bin when there is no safetensors file (only for files you trust; "
        "tensors only, via torch.load(weights_only=True))",
    )
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

    evl = sub.add_parser("eval", help="score an adapter on a split against the base model; writes a report")
    add_eval_arguments(evl)
    evl.set_defaults(func=run_eval)

    abl = sub.add_parser("ablate", help="train + evaluate a grid of variants of a config; one comparison table")
    add_train_arguments(abl, resume=False)
    abl.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                     help="an axis (repeatable); default: fusion=off,add,first,prefix and lora.r=4,8")
    abl.add_argument("--out", default="runs/ablation", help="where the runs and the table go (default: runs/ablation)")
    abl.add_argument(
        "--split", default="validation",
        help="split scored for every run (default: validation: choosing among variants is a choice made on "
             "validation data, so the test split stays unseen until the chosen one is scored with lexlora eval)",
    )
    abl.add_argument("--max-rows", type=_positive_int, help="first N rows of that split only")
    abl.add_argument("--task", choices=TASKS, default="auto")
    abl.set_defaults(func=run_ablate)

    exp = sub.add_parser("export", help="merge an adapter into its base: a standard transformers model dir, verified")
    exp.add_argument("--adapter", required=True, help="adapter directory")
    exp.add_argument("--out", required=True, help="export directory (refused if it exists, unless --overwrite)")
    exp.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                     help="dtype of the saved weights (verified in float32 before the cast; default: float32)")
    exp.add_argument("--inputs", nargs="+", metavar="TEXT",
                     help="inputs (text or JSON records) to verify on (default: the adapter's validation rows, "
                          "else a small built-in set)")
    exp.add_argument("--max-rows", type=_positive_int, default=32, help="validation rows verified on (default: 32)")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT once the new export is verified")
    exp.set_defaults(func=run_export)

    # The serve options' defaults are ServeSettings' (one home).
    serve_defaults = ServeSettings()
    srv = sub.add_parser("serve", help="HTTP JSON API over every adapter in a dir (mixed-adapter batching)")
    srv.set_defaults(**vars(serve_defaults))
    srv.add_argument(
        "--adapters", dest="adapters_dir", required=True, metavar="DIR",
        help="dir of adapter dirs; each is loaded under its dir name",
    )
    srv.add_argument("--host", help="default: %(default)s (this machine only)")
    srv.add_argument("--port", type=int, help="default: %(default)s")
    srv.add_argument("--base", metavar="MODEL_ID", help="base model id or path (default: the first adapter's)")
    srv.add_argument("--device", help="auto (CUDA when present, else CPU), cuda, cuda:1, cpu (default: %(default)s)")
    srv.add_argument("--max-inputs", type=_positive_int, help="inputs per request (default: %(default)s)")
    srv.add_argument("--max-input-chars", type=_positive_int, help="characters per input string (default: %(default)s)")
    srv.add_argument("--max-batch-rows", type=_positive_int, help="rows per model call (default: %(default)s)")
    srv.add_argument(
        "--batch-wait-ms", type=float, help="how long a request waits for others to join its batch (default: %(default)s)"
    )
    srv.add_argument("--max-body-bytes", type=_positive_int, help="largest request body, else 413 (default: %(default)s)")
    srv.add_argument(
        "--body-timeout-s", type=_positive_float,
        help="a request body must arrive within this many seconds, else 408 (default: %(default)s)",
    )
    srv.add_argument(
        "--allow-pickle", action="store_true",
        help="also load adapters in --adapters whose weights are a pickle adapter_model.bin (tensors only); "
             "adapters loaded over HTTP stay safetensors-only",
    )
    srv.add_argument(
        "--skip-invalid", action="store_true",
        help="serve the adapters that load and list the dirs that do not (at startup and in GET /health); "
             "default: refuse to start, naming each failing dir",
    )
    srv.set_defaults(func=run_serve)

    emb = sub.add_parser(
        "embeddings", help="is the lexical field embedded meaningfully? cosine figures, neighbours, t-SNE"
    )
    emb.add_argument("--data", help="data file (default with --adapter: the one it was trained on)")
    emb.add_argument("--field", help="field whose text is embedded (default with --adapter: its lexical field)")
    emb.add_argument("--adapter", metavar="DIR", help="take data, field and model from this adapter's lexlora.json")
    emb.add_argument("--model", help="embedding model id (default: the adapter's, else all-MiniLM-L6-v2)")
    emb.add_argument("--sample", type=_positive_int, default=500, help="distinct texts sampled (default: 500)")
    emb.add_argument("--seed", type=int, default=0, help="sampling / t-SNE seed (default: 0)")
    emb.add_argument("--neighbours", type=_positive_int, default=5, help="neighbours per query (default: 5)")
    emb.add_argument("--queries", type=_positive_int, default=5, help="texts whose neighbours are listed (default: 5)")
    emb.add_argument("--color-field", help="record field colouring the t-SNE points (default: file extension, if any)")
    emb.add_argument(
        "--out", help="report dir (default: ADAPTER/eval/embeddings, else runs/embeddings/<data stem>-<field>)"
    )
    emb.set_defaults(func=run_embeddings)
    return parser


def _run(args: argparse.Namespace, func) -> int:
    """Run a command; bad input (a LexloraError) is one line on stderr and exit 2, no traceback."""
    _setup_logging()
    try:
        return func(args)
    except LexloraError as exc:
        print(f"lexlora: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lexlora: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args, args.func)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of scripts/train_lora.py (works under `accelerate launch` and plain `python`)."""
    parser = argparse.ArgumentParser(prog="train_lora.py", description="Train a lexlora adapter.")
    add_train_arguments(parser)
    return _run(parser.parse_args(argv), run_train)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of scripts/evaluate.py."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a lexlora adapter against its base.")
    add_eval_arguments(parser)
    return _run(parser.parse_args(argv), run_eval)


if __name__ == "__main__":
    sys.exit(main())
