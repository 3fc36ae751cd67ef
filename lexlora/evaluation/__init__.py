"""Evaluation: metrics (with the shipped offline `evaluate` ROUGE script), `lexlora eval`, reports,
plots and the lexical-embedding diagnostics."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "classification_metrics": "metrics", "score": "metrics", "text_metrics": "metrics",
    "evaluate_adapter": "runner", "run_evaluation": "runner",
    "DataCheck": "results", "EvalResult": "results",
    "write_eval_report": "reports",
    "diagnose_file": "diagnostics",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

