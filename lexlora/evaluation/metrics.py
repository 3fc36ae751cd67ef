"""Scoring generated text against references, offline.

Two kinds of target:

* "text" (free-form descriptions): ROUGE-1/2/L/Lsum F-measures, computed through the Hugging Face
  `evaluate` API from the metric script shipped in `lexlora/evaluation/evaluate_metrics/rouge.py` (the Hub's
  "rouge" cannot be fetched offline). Each figure is the mean over examples of the per-example
  F-measure, with the Porter stemmer on (as in rouge_score's and transformers' summarization
  examples). Optionally "bleu": sacrebleu's corpus BLEU divided by 100, so it lies in 0..1 like
  the rest (needs the `bleu` extra: `pip install sacrebleu`).
* "labels" (a small closed set, e.g. file types): accuracy, macro-F1, per-class
  precision/recall/F1/support and the confusion matrix, with scikit-learn.

`score()` dispatches on the task and tags the result with "task" and "count"; `scalar_metrics()`
keeps the top-level float figures for tables, trackers and best-model selection.
"""

from __future__ import annotations

import numbers
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from lexlora.config import SCORED_TASKS
from lexlora.errors import ConfigError, DataError

TEXT_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
OTHER_LABEL = "(other)"

# "min" where lower is better; any name not listed is "max", except names ending in "loss".
METRIC_DIRECTIONS: dict[str, str] = {
    "loss": "min",
    "val_loss": "min",
    **{name: "max" for name in TEXT_METRICS},
    "bleu": "max",
    "accuracy": "max",
    "macro_f1": "max",
}


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric `name` is better: False for losses, True for everything else."""
    direction = METRIC_DIRECTIONS.get(name)
    if direction is None:
        direction = "min" if name.endswith("loss") else "max"  # train_loss, eval_loss, ...
    return direction == "max"


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    predictions, references = list(predictions), list(references)
    if not references:
        raise DataError("no references to score against: the evaluation split is empty")
    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references: they must pair up one to one"
        )
    for kind, values in (("prediction", predictions), ("reference", references)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise DataError(f"{kind} {i} is a {type(value).__name__}, not a string: {value!r}")
    return predictions, references


def detect_task(references: Sequence[str], max_labels: int = 20, min_repeats: int = 3) -> str:
    """"labels" when the references look like a small closed set, else "text".

    Rule (after `strip()`): at most `max_labels` distinct values, and on average each value occurs
    at least `min_repeats` times (len(references) >= min_repeats * distinct). An average rather
    than "every value repeats", so one rare class in a split does not flip a label task to text;
    free-text references are nearly all distinct and fail the second test even on tiny splits.
    Callers who know the task pass it to `score()` instead of "auto".
    """
    references = [r.strip() for r in references]
    if not references:
        raise DataError("cannot detect the task of an empty reference list")
    distinct = len(set(references))
    return "labels" if distinct <= max_labels and len(references) >= min_repeats * distinct else "text"


@lru_cache(maxsize=1)
def _rouge():
    """The shipped ROUGE metric, loaded once per process.

    `evaluate.load` on a local script path never touches the network (it copies the script into
    its modules cache, HF_MODULES_CACHE, and imports it), so HF_EVALUATE_OFFLINE need not be set.
    keep_in_memory=True keeps compute() from writing Arrow files and lock files under
    ~/.cache/huggingface/metrics.
    """
    import evaluate

    from lexlora.evaluation.evaluate_metrics import METRIC_DIR

    return evaluate.load(str(METRIC_DIR / "rouge.py"), keep_in_memory=True)


# An evaluate Metric buffers the inputs of the call in progress, so one call at a time.
_rouge_lock = threading.Lock()


def _bleu(predictions: list[str], references: list[str]) -> float:
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("BLEU needs sacrebleu, which is not installed: pip install sacrebleu "
                          "(or pip install 'lexlora[bleu]')") from None
    return float(sacrebleu.corpus_bleu(predictions, [references]).score) / 100.0


def text_metrics(predictions: Sequence[str], references: Sequence[str], bleu: bool = False) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum (mean per-example F-measure, stemmed) and, if `bleu`, corpus BLEU / 100."""
    predictions, references = _check_pairs(predictions, references)
    bleu_score = _bleu(predictions, references) if bleu else None  # fail fast, before ROUGE runs
    with _rouge_lock:
        rouge = _rouge().compute(predictions=predictions, references=references,
                                 rouge_types=list(TEXT_METRICS), use_stemmer=True)
    result = {name: float(rouge[name]) for name in TEXT_METRICS}
    if bleu_score is not None:
        result["bleu"] = bleu_score
    return result


