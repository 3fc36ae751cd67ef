"""Embedding diagnostics: does the lexical field (e.g. a filename) embed meaningfully?

On a seeded sample of the field's distinct values it measures the mean cosine similarity of a text
with itself re-encoded (encoder sanity, ~1.0), with a random other text (the floor) and with lightly
edited versions of itself (should sit well above the floor); lists nearest neighbours of a few
queries; and draws a t-SNE map. Everything takes an `encode(texts) -> (n, dim) tensor` function so
tests can run it with a fake encoder; `lexical_encode_functions` gives the real one.

Writes embeddings.json (all figures), embeddings.md (a short report) and tsne.png into one dir.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from lexlora.config import FusionConfig
from lexlora.data.records import read_records
from lexlora.errors import ConfigError, DataError

Encode = Callable[[list[str]], torch.Tensor]

DEFAULT_MODEL = FusionConfig.embedding_model

MIN_TEXTS = 5
MAX_LEGEND_CLASSES = 10
SUFFIX = "_v2"
# Each edit is deterministic and touches the stem (the text without its file extension), so that
# "report.py" becomes "repot.py", not "reportpy".
EDIT_KINDS = {
    "delete": "the middle character of the stem deleted",
    "swap": "the two middle characters of the stem swapped",
    "suffix": f"'{SUFFIX}' appended to the stem (before the extension)",
    "case": "upper-cased (lower-cased if already upper case); 1.0 means the encoder ignores case",
}
# A dot, then 1-8 letters/digits with at least one letter ("3.11" is a version, not an extension).
_EXTENSION = re.compile(r"(?<=[^./\s])\.(?=[0-9]*[A-Za-z])[A-Za-z0-9]{1,8}$")


def file_extension(text: str) -> str | None:
    """'.py' for 'asyncio/base_events.py'; None for 'monitor_windows' or a sentence ending in '.'."""
    match = _EXTENSION.search(text)
    return match.group(0).lower() if match else None


def light_edits(text: str) -> dict[str, str]:
    """kind -> edited text, for each kind of EDIT_KINDS that changes `text` (a 1-char stem cannot
    lose or swap a character; 'abba' swapped is 'abba')."""
    ext = file_extension(text) or ""
    stem = text[: len(text) - len(ext)]
    mid = len(stem) // 2
    edits = {"suffix": stem + SUFFIX + ext, "case": text.lower() if text == text.upper() else text.upper()}
    if len(stem) >= 2:
        edits["delete"] = stem[:mid] + stem[mid + 1:] + ext
        edits["swap"] = stem[: mid - 1] + stem[mid] + stem[mid - 1] + stem[mid + 1:] + ext
    return {kind: edits[kind] for kind in EDIT_KINDS if kind in edits and edits[kind] != text}


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _summary(values: Sequence[float] | torch.Tensor) -> dict[str, float | int | None]:
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}  # JSON has no NaN
    std = t.std().item() if t.numel() > 1 else 0.0
    return {"mean": round(t.mean().item(), 6), "std": round(std, 6), "min": round(t.min().item(), 6),
            "max": round(t.max().item(), 6), "n": t.numel()}


def cosine_stats(
    texts: Sequence[str],
    encode: Encode,
    seed: int = 0,
    encode_fresh: Encode | None = None,
    vectors: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Self, random-pair and edited cosine figures over `texts` (distinct, at least 2).

    `encode_fresh` (default `encode`) re-encodes for the self check and encodes the edited texts:
    the real one bypasses the embedding cache, so the self check compares the cached vectors that
    training used with a fresh encoding, and throwaway edits do not fill the cache."""
    texts = list(texts)
    fresh = encode_fresh or encode
    if vectors is None:
        vectors = encode(texts)
    self_cos = _cosines(vectors, fresh(texts))

    # One random partner per text, never itself: an offset in 1..n-1 from its own index.
    rng = random.Random(seed)
    n = len(texts)
    partners = [(i + rng.randrange(1, n)) % n for i in range(n)]
    random_cos = _cosines(vectors, vectors[partners])

    pairs = [(i, kind, edited) for i, text in enumerate(texts) for kind, edited in light_edits(text).items()]
    edited_cos: list[float] = []
    if pairs:
        edited_cos = _cosines(vectors[[i for i, _, _ in pairs]], fresh([e for _, _, e in pairs])).tolist()
    by_kind = {
        kind: _summary([c for (_, k, _), c in zip(pairs, edited_cos) if k == kind]) for kind in EDIT_KINDS
    }
    # Per text: is its mean edited cosine above its random partner's? A rank view of the same question.
    per_text: dict[int, list[float]] = {}
    for (i, _, _), c in zip(pairs, edited_cos):
        per_text.setdefault(i, []).append(c)
    closer = [sum(cs) / len(cs) > random_cos[i].item() for i, cs in per_text.items()]
    return {
        "self": _summary(self_cos),
        "random_pair": _summary(random_cos),
        "edited": {"overall": _summary(edited_cos), "by_kind": by_kind},
        "edited_closer_than_random": round(sum(closer) / len(closer), 6) if closer else None,
    }


