"""A frozen seq2seq base with PEFT LoRA on its attention projections and a lexical fusion projection
on its encoder input; forward for training and `generate` through precomputed encoder outputs
(generate() itself cannot take the lexical vectors: transformers #12844, #11530)."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Mapping, Sequence

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lexlora.config import DataConfig, GenerationSettings, LoraSettings
from lexlora.data.embeddings import LexicalEncoder
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError, ConfigError, DataError
from lexlora.model.families import (
    ENCODER_DECODER_TYPE,
    base_config,
    default_modules_to_save,
    default_target_modules,
)
from lexlora.model.fusion import FUSION_PREFIX, LexicalFusion, encoder_input_width
from lexlora.model.generation import (
    GenerationPipeline,
    RowPlan,
    check_input_list,
    encoder_for_id,
    generate_from_embeds,
)
from lexlora.model.label_scoring import LabelPrediction, resolve_constrain, score_labels
from lexlora.model.loading import is_quantized


def build_lora_config(settings: LoraSettings, model_type: str, base_id: str, config=None,
                      task_type: str = "SEQ_2_SEQ_LM", default_targets: list[str] | str | None = None) -> LoraConfig:
    """PEFT's LoraConfig from lora.*: target modules default to the base's attention projections
    (`lexlora.base.default_target_modules`; a single string in lora.target_modules is a regex over
    whole module paths, as in PEFT); a warm-started encoder-decoder also trains its new cross-attention
    in full (`modules_to_save`, saved with the adapter) unless lora.extra.modules_to_save says otherwise.
    `config` (the base's transformers config) is read from `base_id` when an encoder-decoder needs it."""
    if model_type == ENCODER_DECODER_TYPE and config is None:
        config = base_config(base_id)
    targets = settings.target_modules or default_targets or default_target_modules(model_type, config)
    if not isinstance(targets, str):
        targets = list(targets)
        if len(targets) == 1 and _is_regex(targets[0]):
            targets = targets[0]
    extra = dict(settings.extra)
    if "modules_to_save" not in extra:
        modules = default_modules_to_save(model_type, base_id, config)
        if modules:
            extra["modules_to_save"] = modules
    try:
        return LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=targets,
            bias=settings.bias,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
            task_type=task_type,  # a classifier's encoder: FEATURE_EXTRACTION
            base_model_name_or_path=base_id,
            **extra,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid LoRA settings (lora.*): {exc}") from None


def _is_regex(target: str) -> bool:
    """A target given as a regex (PEFT full-matches a string target against each module path)."""
    return any(c in target for c in "*()[]|\\^$?+")


class LexLoraModel(nn.Module):
    def __init__(
        self,
        peft_model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: AdapterSpec,
        fusion: LexicalFusion | None,
        encoder: LexicalEncoder | None = None,
        generation: GenerationSettings | None = None,
        max_source_length: int | None = None,
    ):
        super().__init__()
        if spec.fusion_enabled != (fusion is not None):
            raise ValueError("spec.fusion_mode and the fusion module must agree")
        self.peft_model = peft_model
        self.lexical_fusion = fusion
        self.tokenizer = tokenizer
        self.spec = spec
        # Embeds raw inputs for fusion in generate_text; None: loaded by spec.embedding_model on first use.
        self.lexical_encoder = encoder
        # generate_text's defaults: the adapter's own (its lexlora.json when loaded), else the config's.
        self.generation = generation or GenerationSettings()
        self.max_source_length = max_source_length or DataConfig.max_source_length
        self.pipeline = GenerationPipeline(tokenizer, self._encoder_for)

    # A label task's label set (lexlora.json `labels`, set when loaded): generate_text is constrained
    # to it by default. None: free text.
    labels: tuple[str, ...] | None = None
    # The PEFT adapter this model's LoRA is (a joint run's job views name theirs; lexlora.model.joint_lora).
    adapter_name: str = "default"

    @classmethod
    def create(
        cls,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        lora_config: LoraConfig,
        spec: AdapterSpec,
        encoder: LexicalEncoder | None = None,
        generation: GenerationSettings | None = None,
        max_source_length: int | None = None,
    ) -> "LexLoraModel":
        """A fresh adapter (LoRA B = 0, zero fusion): computes exactly what the base computes.

        An 8-bit / 4-bit base (model.quantization) gets PEFT's k-bit preparation first (frozen, its
        non-quantized half-precision weights upcast to fp32); gradient checkpointing is separate:
        `enable_gradient_checkpointing`."""
        peft_model, fusion = cls.wrap_base(base, lora_config, spec)
        return cls(peft_model, tokenizer, spec, fusion, encoder, generation, max_source_length)

    @staticmethod
    def wrap_base(base: PreTrainedModel, lora_config: LoraConfig, spec: AdapterSpec) -> tuple[PeftModel, LexicalFusion | None]:
        """The frozen base with PEFT's LoRA layers, and the zero fusion projection `spec` asks for."""
        if is_quantized(base):
            was_training = base.training
            prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
            base.train(was_training)
        base.requires_grad_(False)
        try:
            with warnings.catch_warnings():
                # PEFT reads the base's `is_gradient_checkpointing`, which transformers 5 deprecates
                # with a FutureWarning on every model built; nothing the user can act on.
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                peft_model = get_peft_model(base, lora_config)
        except ValueError as exc:  # e.g. target modules not found in the base
            raise ConfigError(f"could not add LoRA to {lora_config.base_model_name_or_path}: {exc}") from None
        fusion = None
        if spec.fusion_enabled:
            assert spec.embedding_dim is not None
            fusion = LexicalFusion(spec.embedding_dim, encoder_input_width(base), spec.fusion_mode or "add")
        return peft_model, fusion

    # ---- parameters -------------------------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model as it computes; tied weights counted once. A module
        trained in full (PEFT `modules_to_save`, e.g. a warm start's cross-attention) counts once: its
        trainable copy replaces the frozen original, which is left out of the total."""
        named = list(self.named_parameters())
        trainable = sum(p.numel() for _, p in named if p.requires_grad)
        total = sum(p.numel() for n, p in named if ".original_module." not in n)
        return trainable, total

    def own_modules(self) -> dict[str, nn.Module]:
        """The adapter's modules outside PEFT, by their key prefix in the weights file."""
        return {FUSION_PREFIX: self.lexical_fusion} if self.lexical_fusion is not None else {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights under PEFT's key names, plus the fusion projection under `lexical_fusion.`
        (and a classifier's head under its prefix: `own_modules`)."""
        state = dict(get_peft_model_state_dict(self.peft_model, adapter_name=self.adapter_name, save_embedding_layers=False))
        for prefix, module in self.own_modules().items():
            for key, value in module.state_dict().items():
                state[prefix + key] = value
        return state

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        own = self.own_modules()
        lora = {k: v for k, v in state.items() if not k.startswith(tuple(own) or (FUSION_PREFIX,))}
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise AdapterError(
                f"{source}: weights do not match the adapter config"
                + (f"; missing {len(missing)} (e.g. {missing[0]})" if missing else "")
                + (f"; unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "")
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AdapterError(
                    f"{source}: tensor {key} has shape {tuple(value.shape)}, the adapter config implies "
                    f"{tuple(expected[key].shape)} (rank or target modules differ from adapter_config.json?)"
                )
        set_peft_model_state_dict(self.peft_model, lora, adapter_name=self.adapter_name)
        for prefix, module in own.items():
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    @torch.no_grad()
    def round_trainables_(self, dtype: torch.dtype) -> None:
        """Round trainable weights through `dtype` in place (what saving in that dtype keeps)."""
        for param in self.parameters():
            if param.requires_grad and param.dtype != dtype:
                param.copy_(param.to(dtype).to(param.dtype))

    # ---- memory -------------------------------------------------------------------------------
    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model under PEFT's wrapper (the LoRA layers are injected into it)."""
        return self.peft_model.get_base_model()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the base recomputes its layers' activations in the backward pass (in training)."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules())

    # ---- forward / generate ------------------------------------------------------------------
    def encoder_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lexical_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the lexical vector fused in, and the (possibly extended) mask."""
        embeds = self.peft_model.get_input_embeddings()(input_ids)
        if self.lexical_fusion is None:
            return embeds, attention_mask
        if lexical_embeds is None:
            raise DataError("this adapter uses fusion: lexical_embeds are required")
        return self.lexical_fusion(embeds, attention_mask, lexical_embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        lexical_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, lexical_embeds)
        if self.training:
            # A training step never reuses the decoder's key/value cache; building it only costs
            # memory (and it cannot be kept under gradient checkpointing anyway).
            kwargs.setdefault("use_cache", False)
        if labels is None or self.base_model.config.model_type != ENCODER_DECODER_TYPE:
            return self.peft_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)
        with warnings.catch_warnings():
            # EncoderDecoderModel warns on every forward with labels that v4.12 changed how its loss is
            # computed, for models fine-tuned before then; lexlora's warm starts are new: nothing to do.
            warnings.filterwarnings("ignore", message="Version v4.12.0 introduces a better way", category=FutureWarning)
            return self.peft_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lexical_embeds: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Token ids; runs the encoder once on the fused embeddings and decodes from its outputs
        (greedy or beam: `num_beams`, `max_new_tokens`, ... are passed to transformers)."""
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, lexical_embeds)
        return generate_from_embeds(self.peft_model, embeds, mask, **generate_kwargs)

    # ---- raw records in, text out (the shared pipeline, lexlora.model.generation) -----------------
    @torch.no_grad()
    def generate_text(
        self,
        inputs: Sequence[str | Mapping[str, str]],
        batch_size: int = 32,
        max_source_length: int | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        constrain: bool | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One output per raw input (a string or a record of the adapter's fields). Settings not given
        are the model's defaults (`generation`, `max_source_length`).

        `constrain`: None (default) constrains the output to the adapter's label set when it records
        one (`labels`, an adapter trained on a label task), True requires it, False generates free
        text. Constrained outputs are always one of the labels (`generate_labels` also gives their
        scores); max_new_tokens and num_beams do not apply to them."""
        if resolve_constrain(constrain, self.labels, generate_kwargs):
            return [p.label for p in self.generate_labels(inputs, batch_size=batch_size, max_source_length=max_source_length)]
        plan = RowPlan(
            spec=self.spec,
            max_source_length=max_source_length or self.max_source_length,
            max_new_tokens=max_new_tokens or self.generation.max_new_tokens,
            num_beams=num_beams or self.generation.num_beams,
        )
        was_training = self.training
        self.eval()
        try:
            return self.pipeline.generate(self, [plan] * len(check_input_list(inputs)), inputs, batch_size=batch_size, **generate_kwargs)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate_labels(self, inputs: Sequence[str | Mapping[str, str]], batch_size: int = 32,
                        max_source_length: int | None = None) -> list[LabelPrediction]:
        """One `LabelPrediction` (label, scores: every label's probability) per raw input, scored
        over the adapter's label set (lexlora.model.label_scoring); AdapterError if it has none."""
        plan = RowPlan(spec=self.spec, max_source_length=max_source_length or self.max_source_length,
                       max_new_tokens=1, num_beams=1, labels=self.labels)
        was_training = self.training
        self.eval()
        try:
            return score_labels(self.pipeline, self, [plan] * len(check_input_list(inputs)), inputs, batch_size=batch_size)
        finally:
            self.train(was_training)

    def _encoder_for(self, model_id: str) -> LexicalEncoder:
        # The run's encoder when one was given (its cache and batch size), else one by id on first use.
        self.lexical_encoder = encoder_for_id(self.lexical_encoder, model_id, self.peft_model.device)
        return self.lexical_encoder

    # The generation Backend protocol: this model's own LoRA (PEFT) and fusion for every row.
    @property
    def seq2seq(self) -> PreTrainedModel:
        return self.peft_model

    @property
    def uses_fusion(self) -> bool:
        return self.lexical_fusion is not None

    def fused_inputs(self, plans, input_ids, attention_mask, lexical):
        vectors = torch.stack(list(lexical)).to(input_ids.device) if self.lexical_fusion is not None else None
        return self.encoder_inputs(input_ids, attention_mask, vectors)

    def routed(self, plans) -> AbstractContextManager:
        return nullcontext()


def enable_gradient_checkpointing(model: LexLoraModel) -> None:
    """Recompute the frozen base's layer activations in the backward pass instead of keeping them
    (train.gradient_checkpointing): less memory, about one more forward pass of time per step.

    Non-reentrant checkpointing (torch.utils.checkpoint with use_reentrant=False) gives LoRA weights
    inside a checkpointed layer their gradients even when the layer's input does not require grad
    (fusion off: the embeddings come from the frozen table); transformers also hooks the input
    embeddings to require grad, as the reentrant variant would need. The fusion projection sits
    before the first layer, outside any checkpoint. Only layers in training mode are checkpointed,
    so evaluation and generation are unchanged; `LexLoraModel.forward` passes use_cache=False in
    training, which checkpointing needs."""
    base = model.base_model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing=true: {type(base).__name__} does not support gradient checkpointing"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # newer transformers (the old name warns there)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not model.gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing=true: {type(base).__name__} has no checkpointed layers")


def disable_gradient_checkpointing(model: LexLoraModel) -> None:
    """Undo `enable_gradient_checkpointing` (keep every activation again)."""
    base = model.base_model
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()
    if hasattr(base, "disable_input_require_grads") and getattr(base, "_require_grads_hooks", None):
        base.disable_input_require_grads()
