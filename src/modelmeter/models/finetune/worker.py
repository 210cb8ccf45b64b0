"""The fine-tuning worker: claims queued jobs one at a time, trains, registers the model, meters the tokens.

Billing is injected (``on_succeeded``) so this package imports nothing from billing or the gateway.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter import clock
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import Example, parse_dataset, stratified_split
from modelmeter.models.finetune.estimate import epoch_tokens
from modelmeter.models.finetune.recipes import training_from_stored
from modelmeter.models.finetune.tables import FineTuningJob, TenantFile
from modelmeter.models.finetune.tagged import TaggedDataset, TaggedExample, parse_tagged
from modelmeter.models.finetune.tagging import train_tagger
from modelmeter.models.finetune.train import (
    Cancelled,
    Hyperparameters,
    Progress,
    TrainOptions,
    TrainResult,
    train_classifier,
)
from modelmeter.models.outputs import TOKEN_CLASSIFICATION
from modelmeter.models.registry import MlModel, artifact_path, register_tenant_model

log = logging.getLogger("modelmeter.worker")

OnSucceeded = Callable[[Session, FineTuningJob, TrainResult, str], None]
VALIDATION_FRACTION = 0.1
MAX_VALIDATION_ROWS = 2000


@dataclass(frozen=True)
class WorkerConfig:
    data_dir: Path
    device: torch.device
    poll_s: float = 1.0
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 120.0
    show_progress: bool = False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Worker:
    """Runs queued jobs one at a time until ``stop`` is set."""

    def __init__(self, sessions: sessionmaker[Session], config: WorkerConfig, *, on_succeeded: OnSucceeded) -> None:
        self.sessions = sessions
        self.config = config
        self.on_succeeded = on_succeeded
        self.host = socket.gethostname()
        self.worker_id = f"{self.host}:{os.getpid()}:{secrets.token_hex(2)}"

    def run_forever(self, stop: threading.Event) -> None:
        log.info("worker %s started (device %s)", self.worker_id, self.config.device)
        while not stop.is_set():
            if not self.run_once():
                stop.wait(self.config.poll_s)

    def run_once(self, only: str | None = None) -> bool:
        """Recover orphaned jobs, then claim and run one job (``only``: that one, no other tenant's); ``False``
        when there was none to run."""
        for orphan in jobs.recover_orphans(sessions=self.sessions, is_dead=self._is_dead):
            log.warning("recovered job %s from a dead worker", orphan)
        job_id = jobs.claim_next(sessions=self.sessions, worker_id=self.worker_id, only=only)
        if job_id is None:
            return False
        self.run_job(job_id)
        return True

    def _is_dead(self, job: FineTuningJob) -> bool:
        host, _, rest = (job.worker_id or "").partition(":")
        pid = rest.partition(":")[0]
        if host == self.host and pid.isdigit() and job.worker_id != self.worker_id and not pid_alive(int(pid)):
            return True
        stale_before = clock.now_s() - self.config.heartbeat_timeout_s
        return job.heartbeat_at is None or job.heartbeat_at < stale_before

    def run_job(self, job_id: str) -> None:
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job_id, stop), daemon=True, name=f"heartbeat:{job_id}")
        beat.start()
        try:
            self._train(job_id, stop)
        except Cancelled:
            self._note(job_id, "Training stopped: the job was cancelled.")
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._fail(job_id, "training_failed", f"Training failed: {type(exc).__name__}: {exc}")
        finally:
            stop.set()
            beat.join()

    def _beat(self, job_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.config.heartbeat_s):
            try:
                if not jobs.heartbeat(sessions=self.sessions, job_id=job_id, worker_id=self.worker_id):
                    stop.set()  # cancelled (or taken away): the training loop stops at its next step
            except Exception:
                log.exception("heartbeat for %s failed; will retry", job_id)

    def _train(self, job_id: str, stop: threading.Event) -> None:
        job, base_dir, training_file, validation_file = self._job(job_id)
        output = self.config.data_dir / "models" / job.tenant_id / job.id
        options = TrainOptions(
            base_model_dir=base_dir, hparams=Hyperparameters(job.n_epochs, job.batch_size,
                                                             job.learning_rate_multiplier),
            seed=job.seed, device=self.config.device, output_dir=output,
            on_progress=lambda p: self._progress(job.id, p), should_stop=stop.is_set,
            show_progress=self.config.show_progress, training=training_from_stored(job.training_type),
            base_model=job.model)
        if job.task == TOKEN_CLASSIFICATION:
            tagged, held, tags, labels = self._tagged_inputs(job, training_file, validation_file)
            result = train_tagger(train=tagged, validation=held, tags=tags, **options)
            validation_texts = [" ".join(example.words) for example in held]
        else:
            examples, validation, labels = self._inputs(job, training_file, validation_file)
            result = train_classifier(train=examples, validation=validation, labels=labels, **options)
            validation_texts = [example.text for example in validation]
        if job.validation_file:  # evaluating the tenant's own file is compute on its behalf: billed as training
            evaluated = epoch_tokens(base_dir, validation_texts)
            result = replace(result, training_tokens=result.training_tokens + evaluated)
        if not self._succeed(job, result, labels, output):
            shutil.rmtree(output, ignore_errors=True)

    def _job(self, job_id: str) -> tuple[FineTuningJob, Path, TenantFile | None, TenantFile | None]:
        """The job, its base model's directory and its files' rows (read once, in one session)."""
        with self.sessions() as session:
            job = session.get(FineTuningJob, job_id)
            assert job is not None
            base = session.get(MlModel, job.model)
            if base is None:
                raise RuntimeError(f"base model {job.model} is no longer registered")
            training = session.get(TenantFile, job.training_file)
            validation = session.get(TenantFile, job.validation_file) if job.validation_file else None
        return job, artifact_path(base.artifact, self.config.data_dir), training, validation

    def _tagged_inputs(self, job: FineTuningJob, training_file: TenantFile | None,
                       validation_file: TenantFile | None) -> tuple[list[TaggedExample], list[TaggedExample],
                                                                    list[str], list[str]]:
        """A token-classification job's rows, a seeded hold-out (or the tenant's file, bounded), the tags and the
        entity types it registers with."""
        training = self._read_tagged(training_file, "training_file")
        examples = list(training.examples)
        rng = random.Random(job.seed)
        if job.validation_file:
            validation = list(self._read_tagged(validation_file, "validation_file").examples)
            if len(validation) > MAX_VALIDATION_ROWS:
                validation = rng.sample(validation, MAX_VALIDATION_ROWS)
        else:
            rng.shuffle(examples)
            held = min(MAX_VALIDATION_ROWS, max(1, round(len(examples) * VALIDATION_FRACTION)))
            examples, validation = examples[held:], examples[:held]
        self._note(job.id, f"Training on {len(examples)} rows, validating on {len(validation)} rows, entity types "
                           f"{', '.join(training.types)}.")
        return examples, validation, training.tags, list(training.types)

    def _read_tagged(self, f: TenantFile | None, param: str) -> TaggedDataset:
        if f is None:
            raise RuntimeError(f"the {param} was deleted before the job started")
        return parse_tagged((self.config.data_dir / f.path).read_bytes(), max_rows=10**9, max_text_chars=10**9)

    def _inputs(self, job: FineTuningJob, training_file: TenantFile | None, validation_file: TenantFile | None
                ) -> tuple[list[Example], list[Example], list[str]]:
        """A classification job's rows, a stratified hold-out (or the tenant's file, bounded) and its labels."""
        examples, labels = self._read(training_file, "training_file")
        if job.validation_file:
            # Bounded like the automatic hold-out (issue 21: a tenant's explicit file was evaluated in full),
            # a seeded sample when larger; its tokens are billed as training (see _train).
            validation = self._read(validation_file, "validation_file")[0]
            if len(validation) > MAX_VALIDATION_ROWS:
                validation = random.Random(job.seed).sample(validation, MAX_VALIDATION_ROWS)
        else:
            examples, validation = stratified_split(examples, fraction=VALIDATION_FRACTION, seed=job.seed)
            validation = validation[:MAX_VALIDATION_ROWS]
        self._note(job.id, f"Training on {len(examples)} rows, validating on {len(validation)} rows, "
                           f"labels {', '.join(labels)}.")
        return examples, validation, labels

    def _read(self, f: TenantFile | None, param: str) -> tuple[list[Example], list[str]]:
        if f is None:
            raise RuntimeError(f"the {param} was deleted before the job started")
        data = (self.config.data_dir / f.path).read_bytes()
        parsed = parse_dataset(data, filename=f.filename, max_rows=10**9, max_text_chars=10**9, max_labels=10**6)
        return parsed.examples, parsed.labels

    def _progress(self, job_id: str, p: Progress) -> None:
        data = {"epoch": p.epoch, "step": p.step, "total_steps": p.total_steps, "train_loss": round(p.loss, 5),
                "examples_per_s": round(p.examples_per_s, 2), "eta_s": round(p.eta_s, 1)}
        with self.sessions() as session:
            message = (f"Epoch {p.epoch}/{p.n_epochs}, step {p.step}/{p.total_steps}: loss {p.loss:.4f}, "
                       f"{p.examples_per_s:.1f} examples/s, {p.eta_s:.0f} s left")
            jobs.add_event(session=session, job_id=job_id, message=message, type_="metrics", data=data)
            job = session.get(FineTuningJob, job_id)
            if job is not None:
                job.estimated_finish = clock.now_s() + int(p.eta_s)
            session.commit()

    def _succeed(self, job: FineTuningJob, result: TrainResult, labels: list[str], output: Path) -> bool:
        model_id = f"ft:{job.model}:{job.suffix}:{job.id[-8:]}" if job.suffix else f"ft:{job.model}:{job.id[-8:]}"
        relative = output.relative_to(self.config.data_dir)
        with self.sessions() as session:
            moved = jobs.finish(
                session=session, job_id=job.id, owner=self.worker_id, status="succeeded",
                fine_tuned_model=model_id, trained_tokens=result.training_tokens, finished_at=clock.now_s(),
                result_json=json.dumps({**result.metrics, "examples_per_s": round(result.examples_per_s, 2),
                                        "wall_s": round(result.wall_s, 2)}),
            )
            if not moved:
                return False
            register_tenant_model(session=session, model_id=model_id, tenant_id=job.tenant_id,
                                  base_model=job.model, labels=labels, artifact=str(relative), job_id=job.id,
                                  training_type=job.training_type["type"],
                                  task="token-classification" if job.task == TOKEN_CLASSIFICATION
                                  else "text-classification")
            self.on_succeeded(session, job, result, self.config.device.type)
            metrics: dict[str, Any] = dict(result.metrics)
            score = (f"entity F1 {metrics['f1']:.4f}" if job.task == TOKEN_CLASSIFICATION
                     else f"accuracy {metrics['accuracy']:.4f}")
            jobs.add_event(session=session, job_id=job.id,
                           message=f"Job succeeded: {model_id} ({score} on {metrics['n_validation']} validation "
                                   "rows).")
            session.commit()
        return True

    def _fail(self, job_id: str, code: str, message: str) -> None:
        with self.sessions() as session:
            if jobs.finish(session=session, job_id=job_id, owner=self.worker_id, status="failed",
                           **jobs.fail_values(code, message)):
                jobs.add_event(session=session, job_id=job_id, message=message, level="error")
            session.commit()

    def _note(self, job_id: str, message: str) -> None:
        with self.sessions() as session:
            jobs.add_event(session=session, job_id=job_id, message=message)
            session.commit()
