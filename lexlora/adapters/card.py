"""The model card (README.md) written into each adapter dir."""

from __future__ import annotations

from lexlora.adapters.format import AdapterMetadata


def model_card(meta: AdapterMetadata, name: str) -> str:
    adapter, base, weights = meta.adapter, meta.base, meta.weights
    fusion = (
        f"{adapter['fusion_mode']} (embedding of `{adapter['lexical_field']}` by {adapter['embedding_model']}, "
        f"{adapter['embedding_dim']} dims)"
        if adapter.get("fusion_mode")
        else "off"
    )
    metric_lines = "\n".join(f"| {k} | {v} |" for k, v in meta.scalar_metrics.items())
    samples = meta.samples
    sample_lines = "\n".join(
        f"| {s['input']} | {s['reference']} | {s['output']} |".replace("\n", " ") for s in samples
    )
    init = f"random init (seed {base.get('init_seed')}), for tests only" if base.get("random_init") else "pretrained"
    return f"""# {name}

A lexlora adapter: LoRA + lexical fusion projection for `{base.get('model_id')}` ({init}).

- Prompt template: `{adapter['input_template']}`
- Target field: `{adapter['target_field']}`
- Fusion: {fusion}
- Weights: {weights.parameters:,} parameters, {weights.bytes / 1e6:.2f} MB ({weights.dtype})

## Use

```bash
lexlora generate --adapter {name} "some_input"
```

```python
from lexlora.adapters import load_adapter
model = load_adapter("{name}")
```

## Metrics

| metric | value |
|---|---|
{metric_lines}

## Samples (validation split, greedy)

| input | reference | output |
|---|---|---|
{sample_lines}
"""
