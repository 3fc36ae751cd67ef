"""Per-row decoding: SamplingParams checks, pick_tokens against transformers' own processors applied to
each row alone, seeded rows independent of what shares the call, min_new_tokens, and TextTracker's
stop strings and streamed deltas."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lexlora.errors import DataError
from lexlora.serving.decoding import (
    SamplingParams,
    TextTracker,
    make_generator,
    pick_tokens,
)

VOCAB = 50


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("min_new_tokens", -1), ("num_beams", 0), ("temperature", 0.0), ("temperature", -1.0),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0),
])
def test_sampling_params_errors_name_the_field(field, value):
    with pytest.raises(DataError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


def test_sampling_params_refuses_beam_sampling_and_empty_stop_strings():
    with pytest.raises(DataError, match="do_sample with num_beams"):
        SamplingParams(do_sample=True, num_beams=2)
    with pytest.raises(DataError, match="^stop must be"):
        SamplingParams(stop=("ok", ""))
    SamplingParams(do_sample=True, num_beams=1, top_k=0, stop=("x",))  # all fine


def logits_rows(rows, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 3


def reference_processed(params: SamplingParams, history, row_logits):
    """transformers' processors, built here (not through SamplingParams), on one row alone."""
    chain = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            chain.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            chain.append(TopPLogitsWarper(params.top_p))
    return chain(torch.tensor([list(history)]), row_logits[None].clone())[0]


def reference_pick(params, history, row_logits, seed):
    scores = reference_processed(params, history, row_logits)
    if not params.do_sample:
        return int(scores.argmax())
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=torch.Generator().manual_seed(seed)))


def run_pick(logits, params, histories, seeds, blocked=None):
    generators = [None if not p.do_sample else torch.Generator().manual_seed(s) for p, s in zip(params, seeds)]
    return pick_tokens(logits.clone(), params, histories, generators, blocked or [None] * len(params))


def test_greedy_is_argmax():
    logits = logits_rows(6)
    params = [SamplingParams()] * 6
    assert run_pick(logits, params, [[0]] * 6, [0] * 6) == logits.argmax(-1).tolist()


def test_repetition_penalty_rows_equal_transformers_on_each_row_alone():
    logits = logits_rows(3, seed=1)
    top = logits.argmax(-1).tolist()
    # Each row's history holds its own argmax (so the penalty changes the pick) and has its own
    # length: rows processed together must not see each other's tokens.
    histories = [[0, top[0]], [0, 7, top[1], 3, 9], [0]]
    params = [SamplingParams(repetition_penalty=5.0)] * 3
    picked = run_pick(logits, params, histories, [0] * 3)
    assert picked == [reference_pick(params[0], h, logits[i], 0) for i, h in enumerate(histories)]
    assert picked[0] != top[0] and picked[1] != top[1] and picked[2] == top[2]


SAMPLING = [
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=3),
    SamplingParams(do_sample=True, top_p=0.5),
    SamplingParams(do_sample=True, temperature=1.3, top_k=5, top_p=0.8, repetition_penalty=1.5),
    SamplingParams(repetition_penalty=2.0),
    SamplingParams(),
]


def test_sampling_rows_equal_transformers_on_each_row_alone_whatever_shares_the_call():
    # Two rows of each setting (one group of two rows each), with different histories and logits.
    params = [p for p in SAMPLING for _ in range(2)]
    histories = [[0] + list(range(1 + i, 4 + 2 * i)) for i in range(len(params))]
    for trial in range(15):
        logits = logits_rows(len(params), seed=100 + trial)
        seeds = [1000 * trial + i for i in range(len(params))]
        picked = run_pick(logits, params, histories, seeds)
        assert picked == [reference_pick(p, h, logits[i], s)
                          for i, (p, h, s) in enumerate(zip(params, histories, seeds))], trial


