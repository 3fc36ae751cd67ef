"""Several adapters trained at once on one frozen base (issue 19, after mLoRA / ASPEN): every job's
LoRA is a named PEFT adapter on the same `PeftModel`, and a `JobRouter` sends each row of a batch
through its own job's LoRA only. `JobModel` is one job's view of the shared model: a LexLoraModel
whose forward, generation and weights are that job's alone, so evaluation, publishing and the
adapter files are the solo code's. `JointModel` is what the optimizer steps train: one forward of
the rows of every active job, one loss per job over its own tokens.

PEFT's own mixed-adapter batches (`adapter_names=`) are refused in training mode and gather rows by
index; a joint batch keeps each job's rows contiguous, so the router adds each job's LoRA output to
its slice of rows. The frozen base, row-independent layers and disjoint parameters make each job's
gradients exactly those of its solo run (up to float rounding: the matmuls see other shapes)."""

from __future__ import annotations

import types
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from lexlora.errors import ConfigError
from lexlora.model.lora_model import LexLoraModel

ALL_ROWS = slice(None)


class JobRouter:
    """Which rows go through which job's LoRA: (adapter name, row slice) pairs, kept until the next
    call sets them (gradient checkpointing re-runs the forward during backward, and must see the
    same routing)."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, slice]] = []

    def only(self, name: str) -> None:
        self.segments = [(name, ALL_ROWS)]


def _routed_forward(layer: LoraLayer, router: JobRouter):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        pieces, covered = [], 0
        for name, rows in router.segments:
            if name not in self.lora_A:  # this job's LoRA does not target this layer
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            part = x[rows].to(lora_A.weight.dtype)
            delta = lora_B(lora_A(self.lora_dropout[name](part))) * self.scaling[name]
            if rows == ALL_ROWS:
                return (result + delta).to(dtype)
            # Same arithmetic as PEFT's Linear.forward, on this job's rows only.
            if rows.start > covered:
                pieces.append(result[covered : rows.start])
            pieces.append((result[rows] + delta).to(dtype))
            covered = rows.stop
        if not pieces:
            return result
        if covered < result.shape[0]:
            pieces.append(result[covered:])
        return torch.cat(pieces, dim=0)

    return types.MethodType(forward, layer)


def install_router(peft_model: PeftModel) -> JobRouter:
    """Route every LoRA layer of `peft_model` by a new JobRouter (refusing layers it cannot route)."""
    router = JobRouter()
    for path, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module).__name__ not in ("Linear", "Linear8bitLt", "Linear4bit") or any(module.use_dora.values()):
            raise ConfigError(
                f"joint training routes LoRA on linear layers only (no DoRA); {path} is a {type(module).__name__}"
                + (" with DoRA" if any(module.use_dora.values()) else "")
                + ": train this job on its own"
            )
        module.forward = _routed_forward(module, router)
    return router


class JobModel(LexLoraModel):
    """One job's view of the shared model: its LoRA (adapter `adapter_name`) and its own fusion. What
    a training run's evaluation, card samples and adapter files use, as they use a LexLoraModel."""

    router: JobRouter

    def use(self) -> None:
        self.router.only(self.adapter_name)

    def forward(self, *args: Any, **kwargs: Any):
        self.use()
        return super().forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        self.use()
        return super().generate(*args, **kwargs)

    def routed(self, plans):
        self.use()
        return super().routed(plans)

    def own_parameters(self) -> list[nn.Parameter]:
        """This job's LoRA and fusion parameters: the ones its optimizer steps."""
        marker = f".{self.adapter_name}."
        lora = [p for n, p in self.peft_model.named_parameters() if ".lora_" in n and marker in n]
        fusion = list(self.lexical_fusion.parameters()) if self.lexical_fusion is not None else []
        return lora + fusion

    def parameter_counts(self) -> tuple[int, int]:
        own = sum(p.numel() for p in self.own_parameters())
        base = sum(p.numel() for n, p in self.peft_model.named_parameters() if ".lora_" not in n)
        return own, base + own

    @torch.no_grad()
    def round_trainables_(self, dtype: torch.dtype) -> None:
        for param in self.own_parameters():
            if param.dtype != dtype:
                param.copy_(param.to(dtype).to(param.dtype))


