"""Model families: LoRA targets per architecture, the families unsafe in fp16, and warm-started
encoder-decoders named "encoder-decoder:ENCODER_ID+DECODER_ID" (Rothe et al. 2020).

Bases: any `AutoModelForSeq2SeqLM` by id or path (T5 / Flan-T5 / mT5, BART / mBART / BARThez, saved
`EncoderDecoderModel`s, ...), or a warm-started encoder-decoder built from two encoder checkpoints,
named

    model.name_or_path: "encoder-decoder:ENCODER_ID+DECODER_ID"   (or "encoder-decoder:ID" for ID+ID)

Its decoder's cross-attention (and, for BERT-like decoders, the LM head's transform) is missing from
the checkpoints: it is initialised from model.init_seed, and by default trained in full with the
adapter and saved in it (PEFT `modules_to_save`), so loading the adapter restores it."""

from __future__ import annotations

import logging

from transformers import AutoConfig

from lexlora.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)


# LoRA targets per architecture: the attention projections.
_T5_ATTENTION = ["q", "k", "v", "o"]
_BART_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
ATTENTION_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["t5", "mt5", "umt5", "longt5"], _T5_ATTENTION),
    # BART and the families derived from it name their attention projections alike.
    **dict.fromkeys(["bart", "mbart", "pegasus", "marian", "m2m_100", "blenderbot", "blenderbot-small", "plbart"],
                    _BART_ATTENTION),
}

# T5-family models overflow in fp16 (they were trained in bf16).
FP16_UNSAFE = {"t5", "mt5", "umt5", "longt5"}

ENCODER_DECODER_PREFIX = "encoder-decoder:"
ENCODER_DECODER_TYPE = "encoder-decoder"  # transformers' model_type of an EncoderDecoderModel
# Encoder families whose layers can serve as the decoder of an EncoderDecoderModel (causal mask +
# cross-attention added): their attention Linears are named alike.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "xlm-roberta-xl", "bert-generation"}
# LoRA on the encoder's and decoder's self-attention projections (a regex, matched by PEFT against
# the whole module path): `.attention.` with the dot excludes `crossattention`, which is trained in full.
BERT_LIKE_TARGETS = r".*\.attention\.(self\.(query|key|value)|output\.dense)"
# Trained in full with a warm-started encoder-decoder's adapter (missing from encoder checkpoints).
WARM_START_MODULES_TO_SAVE = ["crossattention", "predictions.transform"]


def parse_encoder_decoder(name_or_path: str) -> tuple[str, str] | None:
    """"encoder-decoder:ENC+DEC" -> (ENC, DEC); "encoder-decoder:ID" -> (ID, ID); anything else -> None."""
    if not name_or_path.startswith(ENCODER_DECODER_PREFIX):
        return None
    rest = name_or_path[len(ENCODER_DECODER_PREFIX):].strip()
    parts = [part.strip() for part in rest.split("+")] if rest else []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: a warm-started encoder-decoder is named "
            "'encoder-decoder:ENCODER_ID+DECODER_ID' (or 'encoder-decoder:ID' for the same checkpoint twice)"
        )
    return parts[0], parts[1]


def is_warm_start(name_or_path: str) -> bool:
    return parse_encoder_decoder(name_or_path) is not None


def default_target_modules(model_type: str, config=None) -> list[str] | str:
    """LoRA's target modules for a base: the attention projections (T5: q, k, v, o; BART / mBART:
    q_proj, k_proj, v_proj, out_proj). An encoder-decoder of BERT-like halves gets a regex over its
    self-attention projections (its cross-attention is trained in full, see `default_modules_to_save`).
    Other model types fall back to PEFT's own default for the type, when it has one."""
    if model_type in ATTENTION_TARGETS:
        return list(ATTENTION_TARGETS[model_type])
    if model_type == ENCODER_DECODER_TYPE:
        halves = _encoder_decoder_types(config)
        if halves and all(t in BERT_LIKE for t in halves):
            return BERT_LIKE_TARGETS
        raise ModelLoadError(
            f"no default LoRA target modules for an encoder-decoder of {' + '.join(halves) if halves else 'unknown halves'}; "
            "set lora.target_modules (module names, or one regex string matched against the whole module path)"
        )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS,
    )

    if model_type in PEFT_DEFAULTS:
        logger.info("LoRA targets for %s: PEFT's default %s", model_type, PEFT_DEFAULTS[model_type])
        return list(PEFT_DEFAULTS[model_type])
    raise ModelLoadError(
        f"no default LoRA target modules for model type {model_type!r}; set lora.target_modules"
    )


def default_modules_to_save(model_type: str, base_id: str, config=None) -> list[str] | None:
    """Modules trained in full and saved with the adapter: a warm-started encoder-decoder's
    cross-attention and LM-head transform (randomly initialised, absent from the checkpoints)."""
    if model_type == ENCODER_DECODER_TYPE and is_warm_start(base_id):
        halves = _encoder_decoder_types(config)
        if halves and halves[1] in BERT_LIKE:
            return list(WARM_START_MODULES_TO_SAVE)
        raise ModelLoadError(
            f"{base_id}: no default modules to train with a warm-started {halves[1] if halves else 'unknown'} decoder; "
            "set lora.extra.modules_to_save to its cross-attention (and any other newly initialised) modules"
        )
    return None


def base_config(name_or_path: str):
    """The transformers config of a base id (for a warm start, an EncoderDecoderConfig of its two halves)."""
    pair = parse_encoder_decoder(name_or_path)
    try:
        if pair:
            from transformers import EncoderDecoderConfig

            return EncoderDecoderConfig.from_encoder_decoder_configs(
                AutoConfig.from_pretrained(pair[0]), AutoConfig.from_pretrained(pair[1])
            )
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:
        raise ModelLoadError(f"could not load the config of {name_or_path!r} ({exc})") from None


def refuse_fp16(name_or_path: str) -> None:
    """A ConfigError for train.mixed_precision=fp16 on a T5-family base, or on a warm start with a
    T5-family half (read from the configs alone: the check comes before any model work)."""
    config = base_config(name_or_path)
    families = {config.model_type, *(_encoder_decoder_types(config) or ())}
    unsafe = sorted(families & FP16_UNSAFE)
    if unsafe:
        raise ConfigError(
            f"train.mixed_precision=fp16 is refused for {unsafe[0]}: T5-family models overflow to inf/NaN "
            "in fp16 (they were trained in bf16). Use bf16 (GPUs since Ampere) or no."
        )


def _encoder_decoder_types(config) -> tuple[str, str] | None:
    if config is None or not hasattr(config, "encoder") or not hasattr(config, "decoder"):
        return None
    return config.encoder.model_type, config.decoder.model_type
