"""``modelmeter quickstart``: a demo tenant, a key and a sentiment classifier, then examples that work when pasted.

Idempotent: it looks for what an earlier run made (the tenant by its e-mail, the key by its name, the sample file
by name and size, the job by its file and suffix) and makes only what is missing. When a server answers at
``--url`` it drives that server through its admin and tenant API and the server's worker trains; otherwise it
does the same here, through the same service functions, and trains in this process. Either way it reads the
state and follows the job in the database (as ``modelmeter jobs`` does), so its progress bar is the same.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources

import click

from modelmeter import clock
from modelmeter.cli.output import admin_services, reports_errors
from modelmeter.cli.progress import ProgressDisplay, follow_job
from modelmeter.cli.quickstart_backends import DEMO_EMAIL, Backend, InProcess, OverHttp, server_answers
from modelmeter.errors import NotFoundError
from modelmeter.gateway.services import Services
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.tables import FINISHED_STATUSES, FineTuningJobPublic
from modelmeter.models.registry import BASE_MODEL_ID
from modelmeter.ops import jobs as ops_jobs
from modelmeter.ops import tenants as ops_tenants
from modelmeter.tenancy.keys import ApiKey, ApiKeyCreate
from modelmeter.tenancy.tenants import Tenant

KEY_NAME = "quickstart"


@dataclass(frozen=True)
class Recipe:
    """One demo model: the packaged sample it trains on, and how it is described."""

    sample: str
    suffix: str
    task: str
    n_epochs: int
    rows_are: str  # what the sample's rows are, with their attribution
    metric: str  # the job result's headline figure


SENTIMENT = Recipe("sst2_sample.jsonl", "sentiment", "text-classification", 3,
                   "labeled sentences of SST-2: GLUE, Socher et al. 2013", "accuracy")
ENTITIES = Recipe("entities_sample.jsonl", "entities", "token-classification", 4,
                  "tagged sentences written for modelmeter: names of people, companies and places", "f1")
ENTITY_TEXT = "Maria Lopez from Northwind Bank called about her Lisbon account"
POSITIVE = "a gripping, beautifully acted film"
NEGATIVE = "a dull, lifeless mess"
DEFAULT_URL = "http://127.0.0.1:8000"


def sample_bytes(recipe: Recipe = SENTIMENT) -> bytes:
    """A packaged sample (``modelmeter/data/``, with its attribution in the README beside it)."""
    return resources.files("modelmeter").joinpath("data", recipe.sample).read_bytes()


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


def find_file(services: Services, tenant_id: str, size: int, recipe: Recipe = SENTIMENT) -> str | None:
    with services.sessions() as session:
        rows, _ = jobs.list_files(session=session, tenant_id=tenant_id, limit=1000, after=None)
    return next((f.id for f in rows if f.filename == recipe.sample and f.bytes == size), None)


def find_job(services: Services, tenant_id: str, file_id: str, recipe: Recipe = SENTIMENT
             ) -> FineTuningJobPublic | None:
    data, _ = ops_jobs.list_jobs(sessions=services.sessions, tenant_id=tenant_id, limit=1000, after=None)
    usable = [j for j in data if j.training_file == file_id and j.user_provided_suffix == recipe.suffix
              and j.status not in ("failed", "cancelled")]
    return usable[0] if usable else None  # newest first


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
                if job.status in FINISHED_STATUSES:
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


def entity_examples(url: str, key: str, model: str) -> str:
    """A curl line and a ``huggingface_hub`` snippet that find the entities in a sentence with the tagger."""
    base = url.rstrip("/")
    body = json.dumps({"model": model, "input": ENTITY_TEXT})
    assert "'" not in body
    return "\n".join([
        "# named entities, shell",
        f'curl -s {base}/v1/entities -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
        f"     -d '{body}'",
        "",
        "# named entities, Python with huggingface_hub",
        "from huggingface_hub import InferenceClient",
        f'client = InferenceClient(model="{base}/models/{model}", token="{key}")',
        f'print(client.token_classification("{ENTITY_TEXT}"))',
    ])


@click.command()
@click.option("--url", default=DEFAULT_URL, show_default=True,
              help="Where the server answers (or will, once started): used if one answers, and in the examples.")
@click.option("--worker-wait", default=15.0, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds a running server's worker gets to start the job before it is trained here instead.")
@click.option("--with-entities", is_flag=True,
              help="Also fine-tune a named-entity tagger on the packaged entity sample (people, companies, places).")
@reports_errors
def quickstart(url: str, worker_wait: float, with_entities: bool) -> None:
    """Make a demo tenant (plan pro), a key and a sentiment classifier fine-tuned on a sample of SST-2 (packaged,
    with its attribution), with ``--with-entities`` a named-entity tagger too, then print curl, openai and
    huggingface_hub examples. Running it again changes nothing that is already there."""
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
        recipes = (SENTIMENT, ENTITIES) if with_entities else (SENTIMENT,)
        changed, key, models = _run(services, backend, remote=remote, worker_wait=worker_wait, recipes=recipes)
    click.echo("")
    if not changed:
        click.echo("Nothing changed: the demo tenant, its key, the file and the model were all there.")
    if not remote:
        click.echo(f"Start the server ({_serve_hint(url)}), then paste these:")
    else:
        click.echo("Paste these:")
    click.echo("")
    click.echo(examples(url, key.plaintext or "mm_…", models[0]))
    if with_entities:
        click.echo("")
        click.echo(entity_examples(url, key.plaintext or "mm_…", models[1]))
    if not key.plaintext:
        click.echo("")
        click.echo(f"Replace mm_… with the key {key.key_id} printed when it was issued (it is shown only once), or "
                   f"issue a new one: modelmeter key roll {key.key_id}")


@dataclass
class KeyState:
    key_id: str
    plaintext: str | None  # only when issued by this run


def _run(services: Services, backend: Backend, *, remote: bool, worker_wait: float,
         recipes: tuple[Recipe, ...] = (SENTIMENT,)) -> tuple[bool, KeyState, list[str]]:
    """Find or make each piece in turn: whether anything changed, the key, each recipe's model id."""
    tenant, made_tenant = _tenant(services, backend)
    key = _key(services, backend, tenant)
    changed, models = made_tenant or key.plaintext is not None, []
    for recipe in recipes:
        job, made_job = _job(services, backend, tenant, key, recipe, remote=remote)
        if job.status != "succeeded":
            job = _train(services, job.id, remote=remote, worker_wait=worker_wait)
            if job.status != "succeeded":
                error = job.error
                raise click.ClickException(f"Job {job.id} {job.status}: {error.message if error else ''} "
                                           f"(modelmeter jobs events {job.id})")
            result = job.result or {}
            _say("model", f"{job.fine_tuned_model}: trained in {result.get('wall_s', '?')} s, {recipe.metric} "
                          f"{result.get(recipe.metric, float('nan')):.3f} on {result.get('n_validation', '?')} "
                          "held-out rows")
        else:
            result = job.result or {}
            _say("model", f"{job.fine_tuned_model}: found ({recipe.metric} "
                          f"{result.get(recipe.metric, float('nan')):.3f})")
        changed = changed or made_job
        models.append(str(job.fine_tuned_model))
    return changed, key, models


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


