"""Batch input files (``POST /v1/files`` with ``purpose="batch"``): one request per JSONL line, validated at upload.

A line is ``{"custom_id", "method": "POST", "url", "body"}``: ``url`` one of the inference routes, ``body`` what
that route takes (checked by the route's own request model, so a line the route would refuse is refused here,
naming the line), ``custom_id`` unique in the file. Every bound holds before any line is stored: the lines, the
inputs per line and the characters per input, so a hostile file costs the parser no more than its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from modelmeter.models.finetune.dataset import DatasetError, decode_text, json_object
from modelmeter.models.requests import ClassifyRequest, EmbeddingsRequest, EntitiesRequest

MAX_LINES = 50_000
MAX_CUSTOM_ID = 64
BatchBody = ClassifyRequest | EmbeddingsRequest | EntitiesRequest
ENDPOINTS: dict[str, type[BatchBody]] = {
    "/v1/classify": ClassifyRequest,
    "/v1/embeddings": EmbeddingsRequest,
    "/v1/entities": EntitiesRequest,
}
_KEYS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True, slots=True)
class BatchLine:
    line: int  # 1-based, in the file
    custom_id: str
    url: str
    body: BatchBody  # the route's request model, validated


@dataclass(frozen=True, slots=True)
class BatchFile:
    lines: list[BatchLine]

    @property
    def urls(self) -> set[str]:
        return {line.url for line in self.lines}


def parse_batch_file(data: bytes, *, max_inputs: int, max_text_chars: int, max_lines: int = MAX_LINES) -> BatchFile:
    """Parse and validate a batch file; raise :class:`DatasetError` naming the line of the first problem."""
    text = decode_text(data)
    lines: list[BatchLine] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) == max_lines:
            raise DatasetError(f"more than {max_lines} requests in one batch file")
        item = _line(json_object(raw, number), number, max_inputs=max_inputs, max_text_chars=max_text_chars)
        if item.custom_id in first_line:
            raise DatasetError(f"custom_id {item.custom_id!r} repeats line {first_line[item.custom_id]}", number)
        first_line[item.custom_id] = number
        lines.append(item)
    if not lines:
        raise DatasetError("file is empty")
    return BatchFile(lines)


def _line(obj: dict[str, Any], number: int, *, max_inputs: int, max_text_chars: int) -> BatchLine:
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise DatasetError(f"unknown field {unknown[0]!r} (a line has custom_id, method, url and body)", number)
    missing = sorted(_KEYS - set(obj))
    if missing:
        raise DatasetError(f"missing {missing[0]!r}", number)
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID or not custom_id.isprintable():
        raise DatasetError(f"'custom_id' must be 1-{MAX_CUSTOM_ID} printable characters", number)
    if obj["method"] != "POST":
        raise DatasetError("'method' must be \"POST\"", number)
    url = obj["url"]
    if not isinstance(url, str) or url not in ENDPOINTS:
        raise DatasetError(f"'url' must be one of {', '.join(ENDPOINTS)}", number)
    if not isinstance(obj["body"], dict):
        raise DatasetError("'body' must be a JSON object", number)
    try:
        body = ENDPOINTS[url].model_validate(obj["body"])
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in ("body", *error["loc"]))
        raise DatasetError(f"{where}: {error['msg']}", number) from None
    texts = [body.input] if isinstance(body.input, str) else body.input
    if len(texts) > max_inputs:
        raise DatasetError(f"body.input: at most {max_inputs} inputs per request", number)
    if any(len(t) > max_text_chars for t in texts):
        raise DatasetError(f"body.input: an input is over {max_text_chars} characters", number)
    return BatchLine(number, custom_id, url, body)
