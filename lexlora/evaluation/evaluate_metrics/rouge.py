"""ROUGE as an `evaluate` metric script, shipped with lexlora so it loads without the Hub.

Same arguments as the Hub's "rouge" metric (`rouge_types`, `use_aggregator`, `use_stemmer`,
`tokenizer`), computed with Google's `rouge_score` package. One deliberate difference: with
`use_aggregator=True` this returns the plain mean of the per-example F-measures, not the "mid"
of a `rouge_score.scoring.BootstrapAggregator`. The bootstrap mid is a resampled estimate of that
same mean and changes from run to run; the exact mean is reproducible, which best-model selection
and tests need. With `use_aggregator=False` it returns one F-measure per example, like the Hub's.

Keep this file self-contained (imports from installed libraries only): `evaluate` copies just this
file into its modules cache and imports the copy, so relative or lexlora imports would not resolve.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum) between predictions and references, using
Google's rouge_score. Text is lower-cased and split on non-alphanumerics; rougeLsum treats "\\n"
as a sentence break (no NLTK sentence splitter, so no NLTK data is needed).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    rouge_types: ROUGE variants to compute; default ["rouge1", "rouge2", "rougeL", "rougeLsum"].
    use_aggregator: True (default): one float per type, the mean F-measure over examples.
        False: one list of per-example F-measures per type.
    use_stemmer: apply the Porter stemmer (NLTK's, which needs no downloaded data) to words of
        more than 3 characters. Default False, as on the Hub.
    tokenizer: optional callable str -> list[str] replacing rouge_score's default tokenizer.
Returns:
    dict mapping each rouge type to a float (aggregated) or a list of floats.
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}
"""

DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class _CallableTokenizer:
    """rouge_score wants an object with a `tokenize` method; callers pass a plain function."""

    def __init__(self, fn):
        self.tokenize = fn


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False,
                 tokenizer=None):
        rouge_types = list(rouge_types or DEFAULT_ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(
            rouge_types, use_stemmer=use_stemmer,
            tokenizer=_CallableTokenizer(tokenizer) if tokenizer is not None else None,
        )
        per_type = {name: [] for name in rouge_types}
        for reference, prediction in zip(references, predictions):
            scores = scorer.score(reference, prediction)  # rouge_score's order: (target, prediction)
            for name in rouge_types:
                per_type[name].append(float(scores[name].fmeasure))
        if not use_aggregator:
            return per_type
        return {name: (sum(values) / len(values) if values else 0.0) for name, values in per_type.items()}
