"""lexlora.metrics: ROUGE through the shipped evaluate script (offline), label metrics, task detection."""

import socket
import sys
import warnings

import pytest
from rouge_score import rouge_scorer

from lexlora.errors import ConfigError, DataError
from lexlora.evaluation.evaluate_metrics import METRIC_DIR
from lexlora.evaluation.metrics import (
    OTHER_LABEL,
    TEXT_METRICS,
    classification_metrics,
    detect_task,
    higher_is_better,
    per_example_rouge,
    scalar_metrics,
    score,
    text_metrics,
)

CAT_PRED, CAT_REF = "the cat sat on the mat", "the cat lay on the mat"


def direct_f(pred: str, ref: str) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(TEXT_METRICS), use_stemmer=True)
    return {name: s.fmeasure for name, s in scorer.score(ref, pred).items()}


def test_exact_match_scores_one_on_every_rouge_type():
    # Two tokens at least: with one token there is no bigram and rouge_score gives rouge2 = 0.
    assert text_metrics(["a shell script that backs up files"], ["a shell script that backs up files"]) == {
        name: 1.0 for name in TEXT_METRICS
    }


def test_disjoint_strings_score_zero():
    assert text_metrics(["red green blue"], ["one two three"]) == {name: 0.0 for name in TEXT_METRICS}


def test_partial_overlap_matches_rouge_score_and_hand_values():
    result = text_metrics([CAT_PRED], [CAT_REF])
    assert result == pytest.approx(direct_f(CAT_PRED, CAT_REF))
    # 5 of 6 unigrams, 3 of 5 bigrams, LCS "the cat on the mat" = 5 of 6 tokens; P = R on both sides.
    assert result == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6, "rougeLsum": 5 / 6})


def test_stemmer_is_on():
    assert text_metrics(["scripts running"], ["script runs"])["rouge1"] == 1.0


def test_several_examples_aggregate_to_the_mean_f_measure():
    preds = [CAT_PRED, "configures the web server", "nothing in common"]
    refs = [CAT_REF, "web server configuration file", "a python module"]
    per_example = [direct_f(p, r) for p, r in zip(preds, refs)]
    expected = {name: sum(s[name] for s in per_example) / len(per_example) for name in TEXT_METRICS}
    assert text_metrics(preds, refs) == pytest.approx(expected)


@pytest.mark.parametrize("rouge_type", ["rouge1", "rouge2", "rougeL"])
def test_per_example_rouge_is_each_rows_f_measure_and_averages_to_text_metrics(rouge_type):
    preds = [CAT_PRED, "configures the web server", "nothing in common"]
    refs = [CAT_REF, "web server configuration file", "a python module"]
    rows = per_example_rouge(preds, refs, rouge_type)
    assert rows == pytest.approx([direct_f(p, r)[rouge_type] for p, r in zip(preds, refs)])
    assert rows[2] == 0.0 and 0 < rows[1] < 1
    assert sum(rows) / 3 == pytest.approx(text_metrics(preds, refs)[rouge_type])


def test_evaluate_load_of_the_shipped_script_needs_no_network(monkeypatch):
    import evaluate

    # Each attempt is recorded, not only raised: evaluate and huggingface_hub catch a failed request
    # (`except Exception`), which would swallow an assertion raised here and let the test pass.
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    metric = evaluate.load(str(METRIC_DIR / "rouge.py"), keep_in_memory=True)
    assert attempts == [], f"evaluate.load tried the network: {attempts}"
    per_example = metric.compute(predictions=[CAT_PRED, "x y"], references=[CAT_REF, "x y"],
                                 use_aggregator=False, use_stemmer=True)
    assert per_example["rouge1"] == pytest.approx([5 / 6, 1.0])
    assert per_example["rouge2"] == pytest.approx([3 / 5, 1.0])


def test_bleu_when_sacrebleu_is_installed():
    pytest.importorskip("sacrebleu")
    result = text_metrics([CAT_PRED, "a shell script that backs up files"],
                          [CAT_REF, "a shell script that backs up files"], bleu=True)
    assert 0.0 < result["bleu"] < 1.0
    assert text_metrics([CAT_REF], [CAT_REF], bleu=True)["bleu"] == pytest.approx(1.0)


def test_bleu_without_sacrebleu_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` raise ImportError
    with pytest.raises(ConfigError, match="pip install sacrebleu"):
        text_metrics([CAT_PRED], [CAT_REF], bleu=True)
    assert "bleu" not in text_metrics([CAT_PRED], [CAT_REF])


REFS = ["Shell script", "Markdown document", "Shell script", "Python script", "Markdown document", "Shell script"]
PREDS = ["Shell script", "Shell script", " Shell script ", "Python script", "Markdown document", "a poem"]


def test_classification_matches_hand_computed_values():
    result = classification_metrics(PREDS, REFS)
    assert result["accuracy"] == pytest.approx(4 / 6)
    # F1: Markdown P=1 R=1/2 -> 2/3; Python 1; Shell P=2/3 R=2/3 -> 2/3.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert result["per_class"]["Markdown document"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert result["per_class"]["Shell script"]["support"] == 3
    assert result["confusion"] == {
        "labels": ["Markdown document", "Python script", "Shell script", OTHER_LABEL],
        "matrix": [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 2, 1], [0, 0, 0, 0]],
    }


def test_classification_without_out_of_set_predictions_has_no_other_column():
    result = classification_metrics(["b", "a"], ["a", "b"], labels=["a", "b", "c"])
    assert result["accuracy"] == 0.0
    assert result["confusion"] == {"labels": ["a", "b", "c"], "matrix": [[0, 1, 0], [1, 0, 0], [0, 0, 0]]}
    assert result["per_class"]["c"]["support"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's single-class warning is silenced
        assert classification_metrics(["x"], ["x"])["confusion"] == {"labels": ["x"], "matrix": [[1]]}
    with pytest.raises(DataError, match="outside the given labels"):
        classification_metrics(["a"], ["z"], labels=["a"])


def test_detect_task():
    assert detect_task(REFS * 2) == "labels"
    assert detect_task([f"a file that does thing number {i}" for i in range(50)]) == "text"
    assert detect_task(["x", "y", "z"]) == "text"  # too few repeats to call it a label set
    assert detect_task([str(i % 30) for i in range(300)]) == "text"  # more distinct values than max_labels
    assert detect_task([str(i % 30) for i in range(300)], max_labels=30) == "labels"


def test_score_tags_task_and_count_and_scalar_metrics_keeps_floats():
    labels = score("auto", PREDS * 2, REFS * 2)
    assert labels["task"] == "labels" and labels["count"] == 12
    assert scalar_metrics(labels) == {"accuracy": pytest.approx(4 / 6), "macro_f1": pytest.approx(7 / 9)}
    text = score("text", [CAT_PRED], [CAT_REF])
    assert text["task"] == "text" and text["count"] == 1
    assert set(scalar_metrics(text)) == set(TEXT_METRICS)
    with pytest.raises(ConfigError, match="unknown evaluation task"):
        score("summaries", [CAT_PRED], [CAT_REF])


@pytest.mark.parametrize("call", [text_metrics, classification_metrics, lambda p, r: score("auto", p, r)])
def test_empty_or_mismatched_inputs_are_data_errors(call):
    with pytest.raises(DataError, match="empty"):
        call([], [])
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        call(["a", "b"], ["a"])


def test_metric_directions():
    assert not higher_is_better("loss") and not higher_is_better("val_loss") and not higher_is_better("eval_loss")
    assert all(higher_is_better(name) for name in (*TEXT_METRICS, "bleu", "accuracy", "macro_f1"))
