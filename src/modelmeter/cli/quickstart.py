"""``modelmeter quickstart``: a demo tenant, a key and a sentiment classifier, then examples that work when pasted.

Idempotent: it looks for what an earlier run made (the tenant by its e-mail, the key by its name, the sample file
by name and size, the job by its file and suffix) and makes only what is missing. When a server answers at
``--url`` it drives that server through its admin and tenant API and the server's worker trains; otherwise it
does the same here, through the same service functions, and trains in this process. Either way it reads the
state and follows the job in the database (as ``modelmeter jobs`` does), so its progress bar is the same.
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import click

from modelmeter import clock
from modelmeter.cli.output import admin_services, reports_errors
from modelmeter.cli.progress import ProgressDisplay, follow_job
from modelmeter.errors import NotFoundError
from modelmeter.gateway.services import Services
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import parse_dataset
from modelmeter.models.finetune.tables import FINISHED_STATUSES
from modelmeter.models.registry import BASE_MODEL_ID
from modelmeter.ops import files as ops_files
from modelmeter.ops import jobs as ops_jobs
from modelmeter.ops import tenants as ops_tenants
from modelmeter.tenancy.keys import ApiKey, ApiKeyCreate
from modelmeter.tenancy.tenants import Tenant, TenantCreate

DEMO_NAME = "Demo"
DEMO_EMAIL = "demo@quickstart.modelmeter.test"
DEMO_PLAN = "pro"
KEY_NAME = "quickstart"
SAMPLE = "sst2_sample.jsonl"
SUFFIX = "sentiment"
N_EPOCHS = 3
POSITIVE = "a gripping, beautifully acted film"
NEGATIVE = "a dull, lifeless mess"
DEFAULT_URL = "http://127.0.0.1:8000"


def sample_bytes() -> bytes:
    """The packaged SST-2 sample (``modelmeter/data/``, with its attribution in the README beside it)."""
    return resources.files("modelmeter").joinpath("data", SAMPLE).read_bytes()


# --- what an earlier run made -----------------------------------------------------------------------------------


def find_tenant(services: Services) -> Tenant | None:
    after = None
    while True:
        rows, has_more = ops_tenants.list_tenants(sessions=services.sessions, limit=1000, after=after)
        for tenant in rows:
            if tenant.email == DEMO_EMAIL:
                return tenant
        if not has_more or not rows:
            return None
        after = rows[-1].id


def find_key(services: Services, tenant_id: str) -> ApiKey | None:
    """The demo tenant's newest active key named ``quickstart`` that has not been rolled."""
    rows, _ = ops_tenants.list_keys(sessions=services.sessions, tenant_id=tenant_id, limit=1000, after=None)
    now = clock.now_s()
    usable = [k for k in rows if k.name == KEY_NAME and k.status_at(now) == "active" and k.rolled_to is None]
    return max(usable, key=lambda k: (k.created, k.id), default=None)


def find_file(services: Services, tenant_id: str, size: int) -> str | None:
    with services.sessions() as session:
        rows, _ = jobs.list_files(session=session, tenant_id=tenant_id, limit=1000, after=None)
    return next((f.id for f in rows if f.filename == SAMPLE and f.bytes == size), None)


def find_job(services: Services, tenant_id: str, file_id: str) -> dict[str, Any] | None:
    data, _ = ops_jobs.list_jobs(sessions=services.sessions, tenant_id=tenant_id, limit=1000, after=None)
    usable = [j for j in data if j["training_file"] == file_id and j["user_provided_suffix"] == SUFFIX
              and j["status"] not in ("failed", "cancelled")]
    return usable[0] if usable else None  # newest first


# --- the two ways of making what is missing ---------------------------------------------------------------------


class Backend(Protocol):
    def create_tenant(self) -> str: ...
    def issue_key(self, tenant_id: str, data: ApiKeyCreate) -> tuple[str, str]: ...
    def revoke_key(self, key_id: str) -> None: ...
    def upload(self, key: str, tenant_id: str, data: bytes) -> str: ...
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

    def upload(self, key: str, tenant_id: str, data: bytes) -> str:
        settings = self.services.settings
        parsed = parse_dataset(data, filename=SAMPLE, max_rows=settings.max_file_rows,
                               max_text_chars=settings.max_text_chars, max_labels=settings.max_labels)
        return ops_files.store_file(sessions=self.services.sessions, data_dir=settings.data_dir, tenant_id=tenant_id,
                                    filename=SAMPLE, data=data, parsed=parsed).id

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

    def upload(self, key: str, tenant_id: str, data: bytes) -> str:
        return str(self.request("POST", "/v1/files", key, form=(SAMPLE, data))["id"])

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


# --- training here ----------------------------------------------------------------------------------------------


