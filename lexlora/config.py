"""One typed config for a whole run, built from a YAML file plus dotted `key=value` overrides.

OmegaConf does the merging and type checking against these dataclasses (it is Hydra's config
engine); lexlora only turns its errors into `ConfigError`s and checks the values' meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, reduce
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, get_args, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lexlora.errors import ConfigError
from lexlora.ranges import Range

# The one home of each set of choices; the modules that act on a value import its set from here.
FUSION_MODES = ("add", "first", "prefix")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SAVE_DTYPES = ("float32", "float16", "bfloat16")
SCORED_TASKS = ("text", "labels")  # what lexlora.evaluation.metrics.score computes
TASKS = ("auto", *SCORED_TASKS)  # "auto": detected from the references
TRACKERS = ("tensorboard", "wandb")
QUANTIZATION = ("none", "8bit", "4bit")
DUPLICATE_IDS = ("warn", "drop", "refuse", "ignore")
LONG_TARGETS = ("truncate", "refuse")
DATA_FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "hf", "hub")
# seq2seq: the encoder-decoder generates the target text; classification: the encoder alone with a
# new head over the target field's labels (lexlora.model.classifier).
MODEL_TASKS = ("seq2seq", "classification")
POOLINGS = ("mean", "first")  # how a classifier reduces the encoder's states to one vector per row
CLASS_WEIGHTS = ("none", "balanced")
CLASSIFIER_METRICS = ("val_loss", "accuracy", "macro_f1")
LORA_BIASES = ("none", "all", "lora_only")  # peft.LoraConfig's; it accepts any other and fails later


@dataclass
class ModelConfig:
    name_or_path: str = "google/flan-t5-small"
    # Build the base from its config with random weights: for tests and benchmarks only.
    random_init: bool = False
    init_seed: int = 0
    # Config fields changed before building a random-init base (e.g. a tiny T5 for tests).
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # Base weights in 8-bit or 4-bit through bitsandbytes (CUDA only): none, 8bit, 4bit.
    quantization: str = "none"
    # Cheaper drop-in modules in the base (lexlora/fast_ops.py): CPU dropout masks from packed random
    # bits, and transformers' C tanh-GELU for its Python gelu_new (equal up to rounding).
    fast_ops: bool = True
    # seq2seq or classification (the encoder + a classification head; see ClassifierConfig).
    task: str = "seq2seq"


@dataclass
class ClassifierConfig:
    """The head of a model.task=classification adapter: trained in full, saved with the adapter.
    pooling: mean (masked mean of the encoder's states; MiniLM was trained so, T5 and BART have no
    [CLS]) or first ([CLS]). class_weights: none, or balanced (n / (labels * count), from train)."""

    pooling: str = "mean"
    dropout: float = 0.1
    class_weights: str = "none"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    # 0 as in peft.LoraConfig: on CPU, dropout masks on the LoRA inputs cost ~10% of a step (measured)
    dropout: float = 0.0
    # None: the attention projections of the base's architecture (T5: q, k, v, o).
    target_modules: Optional[List[str]] = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    # Any other peft.LoraConfig argument, passed through unchanged.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FusionConfig:
    enabled: bool = True
    mode: str = "add"
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    embedding_batch_size: int = 64
    # None: $LEXLORA_CACHE/embeddings or ~/.cache/lexlora/embeddings.
    cache_dir: Optional[str] = None


@dataclass
class DataConfig:
    path: str = "examples/python_stdlib.jsonl"
    # auto (from the extension or path), jsonl, json, csv, parquet, hf (save_to_disk dir) or hub (a
    # dataset id, e.g. imdb, or a dir of data files: datasets.load_dataset; offline, its cache).
    format: str = "auto"
    subset: Optional[str] = None  # a hub dataset's config name, e.g. "plain_text"
    input_template: str = "{filename}"
    target_field: str = "description"
    # Field whose text is embedded for fusion; None: the template's only field.
    lexical_field: Optional[str] = None
    # Slices of the data file in `datasets` split syntax: percents or counts.
    splits: Dict[str, str] = field(
        default_factory=lambda: {"train": "[:90%]", "validation": "[90%:]"}
    )
    # Shuffle the records (with this seed) before slicing; None keeps file order.
    shuffle_seed: Optional[int] = None
    max_source_length: int = 128
    max_target_length: int = 64
    pad_to_multiple_of: Optional[int] = None
    # Skip (and count) invalid records instead of stopping at them.
    skip_invalid: bool = False
    # Records repeating an earlier id: warn (kept, counted), drop (keep the first), refuse, ignore.
    on_duplicate_id: str = "warn"
    # The field holding record ids; None: `id` where the records have one.
    id_field: Optional[str] = None
    # Targets longer than max_target_length tokens: truncate (counted in a warning) or refuse.
    on_long_target: str = "truncate"
    # How generated outputs are scored against target_field: text (ROUGE), labels (accuracy,
    # macro-F1) or auto (lexlora.metrics.detect_task on the references).
    task: str = "auto"


@dataclass
class TrainConfig:
    epochs: int = 3
    # When set, overrides epochs.
    max_steps: Optional[int] = None
    batch_size: int = 8
    eval_batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    # AdamW's fused implementation (one kernel over all tensors; torch has it on CPU and CUDA). false:
    # torch's default, which on CPU is a Python loop of ~10 small ops per trainable tensor per step.
    fused_optimizer: bool = True
    warmup_ratio: float = 0.06
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    # auto: bf16 on a GPU that supports it, otherwise no.
    mixed_precision: str = "auto"
    log_every: int = 10
    num_workers: int = 0
    # Batches of similar lengths (transformers' LengthGroupedSampler: shuffled, then sorted by length
    # within mega-batches of 50), so that per-batch padding wastes fewer tokens.
    group_by_length: bool = True
    # Torch threads per process when training on CPU; None: the usable cores / processes
    # (`accelerate launch` without a config file pins OMP_NUM_THREADS=1, halving speed on 2 cores).
    cpu_threads: Optional[int] = None
    # Picks the adapter that is kept: the epoch with the lowest val_loss, or the highest value of
    # a metric that lexlora.metrics.score gives for data.task (rouge1, rougeL, accuracy, macro_f1...).
    eval_metric: str = "val_loss"
    # Generate and score (a slice of) the validation split after each epoch; None: only when
    # eval_metric needs it.
    eval_generate: Optional[bool] = None
    # Generate for the first N validation rows only (generation is slow on CPU); None: all.
    eval_max_rows: Optional[int] = None
    # Experiment trackers through Accelerate: none, tensorboard, wandb, all, or a comma list.
    report_to: str = "none"
    # Where tracker logs go; None: runs/<name of output_dir>. Not the adapter dir.
    logging_dir: Optional[str] = None
    # Recompute the frozen base's activations in the backward pass (less memory, more time).
    gradient_checkpointing: bool = False
    # Save the full training state every N optimizer steps (and at each epoch end); None: epochs only.
    checkpoint_every: Optional[int] = None
    # Where checkpoints go; None: <output_dir>.checkpoints beside the adapter dir.
    checkpoint_dir: Optional[str] = None
    # How many checkpoints to keep (the newest).
    keep_checkpoints: int = 2
    # Continue from the newest checkpoint in checkpoint_dir (the CLI's --resume sets it).
    resume: bool = False

    def trackers(self) -> List[str]:
        """report_to as a list of tracker names ([] for none)."""
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        if names in ([], ["none"]):
            return []
        if names == ["all"]:
            return list(TRACKERS)
        for name in names:
            _check_choice("train.report_to", name, ("none", "all", *TRACKERS))
        if "none" in names or "all" in names:
            raise ConfigError(f"train.report_to: 'none' and 'all' cannot be combined with others; got {self.report_to!r}")
        return list(dict.fromkeys(names))

    @property
    def generates(self) -> bool:
        """Whether each epoch's evaluation generates and scores the validation split."""
        return self.eval_metric != "val_loss" if self.eval_generate is None else self.eval_generate


