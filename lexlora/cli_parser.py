"""The `lexlora` command line's arguments: one sub-parser per command, and the argument groups that
`scripts/train_lora.py` and `scripts/evaluate.py` share with it. Building the parser imports nothing
heavy (no torch, fastapi or transformers)."""

from __future__ import annotations

import argparse
from typing import Callable, Mapping

from lexlora.config import TASKS
from lexlora.export.layout import EXPORT_DTYPES  # light: names only, no torch
from lexlora.serving.settings import (
    ServeSettings,  # a plain dataclass: no fastapi or torch
)


def add_train_arguments(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    if resume:  # train: one config per adapter, all trained in one pass on one base
        parser.add_argument("--config", required=True, action="append",
                            help="YAML config file (see configs/); give it several times to train several adapters "
                                 "in one pass on one frozen base (the overrides apply to every job)")
    else:
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


def _min_max(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        pair = (int(low), int(high))
    except ValueError:
        pair = None
    if not sep or pair is None or not 0 <= pair[0] <= pair[1] or pair[1] < 1:
        raise argparse.ArgumentTypeError(f"want MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, e.g. 1:4; got {text}")
    return pair


def make_parser(commands: Mapping[str, Callable[[argparse.Namespace], int]], description: str | None = None) -> argparse.ArgumentParser:
    """The `lexlora` parser; `commands` maps each sub-command ("adapters list" for nested ones) to the
    function that runs it."""
    parser = argparse.ArgumentParser(prog="lexlora", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    train_parser = sub.add_parser("train", help="train an adapter (same as scripts/train_lora.py)")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=commands["train"])

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
                     help='one JSON object per line instead, {"input": ..., "output": ...} (with "scores" for a '
                     'classifier or label adapter; for scripts)')
    gen.add_argument("--no-constrain", dest="constrain", action="store_false",
                     help="a seq2seq adapter trained on labels: generate free text instead of one of its labels")
    gen.add_argument(
        "--allow-pickle", action="store_true",
        help="read a pickle adapter_model.bin when there is no safetensors file (only for files you trust; "
        "tensors only, via torch.load(weights_only=True))",
    )
    gen.set_defaults(func=commands["generate"])

    adapters = sub.add_parser("adapters", help="what each adapter is: base, dataset, rank, size, metrics")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = adapters_sub.add_parser("list", help="one line per adapter dir in DIR")
    listing.add_argument("dir", metavar="DIR", nargs="?", default="adapters", help="default: adapters")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=commands["adapters list"])
    show = adapters_sub.add_parser("show", help="everything about one adapter; verifies its weights checksum")
    show.add_argument("dir", metavar="DIR", help="adapter directory")
    show.add_argument("--json", action="store_true", help="print JSON instead of key/value lines")
    show.set_defaults(func=commands["adapters show"])

    evl = sub.add_parser("eval", help="score an adapter on a split against the base model; writes a report")
    add_eval_arguments(evl)
    evl.set_defaults(func=commands["eval"])

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
    abl.set_defaults(func=commands["ablate"])

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
    exp.set_defaults(func=commands["export"])

    # The serve options' defaults are ServeSettings' (one home).
    serve_defaults = ServeSettings()
    srv = sub.add_parser("serve", help="HTTP API (lexlora's and OpenAI's) over the adapters in a dir, loaded on first "
                                       "request (continuous batching, per-row adapters)")
    srv.set_defaults(**vars(serve_defaults))
    srv.add_argument(
        "--adapters", dest="adapters_dir", required=True, metavar="DIR",
        help="dir of adapter dirs; each is served under its dir name, loaded on its first request",
    )
    srv.add_argument("--host", help="default: %(default)s (this machine only)")
    srv.add_argument("--port", type=int, help="default: %(default)s")
    srv.add_argument("--base", metavar="MODEL_ID", help="base model id or path (default: the first adapter's)")
    srv.add_argument("--task", choices=["seq2seq", "classification"],
                     help="with --base: the kind of adapters it serves (classification: the base's encoder, for "
                     "classifier-head adapters; default: %(default)s)")
    srv.add_argument("--device", help="auto (CUDA when present, else CPU), cuda, cuda:1, cpu (default: %(default)s)")
    srv.add_argument("--max-inputs", type=_positive_int, help="inputs per request (default: %(default)s)")
    srv.add_argument("--max-input-chars", type=_positive_int, help="characters per input string (default: %(default)s)")
    srv.add_argument("--max-batch-rows", type=_positive_int, help="rows decoding at once (default: %(default)s)")
    srv.add_argument(
        "--engine", choices=("continuous", "static"),
        help="continuous: requests join the running batch at every decoder step (T5 bases; others fall back to "
             "static); static: one batch at a time, as before (default: %(default)s)",
    )
    srv.add_argument(
        "--max-queue", type=_positive_int,
        help="requests waiting for a slot; beyond it a request gets 503 with Retry-After (default: %(default)s)",
    )
    srv.add_argument(
        "--batch-wait-ms", type=float,
        help="static engine: how long a request waits for others to join its batch (default: %(default)s)",
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
        help="if an adapter to load at startup (--pin, --preload, --preload-all) fails, serve without it and list it "
             "(at startup and in GET /health); default: refuse to start, naming each failing adapter",
    )
    srv.add_argument("--max-resident-adapters", type=_positive_int,
                     help="adapters kept in memory at once; the least recently used one with no request in flight "
                          "is evicted to make room (default: %(default)s)")
    srv.add_argument("--max-resident-mb", type=_positive_float,
                     help="the resident adapters' tensors, in MiB (default: %(default)s)")
    srv.add_argument("--pin", nargs="+", metavar="NAME", help="adapters loaded at startup and never evicted")
    srv.add_argument("--preload", nargs="+", metavar="NAME", help="adapters loaded at startup")
    srv.add_argument("--preload-all", action="store_true",
                     help="load every adapter dir at startup (a failing one stops startup, unless --skip-invalid)")
    srv.add_argument("--allow-hub", action="store_true",
                     help="also serve Hugging Face Hub repos named org/name[@revision], fetched on first request "
                          "(or read from the local HF cache; HF_HUB_OFFLINE=1 keeps it offline)")
    srv.add_argument("--api-key", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on every route but /health (default: env LEXLORA_API_KEY, "
                          "else no auth)")
    ray = srv.add_argument_group("Ray Serve (pip install \"lexlora[ray]\"): replicas, each with its base, engine and "
                                 "adapter store; requests go to a replica holding their adapter")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application instead of one process")
    ray.add_argument("--address", dest="ray_address", metavar="ADDRESS",
                     help="the Ray cluster to join: auto (the one `ray start` made here), ray://HOST:10001; "
                          "default: start one on this machine")
    count = ray.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=_positive_int, help="replicas (default: one per GPU of the cluster, else 1)")
    count.add_argument("--autoscale", type=_min_max, metavar="MIN:MAX",
                       help="scale between MIN and MAX replicas by requests in flight")
    ray.add_argument("--replica-cpus", type=_positive_float, help="CPUs per replica (torch threads follow; default 1)")
    ray.add_argument("--replica-gpus", type=float,
                     help="GPUs per replica (default: 1 where the cluster has GPUs, else 0)")
    ray.add_argument("--ingress-replicas", type=_positive_int,
                     help="replicas of the ingress that reads each request's adapter and forwards it (default: "
                          "%(default)s; each forwards ~90 requests/s per core)")
    ray.add_argument("--no-multiplex", dest="multiplex", action="store_false",
                     help="route requests by Ray's default (least busy of two) instead of to a replica holding their "
                          "adapter (for comparison)")
    srv.set_defaults(func=commands["serve"])

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
    emb.set_defaults(func=commands["embeddings"])
    return parser