class LocalTrainer:
    """A worker in a thread of this process that runs queued jobs until ours has finished."""

    def __init__(self, services: Services, job_id: str) -> None:
        from transformers.utils import logging as transformers_logging

        from modelmeter.trainer import build_worker

        # The base model's load report (a fresh classification head is "missing") is noise on this terminal.
        transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.services = services
        self.job_id = job_id
        self.worker = build_worker(services.settings, engine=services.engine, show_progress=False)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="quickstart-worker")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                job = ops_jobs.get_job(sessions=self.services.sessions, job_id=self.job_id)
                if job["status"] in FINISHED_STATUSES:
                    return
                if not self.worker.run_once(only=self.job_id):  # never another tenant's job
                    self.stop.wait(self.services.settings.worker_poll_s)
        except BaseException as exc:  # reported by check() in the thread that follows the job
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise click.ClickException(f"Training here failed: {type(self.error).__name__}: {self.error}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


# --- the command ------------------------------------------------------------------------------------------------


def _say(what: str, text: str) -> None:
    click.echo(f"{what:<7} {text}")


def _serve_hint(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    options = ""
    if parsed.hostname not in (None, "127.0.0.1", "localhost"):
        options += f" --host {parsed.hostname}"
    if parsed.port not in (None, 8000):
        options += f" --port {parsed.port}"
    return f"modelmeter serve{options}"


def examples(url: str, key: str, model: str) -> str:
    """A curl line, an ``openai`` and a ``huggingface_hub`` snippet that call ``model`` with ``key``."""
    base = url.rstrip("/")
    body = json.dumps({"model": model, "input": POSITIVE})
    assert "'" not in body  # it goes between single quotes in the shell
    return "\n".join([
        "# shell",
        f'curl -s {base}/v1/classify -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
        f"     -d '{body}'",
        "",
        "# Python, with openai (pip install openai)",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{base}/v1", api_key="{key}")',
        f'answer = client.post("/classify", cast_to=dict, body={{"model": "{model}", '
        f'"input": ["{POSITIVE}", "{NEGATIVE}"]}})',
        'print([(row["label"], round(row["score"], 3)) for row in answer["data"]])',
        "",
        "# Python, with huggingface_hub (pip install huggingface_hub)",
        "from huggingface_hub import InferenceClient",
        f'client = InferenceClient(model="{base}/models/{model}", token="{key}")',
        f'print(client.text_classification("{POSITIVE}"))',
    ])


@click.command()
@click.option("--url", default=DEFAULT_URL, show_default=True,
              help="Where the server answers (or will, once started): used if one answers, and in the examples.")
@click.option("--worker-wait", default=15.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds a running server's worker gets to start the job before it is trained here instead.")
@reports_errors
def quickstart(url: str, worker_wait: float) -> None:
    """Make a demo tenant (plan pro), a key and a sentiment classifier fine-tuned on a sample of SST-2 (packaged,
    with its attribution), then print curl, openai and huggingface_hub examples. Running it again changes
    nothing that is already there."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise click.BadParameter(f"'{url}' is not an http(s) URL, such as {DEFAULT_URL}.", param_hint="--url")
    remote = server_answers(url)
    if remote:
        click.echo(f"A server answers at {url}: using its admin and tenant API; its worker trains.")
    else:
        click.echo(f"No server answers at {url}: doing it here, in this process (start the server afterwards).")
    with admin_services() as services:
        backend: Backend
        if remote:
            http = OverHttp(url, services.settings.admin_token or "")
            http.check_admin()
            backend = http
        else:
            backend = InProcess(services)
        changed, key, model = _run(services, backend, remote=remote, worker_wait=worker_wait)
    click.echo("")
    if not changed:
        click.echo("Nothing changed: the demo tenant, its key, the file and the model were all there.")
    if not remote:
        click.echo(f"Start the server ({_serve_hint(url)}), then paste these:")
    else:
        click.echo("Paste these:")
    click.echo("")
    click.echo(examples(url, key.plaintext or "mm_…", model))
    if not key.plaintext:
        click.echo("")
        click.echo(f"Replace mm_… with the key {key.key_id} printed when it was issued (it is shown only once), or "
                   f"issue a new one: modelmeter key roll {key.key_id}")


@dataclass
class KeyState:
    key_id: str
    plaintext: str | None  # only when issued by this run


def _run(services: Services, backend: Backend, *, remote: bool, worker_wait: float) -> tuple[bool, KeyState, str]:
    """Find or make each piece in turn: whether anything changed, the key, the model id."""
    tenant, made_tenant = _tenant(services, backend)
    key = _key(services, backend, tenant)
    job, made_job = _job(services, backend, tenant, key, remote=remote)
    if job["status"] != "succeeded":
        job = _train(services, job["id"], remote=remote, worker_wait=worker_wait)
        if job["status"] != "succeeded":
            error = job["error"] or {}
            raise click.ClickException(f"Job {job['id']} {job['status']}: {error.get('message', '')} "
                                       f"(modelmeter jobs events {job['id']})")
        result = job["result"] or {}
        _say("model", f"{job['fine_tuned_model']}: trained in {result.get('wall_s', '?')} s, accuracy "
                      f"{result.get('accuracy', float('nan')):.3f} on {result.get('n_validation', '?')} held-out rows")
    else:
        result = job["result"] or {}
        _say("model", f"{job['fine_tuned_model']}: found (accuracy {result.get('accuracy', float('nan')):.3f})")
    return made_tenant or key.plaintext is not None or made_job, key, str(job["fine_tuned_model"])


def _tenant(services: Services, backend: Backend) -> tuple[Tenant, bool]:
    tenant = find_tenant(services)
    if tenant is not None:
        _say("tenant", f"{tenant.id} {tenant.name} <{tenant.email}> on plan {tenant.plan}: found")
        return tenant, False
    tenant_id = backend.create_tenant()
    try:
        tenant = ops_tenants.get_tenant(sessions=services.sessions, tenant_id=tenant_id)
    except NotFoundError:
        raise click.ClickException(
            f"The server made tenant {tenant_id}, but this command's database has no such tenant: give this "
            "command the server's MODELMETER_DATABASE_URL (or MODELMETER_DATA_DIR).") from None
    _say("tenant", f"{tenant.id} {tenant.name} <{tenant.email}> on plan {tenant.plan}: created")
    return tenant, True


def _key(services: Services, backend: Backend, tenant: Tenant) -> KeyState:
    found = find_key(services, tenant.id)
    if found is not None:
        _say("key", f"{found.id} {found.prefix}…{found.last4}: found (issued earlier; its secret was shown then, "
                    "once)")
        return KeyState(found.id, None)
    key_id, plaintext = backend.issue_key(tenant.id, ApiKeyCreate(name=KEY_NAME))
    _say("key", f"{key_id} {plaintext[:6]}…{plaintext[-4:]}: issued (shown in full below, this once)")
    return KeyState(key_id, plaintext)


def _job(services: Services, backend: Backend, tenant: Tenant, key: KeyState, *,
         remote: bool) -> tuple[dict[str, Any], bool]:
    """The job that trains (or trained) the classifier on the sample, uploading and creating what is missing."""
    data = sample_bytes()
    file_id = find_file(services, tenant.id, len(data))
    job = find_job(services, tenant.id, file_id) if file_id else None
    if file_id is not None and job is not None:
        _say("file", f"{file_id} {SAMPLE}: found")
        if job["status"] != "succeeded":
            _say("model", f"job {job['id']} is {job['status']}: following it")
        return job, False
    setup_key: tuple[str, str] | None = None
    tenant_key = key.plaintext
    if tenant_key is None and remote:  # the tenant API needs a key whose secret this run knows: a short-lived one
        setup_key = backend.issue_key(tenant.id, ApiKeyCreate(name=f"{KEY_NAME}-setup", scopes=["fine-tune"],
                                                              expires_at=clock.now_s() + 3600))
        tenant_key = setup_key[1]
    try:
        if file_id is None:
            file_id = backend.upload(tenant_key or "", tenant.id, data)
            rows = data.count(b"\n")
            _say("file", f"{file_id} {SAMPLE} ({rows:,} labeled sentences of SST-2: GLUE, Socher et al. 2013): "
                         "uploaded")
        body = {"model": BASE_MODEL_ID, "training_file": file_id, "suffix": SUFFIX,
                "hyperparameters": {"n_epochs": N_EPOCHS}}
        job_id = backend.create_job(tenant_key or "", tenant.id, body)
    finally:
        if setup_key is not None:
            backend.revoke_key(setup_key[0])
    _say("model", f"fine-tuning {BASE_MODEL_ID} with a LoRA adapter (the default training type): job {job_id}")
    return ops_jobs.get_job(sessions=services.sessions, job_id=job_id), True


def _train(services: Services, job_id: str, *, remote: bool, worker_wait: float) -> dict[str, Any]:
    """Follow the job until it finishes, training it here unless a server's worker starts it in time."""
    trainer: LocalTrainer | None = None
    started = clock.now()

    def train_here() -> None:
        nonlocal trainer
        trainer = LocalTrainer(services, job_id)
        trainer.start()

    def on_poll(job: dict[str, Any]) -> None:
        if trainer is not None:
            trainer.check()
        elif job["status"] == "queued" and clock.now() - started > worker_wait:
            click.echo(f"The server's worker has not started the job in {worker_wait:g} s (is it running with "
                       "--no-worker, or busy?): training here, in this process, as well.")
            train_here()

    if not remote:
        train_here()
    display = ProgressDisplay()
    try:
        return follow_job(lambda after: ops_jobs.job_events(sessions=services.sessions, job_id=job_id,
                                                            after_seq=after), display, on_poll=on_poll)
    except KeyboardInterrupt:
        raise click.ClickException(f"Interrupted: job {job_id} is left as it is; run modelmeter quickstart again to "
                                   "pick it up.") from None
    finally:
        if trainer is not None:
            trainer.close()


COMMANDS = (quickstart,)
