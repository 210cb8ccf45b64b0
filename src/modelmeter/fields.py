"""Request field types that accept exactly what their JSON schema says, so that clients, generated SDKs and the
contract tests (schemathesis, which reads the schema with Python's ``re`` and JSON's number model) agree with
the validation.

- ``Annotated[int, Strict(), Field(…bounds…), INTEGRAL]``: a JSON integer. JSON Schema counts ``3.0`` as an
  integer and ``"3"`` or ``true`` as not; pydantic's lax ``int`` takes all three and its strict one refuses
  ``3.0``. Strict plus ``INTEGRAL`` (integral floats become ints first) takes ints and integral floats only. The
  order matters: ``INTEGRAL`` last wraps the bounded int, so the schema keeps ``minimum``/``maximum``.
- ``PYTHON_RE``: the regex engine for models with patterns. pydantic's default (Rust's ``regex``) differs from
  Python's ``re`` at the edges (``$`` before a final newline, which characters ``\\s`` means), and the schema's
  readers use ``re``.
- ``matching(pattern)``: a pattern on a query parameter, checked with ``re`` and stated in the schema (FastAPI's
  own ``Query(pattern=…)`` would use the Rust engine).
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import AfterValidator, BeforeValidator

INT32_MAX: Final = 2**31 - 1  # the largest value the integer columns hold on PostgreSQL
PYTHON_RE: Final[Literal["python-re"]] = "python-re"


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)


def matching(pattern: str) -> AfterValidator:
    """A validator refusing a string ``re.search(pattern, …)`` does not match (JSON Schema's semantics)."""
    compiled = re.compile(pattern)

    def check(value: str | None) -> str | None:
        if value is not None and compiled.search(value) is None:
            raise ValueError(f"must match the pattern {pattern}")
        return value

    return AfterValidator(check)
