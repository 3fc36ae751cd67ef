"""Several adapters trained in one pass over one frozen base (issue 19): `train_jobs(cfgs)`.

    accelerate launch scripts/train_lora.py --config a.yaml --config b.yaml --config c.yaml

Each job keeps its own data, template, fusion, LoRA rank and targets, learning rate and schedule,
epochs / max_steps, validation, checkpoint cadence and output dir, and publishes an ordinary adapter
dir. They share the base, the tokenizer, the embedding model and the process: the base is loaded
once, and each optimizer step trains one batch made of every active job's next micro-batch
(`lexlora.training.joint_loop`, `lexlora.model.joint_lora`). With the same seeds and data, each
adapter equals its solo run's up to float rounding, when dropout is off (dropout masks are drawn
for the whole joint batch: with dropout on, a job sees other masks than alone, of the same rate).

Each job is set up by the solo recipe's own phases (`Recipe`), on the shared accelerator and model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from lexlora.adapters.files import check_output_dir
from lexlora.adapters.fingerprint import fingerprint
from lexlora.config import Config, config_to_dict, config_to_yaml
from lexlora.data.prepare import prepare_data
from lexlora.errors import AdapterError, ConfigError, LexloraError
from lexlora.fileio import failed_name, make_staging_dir
from lexlora.model.factory import joint_model_for_run
from lexlora.model.families import base_config
from lexlora.model.loading import check_quantization, load_base_model, load_tokenizer
from lexlora.model.lora_model import build_lora_config
from lexlora.training.checkpoints import StopSignals, TrainingInterrupted
from lexlora.training.evaluator import Evaluator, plan_evaluation
from lexlora.training.joint_loop import JobRun, JointCheckpoints, JointRun
from lexlora.training.launch import make_accelerator, resolve_mixed_precision, set_cpu_threads
from lexlora.training.memory import describe_memory, reset_peak
from lexlora.training.optimizer import make_optimizer, make_scheduler, total_steps
from lexlora.training.publish import recorded_labels
from lexlora.training import recipe
from lexlora.training.recipe import (
    Launched,
    Optimization,
    Recipe,
    RunData,
    RunModel,
    TrainResult,
    describe_counts,
)
from lexlora.training.tracking import LOG_NAME, MetricsLog

# Settings of the one process and base every job shares: they must agree.
SHARED = ("train.mixed_precision", "train.gradient_checkpointing", "train.cpu_threads", "train.resume")


class JointTrainingError(LexloraError):
    """Some jobs of a joint run did not publish an adapter (the others did)."""


def train_jobs(cfgs: list[Config]) -> list[TrainResult]:
    """Train every job of `cfgs` in one pass and publish each to its output_dir; the results in job
    order. One config is a solo run (`train`)."""
    if len(cfgs) == 1:
        return [recipe.train(cfgs[0])]
    return JointRecipe(cfgs).run()


def check_jobs(cfgs: list[Config]) -> None:
    """Refuse, before any work, jobs that cannot share one base and one process."""
    first = cfgs[0]
    for index, cfg in enumerate(cfgs):
        cfg.check()
        name = f"job {index + 1} ({cfg.output_dir})"
        model, expected = config_to_dict(cfg)["model"], config_to_dict(first)["model"]
        differing = sorted(k for k in set(model) | set(expected) if model.get(k) != expected.get(k))
        if differing:
            raise ConfigError(
                f"{name}: joint jobs train on one base, but its model.* settings differ from job 1's: "
                + ", ".join(f"model.{k} {model.get(k)!r} (job 1: {expected.get(k)!r})" for k in differing)
            )
        for key in SHARED:
            if cfg.value(key) != first.value(key):
                raise ConfigError(f"{name}: {key}={cfg.value(key)!r}, job 1 has {first.value(key)!r}; joint jobs share it")
        if cfg.classifies:
            raise ConfigError(f"{name}: model.task=classification is not trained jointly yet; train it on its own")
        if cfg.train.gradient_accumulation_steps != 1:
            raise ConfigError(f"{name}: train.gradient_accumulation_steps must be 1 in a joint run (each round "
                              "steps every job); raise train.batch_size instead, or train it on its own")
        if cfg.train.trackers():
            raise ConfigError(f"{name}: train.report_to is not supported in a joint run; each job's metrics.jsonl has its log")
        if cfg.lora.bias != "none":
            raise ConfigError(f"{name}: lora.bias={cfg.lora.bias} trains the base's biases, which every job shares")
        lora = build_lora_config(cfg.lora, base_config(cfg.model.name_or_path).model_type, cfg.model.name_or_path)
        if lora.modules_to_save:
            raise ConfigError(f"{name}: modules trained in full ({sorted(lora.modules_to_save)}, lora.extra.modules_to_save) "
                              "would be shared by every job; set lora.extra.modules_to_save: [] or train it on its own")
    outputs = [Path(cfg.output_dir).resolve() for cfg in cfgs]
    for index, out in enumerate(outputs):
        if out in outputs[:index]:
            raise ConfigError(f"job {index + 1}: output_dir {cfgs[index].output_dir} is also job {outputs.index(out) + 1}'s")


class JointRecipe:
    """A joint run's phases: one accelerator, each job's data, one model, each job's loaders and
    optimizer, then the rounds; each job is a solo `Recipe` whose phases are filled in here."""

    def __init__(self, cfgs: list[Config]):
        self.cfgs = cfgs
        self.jobs = [Recipe(cfg) for cfg in cfgs]
        self.results: dict[int, TrainResult] = {}
        self.errors: list[str] = []

    def run(self) -> list[TrainResult]:
        self.setup()
        return self.train()

    def setup(self) -> None:
        cfgs, first = self.cfgs, self.cfgs[0]
        check_jobs(cfgs)
        check_quantization(first.model)
        mixed_precision = resolve_mixed_precision(first.train.mixed_precision)
        if mixed_precision == "fp16":  # one GradScaler would unscale every job's optimizer at each clip
            raise ConfigError("train.mixed_precision=fp16 is not supported in a joint run; use bf16 or no")
        accelerator = make_accelerator(first, mixed_precision, [], joint=True)
        if accelerator.device.type == "cpu":
            set_cpu_threads(first.train.cpu_threads, accelerator.num_processes)
        set_seed(first.train.seed)
        self.checkpoints = checkpoints = JointCheckpoints(cfgs, accelerator)
        resume_from = checkpoints.resume_point()
        self.done = checkpoints.done_jobs(resume_from)
        for index, cfg in enumerate(cfgs):
            if index not in self.done:
                check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
        tokenizer, encoders = load_tokenizer(first.model), {}
        for job in self.jobs:
            job.launched = Launched(accelerator, mixed_precision, [], checkpoints, resume_from)
            with accelerator.main_process_first():
                prepared = prepare_data(job.cfg, tokenizer, accelerator.device, encoders)
            job.data = RunData(tokenizer, prepared, plan_evaluation(job.cfg, prepared))
        base = load_base_model(first.model, device=accelerator.device)
        base_fingerprint = fingerprint(base, first.model)
        self.model = joint_model_for_run([(job.cfg, job.data.prepared) for job in self.jobs], base, tokenizer)
        for job, view in zip(self.jobs, self.model.jobs):
            labels = recorded_labels(job.cfg, job.data.prepared.splits)
            if labels:
                view.labels = tuple(labels)
            trainable, total = view.parameter_counts()
            accelerator.print(f"job {view.adapter_name} -> {job.cfg.output_dir}: {describe_counts(trainable, total)}")
            job.built = RunModel(view, base_fingerprint, trainable, total)
            job.setup_loaders()
        optimizers, schedulers, steps = [], [], []
        for job, view in zip(self.jobs, self.model.jobs):
            steps.append(total_steps(job.cfg.train, len(job.loaders.train)))
            optimizers.append(make_optimizer(view.own_parameters(), job.cfg.train))
            schedulers.append(make_scheduler(optimizers[-1], job.cfg.train, steps[-1], accelerator.num_processes))
        prepared, *rest = accelerator.prepare(self.model, *optimizers, *schedulers)
        checkpoints.attach(self.model)
        for index, (job, view) in enumerate(zip(self.jobs, self.model.jobs)):
            job.optim = Optimization(prepared, view, rest[index], rest[len(self.jobs) + index], steps[index])
        self.prepared, self.accelerator = prepared, accelerator

    def train(self) -> list[TrainResult]:
        accelerator = self.accelerator
        self.driver = driver = JointRun(accelerator, self.prepared, self.checkpoints, self.finish)
        self.stagings: dict[int, Path] = {}
        try:
            for index, job in enumerate(self.jobs):
                driver.jobs.append(self.job_run(index, job))
            if self.jobs[0].launched.resume_from is not None:
                driver.restore(self.jobs[0].launched.resume_from)
            reset_peak(accelerator.device)
            with StopSignals(accelerator) as stop:
                driver.loop(stop)
            self.checkpoints.remove_all()
        except TrainingInterrupted:
            for staging in self.stagings.values():  # the checkpoint holds their logs
                shutil.rmtree(staging, ignore_errors=True)
            self.stagings.clear()
            raise
        finally:
            accelerator.end_training()
            for staging in self.stagings.values():
                if staging.exists():
                    shutil.move(str(staging), str(failed_name(staging)))
        if self.errors:
            raise JointTrainingError("; ".join(self.errors))
        for index in self.done:  # published by the run this one resumed
            self.results[index] = TrainResult(Path(self.cfgs[index].output_dir), {"published_before_resume": True})
        return [self.results[index] for index in sorted(self.results)]

    def job_run(self, index: int, job: Recipe) -> JobRun:
        cfg, accelerator, optim = job.cfg, self.accelerator, job.optim
        evaluator = (
            Evaluator(cfg, job.data.plan, optim.unwrapped, optim.unwrapped, job.loaders.validation, accelerator)
            if job.loaders.validation is not None else None
        )
        staging = None
        if accelerator.is_main_process and index not in self.done:
            staging = self.stagings[index] = make_staging_dir(cfg.output_dir)
            (staging / "config.yaml").write_text(config_to_yaml(cfg))
        run = JobRun(
            cfg, accelerator, index=index, joint=self.driver, model=optim.unwrapped, optimizer=optim.optimizer,
            scheduler=optim.scheduler, loader=job.loaders.train, generator=job.loaders.generator, evaluator=evaluator,
            total_steps=optim.total_steps, log=MetricsLog(staging / LOG_NAME if staging else None),
            checkpoints=self.checkpoints, staging=staging,
        )
        run.done = index in self.done
        return run

    def finish(self, run: JobRun, metrics: dict[str, Any], stopped) -> None:
        """Publish a job that left the pass (its last good weights, if its loss stopped being finite)."""
        job = self.jobs[run.index]
        metrics.update(job._run_figures())
        run.log.write(memory=metrics["memory"])
        self.accelerator.print(f"{job.cfg.output_dir}: {describe_memory(metrics['memory'])}")
        try:
            job.publish(run.evaluator, run.staging, metrics)
        except AdapterError as exc:
            self.errors.append(f"{job.cfg.output_dir}: {exc}")
            return
        self.stagings.pop(run.index, None)
        self.results[run.index] = TrainResult(Path(job.cfg.output_dir), metrics)
        if stopped is not None:
            self.errors.append(str(stopped.error(job.cfg, run, f"they were saved as the adapter {job.cfg.output_dir}")))
