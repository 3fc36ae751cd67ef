"""Evaluation: metrics (with the shipped offline `evaluate` ROUGE script), `lexlora eval`, reports,
plots and the lexical-embedding diagnostics."""

from typing import TYPE_CHECKING

from lexlora._exports import lazy_exports

_EXPORTS = {
    "classification_metrics": "metrics", "score": "metrics", "text_metrics": "metrics",
    "EvalResult": "runner", "evaluate_adapter": "runner", "run_evaluation": "runner",
    "write_eval_report": "reports",
    "diagnose_file": "diagnostics",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from lexlora.evaluation.metrics import classification_metrics, score, text_metrics  # noqa: F401
    from lexlora.evaluation.runner import EvalResult, evaluate_adapter, run_evaluation  # noqa: F401
    from lexlora.evaluation.reports import write_eval_report  # noqa: F401
    from lexlora.evaluation.diagnostics import diagnose_file  # noqa: F401
