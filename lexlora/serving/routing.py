"""Many LoRA adapters on one frozen base, applied per row through forward hooks.

PEFT keeps every adapter as modules inside every LoRA layer, and its `load_adapter` / `set_adapter`
walk all modules of the model, so their cost grows with the number of adapters loaded (measured on
flan-t5-small: load 150 ms with 1 adapter, ~1 s with 50; set_adapter 88 ms with 51). Here an adapter
is a dict of (A, B) tensors per targeted Linear, a hook on each targeted Linear adds
`B(A(x)) * scaling` (the arithmetic of PEFT's LoRA Linear at inference), and which adapter a row uses is decided
per call: loading touches only the new adapter's tensors and switching touches nothing.

Modules an adapter trains in full (PEFT `modules_to_save`, e.g. a warm-started encoder-decoder's
cross-attention) are routed the same way when they are made of Linear and LayerNorm layers: a hook on
each such layer recomputes its output with the adapter's own weights for that adapter's rows. Other
full modules, DoRA, LoRA bias and per-module rank/alpha patterns are refused (load those with
`lexlora.adapters.load_adapter`, which goes through PEFT).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

from lexlora.adapters.format import PEFT_PREFIX, saved_module_matches
from lexlora.errors import AdapterError

# LoraConfig fields whose non-default values this path cannot reproduce.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out",
}


@dataclass
class LoraDelta:
    """One targeted Linear's low-rank update, kept in the dtype it was saved in."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float


@dataclass
class ModuleWeights:
    """A Linear or LayerNorm the adapter trained in full (modules_to_save): its weights replace the
    base's for the adapter's rows."""

    kind: str  # "linear" or "layer_norm"
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.bias.nbytes if self.bias is not None else 0)


