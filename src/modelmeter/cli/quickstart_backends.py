"""The two ways ``modelmeter quickstart`` makes what is missing: the service functions the admin and tenant routes
call, in this process; or a running server's admin and tenant API."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from typing import Any, Protocol

import click

from modelmeter.gateway.services import Services
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import ParsedDataset, parse_dataset
from modelmeter.models.finetune.tagged import TaggedDataset, looks_tagged, parse_tagged
from modelmeter.ops import files as ops_files
from modelmeter.ops import jobs as ops_jobs
from modelmeter.ops import tenants as ops_tenants
from modelmeter.tenancy.keys import ApiKeyCreate
from modelmeter.tenancy.tenants import TenantCreate

DEMO_NAME = "Demo"
DEMO_EMAIL = "demo@quickstart.modelmeter.test"
DEMO_PLAN = "pro"


# --- the two ways of making what is missing ---------------------------------------------------------------------


class Backend(Protocol):
    def create_tenant(self) -> str: ...
    def issue_key(self, tenant_id: str, data: ApiKeyCreate) -> tuple[str, str]: ...
    def revoke_key(self, key_id: str) -> None: ...
    def upload(self, key: str, tenant_id: str, filename: str, data: bytes) -> str: ...
    def create_job(self, key: str, tenant_id: str, body: dict[str, Any]) -> str: ...


class InProcess:
    """The service functions the admin and tenant routes call, on this command's database."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def create_tenant(self) -> str:
        data = TenantCreate(name=DEMO_NAME, email=DEMO_EMAIL, plan=DEMO_PLAN)
        return ops_tenants.create_tenant(sessions=self.services.sessions, catalog=self.services.plans, data=data).id

    def issue_key(self, tenant_id: str, data: ApiKeyCreate) -> tuple[str, str]:
        row, plaintext = ops_tenants.issue_key(sessions=self.services.sessions, tenant_id=tenant_id, data=data)
        return row.id, plaintext

    def revoke_key(self, key_id: str) -> None:
        ops_tenants.revoke_key(sessions=self.services.sessions, key_id=key_id)

    def upload(self, key: str, tenant_id: str, filename: str, data: bytes) -> str:
        settings = self.services.settings
        parsed: ParsedDataset | TaggedDataset
        if looks_tagged(data):
            parsed = parse_tagged(data, max_rows=settings.max_file_rows, max_text_chars=settings.max_text_chars)
        else:
            parsed = parse_dataset(data, filename=filename, max_rows=settings.max_file_rows,
                                   max_text_chars=settings.max_text_chars, max_labels=settings.max_labels)
        return ops_files.store_file(sessions=self.services.sessions, data_dir=settings.data_dir, tenant_id=tenant_id,
                                    filename=filename, data=data, parsed=parsed).id

    def create_job(self, key: str, tenant_id: str, body: dict[str, Any]) -> str:
        settings = self.services.settings
        created = ops_jobs.create_job(
            sessions=self.services.sessions, catalog=self.services.plans, data_dir=settings.data_dir,
            max_active=settings.max_active_jobs_per_tenant, tenant_id=tenant_id, data=jobs.JobCreate(**body),
            bases=ops_jobs.base_models(sessions=self.services.sessions))
        return created.job.id


class OverHttp:
    """A running server's admin API (with the admin token) and tenant API (with the tenant's key)."""

    def __init__(self, url: str, admin_token: str) -> None:
        self.url = url.rstrip("/")
        self.admin_token = admin_token

    def request(self, method: str, path: str, token: str, body: dict[str, Any] | None = None,
                form: tuple[str, bytes] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif form is not None:
            boundary = secrets.token_hex(16)
            filename, content = form
            data = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + \
                f"\r\n--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 (the operator's URL)
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")[:200]
            hint = (" (this command's admin token is not the server's: set MODELMETER_ADMIN_TOKEN, or "
                    "MODELMETER_DATA_DIR to the server's)") if exc.code == 401 and token == self.admin_token else ""
            raise click.ClickException(f"{method} {self.url}{path}: {exc.code} {message}{hint}") from None

    def check_admin(self) -> None:
        self.request("GET", "/admin/tenants?limit=1", self.admin_token)

    def create_tenant(self) -> str:
        body = {"name": DEMO_NAME, "email": DEMO_EMAIL, "plan": DEMO_PLAN}
        return str(self.request("POST", "/admin/tenants", self.admin_token, body)["id"])

    def issue_key(self, tenant_id: str, data: ApiKeyCreate) -> tuple[str, str]:
        created = self.request("POST", f"/admin/tenants/{tenant_id}/keys", self.admin_token,
                               data.model_dump(exclude_none=True))
        return str(created["id"]), str(created["key"])

    def revoke_key(self, key_id: str) -> None:
        self.request("DELETE", f"/admin/keys/{key_id}", self.admin_token)

    def upload(self, key: str, tenant_id: str, filename: str, data: bytes) -> str:
        return str(self.request("POST", "/v1/files", key, form=(filename, data))["id"])

    def create_job(self, key: str, tenant_id: str, body: dict[str, Any]) -> str:
        return str(self.request("POST", "/v1/fine_tuning/jobs", key, body)["id"])


def server_answers(url: str) -> bool:
    """Whether a modelmeter server answers ``GET /readyz`` at ``url`` (no: nothing listens there)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=3) as response:  # noqa: S310
            return bool(json.loads(response.read()).get("status") == "ready")
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"A server answers at {url} but is not ready ({exc.code}): start it again, or "
                                   "give another --url.") from None
    except (urllib.error.URLError, OSError, ValueError):
        return False