@dataclass
class GenerationSettings:
    max_new_tokens: int = 48
    num_beams: int = 1
    batch_size: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    output_dir: str = "adapters/default"
    overwrite_output_dir: bool = False
    # Weights are stored in this dtype; training ends by rounding to it so the saved adapter is
    # exactly the model that was last evaluated.
    save_dtype: str = "float16"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check the values' meaning. Runs on load; training runs it again for configs built or
        changed in Python (attribute assignment skips __post_init__)."""
        for key, choices in CHOICES.items():
            _check_choice(key, self.value(key), choices)
        for key, rule in NUMERIC_RULES.items():
            rule.check(key, self.value(key), _allows_none(key))
        if self.train.epochs == 0 and self.train.max_steps is None:
            raise ConfigError("train.epochs must be at least 1 (or set train.max_steps), got 0")
        if "train" not in self.data.splits:
            raise ConfigError("data.splits needs a 'train' entry, e.g. data.splits.train='[:90%]'")
        self._check_evaluation()
        self._check_classification()

    @property
    def classifies(self) -> bool:
        return self.model.task == "classification"

    def _check_classification(self) -> None:
        if self.classifies and self.train.eval_metric not in CLASSIFIER_METRICS:
            raise ConfigError(
                f"train.eval_metric={self.train.eval_metric} is not computed for model.task=classification; "
                f"use one of {', '.join(CLASSIFIER_METRICS)}"
            )
        if self.classifies and self.data.task == "text":
            raise ConfigError("model.task=classification predicts labels: data.task must be labels or auto, got text")

    def value(self, key: str) -> Any:
        """The value of a dotted key, e.g. "train.learning_rate"."""
        return reduce(getattr, key.split("."), self)

    def _check_evaluation(self) -> None:
        # Which metric names a task produces is checked by training once the task is known.
        train = self.train
        train.trackers()
        if not train.eval_metric.strip():
            raise ConfigError("train.eval_metric must name a metric, e.g. val_loss or rougeL")
        if train.eval_metric != "val_loss" and train.eval_generate is False:
            raise ConfigError(
                f"train.eval_metric={train.eval_metric} is computed on generated outputs; "
                "it needs train.eval_generate=true (or unset)"
            )
        if (train.eval_metric != "val_loss" or train.eval_generate) and "validation" not in self.data.splits:
            raise ConfigError(
                f"train.eval_metric={train.eval_metric} / train.eval_generate need a validation split: "
                "add data.splits.validation, e.g. data.splits.validation='[90%:]'"
            )


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
MORE_THAN_0 = Range(0, low_open=True)
# accelerate's set_seed seeds numpy too, which takes 0 .. 2**32 - 1; every seed gets that range.
SEED = Range(0, 2**32 - 1)

# Every numeric key of the config (a test walks the dataclasses so that a new key needs a rule).
NUMERIC_RULES: dict[str, Range] = {
    "model.init_seed": SEED,
    "lora.r": AT_LEAST_1,
    "lora.alpha": MORE_THAN_0,
    "lora.dropout": Range(0, 1, high_open=True),
    "classifier.dropout": Range(0, 1, high_open=True),
    "fusion.embedding_batch_size": AT_LEAST_1,
    "data.shuffle_seed": SEED,
    "data.max_source_length": AT_LEAST_1,
    "data.max_target_length": AT_LEAST_1,
    "data.pad_to_multiple_of": AT_LEAST_1,
    "train.epochs": Range(0, note="0 only with train.max_steps"),
    "train.max_steps": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.eval_batch_size": AT_LEAST_1,
    "train.learning_rate": MORE_THAN_0,
    "train.weight_decay": AT_LEAST_0,
    "train.warmup_ratio": Range(0, 1),
    "train.gradient_accumulation_steps": AT_LEAST_1,
    "train.max_grad_norm": Range(0, note="0: no clipping"),
    "train.seed": SEED,
    "train.log_every": AT_LEAST_1,
    "train.num_workers": AT_LEAST_0,
    "train.cpu_threads": AT_LEAST_1,
    "train.eval_max_rows": AT_LEAST_1,
    "train.checkpoint_every": Range(0, note="0 as null: at epoch ends only"),
    "train.keep_checkpoints": AT_LEAST_1,
    "generation.max_new_tokens": AT_LEAST_1,
    "generation.num_beams": AT_LEAST_1,
    "generation.batch_size": AT_LEAST_1,
}

CHOICES: dict[str, Sequence[str]] = {
    "model.quantization": QUANTIZATION,
    "model.task": MODEL_TASKS,
    "classifier.pooling": POOLINGS,
    "classifier.class_weights": CLASS_WEIGHTS,
    "lora.bias": LORA_BIASES,
    "fusion.mode": FUSION_MODES,
    "data.format": DATA_FORMATS,
    "data.on_duplicate_id": DUPLICATE_IDS,
    "data.on_long_target": LONG_TARGETS,
    "data.task": TASKS,
    "train.mixed_precision": MIXED_PRECISION,
    "save_dtype": SAVE_DTYPES,
}


@cache
def _allows_none(key: str) -> bool:
    """Whether the dataclass field of a dotted key is Optional."""
    *sections, name = key.split(".")
    owner = reduce(lambda cls, section: get_type_hints(cls)[section], sections, Config)
    return type(None) in get_args(get_type_hints(owner)[name])


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, checked against `Config`."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = OmegaConf.create({})
        if not OmegaConf.is_dict(loaded):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        layers.append(loaded)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lora.r=16)")
    for item in overrides:  # one at a time, so an error names the override at fault
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {_omegaconf_message(exc)}") from None
        except yaml.YAMLError as exc:  # the value is parsed as YAML: '[100%:]' or '{a} {b}' need quotes
            reason = str(exc).strip().splitlines()[0]
            key, _, value = item.partition("=")
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({reason}); quote it, e.g. {key}='{value}'"
            ) from None
    source = f"{path}" if path is not None else "the defaults"
    try:
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source} (with overrides): {_omegaconf_message(exc)}") from None
    assert isinstance(config, Config)
    return config


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    # OmegaConf appends a multi-line block of internals; keep the first line and the key.
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{first} (key: {key})" if key and key not in first else first


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]