class LoraWeights:
    """One adapter's LoRA deltas, keyed by the base module path they apply to, and the layers it
    replaces in full (modules_to_save), keyed likewise."""

    def __init__(self, deltas: dict[str, LoraDelta], modules: dict[str, ModuleWeights] | None = None):
        self.deltas = deltas
        self.modules = modules or {}

    @property
    def paths(self) -> set[str]:
        return set(self.deltas) | set(self.modules)

    @property
    def nbytes(self) -> int:
        return sum(d.A.nbytes + d.B.nbytes for d in self.deltas.values()) + sum(m.nbytes for m in self.modules.values())

    @classmethod
    def from_peft_state(
        cls,
        state: Mapping[str, torch.Tensor],
        config: LoraConfig,
        base: nn.Module,
        source: str,
        device: torch.device | str | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> "LoraWeights":
        """Build from PEFT's saved keys (`base_model.model.<path>.lora_{A,B}.weight`), checking every
        path names a Linear of `base` and every shape fits it. `modules` is `base.named_modules()` as a
        dict, when the caller keeps one (walking the model costs more than the rest of a load)."""
        for field, what in UNSUPPORTED.items():
            if getattr(config, field, None):
                raise AdapterError(
                    f"{source}: adapters with {what} cannot be hot-swapped; load this one on its own "
                    "with lexlora.adapters.load_adapter (or `lexlora generate`)"
                )
        scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        saved_roots = list(getattr(config, "modules_to_save", None) or [])
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        full: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            path, dot, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if key.startswith(PEFT_PREFIX) and dot and kind in ("A.weight", "B.weight"):
                pairs.setdefault(path, {})[kind[0]] = tensor
                continue
            module_path, _, param = key.removeprefix(PEFT_PREFIX).rpartition(".")
            if key.startswith(PEFT_PREFIX) and saved_roots and _under_saved_root(module_path, saved_roots):
                full.setdefault(module_path, {})[param] = tensor
                continue
            raise AdapterError(f"{source}: unexpected tensor {key} (not a plain LoRA A/B weight)")
        if not pairs and not full:
            raise AdapterError(f"{source}: no LoRA weights found")
        modules = modules if modules is not None else dict(base.named_modules())
        deltas = {}
        for path, pair in pairs.items():
            module = modules.get(path)
            if not isinstance(module, nn.Linear):
                raise AdapterError(f"{source}: LoRA weights for {path}, which is not a Linear layer of the base")
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{source}: {path} has lora_{''.join(pair)} but not both lora_A and lora_B")
            A, B = pair["A"], pair["B"]
            expected = ((config.r, module.in_features), (module.out_features, config.r))
            if (tuple(A.shape), tuple(B.shape)) != expected:
                raise AdapterError(
                    f"{source}: {path} lora_A/lora_B have shapes {tuple(A.shape)}/{tuple(B.shape)}; "
                    f"rank {config.r} on this base needs {expected[0]}/{expected[1]}"
                )
            device_ = torch.device(device) if device is not None else module.weight.device
            if A.device != device_:  # each torch call hands the GIL over: none when it would copy nothing
                A, B = A.to(device_), B.to(device_)
            deltas[path] = LoraDelta(A, B, scaling)
        replaced = {path: _module_weights(path, params, modules.get(path), source, device) for path, params in full.items()}
        for path in deltas:
            if any(path == other or path.startswith(other + ".") for other in replaced):
                raise AdapterError(f"{source}: {path} has LoRA weights inside a module the adapter trains in full")
        _check_complete(replaced, saved_roots, modules, source)
        return cls(deltas, replaced)


def _under_saved_root(module_path: str, roots: Sequence[str]) -> bool:
    """Whether a module path lies inside a module matched by modules_to_save."""
    parts = module_path.split(".")
    return any(saved_module_matches(".".join(parts[:i]), root) for root in roots for i in range(1, len(parts) + 1))


def _module_weights(path: str, params: dict[str, torch.Tensor], module: nn.Module | None, source: str,
                    device: torch.device | str | None) -> ModuleWeights:
    if isinstance(module, nn.Linear):
        kind = "linear"
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        kind = "layer_norm"
    else:
        what = type(module).__name__ if module is not None else "no module of the base"
        raise AdapterError(
            f"{source}: the adapter trains {path} in full ({what}); only Linear and LayerNorm layers can be "
            "hot-swapped. Load this adapter on its own with lexlora.adapters.load_adapter (or `lexlora generate`)"
        )
    expected = {name: tuple(p.shape) for name, p in module.named_parameters(recurse=False)}
    got = {name: tuple(t.shape) for name, t in params.items()}
    if got != expected:
        raise AdapterError(f"{source}: {path} is saved with {got}; this base's {type(module).__name__} has {expected}")
    device_ = device if device is not None else module.weight.device
    bias = params.get("bias")
    return ModuleWeights(kind, params["weight"].to(device_), bias.to(device_) if bias is not None else None)


def _check_complete(replaced: dict[str, ModuleWeights], roots: Sequence[str], modules: dict[str, nn.Module], source: str) -> None:
    """Every parameter-holding layer inside a module trained in full must come with the adapter."""
    if not roots:
        return
    for path, module in modules.items():
        if not path or not _under_saved_root(path, roots) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if path not in replaced:
            raise AdapterError(
                f"{source}: the adapter trains the modules {list(roots)} in full but has no weights for {path}"
            )


class Route:
    """Which adapter each row of the current call uses.

    One adapter for all rows: `output + B(A(x)) * scaling`, as PEFT computes it. Several: the rows'
    adapters are concatenated along the rank dimension, `h = x @ A_cat.T`, each row keeps only its
    own adapter's columns (a 0/scaling mask), and `output + h @ B_cat.T`: two matmuls per layer
    whatever the number of adapters, instead of one pair per adapter. Weights are cast to the compute
    dtype once per call, not per decoding step. Decoder layers see each row repeated (beams), so masks
    are expanded to whatever batch size arrives."""

    def __init__(self, rows: Sequence[LoraWeights | None]):
        self.rows = list(rows)
        self.adapters = list({id(w): w for w in self.rows if w is not None}.values())
        self.single = self.adapters[0] if len(self.adapters) == 1 and None not in self.rows else None
        self._weights: dict[str, tuple[torch.Tensor, torch.Tensor, list[LoraWeights]] | None] = {}
        self._masks: dict[tuple[str, int], torch.Tensor] = {}
        self._replaced: dict[str, list] = {}
        self._row_masks: dict[tuple[int, int, int], torch.Tensor] = {}

    def _stacked(self, path: str, like: torch.Tensor):
        if path not in self._weights:
            users = [w for w in self.adapters if path in w.deltas]
            if not users:
                self._weights[path] = None
            else:
                deltas = [w.deltas[path] for w in users]
                A = torch.cat([d.A for d in deltas]).to(like.device, like.dtype)
                B = torch.cat([d.B for d in deltas], dim=1).to(like.device, like.dtype)
                self._weights[path] = (A, B, users)
        return self._weights[path]

    def _mask(self, path: str, batch: int, users: list[LoraWeights], like: torch.Tensor) -> torch.Tensor:
        key = (path, batch)
        if key not in self._masks:
            if batch % len(self.rows):
                raise RuntimeError(f"a layer saw {batch} rows for a call of {len(self.rows)}")
            repeat = batch // len(self.rows)
            columns, start = {}, 0
            for weights in users:
                rank = weights.deltas[path].A.shape[0]
                columns[id(weights)] = (start, start + rank, weights.deltas[path].scaling)
                start += rank
            mask = torch.zeros(len(self.rows), start, dtype=like.dtype)
            for row, weights in enumerate(self.rows):
                if weights is not None and id(weights) in columns:
                    first, last, scaling = columns[id(weights)]
                    mask[row, first:last] = scaling
            self._masks[key] = mask.repeat_interleave(repeat, dim=0).unsqueeze(1).to(like.device)
        return self._masks[key]

    def replace(self, path: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The output of a layer that some of this call's adapters trained in full: their rows get it
        recomputed with their own weights, the other rows keep the base's."""
        users = [w for w in self.adapters if path in w.modules]
        if not users:
            return output
        if path not in self._replaced:
            self._replaced[path] = [
                (w, w.modules[path].weight.to(x.device, x.dtype),
                 w.modules[path].bias.to(x.device, x.dtype) if w.modules[path].bias is not None else None)
                for w in users
            ]
        for weights, weight, bias in self._replaced[path]:
            if weights.modules[path].kind == "linear":
                new = F.linear(x, weight, bias)
            else:
                new = F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
            if self.single is weights:
                return new
            output = torch.where(self._rows_of(weights, x.shape[0], x.dim(), x.device), new, output)
        return output

    def _rows_of(self, weights: LoraWeights, batch: int, dims: int, device: torch.device) -> torch.Tensor:
        key = (id(weights), batch, dims)
        if key not in self._row_masks:
            if batch % len(self.rows):
                raise RuntimeError(f"a layer saw {batch} rows for a call of {len(self.rows)}")
            mask = torch.tensor([w is weights for w in self.rows]).repeat_interleave(batch // len(self.rows))
            self._row_masks[key] = mask.view(batch, *([1] * (dims - 1))).to(device)
        return self._row_masks[key]

    def apply(self, path: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        stacked = self._stacked(path, x)
        if stacked is None:
            return output
        A, B, users = stacked
        if self.single is not None:
            return output + F.linear(F.linear(x, A), B) * self.single.deltas[path].scaling
        hidden = F.linear(x, A) * self._mask(path, x.shape[0], users, x)
        return output + F.linear(hidden, B)


class LoraRouter:
    """Forward hooks on the targeted Linears of one base; each call routes rows to adapters."""

    def __init__(self, base: nn.Module):
        self.base = base
        self._modules = dict(base.named_modules())
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._users: Counter[str] = Counter()
        self._route: Route | None = None
        self._busy = threading.Lock()
        # A server sets this: a hook stays once made, so swapping adapters in and out while another
        # thread runs the model never changes a module's hooks (only the first use of a layer does).
        self.keep_hooks = False

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The base's modules by path (walked once)."""
        return self._modules

    def adds_hooks(self, weights: LoraWeights) -> bool:
        """Whether attaching `weights` would hook a layer not hooked yet."""
        return any(path not in self._hooks for path in weights.paths)

    def attach(self, weights: LoraWeights) -> None:
        for path in weights.paths:
            if path not in self._hooks:
                self._hooks[path] = self._modules[path].register_forward_hook(self._hook_for(path))
            self._users[path] += 1

    def detach(self, weights: LoraWeights) -> None:
        for path in weights.paths:
            self._users[path] -= 1
            if self._users[path] <= 0:
                del self._users[path]
                if not self.keep_hooks:
                    self._hooks.pop(path).remove()

    def _hook_for(self, path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            route = self._route
            if route is None:
                return None
            return route.apply(path, args[0], route.replace(path, module, args[0], output))

        return hook

    @contextmanager
    def route(self, rows: Sequence[LoraWeights | None] | Route | Any) -> Iterator[None]:
        """Within this block, row i of every forward uses `rows[i]` (None: the base alone). Instead of
        a list, any object with Route's `apply` and `replace` may route the rows (the serving engine's
        per-slot weights, slot_lora.py)."""
        if not self._busy.acquire(blocking=False):  # atomic: two threads can never both route
            raise RuntimeError("the model is already running a call (LoraRouter.route is not reentrant, and one "
                               "thread at a time may run the registry; a serving Engine owns it while it runs)")
        try:
            self._route = Route(rows) if isinstance(rows, (list, tuple)) else rows
            yield
        finally:
            self._route = None
            self._busy.release()