def per_example_rouge(predictions: Sequence[str], references: Sequence[str], rouge_type: str = "rouge1") -> list[float]:
    """One ROUGE F-measure per example (stemmed, as text_metrics; their mean is its figure): for
    paired comparisons of two systems on the same rows."""
    predictions, references = _check_pairs(predictions, references)
    with _rouge_lock:
        rouge = _rouge().compute(predictions=predictions, references=references, rouge_types=[rouge_type],
                                 use_stemmer=True, use_aggregator=False)
    return [float(x) for x in rouge[rouge_type]]


def classification_metrics(predictions: Sequence[str], references: Sequence[str],
                           labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class figures and the confusion matrix for a closed label set.

    Values are compared after `strip()`, otherwise as exact strings. `labels` defaults to the
    distinct references, sorted; a reference outside an explicit `labels` is a DataError.
    A prediction outside the label set counts as wrong: it is mapped to "(other)", which then
    appears as the last row and column of the confusion matrix (its row is all zeros, as no
    reference is "(other)"); "(other)" is absent from the matrix when no prediction falls outside.
    Per-class figures cover the label set only. Macro-F1 averages per-class F1 over the labels
    that occur in the references or predictions (scikit-learn's default set, minus "(other)").
    Rows of the matrix are references, columns predictions.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    predictions, references = _check_pairs(predictions, references)
    references = [r.strip() for r in references]
    if labels is None:
        labels = sorted(set(references))
    else:
        labels = list(dict.fromkeys(label.strip() for label in labels))
        unknown = sorted(set(references) - set(labels))
        if unknown:
            raise DataError(f"references outside the given labels: {unknown}")
    if OTHER_LABEL in labels:
        raise DataError(f"{OTHER_LABEL!r} is reserved for out-of-set predictions and cannot be a label")
    known = set(labels)
    predicted = [p.strip() if p.strip() in known else OTHER_LABEL for p in predictions]

    seen = set(references) | set(predicted)
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predicted, labels=labels, zero_division=0)
    macro_f1 = f1_score(references, predicted, labels=[label for label in labels if label in seen],
                        average="macro", zero_division=0)
    matrix_labels = labels + ([OTHER_LABEL] if OTHER_LABEL in seen else [])
    with warnings.catch_warnings():
        # scikit-learn warns about a single class even when `labels` fixes the shape, as here.
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        matrix = confusion_matrix(references, predicted, labels=matrix_labels)
    return {
        "accuracy": float(accuracy_score(references, predicted)),
        "macro_f1": float(macro_f1),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion": {"labels": matrix_labels, "matrix": matrix.tolist()},
    }


def score(task: str, predictions: Sequence[str], references: Sequence[str], bleu: bool = False) -> dict[str, Any]:
    """Score by task: "text" -> text_metrics, "labels" -> classification_metrics, "auto" -> detect_task.

    The result always carries "task" (the resolved one) and "count" (number of pairs). `bleu`
    applies to text tasks only.
    """
    predictions, references = _check_pairs(predictions, references)
    if task == "auto":
        task = detect_task(references)
    if task not in SCORED_TASKS:
        raise ConfigError(f"unknown evaluation task {task!r}: expected one of {', '.join(SCORED_TASKS)} or auto")
    if task == "text":
        figures = text_metrics(predictions, references, bleu=bleu)
    else:
        figures = classification_metrics(predictions, references)
    return {"task": task, "count": len(references), **figures}


def scalar_metrics(scores: dict) -> dict[str, float]:
    """The top-level real-valued figures of a score dict, as floats.

    Leaves out nested values (per_class, confusion), strings ("task") and integers ("count"), so
    what remains is comparable across runs: rouge*, bleu, accuracy, macro_f1, losses.
    """
    return {
        name: float(value) for name, value in scores.items()
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
    }