class JointModel(nn.Module):
    """Every job's view over one PeftModel; `forward` trains them all on one batch."""

    def __init__(self, jobs: Sequence[JobModel]):
        super().__init__()
        self.peft_model = jobs[0].peft_model
        self.fusions = nn.ModuleList([job.lexical_fusion or nn.Identity() for job in jobs])  # registered once
        self.jobs = list(jobs)  # a plain list: not submodules again (their parameters are ours already)

    @property
    def base_model(self):
        return self.peft_model.get_base_model()

    def forward(self, indices: Sequence[int], batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One forward of every batch's rows together (batch i routed to job indices[i]); each job's
        loss is the mean cross-entropy over its own target tokens, as its solo run computes it.

        The encoder runs once over every row; the decoder once per group of jobs with similar target
        lengths (jobs' targets differ several-fold: one padded decoder call would mostly compute
        padding). Under gradient checkpointing everything is one call, since the layers recomputed
        in the backward pass must see the routing they saw in the forward."""
        order = sorted(range(len(batches)), key=lambda k: batches[k]["labels"].shape[1])
        views, batches = [self.jobs[indices[k]] for k in order], [batches[k] for k in order]
        fused = [view.encoder_inputs(b["input_ids"], b["attention_mask"], b.get("lexical_embeds")) for view, b in zip(views, batches)]
        width = max(embeds.shape[1] for embeds, _ in fused)
        # Padding past a row's own end is masked (encoder) or ignored (-100 labels; the decoder is
        # causal), so it changes no row's result.
        embeds = torch.cat([F.pad(e, (0, 0, 0, width - e.shape[1])) for e, _ in fused])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in fused])
        segments, start = [], 0
        for view, batch in zip(views, batches):
            rows = batch["labels"].shape[0]
            segments.append((view.adapter_name, slice(start, start + rows)))
            start += rows
        router = views[0].router
        router.segments = segments
        lengths = [b["labels"].shape[1] for b in batches]
        groups = [list(range(len(batches)))] if views[0].gradient_checkpointing else decoder_groups(lengths, [s.stop - s.start for _, s in segments])
        if len(groups) == 1:
            losses = self._decoded_losses(batches, segments, inputs_embeds=embeds, attention_mask=mask)
        else:
            encoded = self.base_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
            losses = []
            for group in groups:
                rows = slice(segments[group[0]][1].start, segments[group[-1]][1].stop)
                local = [(name, slice(s.start - rows.start, s.stop - rows.start)) for name, s in (segments[k] for k in group)]
                router.segments = local
                losses += self._decoded_losses([batches[k] for k in group], local, attention_mask=mask[rows],
                                               encoder_outputs=(encoded.last_hidden_state[rows],))
        in_order = [None] * len(losses)
        for position, k in enumerate(order):
            in_order[k] = losses[position]
        return in_order

    def _decoded_losses(self, batches, segments, **inputs) -> list[torch.Tensor]:
        """Each segment's loss from one decoder call over `batches` (their labels padded together)."""
        target = max(b["labels"].shape[1] for b in batches)
        labels = torch.cat([F.pad(b["labels"], (0, target - b["labels"].shape[1]), value=-100) for b in batches])
        decoder_input_ids = self.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
        scored = labels != -100
        # The output projection only at the target tokens (the largest per-token cost).
        hook = self.base_model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][scored], *args[1:]))
        try:
            logits = self.peft_model(decoder_input_ids=decoder_input_ids, use_cache=False, **inputs).logits
        finally:
            hook.remove()
        if logits.dim() != 2:
            raise ConfigError(f"joint training: {type(self.base_model).__name__} reshapes its logits; train its jobs on their own")
        targets, losses, start = labels[scored], [], 0
        per_row = scored.sum(dim=1).tolist()  # one host sync (the boolean selection above needs one anyway)
        for _, rows in segments:
            count = sum(per_row[rows])
            losses.append(F.cross_entropy(logits[start : start + count], targets[start : start + count]))
            start += count
        return losses

    # The checkpoint hooks (lexlora.training.checkpoints) save and load these: every job's trainables.
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}/{key}": value for i, job in enumerate(self.jobs) for key, value in job.trainable_state_dict().items()}

    def load_trainable_state_dict(self, state, source: str = "state dict") -> None:
        for i, job in enumerate(self.jobs):
            prefix = f"{i}/"
            job.load_trainable_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, source)



def decoder_groups(lengths: Sequence[int], rows: Sequence[int], slack: float = 1.25) -> list[list[int]]:
    """Consecutive jobs (sorted by target length) merged into one decoder call while its padded
    tokens stay within `slack` times their own: fewer, larger calls without much padding."""
    groups = [[0]]
    for k in range(1, len(lengths)):
        group = groups[-1] + [k]
        padded = sum(rows[j] for j in group) * lengths[k]
        if padded <= slack * sum(rows[j] * lengths[j] for j in group):
            groups[-1] = group
        else:
            groups.append([k])
    return groups
