"""One frozen base in memory, many adapters loaded under names: switch per dataset, or mix adapters
row by row in one `generate` call.

    model = LexLoRA.from_pretrained("google/flan-t5-small")
    model.load_adapter("adapters/file-description", name="desc")
    model.load_adapter("adapters/file-type", name="type")
    model.generate(["backup_config.json"], adapter="desc")
    model.generate(["a.py", "b.md"], adapter=["desc", "type"])      # mixed-adapter batch

Each adapter brings its LoRA weights (see `lexlora.routing`), its fusion projection (own mode and
dims), prompt template, fields and generation defaults. Nothing is changed by a refused load.

Classifier-head adapters (model.task=classification) live on a base loaded as its encoder alone:

    model = LexLoRA.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", task="classification")
    model.load_adapter("adapters/file-type-classifier", name="type")
    model.classify(["backup.sh", "notes.md"], adapter="type")   # [LabelPrediction(label, scores), ...]

Each row gets its own LoRA, fusion and head (lexlora.serving.heads), so such adapters mix in one batch
too; a base hosts one kind, and loading the other kind is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lexlora.adapters.files import (
    AdapterFiles,
    base_config_from_metadata,
    classifier_spec,
    read_adapter_dir,
)
from lexlora.adapters.fingerprint import check_fingerprint, fingerprint
from lexlora.adapters.format import read_metadata
from lexlora.config import ModelConfig
from lexlora.data.embeddings import LexicalEncoder
from lexlora.errors import AdapterError, DataError
from lexlora.model.fusion import FUSION_PREFIX, encoder_input_width, fuse
from lexlora.model.generation import GenerationPipeline, RowPlan, check_input_list
from lexlora.model.label_scoring import LabelPrediction, generate_or_score, resolve_constrain, score_labels
from lexlora.model.loading import load_base_model, load_tokenizer
from lexlora.model.classifier import classify
from lexlora.model.encoders import hidden_width
from lexlora.serving.heads import build_head, head_logits, split_head
from lexlora.serving.loaded import ADAPTER_NAME, HUB_NAME, MAX_ADAPTER_NAME, LoadedAdapter, check_adapter_name
from lexlora.serving.routing import LoraRouter, LoraWeights

__all__ = ["ADAPTER_NAME", "HUB_NAME", "MAX_ADAPTER_NAME", "LexLoRA", "LoadedAdapter", "check_adapter_name"]

class LexLoRA:
    """A frozen seq2seq base with a registry of named adapters."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_config: ModelConfig):
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.tokenizer = tokenizer
        self.base_config = base_config
        self.base_fingerprint = fingerprint(base, base_config)  # the base is frozen: computed once
        self.router = LoraRouter(base)
        self._adapters: dict[str, LoadedAdapter] = {}
        self._encoders: dict[str, LexicalEncoder] = {}
        self.pipeline = GenerationPipeline(tokenizer, self.encoder_for)
        self.active_adapter: str | None = None
        self._disabled = False
        # None: lexical vectors cached on disk (lexlora.data.embeddings); a number: that many kept in
        # memory only, as a server sets it (every request brings texts never seen before).
        self.lexical_cache_entries: int | None = None

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        random_init: bool = False,
        init_seed: int = 0,
        config_overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        task: str = "seq2seq",
    ) -> "LexLoRA":
        """Load the base once (by id or path, as transformers does). task="classification" loads its
        encoder alone, for classifier-head adapters (a base serves one kind)."""
        config = ModelConfig(
            name_or_path=name_or_path, random_init=random_init, init_seed=init_seed,
            config_overrides=dict(config_overrides or {}), task=task,
        )
        return cls.from_config(config, device=device)

    @classmethod
    def from_config(cls, config: ModelConfig, device: str | torch.device | None = None) -> "LexLoRA":
        base = load_base_model(config)
        if device is not None:
            base.to(device)
        return cls(base, load_tokenizer(config), config)

    @classmethod
    def for_adapter(cls, adapter_dir: str | Path, device: str | torch.device | None = None) -> "LexLoRA":
        """The base an adapter was trained on, as recorded in its metadata (nothing loaded yet)."""
        return cls.from_config(base_config_from_metadata(read_metadata(adapter_dir)), device=device)

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    # ---- the registry ----------------------------------------------------------------------------
    def load_adapter(
        self, adapter_dir: str | Path, name: str | None = None, *, replace: bool = False, allow_pickle: bool = False
    ) -> LoadedAdapter:
        """Load an adapter dir under `name` (default: the dir's name). Refuses, leaving the registry as
        it was, a name already loaded (unless `replace`), an incomplete or corrupted dir, or an
        adapter trained on another base. A pickle adapter_model.bin is read only with `allow_pickle`
        (tensors only, as load_adapter)."""
        name = name if name is not None else Path(adapter_dir).name
        check_adapter_name(name)
        if name in self._adapters and not replace:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pass replace=True")
        return self.install(self.build_adapter(adapter_dir, name, allow_pickle=allow_pickle), replace=replace)

    def build_adapter(self, adapter_dir: str | Path, name: str, *, allow_pickle: bool = False) -> LoadedAdapter:
        """Read, check and build an adapter for this base without installing it: the slow part of a
        load (file reads, checksums, tensors), which an adapter store runs off the serving loop."""
        check_adapter_name(name, hub=True)
        adapter_dir = Path(adapter_dir)
        files = read_adapter_dir(adapter_dir, allow_pickle)
        check_fingerprint(files.meta.base, self.base_fingerprint, str(adapter_dir))
        return self._build(name, files)

    def install(self, loaded: LoadedAdapter, *, replace: bool = False) -> LoadedAdapter:
        """Make a built adapter servable under its name (replacing the one of that name with `replace`)."""
        old = self._adapters.get(loaded.name)
        if old is not None and not replace:
            raise AdapterError(f"an adapter named {loaded.name!r} is already loaded; unload it first or pass replace=True")
        self.router.attach(loaded.lora)
        if old is not None:
            self.router.detach(old.lora)
        self._adapters[loaded.name] = loaded
        if self.active_adapter is None:
            self.active_adapter = loaded.name
        return loaded

    def _build(self, name: str, files: AdapterFiles) -> LoadedAdapter:
        source = str(files.weights_path)
        head_state, state = split_head(files.state)
        classifier = classifier_spec(files.meta, str(files.path))
        head = None
        if classifier is not None:
            head = build_head(head_state, classifier, hidden_width(self.base), source, self.device)
        lora_state = {k: v for k, v in state.items() if not k.startswith(FUSION_PREFIX)}
        lora = LoraWeights.from_peft_state(lora_state, files.lora_config, self.base, source, device=self.device,
                                           modules=self.router.modules)
        fusion = {k[len(FUSION_PREFIX):]: v for k, v in files.state.items() if k.startswith(FUSION_PREFIX)}
        spec = files.spec
        if spec.fusion_enabled:
            model_dim = encoder_input_width(self.base)
            weight, bias = fusion.get("proj.weight"), fusion.get("proj.bias")
            expected = (model_dim, spec.embedding_dim)
            if weight is None or bias is None or tuple(weight.shape) != expected or tuple(bias.shape) != (model_dim,):
                raise AdapterError(
                    f"{source}: the fusion projection must be proj.weight {expected} and proj.bias ({model_dim},) "
                    f"for this base and embedding_dim {spec.embedding_dim}"
                )
            fusion = {k: v.to(self.device) for k, v in fusion.items()}
        return LoadedAdapter(
            name=name, path=files.path, spec=spec, metadata=files.meta, lora=lora, fusion=fusion,
            file_bytes=files.weights_bytes, head=head,
        )

    def delete_adapter(self, name: str) -> None:
        """Unload an adapter; its memory is freed once no call is using it."""
        loaded = self._get(name)
        loaded.unloaded = True
        self.router.detach(loaded.lora)
        del self._adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self._adapters), None)

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter `generate` uses when none is given."""
        self._get(name)
        self.active_adapter = name

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        """The loaded adapters by name (a copy: changing it changes nothing)."""
        return dict(self._adapters)

    def list_adapters(self) -> list[dict[str, Any]]:
        return [a.describe() for a in list(self._adapters.values())]

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def _get(self, name: str) -> LoadedAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            loaded = ", ".join(sorted(self._adapters)) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})") from None

    def encoder_for(self, model_id: str) -> LexicalEncoder:
        """One embedding model (and cache) per id, shared by the adapters that use it."""
        if model_id not in self._encoders:
            self._encoders[model_id] = LexicalEncoder(model_id, device=self.device, memory_only=self.lexical_cache_entries)
        return self._encoders[model_id]

    # ---- generation (lexlora.model.generation; this registry is its Backend) -----------------------
    @torch.no_grad()
    def generate(
        self,
        inputs: Sequence[str | Mapping[str, str]],
        adapter: str | Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        constrain: bool | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One output per input. `adapter` is a name for all rows, a name per row (a mixed-adapter
        batch), or None for the active adapter. Each row is formatted by its adapter's template; rows
        whose adapters' generation defaults differ run in separate batches, so a row's output is the
        same as when its adapter runs alone.

        `constrain`: None (default) constrains the rows of adapters that record a label set (trained
        on a label task) to it: their output is always one of the labels (`generate_labels` also
        gives the scores); True requires a label set of every row's adapter; False decodes free text."""
        rows = self._row_adapters(inputs, adapter)
        if self.classifies:  # a classifier's output is always one of its labels
            if constrain is False:
                raise AdapterError("classifier-head adapters always predict one of their labels; constrain=False "
                                   "applies to seq2seq adapters only")
            return [p.label for p in self.predict_labels([a.plan() for a in rows], inputs, batch_size=batch_size)]
        decided = {a.name: resolve_constrain(constrain, a.labels, generate_kwargs, a.name) for a in rows}
        return generate_or_score(self.pipeline, self, [a.plan(max_new_tokens, num_beams) for a in rows], inputs,
                                 [decided[a.name] for a in rows], batch_size=batch_size, **generate_kwargs)

    @torch.no_grad()
    def generate_labels(self, inputs: Sequence[str | Mapping[str, str]], adapter: str | Sequence[str] | None = None,
                        *, batch_size: int = 32) -> list[LabelPrediction]:
        """One `LabelPrediction` (`label`, `scores`: each label's probability, summing to 1) per input,
        each scored over its adapter's label set (`adapter` as in `generate`, mixed batches too);
        AdapterError for an adapter without one. Classifier-head adapters give their head's
        probabilities (each row through its own LoRA, fusion and head)."""
        plans = [a.plan() for a in self._row_adapters(inputs, adapter)]
        return self.predict_labels(plans, inputs, batch_size=batch_size)

    classify = generate_labels  # the name a classifier's user looks for

    def predict_labels(self, plans: Sequence[RowPlan], inputs: Sequence[str | Mapping[str, str]], *,
                       batch_size: int = 32) -> list[LabelPrediction]:
        """`generate_labels` for rows already planned (the server's path): the heads of a classifier
        base, else every label of each row's set scored by the decoder."""
        if self.classifies:
            return classify(self.pipeline, self, plans, inputs, batch_size=batch_size)
        return score_labels(self.pipeline, self, plans, inputs, batch_size=batch_size)

    @property
    def classifies(self) -> bool:
        """Whether the base is an encoder for classifier-head adapters (model.task=classification)."""
        return self.base_config.task == "classification"

    # The ClassifierBackend protocol (lexlora.model.classifier): the encoder once, then each row's head.
    def encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.base(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state

    def head_logits(self, plans: Sequence[RowPlan], states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return head_logits([None if self._disabled else p.adapter.head for p in plans], states, mask)

    def _row_adapters(self, inputs: Sequence[str | Mapping[str, str]], adapter: str | Sequence[str] | None) -> list[LoadedAdapter]:
        """Each input's adapter."""
        count = len(check_input_list(inputs))
        if adapter is None:
            if self.active_adapter is None:
                raise AdapterError("no adapter is loaded; load one with load_adapter() first")
            names = [self.active_adapter] * count
        elif isinstance(adapter, str):
            names = [adapter] * count
        else:
            names = list(adapter)
            if len(names) != count:
                raise DataError(f"got {count} inputs but {len(names)} adapter names; give one name per input")
        return [self._get(n) for n in names]

    @torch.no_grad()
    def forward(
        self,
        inputs: Sequence[str | Mapping[str, str]],
        adapter: str | Sequence[str] | None = None,
        *,
        targets: Sequence[str] | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ):
        """The base's forward output (logits; loss when `targets` are given) with each row through its
        adapter: what `generate` decodes from, for scoring and checks."""
        plans = [a.plan() for a in self._row_adapters(inputs, adapter)]
        records = self.pipeline.records(plans, inputs)
        embeds, mask = self.pipeline.encoder_inputs(self, plans, records, self.pipeline.lexical(self, plans, records))
        labels = None
        if targets is not None:
            labels = self.tokenizer(text_target=list(targets), return_tensors="pt", padding=True)["input_ids"]
            labels[labels == self.tokenizer.pad_token_id] = -100
            labels = labels.to(self.device)
        with self.routed(plans):
            return self.base(
                inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_input_ids=decoder_input_ids,
            )

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within this block every row runs on the base alone (no LoRA, no fusion) but is still
        formatted by its adapter's template and generation defaults: the base-vs-adapter comparison
        on the same prompts (like PEFT's `disable_adapter()`)."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @property
    def seq2seq(self) -> PreTrainedModel:
        return self.base

    @property
    def uses_fusion(self) -> bool:
        return not self._disabled  # the base alone uses no fusion: nothing to embed

    def routed(self, plans: Sequence[RowPlan]):
        return self.router.route([None if self._disabled else p.adapter.lora for p in plans])

    def fused_inputs(
        self,
        plans: Sequence[RowPlan],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lexical: Sequence[torch.Tensor | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with each row's own fusion; rows whose mode adds no position get a masked
        pad position at the end when others in the batch are prefixed."""
        embeds = self.base.get_input_embeddings()(input_ids)
        if self._disabled:
            return embeds, attention_mask
        groups: dict[str, list[int]] = {}
        for row, plan in enumerate(plans):
            groups.setdefault(plan.adapter.name, []).append(row)
        parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        for rows in groups.values():
            loaded = plans[rows[0]].adapter
            index = torch.tensor(rows, device=embeds.device)
            part_embeds, part_mask = embeds.index_select(0, index), attention_mask.index_select(0, index)
            if loaded.spec.fusion_enabled:
                weight = loaded.fusion["proj.weight"].to(embeds.dtype)
                bias = loaded.fusion["proj.bias"].to(embeds.dtype)
                vectors = torch.stack([lexical[i] for i in rows]).to(embeds.device)
                part_embeds, part_mask = fuse(loaded.spec.fusion_mode, weight, bias, part_embeds, part_mask, vectors)
            parts.append((rows, part_embeds, part_mask))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        length = max(p[1].shape[1] for p in parts)
        out_embeds = embeds.new_zeros(embeds.shape[0], length, embeds.shape[2])
        out_mask = attention_mask.new_zeros(attention_mask.shape[0], length)
        for rows, part_embeds, part_mask in parts:
            index = torch.tensor(rows, device=embeds.device)
            out_embeds[index, : part_embeds.shape[1]] = part_embeds
            out_mask[index, : part_mask.shape[1]] = part_mask
        return out_embeds, out_mask
