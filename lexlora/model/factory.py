"""The one place a fresh LoRA + fusion model is put together: PEFT's LoraConfig for the base's
family, `LexLoraModel.create`, and gradient checkpointing when asked. Training builds its model
here (`model_for_run`: the spec from the config and the prepared data); benchmarks and tests
build theirs with `build_model` from explicit parts."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lexlora.config import ClassifierConfig, Config, GenerationSettings, LoraSettings
from lexlora.data.spec import AdapterSpec
from lexlora.model.lora_model import (
    LexLoraModel,
    build_lora_config,
    enable_gradient_checkpointing,
)

if TYPE_CHECKING:
    from lexlora.data.embeddings import LexicalEncoder
    from lexlora.model.classifier import LexClassifierModel
    from lexlora.data.prepare import PreparedData
    from lexlora.model.joint_lora import JointModel


def build_model(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: AdapterSpec,
    lora: LoraSettings,
    *,
    base_id: str,
    encoder: "LexicalEncoder | None" = None,
    gradient_checkpointing: bool = False,
    generation: GenerationSettings | None = None,
    max_source_length: int | None = None,
) -> LexLoraModel:
    """A fresh adapter on `base` (computing exactly what the base computes until trained): LoRA from
    `lora` on the family's default targets unless lora.target_modules says otherwise, the fusion
    projection `spec` asks for, and `encoder` to embed raw inputs for fusion at generation
    (`generation` and `max_source_length`: generate_text's defaults). `base_id` is the base's
    model.name_or_path (recorded in adapter_config.json). LoRA's initial weights are drawn from
    torch's global RNG: seed it first for a reproducible model."""
    lora_config = build_lora_config(lora, base.config.model_type, base_id, base.config)
    model = LexLoraModel.create(
        base, tokenizer, lora_config, spec, encoder=encoder, generation=generation, max_source_length=max_source_length
    )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def build_classifier(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: AdapterSpec,
    lora: LoraSettings,
    labels: tuple[str, ...] | list[str],
    *,
    base_id: str,
    classifier: ClassifierConfig | None = None,
    encoder: "LexicalEncoder | None" = None,
    class_weights: "torch.Tensor | None" = None,
    gradient_checkpointing: bool = False,
    max_source_length: int | None = None,
) -> "LexClassifierModel":
    """A fresh classifier adapter on an encoder base (`lexlora.model.encoders.load_encoder_base`):
    LoRA on the encoder's attention (every self-attention projection of a BERT-like encoder), the
    fusion projection `spec` asks for, and a new head over `labels` (sorted: id = index). LoRA and the
    head are initialised from torch's global RNG: seed it first for a reproducible model."""
    from lexlora.model.classifier import ClassifierSpec, LexClassifierModel
    from lexlora.model.encoders import encoder_target_modules

    classifier = classifier or ClassifierConfig()
    model_type = base.config.model_type
    lora_config = build_lora_config(lora, model_type, base_id, base.config, task_type="FEATURE_EXTRACTION",
                                    default_targets=encoder_target_modules(model_type))
    model = LexClassifierModel.create_classifier(
        base, tokenizer, lora_config, spec, ClassifierSpec(tuple(labels), classifier.pooling),
        dropout=classifier.dropout, encoder=encoder, max_source_length=max_source_length, class_weights=class_weights,
    )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def run_spec(cfg: Config, data: "PreparedData") -> AdapterSpec:
    """The adapter spec of a training run: the prompt and fields from data.*, fusion from fusion.*,
    the lexical field and embedding width from the prepared data."""
    return AdapterSpec(
        input_template=cfg.data.input_template,
        target_field=cfg.data.target_field,
        lexical_field=data.lexical_field,
        fusion_mode=cfg.fusion.mode if cfg.fusion.enabled else None,
        embedding_model=cfg.fusion.embedding_model if cfg.fusion.enabled else None,
        embedding_dim=data.embedding_dim,
    )


def model_for_run(cfg: Config, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: "PreparedData") -> LexLoraModel:
    """`build_model` as a training run configures it (lora.*, train.gradient_checkpointing, the
    run's lexical encoder, generation.* and data.max_source_length); `build_classifier` for
    model.task=classification (classifier.*, the data's labels and class weights). The new weights
    are drawn from train.seed alone, whatever ran before: a job of a joint run starts exactly as its
    solo run does."""
    with seeded(cfg.train.seed):
        return _model_for_run(cfg, base, tokenizer, data)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's RNGs (CPU and CUDA) seeded with `seed` inside, and as they were after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _model_for_run(cfg: Config, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: "PreparedData") -> LexLoraModel:
    if cfg.classifies:
        assert data.labels is not None, "a classification run's data carries its labels"
        return build_classifier(
            base, tokenizer, run_spec(cfg, data), cfg.lora, data.labels.labels, base_id=cfg.model.name_or_path,
            classifier=cfg.classifier, encoder=data.encoder, class_weights=data.class_weights,
            gradient_checkpointing=cfg.train.gradient_checkpointing, max_source_length=cfg.data.max_source_length,
        )
    return build_model(
        base, tokenizer, run_spec(cfg, data), cfg.lora,
        base_id=cfg.model.name_or_path, encoder=data.encoder, gradient_checkpointing=cfg.train.gradient_checkpointing,
        generation=cfg.generation, max_source_length=cfg.data.max_source_length,
    )


def joint_model_for_run(jobs: "list[tuple[Config, PreparedData]]", base: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase) -> "JointModel":
    """Every job's fresh LoRA + fusion on one `base` (lexlora.model.joint_lora): job 0's as its solo
    run builds it, the others as named PEFT adapters beside it, each drawn from its own train.seed."""
    from lexlora.model.fusion import LexicalFusion, encoder_input_width
    from lexlora.model.joint_lora import JobModel, JointModel, install_router

    views = []
    for index, (cfg, data) in enumerate(jobs):
        if index == 0:
            first = model_for_run(cfg, base, tokenizer, data)
            peft_model, fusion = first.peft_model, first.lexical_fusion
        else:
            spec = run_spec(cfg, data)
            lora_config = build_lora_config(cfg.lora, base.config.model_type, cfg.model.name_or_path, base.config)
            with seeded(cfg.train.seed):
                peft_model.add_adapter(f"job{index}", lora_config)
            fusion = LexicalFusion(spec.embedding_dim, encoder_input_width(base), spec.fusion_mode) if spec.fusion_enabled else None
            if fusion is not None:
                fusion.to(peft_model.device)
        view = JobModel(peft_model, tokenizer, run_spec(cfg, data), fusion, data.encoder, cfg.generation,
                        cfg.data.max_source_length)
        view.adapter_name = "default" if index == 0 else f"job{index}"
        views.append(view)
    router = install_router(peft_model)
    for view in views:
        view.router = router
        for param in view.own_parameters():  # PEFT leaves only the active adapter trainable
            param.requires_grad_(True)
    return JointModel(views)