def nearest_neighbours(
    texts: Sequence[str], vectors: torch.Tensor, queries: Sequence[int], k: int
) -> list[dict[str, Any]]:
    """For each query index, its top-k other texts of `texts` by cosine, closest first."""
    unit = F.normalize(vectors.float(), dim=-1)
    sims = unit[list(queries)] @ unit.T
    result = []
    for row, q in zip(sims, queries):
        row = row.clone()
        row[q] = -float("inf")  # not itself
        top = torch.topk(row, min(k, len(texts) - 1))
        result.append({
            "query": texts[q],
            "neighbours": [
                {"text": texts[j], "cosine": round(c, 6)} for c, j in zip(top.values.tolist(), top.indices.tolist())
            ],
        })
    return result


def tsne_png(
    vectors: torch.Tensor,
    labels: Sequence[str] | None,
    path: str | Path,
    seed: int = 0,
    title: str = "",
    annotate: dict[int, str] | None = None,
) -> dict[str, Any]:
    """A t-SNE scatter of `vectors` saved as PNG; points coloured by `labels` (the most frequent
    MAX_LEGEND_CLASSES - 1 classes, the rest as 'other'), `annotate` texts written next to points."""
    from matplotlib.figure import Figure  # heavy imports only when plotting
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    n = len(vectors)
    # t-SNE needs perplexity < n; 3 * perplexity + 1 points is the usual minimum.
    perplexity = min(30.0, max(1.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed)
    # One OpenMP thread: with torch's own libgomp loaded, sklearn's threaded Barnes-Hut spins against
    # it and 16 points took 4-17 s instead of 0.1 s (500 points: 2.9 s single-threaded).
    with threadpool_limits(limits=1, user_api="openmp"):
        coords = tsne.fit_transform(vectors.float().numpy())

    # A bare Figure renders with Agg and never touches pyplot's global backend or opens a window.
    fig = Figure(figsize=(8, 7), dpi=110)
    ax = fig.add_subplot()
    legend = None
    if labels is not None:
        keep = [name for name, _ in Counter(labels).most_common()]
        if len(keep) > MAX_LEGEND_CLASSES:
            keep = keep[: MAX_LEGEND_CLASSES - 1]
        shown = [lab if lab in keep else "other" for lab in labels]
        classes = keep + (["other"] if "other" in shown and "other" not in keep else [])
        for index, name in enumerate(classes):
            mask = [s == name for s in shown]
            ax.scatter(coords[mask, 0], coords[mask, 1], s=12, alpha=0.75, color=f"C{index % 10}",
                       label=f"{name} ({sum(mask)})")
        ax.legend(fontsize=8, markerscale=1.5, loc="best")
        legend = classes
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=12, alpha=0.75)
    for index, text in (annotate or {}).items():
        ax.annotate(text[:40], coords[index], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(title or f"t-SNE of {n} embeddings", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return {"path": Path(path).name, "points": n, "perplexity": round(perplexity, 3), "legend": legend}


def load_texts(
    path: str | Path, field: str, color_field: str | None = None, fmt: str = "auto"
) -> tuple[list[str], list[str] | None]:
    """The distinct values of `field` in file order, and the `color_field` value of each one's
    first record (None without a colour field)."""
    fields = [field] + ([color_field] if color_field and color_field != field else [])
    records = read_records(path, fields, target_field=field, fmt=fmt)
    first: dict[str, str] = {}
    for record in records:
        first.setdefault(record.fields[field], record.fields[color_field] if color_field else "")
    texts = list(first)
    if len(texts) < MIN_TEXTS:
        raise DataError(
            f"{path}: field {field!r} has {len(texts)} distinct value(s); "
            f"embedding diagnostics need at least {MIN_TEXTS}"
        )
    return texts, ([first[t] for t in texts] if color_field else None)


def sample_indices(n_total: int, n: int, seed: int) -> list[int]:
    """`n` of range(n_total) chosen with `seed`, in ascending order (all if n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))


def run_diagnostics(
    texts: Sequence[str],
    encode: Encode,
    out_dir: str | Path,
    *,
    encode_fresh: Encode | None = None,
    labels: Sequence[str] | None = None,
    color_by: str | None = None,
    seed: int = 0,
    neighbours: int = 5,
    queries: int = 5,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All figures for `texts` (the sample, distinct): writes embeddings.json, embeddings.md and
    tsne.png into `out_dir` and returns the JSON's content. Without `labels`, points are coloured
    by file extension when the texts have more than one (counting 'none')."""
    texts = list(texts)
    if len(texts) < MIN_TEXTS:
        raise DataError(f"embedding diagnostics need at least {MIN_TEXTS} distinct texts, got {len(texts)}")
    if len(set(texts)) != len(texts):
        raise ValueError("texts must be distinct")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    vectors = encode(texts)
    figures = cosine_stats(texts, encode, seed=seed, encode_fresh=encode_fresh, vectors=vectors)
    query_ids = sample_indices(len(texts), queries, seed + 1)
    neighbour_lists = nearest_neighbours(texts, vectors, query_ids, neighbours)

    if labels is None:
        extensions = [file_extension(t) or "(none)" for t in texts]
        if len(set(extensions)) > 1:  # one class (all '.py', or none) would colour nothing
            labels, color_by = extensions, "file extension"
    tsne = tsne_png(
        vectors, labels, out / "tsne.png", seed=seed,
        title=f"t-SNE of {len(texts)} texts" + (f", coloured by {color_by}" if labels is not None else ""),
        annotate={i: texts[i] for i in query_ids},
    )
    tsne["color_by"] = color_by if labels is not None else None

    result = {
        "source": {**(source or {}), "sample": len(texts), "seed": seed, "dim": int(vectors.shape[-1])},
        **figures,
        "edit_kinds": EDIT_KINDS,
        "neighbours": neighbour_lists,
        "tsne": tsne,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "embeddings.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "embeddings.md").write_text(markdown_report(result), encoding="utf-8")
    return result


def _code(text: str) -> str:
    text = " ".join(text.split())
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_report(result: dict[str, Any]) -> str:
    src = result["source"]
    lines = ["# Embedding diagnostics", ""]
    described = [f"{key} `{src[key]}`" for key in ("data", "field", "model") if src.get(key)]
    lines.append(
        (", ".join(described) + "; " if described else "")
        + f"sample of {src['sample']} distinct texts"
        + (f" out of {src['distinct']}" if src.get("distinct") else "")
        + f" (seed {src['seed']}), {src['dim']}-d vectors."
    )
    lines += ["", "| cosine similarity of a text with | mean | std | min | n |", "|---|---|---|---|---|"]
    rows = [("itself, re-encoded", result["self"]), ("a random other text", result["random_pair"]),
            ("a lightly edited version (all edits)", result["edited"]["overall"])]
    rows += [(f"edit: {kind}", stats) for kind, stats in result["edited"]["by_kind"].items()]
    for name, s in rows:
        lines.append(f"| {name} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['min'])} | {s['n']} |")
    closer = result.get("edited_closer_than_random")
    if closer is not None:
        lines += ["", f"Texts whose edited versions are closer (on average) than their random partner: {closer:.1%}."]
    lines += ["", "Edits (deterministic):", ""]
    lines += [f"- **{kind}**: {doc}" for kind, doc in result["edit_kinds"].items()]
    lines += ["", "## Nearest neighbours", ""]
    for item in result["neighbours"]:
        near = ", ".join(f"{_code(n['text'])} {n['cosine']:.3f}" for n in item["neighbours"])
        lines.append(f"- {_code(item['query'])} → {near}")
    tsne = result["tsne"]
    colour = f", coloured by {tsne['color_by']}" if tsne.get("color_by") else ""
    lines += ["", "## t-SNE", "", f"{tsne['points']} points, perplexity {tsne['perplexity']}{colour}; "
              "labelled points are the neighbour queries.", "", f"![t-SNE]({tsne['path']})", ""]
    return "\n".join(lines)


def lexical_encode_functions(model_id: str, cache_dir: str | Path | None = None) -> tuple[Encode, Encode]:
    """(cached, fresh) encode functions for the real embedding model: `cached` is LexicalEncoder's,
    the vectors training sees; `fresh` runs the same model without reading or writing the cache."""
    from lexlora.data.embeddings import LexicalEncoder

    encoder = LexicalEncoder(model_id, cache_dir=cache_dir)

    def fresh(texts: list[str]) -> torch.Tensor:
        vectors = encoder.model.encode(
            list(texts), batch_size=encoder.batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return vectors.detach().to("cpu", torch.float32)

    return encoder.encode, fresh


def adapter_settings(adapter_dir: str | Path) -> dict[str, str]:
    """The data path, lexical field, embedding model and data format an adapter was trained with,
    from its lexlora.json (no torch needed)."""
    from lexlora.adapters.format import read_metadata

    meta = read_metadata(adapter_dir)
    adapter = meta.adapter
    if not adapter.get("fusion_mode"):
        raise ConfigError(
            f"{adapter_dir}: this adapter has no lexical fusion, so there are no lexical embeddings to "
            "diagnose; use --data FILE --field NAME instead"
        )
    return {
        "data": str(meta.dataset.path or ""),
        "field": adapter.get("lexical_field") or "",
        "model": adapter.get("embedding_model") or DEFAULT_MODEL,
        "format": meta.data.get("format") or "auto",
    }


def diagnose_file(
    path: str | Path,
    field: str,
    model_id: str,
    out_dir: str | Path,
    *,
    sample: int = 500,
    seed: int = 0,
    neighbours: int = 5,
    queries: int = 5,
    color_field: str | None = None,
    fmt: str = "auto",
    encode_functions: tuple[Encode, Encode] | None = None,
) -> dict[str, Any]:
    """Read `field` of `path`, sample its distinct values with `seed` and run the diagnostics."""
    texts, labels = load_texts(path, field, color_field, fmt)
    chosen = sample_indices(len(texts), sample, seed)
    encode, fresh = encode_functions or lexical_encode_functions(model_id)
    return run_diagnostics(
        [texts[i] for i in chosen], encode, out_dir, encode_fresh=fresh,
        labels=[labels[i] for i in chosen] if labels is not None else None,
        color_by=f"field {color_field!r}" if color_field else None,
        seed=seed, neighbours=neighbours, queries=queries,
        source={"data": str(path), "field": field, "model": model_id, "distinct": len(texts)},
    )
