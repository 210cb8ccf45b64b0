"""The base of every public response shape, and the one list envelope.

A resource's public model lives beside its table and is built from it with ``XPublic.of(row, ...)``: the route,
the CLI, the dashboard and the alert webhooks all hold the same typed object, and FastAPI documents it in OpenAPI.
Every model forbids extra keys, so the document says exactly what a client receives. ``model_config``'s
``title`` is the name the OpenAPI document gives the shape (``gateway/openapi.py`` names each component by it),
so a class can be called ``FineTuningJobPublic`` beside its table while clients keep seeing ``FineTuningJob``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Public(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # class name -> the name the OpenAPI document gives it, for every shape whose config sets a title
    public_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        title = cls.model_config.get("title")
        if title and "title" in cls.__dict__.get("model_config", {}) and title != cls.__name__:
            Public.public_names[cls.__name__] = title


_WORD = re.compile(r"[A-Za-z0-9]+")


def public_name(name: str) -> str:
    """``name`` (a component's key or title, such as ``Page_FilePublic_`` or ``Page[FilePublic]``) with each
    class name that has a title in its place: ``Page_FileObject_``."""
    return _WORD.sub(lambda m: Public.public_names.get(m.group(0), m.group(0)), name)


class Page(Public, Generic[T]):
    """Every list: ``{"object": "list", "data": [...], "has_more": bool}`` (the OpenAI and Stripe convention)."""

    object: Literal["list"]
    data: list[T]
    has_more: bool

    @classmethod
    def of(cls, data: Sequence[T], has_more: bool = False) -> Page[T]:
        return cls(object="list", data=list(data), has_more=has_more)
