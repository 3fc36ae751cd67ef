"""`lexlora` command line: train, generate, eval, ablate, embeddings, adapters list/show, serve, export.
It only parses arguments and calls into the packages; errors from bad input are printed as one line,
without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from lexlora.cli_parser import add_eval_arguments, add_train_arguments, make_parser
from lexlora.errors import LexloraError
from lexlora.serving.settings import ServeSettings  # a plain dataclass: no fastapi or torch

EXIT_BAD_INPUT = 2


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Third-party INFO chatter drowns our own lines.
    for noisy in ("sentence_transformers", "httpx", "datasets", "urllib3", "huggingface_hub", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_train(args: argparse.Namespace) -> int:
    from lexlora.config import load_config
    from lexlora.training.joint import train_jobs

    configs = [load_config(path, args.overrides) for path in args.config]
    for config in configs:
        if args.resume:
            config.train.resume = True
        if getattr(args, "overwrite", False):
            config.overwrite_output_dir = True
    for result in train_jobs(configs):
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
    if model.labels and args.constrain:  # a classifier, or a label adapter constrained to its labels
        predictions = model.generate_labels(inputs, batch_size=args.batch_size)
        for given, value, p in zip(args.inputs, inputs, predictions):
            print(json.dumps({"input": value, "output": p.label, "scores": p.scores}, ensure_ascii=False) if args.json
                  else f"{format_generated(given, p.label)}  ({format_scores(p.scores)})")
        return 0
    # Settings not given on the command line are the adapter's own (its lexlora.json).
    outputs = model.generate_text(inputs, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, constrain=False if model.labels else None)
    for given, value, text in zip(args.inputs, inputs, outputs):
        print(json.dumps({"input": value, "output": text}, ensure_ascii=False) if args.json
              else format_generated(given, text))
    return 0


def format_scores(scores: dict[str, float], shown: int = 3) -> str:
    """The likeliest labels with their probabilities: `Shell script 0.91, Log file 0.05, ...`."""
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    more = f", +{len(ranked) - shown} more" if len(ranked) > shown else ""
    return ", ".join(f"{label} {p:.2f}" for label, p in ranked[:shown]) + more


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


def run_serve(args: argparse.Namespace) -> int:
    import dataclasses

    # The serve sub-parser has one option per setting, under the setting's name.
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    if settings.ray:
        from lexlora.serving.ray_app import run_ray_server  # imports Ray only once it is known to be there

        return run_ray_server(settings)
    from lexlora.serving.server import run_server  # fastapi/uvicorn are only imported by the server

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


COMMANDS = {
    "train": run_train, "generate": run_generate, "adapters list": run_adapters_list,
    "adapters show": run_adapters_show, "eval": run_eval, "ablate": run_ablate, "export": run_export,
    "serve": run_serve, "embeddings": run_embeddings,
}


def build_parser() -> argparse.ArgumentParser:
    return make_parser(COMMANDS, description=__doc__)


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
