"""The optimizer-step loop of a joint run (several adapters on one frozen base, issue 19).

Each job keeps a `JobRun`: the solo loop's own state and checks (`TrainingRun`: its counters, epochs
drawn from its own seed, log, validation, best epoch, last weights verified finite), fed from
outside. `JointRun` drives them: each round takes every active job's next micro-batch, trains them
in one forward and backward (`JointModel`), then steps each job's optimizer and schedule on its own
gradients. A job whose steps are done, or whose loss stops being finite, leaves the pass (and is
published at once); the others go on. Checkpoints hold every job's state at once, in one dir."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from lexlora.config import Config, config_to_dict
from lexlora.training.checkpoints import (
    STATE_NAME,
    Checkpoints,
    LoopState,
    StopSignals,
    config_differences,
    dataset_sha256,
)
from lexlora.training.loop import NonFiniteLoss, TrainingRun, interrupted


class _NoStop:
    """The jobs' own stop checks are the driver's: it checks once a round, for all of them."""

    @staticmethod
    def agreed() -> int:
        return 0


NO_STOP = _NoStop()


class JobRun(TrainingRun):
    """One job of a joint run: the solo loop's state and checks, its batches pulled by `JointRun`."""

    def __init__(self, cfg: Config, accelerator, *, index: int, joint: "JointRun", **kwargs: Any):
        super().__init__(cfg, accelerator, **kwargs)
        self.index, self.joint = index, joint
        self.params = self.unwrapped.own_parameters()  # clipped together: this job's alone
        self.iterator = None
        self.done = False
        self.progress = tqdm(disable=True)  # the driver shows one bar for every job

    def next_batch(self):
        """This job's next micro-batch, ending its epochs on the way as the solo loop does (validation,
        checkpoint); None once its steps are done."""
        state = self.state
        while True:
            if state.step >= self.total_steps and not state.batches_done:
                return None
            if state.step < self.total_steps:
                if self.iterator is None:
                    self.iterator = iter(self.epoch_batches())
                batch = next(self.iterator, None)
                if batch is not None:
                    return batch
            self.iterator = None
            self.end_epoch(NO_STOP)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """After the joint backward: clip, step and schedule this job on its own gradients."""
        train = self.cfg.train
        if train.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.record(loss)
        self.state.step += 1
        self.joint.progress.update(1)

    def after_step(self, stop) -> None:
        state, train = self.state, self.cfg.train
        if state.step % train.log_every == 0 or state.step == self.total_steps:
            self.log_loss()
        ends_epoch = state.batches_done == len(self.loader) or state.step >= self.total_steps
        if train.checkpoint_every and state.step % train.checkpoint_every == 0 and not ends_epoch:
            self.save()

    def save(self) -> Path:
        # One checkpoint of every job at the end of the round (several may ask in one round).
        self.joint.save_requested = True
        return self.joint.checkpoints.directory

    def summary(self, stopped: NonFiniteLoss | None = None) -> dict[str, Any]:
        metrics = super().summary(stopped)
        # The joint loop's time so far without any job's epoch evaluations (train_seconds leaves out
        # this job's own only): for the last job to leave, the whole loop's training time.
        evaluations = sum(job.evaluator.seconds for job in self.joint.jobs if job.evaluator is not None)
        metrics.update(joint_jobs=len(self.joint.jobs), joint_train_seconds=round(self.elapsed() - evaluations, 3))
        return metrics


