"""Training: the recipe in setup phases, the step loop, per-epoch evaluation, checkpoints, trackers,
memory figures, and the ablation grid built on them."""

from typing import TYPE_CHECKING

from lexlora._exports import lazy_exports

_EXPORTS = {
    "TrainResult": "recipe", "train": "recipe",
    "NonFiniteLossError": "loop", "TrainingRun": "loop",
    "Checkpoints": "checkpoints",
    "Evaluator": "evaluator",
    "peak_memory": "memory",
    "run_ablation": "ablation",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from lexlora.training.recipe import TrainResult, train
    from lexlora.training.loop import NonFiniteLossError, TrainingRun
    from lexlora.training.checkpoints import Checkpoints
    from lexlora.training.evaluator import Evaluator
    from lexlora.training.memory import peak_memory
    from lexlora.training.ablation import run_ablation
