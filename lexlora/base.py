"""The frozen base: tokenizer and seq2seq model by id, random init on request, 8-bit / 4-bit weights
through bitsandbytes on CUDA (model.quantization), and a fingerprint that adapters record so they are
never loaded onto a base they were not trained on.

Bases: any `AutoModelForSeq2SeqLM` by id or path (T5 / Flan-T5 / mT5, BART / mBART / BARThez, saved
`EncoderDecoderModel`s, ...), or a warm-started encoder-decoder built from two encoder checkpoints
("Leveraging Pre-trained Checkpoints for Sequence Generation Tasks", Rothe et al. 2020), named

    model.name_or_path: "encoder-decoder:ENCODER_ID+DECODER_ID"   (or "encoder-decoder:ID" for ID+ID)

Its decoder's cross-attention (and, for BERT-like decoders, the LM head's transform) is missing from
the checkpoints: it is initialised from model.init_seed, and by default trained in full with the
adapter and saved in it (PEFT `modules_to_save`), so loading the adapter restores it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from lexlora.config import QUANTIZATION, ModelConfig
from lexlora.errors import AdapterError, ConfigError, ModelLoadError
from lexlora.fast_ops import use_fast_ops

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
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

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


def _encoder_decoder_types(config) -> tuple[str, str] | None:
    if config is None or not hasattr(config, "encoder") or not hasattr(config, "decoder"):
        return None
    return config.encoder.model_type, config.decoder.model_type


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
    """The base seq2seq model, frozen and in eval mode.

    With model.quantization=8bit/4bit the weights are loaded through bitsandbytes straight onto the
    CUDA device `device` (default: the current one, which Accelerate sets per process); elsewhere the
    base is on the CPU and the caller moves it."""
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


def fingerprint(base: PreTrainedModel, model: ModelConfig) -> dict[str, Any]:
    """What an adapter needs of its base: the architecture (every parameter's name and shape), the
    vocabulary size, and a digest of the first embedding rows that tells one set of weights from
    another (rounded through bf16 so fp32, bf16 and fp16 loads of the same weights agree).

    Shapes are logical, so an 8-bit or 4-bit load of a base (whose packed weights have other shapes)
    has the fingerprint of its full-precision load, and a QLoRA adapter loads on the full base."""
    modules = dict(base.named_modules(remove_duplicate=False))
    shapes = [
        (_base_parameter_name(name), _logical_shape(modules, name, p))
        for name, p in base.named_parameters(remove_duplicate=False)
        # the same base, whether or not PEFT has wrapped it already (LoRA layers, modules_to_save copies)
        if "lora_" not in name and ".modules_to_save." not in name
    ]
    arch = hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()
    rows = [base.get_input_embeddings().weight[:16]]
    if base.config.model_type == ENCODER_DECODER_TYPE:
        # Its cross-attention may be new (a warm start, seeded): tell one initialisation from another.
        rows += [p[:16] for n, p in base.named_parameters() if "crossattention" in n and "lora_" not in n
                 and "modules_to_save" not in n][:1]
    digest = hashlib.sha256()
    for tensor in rows:
        digest.update(tensor.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return {
        "model_id": model.name_or_path,
        "model_type": base.config.model_type,
        "vocab_size": vocab_size(base),
        "architecture_sha256": arch,
        "weights_sha256": digest.hexdigest(),
        "random_init": model.random_init,
        "init_seed": model.init_seed if model.random_init or is_warm_start(model.name_or_path) else None,
        "config_overrides": dict(model.config_overrides),
    }


def vocab_size(base: PreTrainedModel) -> int:
    """The output vocabulary (an EncoderDecoderConfig has no vocab_size of its own: its decoder's)."""
    config = base.config
    if getattr(config, "vocab_size", None) is None and hasattr(config, "decoder"):
        config = config.decoder
    return int(config.vocab_size)


def _logical_shape(modules: dict[str, nn.Module], name: str, param: torch.Tensor) -> list[int]:
    """A Linear weight as (out_features, in_features) whatever its storage (bitsandbytes packs 4-bit
    weights into a (n, 1) uint8 tensor); every other parameter as its own shape."""
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if leaf == "weight" and isinstance(module, nn.Linear):
        return [int(module.out_features), int(module.in_features)]
    return list(param.shape)


def _base_parameter_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], adapter_dir: str) -> None:
    """Refuse an adapter whose base differs from the loaded one, saying how."""

    def describe(fp: dict[str, Any]) -> str:
        init = f"random init, seed {fp.get('init_seed')}" if fp.get("random_init") else "pretrained weights"
        overrides = f", config overrides {fp['config_overrides']}" if fp.get("config_overrides") else ""
        return f"{fp.get('model_id')} ({fp.get('model_type')}, vocab {fp.get('vocab_size')}, {init}{overrides})"

    for key, what in (
        ("model_type", "model type"),
        ("vocab_size", "vocabulary size"),
        ("architecture_sha256", "architecture (parameter names and shapes)"),
        ("weights_sha256", "weights"),
    ):
        if saved.get(key) != current.get(key):
            values = [str(fp.get(key)) for fp in (saved, current)]
            if key.endswith("sha256"):
                values = [v[:12] for v in values]
            raise AdapterError(
                f"{adapter_dir}: this adapter was trained on a different base ({what} differ: "
                f"{values[0]} vs {values[1]}).\n"
                f"  adapter's base: {describe(saved)}\n  loaded base:    {describe(current)}\n"
                "Load it onto the base it was trained on."
            )
    if saved.get("model_id") != current.get("model_id"):
        logger.warning(
            "%s: adapter's base id %r differs from the loaded %r, but the fingerprints match",
            adapter_dir, saved.get("model_id"), current.get("model_id"),
        )
