"""Label-constrained generation for seq2seq adapters trained on a label task: every label of the
row's label set is scored, and the output is the likeliest one.

Scoring, not search: for R rows with label sets of L labels each, the encoder runs once per row
(with its fusion and LoRA, through `GenerationPipeline`'s stages), then the decoder runs ONE
teacher-forced pass over the R*L (row, label) pairs: each row's encoder output repeated once per
label, the label's target tokens (end token included, tokenized as training tokenized targets) as
the decoder's labels. A label's score is the sum of its tokens' log-probabilities; a row's scores
are the softmax of its labels' sums, so they add up to 1 (P(label | input, the label is one of the
set)), and its output is the argmax. Exact (nothing is pruned, unlike constrained beam search) and
one decoder pass. Rows of different adapters (different label sets) mix freely: each (row, label)
pair keeps its row's plan, so the backend routes it through the row's adapter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from lexlora.errors import AdapterError, DataError
from lexlora.model.generation import Backend, GenerationPipeline, RowPlan, check_input_list

MAX_SEQUENCES = 256  # (row, label) pairs per decoder pass: bounds the logits' memory (pairs x tokens x vocab)


@dataclass(frozen=True)
class LabelPrediction:
    """One input's constrained output: `label` (the likeliest of the set), `scores` (every label's
    probability given the input and that the answer is one of the labels; they sum to 1) and
    `log_probs` (each label's sequence log-probability under the model, unnormalised)."""

    label: str
    scores: dict[str, float]
    log_probs: dict[str, float]


def resolve_constrain(constrain: bool | None, labels: Sequence[str] | None, generate_kwargs: Mapping[str, object],
                      adapter: str | None = None) -> bool:
    """Whether rows of an adapter with label set `labels` are constrained: `constrain`, or when None,
    whether it has a label set. True without a label set is an AdapterError; decoding options
    (`generate_kwargs`: sampling, min_new_tokens, ...) with a constrained row are a DataError,
    since scoring has no decoding to apply them to."""
    what = f"adapter {adapter!r}" if adapter else "this adapter"
    if constrain is None:
        constrain = bool(labels)
    if constrain and not labels:
        raise AdapterError(f"constrain=True: {what} has no label set (it was not trained on a label task, so its "
                           "lexlora.json records no labels); generate free text with constrain=False or None")
    if constrain and generate_kwargs:
        raise DataError(f"{', '.join(sorted(generate_kwargs))}: not used by label-constrained generation ({what} "
                        "scores every label of its set instead of decoding); pass constrain=False to decode free text")
    return bool(constrain)


def check_label_plans(plans: Sequence[RowPlan]) -> None:
    for row, plan in enumerate(plans):
        if not plan.labels:
            name = getattr(plan.adapter, "name", None)
            raise AdapterError(
                f"input {row}: the adapter{f' {name!r}' if name else ''} has no label set (it was not trained on a "
                "label task), so its generation cannot be constrained; pass constrain=False (or leave it unset)"
            )


@torch.no_grad()
def score_labels(pipeline: GenerationPipeline, backend: Backend, plans: Sequence[RowPlan],
                 inputs: Sequence[str | Mapping[str, str]], *, batch_size: int = 32,
                 max_sequences: int = MAX_SEQUENCES) -> list[LabelPrediction]:
    """One `LabelPrediction` per input, each scored over its plan's `labels`."""
    check_label_plans(plans)
    label_ids = _label_token_ids(pipeline, plans)
    predictions: list[LabelPrediction] = []
    for _, chunk, embeds, mask in pipeline.encoded_chunks(backend, plans, inputs, batch_size):
        with backend.routed(chunk):
            states = backend.seq2seq.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)[0]
        pairs = [(r, label) for r, plan in enumerate(chunk) for label in plan.labels]
        sums: list[float] = []
        for first in range(0, len(pairs), max_sequences):
            part = pairs[first : first + max_sequences]
            sums.extend(_sequence_log_probs(backend, [chunk[r] for r, _ in part], states, mask,
                                            [r for r, _ in part], [label_ids[label] for _, label in part]))
        at = 0
        for plan in chunk:
            row_sums = torch.tensor(sums[at : at + len(plan.labels)], dtype=torch.float64)
            at += len(plan.labels)
            probs = torch.softmax(row_sums, dim=0).tolist()
            best = int(torch.argmax(row_sums))  # ties: the first in the (sorted) label set
            predictions.append(LabelPrediction(
                plan.labels[best], dict(zip(plan.labels, probs)), dict(zip(plan.labels, row_sums.tolist()))))
    return predictions


def _label_token_ids(pipeline: GenerationPipeline, plans: Sequence[RowPlan]) -> dict[str, list[int]]:
    """Each label's target tokens, as training tokenized targets (`text_target`, end token included)."""
    labels = sorted({label for plan in plans for label in plan.labels})
    return dict(zip(labels, pipeline.tokenizer(text_target=labels)["input_ids"]))


def _sequence_log_probs(backend: Backend, plans: Sequence[RowPlan], states: torch.Tensor, mask: torch.Tensor,
                        rows: Sequence[int], ids: Sequence[Sequence[int]]) -> list[float]:
    """Teacher-forced sum of log P(token) over each label sequence, its row's encoder output repeated."""
    model = backend.seq2seq
    index = torch.tensor(list(rows), device=states.device)
    width = max(len(i) for i in ids)
    labels = torch.full((len(ids), width), -100, dtype=torch.long, device=states.device)
    for n, sequence in enumerate(ids):
        labels[n, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    # The model's own shift (decoder start token, -100 as pad): the decoder inputs training saw.
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    with backend.routed(plans), warnings.catch_warnings():
        # EncoderDecoderModel's per-forward notice about its v4.12 loss change (no loss computed here).
        warnings.filterwarnings("ignore", message="Version v4.12.0 introduces a better way", category=FutureWarning)
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=states.index_select(0, index)),
                       attention_mask=mask.index_select(0, index), decoder_input_ids=decoder_input_ids,
                       use_cache=False, return_dict=True).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != -100
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, 0.0).sum(dim=1).tolist()


def generate_or_score(pipeline: GenerationPipeline, backend: Backend, plans: Sequence[RowPlan],
                      inputs: Sequence[str | Mapping[str, str]], constrained: Sequence[bool], *, batch_size: int = 32,
                      **generate_kwargs) -> list[str]:
    """One output per input: the likeliest label for the `constrained` rows, free generation for the
    others (a batch may mix both, e.g. a label adapter and a description adapter)."""
    items = list(check_input_list(inputs))
    scored = [i for i, c in enumerate(constrained) if c]
    if not scored:
        return pipeline.generate(backend, plans, items, batch_size=batch_size, **generate_kwargs)
    outputs: list[str] = [""] * len(items)
    free = [i for i, c in enumerate(constrained) if not c]
    if free:
        texts = pipeline.generate(backend, [plans[i] for i in free], [items[i] for i in free], batch_size=batch_size,
                                  **generate_kwargs)
        for row, text in zip(free, texts):
            outputs[row] = text
    predictions = score_labels(pipeline, backend, [plans[i] for i in scored], [items[i] for i in scored],
                               batch_size=batch_size)
    for row, prediction in zip(scored, predictions):
        outputs[row] = prediction.label
    return outputs
