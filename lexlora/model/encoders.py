"""The frozen base of a classifier (model.task=classification): a model's encoder alone.

- BERT-like encoders (all-MiniLM-L6-v2, BERT, RoBERTa, ...): `AutoModel` (their pooler is unused);
- T5 / Flan-T5 / mT5: transformers' `T5EncoderModel` family, which loads only the encoder's weights;
- BART / mBART / BARThez and other encoder-decoders: the encoder of `AutoModel` (the decoder is dropped).

Why the encoder and not transformers' `BartForSequenceClassification`: that class runs the whole
decoder and classifies from the decoder state of the last EOS token, so every input must end in EOS,
the decoder doubles the compute, and the head sits on the decoder, where the fusion projection (which
feeds the encoder input) and per-row routing would need a second path. One encoder + pooling + head
serves every family the same way, and mixed batches of classifier adapters route like the encoder of a
seq2seq adapter does."""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import logging as hf_logging

from lexlora.config import ModelConfig
from lexlora.errors import ConfigError, ModelLoadError
from lexlora.model.families import BERT_LIKE, BERT_LIKE_TARGETS, is_warm_start

logger = logging.getLogger(__name__)

# transformers' encoder-only classes of the T5 families (AutoModel would build the decoder too).
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def load_encoder_base(model: ModelConfig) -> PreTrainedModel:
    """The encoder of `model.name_or_path`, frozen and in eval mode (random weights from
    model.init_seed with model.random_init, for tests and benchmarks)."""
    if is_warm_start(model.name_or_path):
        raise ConfigError(
            f"model.task=classification uses one encoder; name it directly (e.g. the ENCODER_ID of "
            f"{model.name_or_path!r}) rather than a warm-started encoder-decoder"
        )
    if model.quantization != "none":
        raise ConfigError("model.quantization is not supported with model.task=classification (its head is trained in full "
                          "and its encoders are small); use model.quantization=none")
    if model.config_overrides and not model.random_init:
        raise ModelLoadError("model.config_overrides only applies with model.random_init=true "
                             "(pretrained weights fix the architecture)")
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, **(model.config_overrides if model.random_init else {}))
    except Exception as exc:
        raise ModelLoadError(f"could not load the config of {model.name_or_path!r} ({exc})") from None
    model_class = _encoder_class(config.model_type)
    try:
        if model.random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(model.init_seed)
                base = model_class.from_config(config) if model_class is AutoModel else model_class(config)
            logger.warning("model.random_init=true: %s built from its config with random weights (seed %d); "
                           "for tests and benchmarks only", model.name_or_path, model.init_seed)
        else:
            verbosity = hf_logging.get_verbosity()
            # A seq2seq checkpoint loaded as its encoder reports the decoder's weights as unused: expected.
            hf_logging.set_verbosity_error()
            try:
                base = model_class.from_pretrained(model.name_or_path)
            finally:
                hf_logging.set_verbosity(verbosity)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load the weights of {model.name_or_path!r}: {exc}\n"
            f"Download them first (e.g. `hf download {model.name_or_path}`), or point HF_HUB_CACHE at a cache that has them."
        ) from None
    if getattr(base.config, "is_encoder_decoder", False) and hasattr(base, "get_encoder"):
        base = base.get_encoder()  # BART & co: keep the encoder (and its share of the embeddings)
    base.name_or_path = model.name_or_path  # what PEFT records as base_model_name_or_path
    base.requires_grad_(False)
    base.eval()
    return base


def _encoder_class(model_type: str):
    if model_type in _T5_ENCODERS:
        import transformers

        return getattr(transformers, _T5_ENCODERS[model_type])
    return AutoModel


def encoder_target_modules(model_type: str) -> list[str] | str | None:
    """LoRA targets of an encoder base where they differ from the seq2seq defaults: BERT-like
    encoders get every self-attention projection (PEFT's default for BERT is query and value only).
    None: the family's seq2seq default (T5: q, k, v, o; BART: q_proj, k_proj, v_proj, out_proj)."""
    return BERT_LIKE_TARGETS if model_type in BERT_LIKE else None


def hidden_width(base: PreTrainedModel) -> int:
    """The width of the encoder's output states (what the head reads)."""
    config = base.config
    for key in ("hidden_size", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ModelLoadError(f"cannot tell the hidden width of {type(base).__name__} (no hidden_size or d_model in its config)")
