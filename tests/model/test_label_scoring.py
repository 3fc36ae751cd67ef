"""Label-constrained generation (lexlora.model.label_scoring) on one adapter: outputs always in the
label set, scores that sum to 1 and equal a brute-force per-label loss from the model's own forward,
and the constrain switch (default on with a label set, off gives free text, on without one refused)."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lexlora.errors import AdapterError, DataError
from lexlora.model.loading import load_base_model, load_tokenizer
from tests.conftest import tiny_model_config
from tests.helpers import make_model, perturb_

WORDS = ["config", "file", "python source", "image", "log data", "archive", "shell script", "readme", "x"]
NAMES = ["backup_config.json", "setup.py", "notes.txt", "a_much_longer_file_name_for_padding.tar.gz", "run.sh"]

_BASE: dict = {}


def base_and_tokenizer():
    # Built once per module: hypothesis examples cannot take function-scoped fixtures.
    if not _BASE:
        config = tiny_model_config()
        _BASE["tokenizer"] = load_tokenizer(config)
        _BASE["base"] = load_base_model(config)
    return _BASE["base"], _BASE["tokenizer"]


def adapter(mode, seed, labels):
    base, tokenizer = base_and_tokenizer()
    model = make_model(copy.deepcopy(base), tokenizer, mode=mode, seed=seed)  # PEFT changes the base it wraps
    perturb_(model, seed)
    model.labels = tuple(labels)
    model.eval()
    return model


def brute_force_log_prob(model, text, label):
    """The label's sequence log-probability for this row alone: -(mean token loss) x tokens, from the
    model's own forward with labels=."""
    tokenizer = model.tokenizer
    record = model.spec.format_input(text)
    enc = tokenizer([model.spec.template.format(record)], return_tensors="pt", truncation=True,
                    max_length=model.max_source_length)
    lexical = None
    if model.lexical_fusion is not None:
        lexical = model._encoder_for(model.spec.embedding_model).encode([record[model.spec.lexical_field]])
    labels = torch.tensor([tokenizer(text_target=label)["input_ids"]])
    with torch.no_grad():
        loss = model(enc.input_ids, enc.attention_mask, labels=labels, lexical_embeds=lexical).loss
    return -float(loss) * labels.shape[1]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from([None, "add", "prefix"]),
    labels=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join),
                    min_size=2, max_size=6, unique=True).map(sorted),
    inputs=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4),
)
def test_constrained_outputs_are_labels_scored_exactly(seed, mode, labels, inputs):
    model = adapter(mode, seed, labels)
    predictions = model.generate_labels(inputs, batch_size=3)  # 3: more than one encoder chunk
    assert len(predictions) == len(inputs)
    assert model.generate_text(inputs) == [p.label for p in predictions]  # constrained by default
    for text, prediction in zip(inputs, predictions):
        assert prediction.label in labels and list(prediction.scores) == labels
        assert math.isclose(sum(prediction.scores.values()), 1.0, abs_tol=1e-9)
        brute = {label: brute_force_log_prob(model, text, label) for label in labels}
        for label in labels:
            assert prediction.log_probs[label] == pytest.approx(brute[label], rel=1e-4, abs=1e-3)
        assert prediction.label == max(brute, key=brute.get)
        shift = max(brute.values())
        total = sum(math.exp(v - shift) for v in brute.values())
        for label in labels:
            assert prediction.scores[label] == pytest.approx(math.exp(brute[label] - shift) / total, abs=1e-4)


def test_multi_token_labels_score_every_token():
    model = adapter(None, 3, ["python source code", "python source"])
    tokens = [len(model.tokenizer(text_target=label)["input_ids"]) for label in model.labels]
    assert min(tokens) >= 3  # several tokens + the end token: a first-token score would tie them
    prediction = model.generate_labels(["setup.py"])[0]
    assert prediction.log_probs["python source code"] != pytest.approx(prediction.log_probs["python source"])


def test_constrain_false_is_todays_free_generation():
    model = adapter("add", 5, ["config", "image"])
    free = model.generate_text(NAMES, constrain=False, max_new_tokens=5)
    model.labels = None
    assert model.generate_text(NAMES, max_new_tokens=5) == free  # no label set: free by default
    model.labels = ("config", "image")
    assert not set(free) <= {"config", "image"}  # the free text leaves the label set...
    assert set(model.generate_text(NAMES, max_new_tokens=5)) <= {"config", "image"}  # ...constrained never does


def test_constrain_true_without_a_label_set_is_refused():
    model = adapter(None, 6, ["a"])
    model.labels = None
    with pytest.raises(AdapterError, match="constrain=True: this adapter has no label set"):
        model.generate_text(["a.py"], constrain=True)
    with pytest.raises(AdapterError, match="has no label set"):
        model.generate_labels(["a.py"])


def test_decoding_options_with_a_constrained_row_are_refused():
    model = adapter(None, 7, ["config", "image"])
    with pytest.raises(DataError, match="do_sample: not used by label-constrained generation.*constrain=False"):
        model.generate_text(["a.py"], do_sample=True)
    assert len(model.generate_text(["a.py"], constrain=False, do_sample=True, max_new_tokens=2)) == 1