def _job(services: Services, backend: Backend, tenant: Tenant, key: KeyState, recipe: Recipe, *,
         remote: bool) -> tuple[FineTuningJobPublic, bool]:
    """The job that trains (or trained) the recipe's model on its sample, uploading and creating what is missing."""
    data = sample_bytes(recipe)
    file_id = find_file(services, tenant.id, len(data), recipe)
    job = find_job(services, tenant.id, file_id, recipe) if file_id else None
    if file_id is not None and job is not None:
        _say("file", f"{file_id} {recipe.sample}: found")
        if job.status != "succeeded":
            _say("model", f"job {job.id} is {job.status}: following it")
        return job, False
    setup_key: tuple[str, str] | None = None
    tenant_key = key.plaintext
    if tenant_key is None and remote:  # the tenant API needs a key whose secret this run knows: a short-lived one
        setup_key = backend.issue_key(tenant.id, ApiKeyCreate(name=f"{KEY_NAME}-setup", scopes=["fine-tune"],
                                                              expires_at=clock.now_s() + 3600))
        tenant_key = setup_key[1]
    try:
        if file_id is None:
            file_id = backend.upload(tenant_key or "", tenant.id, recipe.sample, data)
            rows = data.count(b"\n")
            _say("file", f"{file_id} {recipe.sample} ({rows:,} {recipe.rows_are}): uploaded")
        body = {"model": BASE_MODEL_ID, "training_file": file_id, "suffix": recipe.suffix,
                "hyperparameters": {"n_epochs": recipe.n_epochs}, "task": recipe.task}
        job_id = backend.create_job(tenant_key or "", tenant.id, body)
    finally:
        if setup_key is not None:
            backend.revoke_key(setup_key[0])
    _say("model", f"fine-tuning {BASE_MODEL_ID} with a LoRA adapter (the default training type): job {job_id}")
    return ops_jobs.get_job(sessions=services.sessions, job_id=job_id), True


def _train(services: Services, job_id: str, *, remote: bool, worker_wait: float) -> FineTuningJobPublic:
    """Follow the job until it finishes, training it here unless a server's worker starts it in time."""
    trainer: LocalTrainer | None = None
    started = clock.now()

    def train_here() -> None:
        nonlocal trainer
        trainer = LocalTrainer(services, job_id)
        trainer.start()

    def on_poll(job: FineTuningJobPublic) -> None:
        if trainer is not None:
            trainer.check()
        elif job.status == "queued" and clock.now() - started > worker_wait:
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