def test_top_k_and_top_p_restrict_what_is_drawn():
    logits = logits_rows(1, seed=5)[0]
    top3 = set(logits.topk(3).indices.tolist())
    probs = torch.softmax(logits, -1)
    ranked = probs.argsort(descending=True).tolist()
    nucleus, mass = set(), 0.0
    for token in ranked:  # top_p=0.5 keeps the likeliest tokens until their mass reaches 0.5
        nucleus.add(token)
        mass += float(probs[token])
        if mass >= 0.5:
            break
    k_draws, p_draws = set(), set()
    for seed in range(60):
        k_draws |= set(run_pick(logits[None], [SamplingParams(do_sample=True, top_k=3)], [[0]], [seed]))
        p_draws |= set(run_pick(logits[None], [SamplingParams(do_sample=True, top_p=0.5)], [[0]], [seed]))
    assert k_draws <= top3 and len(k_draws) > 1
    assert p_draws <= nucleus


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_the_call():
    mine = SamplingParams(do_sample=True, temperature=1.5, top_k=20, seed=3)
    row = logits_rows(1, seed=9)
    alone = []
    generator = make_generator(mine, 0, torch.device("cpu"))
    for _ in range(10):
        alone += pick_tokens(row.clone(), [mine], [[0]], [generator], [None])
    for others in ([SamplingParams()], [mine, SamplingParams(do_sample=True)], SAMPLING):
        generator = make_generator(mine, 0, torch.device("cpu"))
        shared = []
        for step in range(10):
            logits = torch.cat([logits_rows(len(others), seed=step), row])
            gens = [make_generator(p, i, torch.device("cpu")) for i, p in enumerate(others)] + [generator]
            shared.append(pick_tokens(logits, [*others, mine], [[0]] * (len(others) + 1), gens,
                                      [None] * (len(others) + 1))[-1])
        assert shared == alone
    assert len(set(alone)) > 1  # it really samples


def test_make_generator_seeds_by_row_and_only_for_sampling():
    assert make_generator(SamplingParams(seed=1), 0, torch.device("cpu")) is None
    params = SamplingParams(do_sample=True, seed=11)
    first = make_generator(params, 2, torch.device("cpu"))
    again = make_generator(params, 2, torch.device("cpu"))
    other = make_generator(params, 3, torch.device("cpu"))
    draw = lambda g: torch.randint(0, 10**9, (4,), generator=g).tolist()
    assert draw(first) == draw(again) != draw(other)


def test_min_new_tokens_blocks_the_end_token():
    logits = logits_rows(2, seed=2)
    eos = 1
    logits[:, eos] = 100.0  # the end token is everyone's favourite
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=0)]
    picked = run_pick(logits, params, [[0], [0]], [0, 0], blocked=[eos, eos])
    assert eos not in picked
    assert picked[0] == int(torch.cat([logits[0, :eos], torch.tensor([-1e9]), logits[0, eos + 1:]]).argmax())
    assert run_pick(logits, params, [[0], [0]], [0, 0], blocked=[None, None]) == [eos, eos]
    assert run_pick(logits, params, [[0], [0]], [0, 0], blocked=[eos, None]) == [picked[0], eos]


# ---- TextTracker ----------------------------------------------------------------------------------

def stream(tokenizer, text, stop=()):
    """Feed `text`'s tokens one at a time as the engine does; (tracker, deltas, streamed so far)."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    tracker = TextTracker(tokenizer, stop)
    deltas, seen = [], []
    for i in range(1, len(ids) + 1):
        deltas.append(tracker.update(ids[:i], final=i == len(ids)))
        seen.append("".join(deltas))
        if tracker.stopped:
            break
    return tracker, deltas, seen


TEXTS = ["it reads backup_config.json files", "a setup.py script", "the Makefile target", "notes for the module"]


def test_no_stop_strings_streams_the_whole_output(tokenizer):
    for text in TEXTS:
        tracker, deltas, _ = stream(tokenizer, text)
        assert "".join(deltas) == tracker.output == text and not tracker.stopped


@pytest.mark.parametrize("text, stop, output", [
    ("it reads backup_config.json files", ("config",), "it reads backup_"),
    ("it reads backup_config.json files", ("json", "reads"), "it"),
    ("a setup.py script", (".py",), "a setup"),
    ("the Makefile target", ("Makef",), "the"),
    ("the Makefile target", ("nowhere",), "the Makefile target"),
])
def test_stop_strings_cut_the_output_before_the_stop(tokenizer, text, stop, output):
    tracker, _deltas, _ = stream(tokenizer, text, stop)
    assert tracker.output == output
    assert tracker.stopped == (output != text)


def test_streamed_deltas_add_up_to_the_output_and_never_show_part_of_a_stop(tokenizer):
    for text in TEXTS:
        words = text.split()
        # every prefix of every word, as a stop string: the stream stops mid-word in every way
        stops = {w[:k] for w in words for k in range(1, len(w) + 1)} | {w[1:] for w in words if len(w) > 2}
        for stop in sorted(stops):
            tracker, deltas, seen = stream(tokenizer, text, (stop, "zzzz"))
            assert "".join(deltas) == tracker.output, (text, stop, deltas)
            # what was streamed at any point is a prefix of the final output: nothing streamed was
            # later taken back, so no part of the stop string ever went out
            for streamed in seen:
                assert tracker.output.startswith(streamed), (text, stop, streamed)
                assert stop not in streamed
