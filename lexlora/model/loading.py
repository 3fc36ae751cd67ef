"""The frozen base: tokenizer and seq2seq model by id, random init on request, 8-bit / 4-bit weights
through bitsandbytes on CUDA (model.quantization)."""

from __future__ import annotations

import importlib.util
import logging
import tempfile

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from lexlora.config import QUANTIZATION, ModelConfig
from lexlora.errors import ConfigError, ModelLoadError
from lexlora.model.families import (
    ENCODER_DECODER_TYPE,
    is_warm_start,
    parse_encoder_decoder,
)
from lexlora.model.fast_ops import use_fast_ops

logger = logging.getLogger(__name__)


def load_tokenizer(model: ModelConfig):
    pair = parse_encoder_decoder(model.name_or_path)
    name = pair[0] if pair else model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if pair and pair[1] != pair[0]:
            decoder = AutoTokenizer.from_pretrained(pair[1])
            if decoder.get_vocab() != tokenizer.get_vocab():
                raise ModelLoadError(
                    f"{model.name_or_path}: the encoder's and the decoder's tokenizers differ; lexlora uses one "
                    "tokenizer for inputs and targets, so both checkpoints must share a vocabulary"
                )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the tokenizer of {name!r} ({type(exc).__name__}: {exc}). "
            "Check the id and your network, or HF_HUB_CACHE / HF_HUB_OFFLINE for an offline cache."
        ) from None
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """Start / end / pad ids for a decoder warm-started from an encoder: BERT-like tokenizers mark a
    sequence [CLS] ... [SEP], so decoding starts at [CLS] and ends at [SEP]."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    return {"decoder_start_token_id": start, "eos_token_id": end, "pad_token_id": pad}


def set_generation_ids(base: PreTrainedModel, tokenizer) -> None:
    """An EncoderDecoderModel knows no start / end / pad tokens of its own: set them (on the config,
    which shifts labels into decoder inputs, and on the generation config), unless already set."""
    if base.config.model_type != ENCODER_DECODER_TYPE:
        return
    for key, value in special_token_ids(tokenizer).items():
        if value is None:
            raise ModelLoadError(f"the tokenizer has no token for {key}; the encoder-decoder cannot generate")
        if getattr(base.config, key, None) is None:
            setattr(base.config, key, value)
        if getattr(base.generation_config, key, None) is None:
            setattr(base.generation_config, key, getattr(base.config, key))
    if getattr(base.generation_config, "bos_token_id", None) is None:
        base.generation_config.bos_token_id = base.config.decoder_start_token_id


def check_quantization(model: ModelConfig) -> None:
    """Refuse model.quantization=8bit/4bit up front (before any data or model work) where it cannot
    run: it needs a CUDA GPU and the bitsandbytes package."""
    if model.quantization == "none":
        return
    if model.quantization not in QUANTIZATION:
        raise ConfigError(f"model.quantization must be one of {', '.join(QUANTIZATION)}; got {model.quantization!r}")
    switch = f"model.quantization={model.quantization}"
    needs = f"{switch} loads the base's weights through bitsandbytes, which needs a CUDA GPU and the bitsandbytes package"
    if not torch.cuda.is_available():
        raise ConfigError(f"{needs}; this machine has no CUDA device. Use model.quantization=none here.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{needs}; bitsandbytes is not installed (pip install bitsandbytes), or use model.quantization=none.")


def quantization_config(quantization: str):
    """transformers' BitsAndBytesConfig for model.quantization (None for none): LLM.int8 for 8bit,
    NF4 with double quantization and bf16 compute for 4bit (QLoRA's recipe)."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    raise ConfigError(f"model.quantization must be one of {', '.join(QUANTIZATION)}; got {quantization!r}")


def is_quantized(base: nn.Module) -> bool:
    """Whether the base's weights are k-bit (bitsandbytes), i.e. need PEFT's k-bit preparation."""
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def load_base_model(model: ModelConfig, device: int | str | torch.device | None = None) -> PreTrainedModel:
    """The base seq2seq model (with model.task=classification, its encoder), frozen and in eval mode.

    With model.quantization=8bit/4bit the weights are loaded through bitsandbytes straight onto the
    CUDA device `device` (default: the current one, which Accelerate sets per process); elsewhere the
    base is on the CPU and the caller moves it."""
    if model.task == "classification":  # the encoder alone, for a classification head
        from lexlora.model.encoders import load_encoder_base

        base = load_encoder_base(model)
        if model.fast_ops:
            use_fast_ops(base)
        return base
    check_quantization(model)
    if is_warm_start(model.name_or_path):
        base = _load_warm_start(model, device)
    elif model.random_init:
        try:
            config = AutoConfig.from_pretrained(model.name_or_path, **model.config_overrides)
        except Exception as exc:
            raise ModelLoadError(f"could not load the config of {model.name_or_path!r} ({exc})") from None
        # A fixed seed makes the random base reproducible, so an adapter trained on it can be reloaded.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.init_seed)
            base = AutoModelForSeq2SeqLM.from_config(config)
        logger.warning(
            "model.random_init=true: %s built from its config with random weights (seed %d); "
            "for tests and benchmarks only", model.name_or_path, model.init_seed,
        )
        if model.quantization != "none":
            # bitsandbytes quantizes while loading weights: save the random base, load it back quantized
            # (the same weights as the full-precision random base, so adapters move between the two).
            with tempfile.TemporaryDirectory(prefix="lexlora-random-base-") as tmp:
                base.save_pretrained(tmp)
                del base
                base = _load_quantized(tmp, model, device)
    else:
        if model.config_overrides:
            raise ModelLoadError(
                "model.config_overrides only applies with model.random_init=true "
                "(pretrained weights fix the architecture)"
            )
        try:
            if model.quantization != "none":
                base = _load_quantized(model.name_or_path, model, device)
            else:
                base = AutoModelForSeq2SeqLM.from_pretrained(model.name_or_path)
        except OSError as exc:
            raise ModelLoadError(
                f"could not load the weights of {model.name_or_path!r}: {exc}\n"
                f"Download them first (e.g. `hf download {model.name_or_path}` on a machine with network, "
                "or point HF_HUB_CACHE at a cache that has them), or, for tests and benchmarks only, "
                "set model.random_init=true to build the same shape with random weights."
            ) from None
    if base.config.model_type == ENCODER_DECODER_TYPE:
        set_generation_ids(base, load_tokenizer(model))
    base.requires_grad_(False)
    base.eval()
    if model.fast_ops:
        use_fast_ops(base)
    return base


def _load_warm_start(model: ModelConfig, device: int | str | torch.device | None) -> PreTrainedModel:
    """EncoderDecoderModel from two encoder checkpoints (or, with random_init, from their configs),
    the missing weights (cross-attention, LM-head transform) initialised from model.init_seed."""
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    encoder_id, decoder_id = parse_encoder_decoder(model.name_or_path)
    if model.quantization != "none":
        raise ConfigError(
            f"model.quantization={model.quantization} is not supported for a warm-started encoder-decoder "
            f"({model.name_or_path}); its new cross-attention is trained in full. Use model.quantization=none."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.init_seed)
        if model.random_init:
            try:
                encoder = AutoConfig.from_pretrained(encoder_id, **model.config_overrides)
                decoder = AutoConfig.from_pretrained(decoder_id, **model.config_overrides)
            except Exception as exc:
                raise ModelLoadError(f"could not load the configs of {model.name_or_path!r} ({exc})") from None
            decoder.is_decoder, decoder.add_cross_attention = True, True
            base = EncoderDecoderModel(config=EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
            logger.warning(
                "model.random_init=true: %s built from its configs with random weights (seed %d); "
                "for tests and benchmarks only", model.name_or_path, model.init_seed,
            )
        else:
            if model.config_overrides:
                raise ModelLoadError(
                    "model.config_overrides only applies with model.random_init=true "
                    "(pretrained weights fix the architecture)"
                )
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the load report lists the new cross-attention as missing: expected
            try:
                base = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder_id, decoder_id)
            except OSError as exc:
                raise ModelLoadError(
                    f"could not load the weights of {model.name_or_path!r}: {exc}\n"
                    "Download both checkpoints first (`hf download ID`), or point HF_HUB_CACHE at a cache that has them."
                ) from None
            finally:
                hf_logging.set_verbosity(verbosity)
            logger.info(
                "warm-started encoder-decoder %s: cross-attention initialised from seed %d (trained with the adapter)",
                model.name_or_path, model.init_seed,
            )
    base.name_or_path = model.name_or_path  # what PEFT records as base_model_name_or_path
    return base


def _load_quantized(path: str, model: ModelConfig, device: int | str | torch.device | None) -> PreTrainedModel:
    if device is None:
        device = torch.cuda.current_device()
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda":
        raise ConfigError(f"model.quantization={model.quantization} needs the base on a CUDA device, not {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    base = AutoModelForSeq2SeqLM.from_pretrained(
        path, quantization_config=quantization_config(model.quantization), device_map={"": index}
    )
    logger.info("base weights loaded in %s through bitsandbytes on cuda:%d", model.quantization, index)
    return base
