"""Training: the recipe in setup phases, the step loop, per-epoch evaluation, checkpoints, trackers,
memory figures, and the ablation grid built on them."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "TrainResult": "recipe", "train": "recipe", "Recipe": "recipe",
    "adapter_metadata": "publish",
    "NonFiniteLossError": "loop", "TrainingRun": "loop",
    "Checkpoints": "checkpoints",
    "Evaluator": "evaluator",
    "peak_memory": "memory",
    "run_ablation": "ablation",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