class JointRun:
    """The rounds of a joint run over its `jobs`; `finish(job, metrics, stopped)` publishes a job
    that leaves the pass."""

    def __init__(self, accelerator, model, checkpoints: "JointCheckpoints",
                 finish: Callable[[JobRun, dict[str, Any], NonFiniteLoss | None], None]):
        self.accelerator, self.model, self.checkpoints, self.finish = accelerator, model, checkpoints, finish
        self.jobs: list[JobRun] = []
        self.state = LoopState()  # step: rounds trained (the checkpoints' names)
        self.save_requested = False
        self.progress = None

    @property
    def active(self) -> list[JobRun]:
        return [job for job in self.jobs if not job.done]

    def loop(self, stop: StopSignals) -> None:
        self.progress = tqdm(total=sum(job.total_steps for job in self.jobs), desc=f"train ({len(self.jobs)} jobs)",
                             initial=sum(job.state.step for job in self.jobs),
                             disable=not self.accelerator.is_local_main_process)
        for job in self.jobs:
            job.started = time.perf_counter()
        self.model.train()
        while self.active:
            self.round(stop)
        self.progress.close()

    def round(self, stop: StopSignals) -> None:
        stepping, batches = [], []
        for job in self.active:
            try:
                batch = job.next_batch()
            except NonFiniteLoss as bad:
                self.leave(job, bad)
                continue
            if batch is None:
                self.leave(job, None)
            else:
                stepping.append(job)
                batches.append(batch)
        if stepping:
            losses = self.model([job.index for job in stepping], batches)
            self.accelerator.backward(torch.stack(losses).sum())
            for job, loss in zip(stepping, losses):
                job.optimizer_step(loss)
            for job in stepping:
                try:
                    job.after_step(NO_STOP)
                except NonFiniteLoss as bad:
                    self.leave(job, bad)
            self.state.step += 1
        signum = stop.agreed()
        if (self.save_requested or signum) and self.active:
            path = self.save()
            if signum:
                self.interrupt(signum, path)

    def leave(self, job: JobRun, stopped: NonFiniteLoss | None) -> None:
        job.done = True
        metrics = job.summary() if stopped is None else job.keep_last_good(stopped)
        self.finish(job, metrics, stopped)
        self.save_requested = True  # the next checkpoint records it as done

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path:
        for job in self.active:  # a checkpoint only ever holds weights verified finite
            try:
                job.verify()
            except NonFiniteLoss as bad:
                self.leave(job, bad)
        entries, best, logs = [], {}, {}
        for job in self.jobs:
            entry: dict[str, Any] = {"done": job.done}
            if not job.done:
                extra, job_best = job.checkpoint_entry()
                entry.update(loop=asdict(job.state), **extra)
                best.update({f"{job.index}/{k}": v for k, v in (job_best or {}).items()})
                logs[f"metrics-{job.index}.jsonl"] = job.log.path
            entries.append(entry)
        self.save_requested = False
        return self.checkpoints.save(self.state, {"jobs": entries}, best or None, logs)

    def restore(self, path: Path) -> None:
        saved, best = self.checkpoints.load(path)
        self.state = saved["loop"]
        for job, entry in zip(self.jobs, saved["jobs"]):
            if entry["done"]:
                job.done = True
                continue
            job_best = {k.split("/", 1)[1]: v for k, v in (best or {}).items() if k.startswith(f"{job.index}/")}
            job.apply_checkpoint({**entry, "loop": LoopState(**entry["loop"])}, job_best or None, path,
                                 path / f"metrics-{job.index}.jsonl")

    def interrupt(self, signum: int, path: Path) -> None:
        done = sum(job.done for job in self.jobs)
        message = (
            f"lexlora: stopped by {signal.Signals(signum).name} after {self.state.step} joint steps "
            f"({done} of {len(self.jobs)} jobs published); the training state of the others is saved in {path}. "
            "To continue, run the same command with --resume (train.resume=true)."
        )
        raise interrupted(self.accelerator, signum, path, message)


class JointCheckpoints(Checkpoints):
    """The checkpoints of a joint run: one dir (the first job's train.checkpoint_dir, else
    `<its output_dir>.joint-checkpoints`), each checkpoint holding every job's state."""

    def __init__(self, cfgs: list[Config], accelerator):
        super().__init__(cfgs[0], accelerator)
        self.cfgs = cfgs
        self.directory = Path(cfgs[0].train.checkpoint_dir or f"{cfgs[0].output_dir}.joint-checkpoints")
        self.dataset_sha256 = [dataset_sha256(cfg) for cfg in cfgs]

    def config_dict(self) -> dict[str, Any]:
        return {"jobs": [config_to_dict(cfg) for cfg in self.cfgs]}

    def differences(self, saved: dict[str, Any]) -> list[str]:
        before = saved["config"].get("jobs", [])
        if len(before) != len(self.cfgs):
            return [f"number of jobs: {len(before)} in the checkpoint, {len(self.cfgs)} now"]
        found = []
        for index, (old, cfg) in enumerate(zip(before, self.cfgs)):
            found += [f"job {index + 1} ({cfg.output_dir}): {d}" for d in config_differences(old, config_to_dict(cfg))]
        for index, (old, new) in enumerate(zip(saved.get("dataset_sha256") or [], self.dataset_sha256)):
            if old != new:
                found.append(f"job {index + 1}: the contents of data.path {self.cfgs[index].data.path} changed since the checkpoint")
        return found

    def done_jobs(self, path: Path | None) -> set[int]:
        """The jobs a checkpoint records as published."""
        if path is None:
            return set()
        jobs = json.loads((path / STATE_NAME).read_text())["jobs"]
        return {index for index, entry in enumerate(jobs) if entry["done"]}
