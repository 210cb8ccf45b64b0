"""What every operator verb shares: the platform's services for one command, and printing text or JSON."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec

import click
from pydantic import BaseModel, ValidationError

from modelmeter.errors import ModelMeterError
from modelmeter.gateway.services import Services
from modelmeter.settings import Settings, ensure_admin_token

P = ParamSpec("P")


def load_services() -> Services:
    """The platform's services on the configured database (migrated), printing the admin token if generated."""
    from modelmeter.gateway.wiring import build_services, prepare_database

    settings = Settings()
    token, generated = ensure_admin_token(settings)
    if generated:
        click.echo(f"Admin token (shown once, kept in {settings.data_dir}/admin_token): {token}", err=True)
    services = build_services(settings)
    prepare_database(services)
    return services


@contextmanager
def admin_services() -> Iterator[Services]:
    """The platform's services for one verb; the service functions they call own their transactions."""
    services = load_services()
    try:
        yield services
    finally:
        services.engine.dispose()


def emit(as_json: bool, payload: Any, human: Callable[[Any], str]) -> None:
    """Print ``payload`` as JSON (a public model as the API sends it) or as ``human(payload)`` says."""
    if as_json:
        data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human(payload))


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def fail(exc: Exception) -> None:
    if isinstance(exc, ModelMeterError):
        raise click.ClickException(f"{exc.message} ({exc.type})")
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        raise click.ClickException(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    raise exc


def reports_errors(verb: Callable[P, None]) -> Callable[P, None]:
    """A verb's refusals (the platform's errors, invalid input) printed as one line, exit status 1."""

    @functools.wraps(verb)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            verb(*args, **kwargs)
        except (ModelMeterError, ValidationError) as exc:
            fail(exc)

    return run


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


