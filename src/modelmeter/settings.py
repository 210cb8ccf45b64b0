"""Settings read from the environment (prefix ``MODELMETER_``); ``get_settings()`` is the dependency."""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ADMIN_TOKEN_FILE = "admin_token"  # noqa: S105 (a file name)


class Settings(BaseSettings):
    """Every knob of the platform; the defaults run everything on one machine."""

    model_config = SettingsConfigDict(env_prefix="MODELMETER_", extra="ignore")

    data_dir: Path = Path("./.modelmeter")
    database_url: str | None = None
    redis_url: str | None = None
    admin_token: str | None = None
    device: str = "auto"
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_live_mode: bool = False
    plans_file: Path | None = None

    # HTTP edge
    max_body_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    key_cache_ttl_s: Annotated[float, Field(ge=0)] = 30.0
    auth_failures_per_minute: Annotated[int, Field(gt=0)] = 30  # per client address, then 429 before any lookup
    last_used_flush_s: Annotated[float, Field(gt=0)] = 60.0
    default_key_grace_s: Annotated[int, Field(ge=0)] = 24 * 3600
    idempotency_ttl_s: Annotated[int, Field(gt=0)] = 24 * 3600  # how long an Idempotency-Key's answer is kept
    idempotency_max_answer_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024  # larger: a 409 is kept instead
    idempotency_lock_s: Annotated[int, Field(gt=0)] = 120  # lease on a key in flight (frees a dead replica's)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    fast_lane: bool = True  # /v1/embeddings and /v1/classify by gateway/fastlane.py (same answers, less CPU)

    # Serving
    max_inputs_per_request: Annotated[int, Field(gt=0)] = 256
    max_batch_tokens: Annotated[int, Field(gt=0)] = 16384
    max_batch_size: Annotated[int, Field(gt=0)] = 64
    max_wait_ms: Annotated[float, Field(ge=0)] = 2.0
    max_padding_ratio: Annotated[float, Field(ge=1)] = 1.3
    max_queue_requests: Annotated[int, Field(gt=0)] = 1024
    # Batch API lines run behind interactive rows: at most this share of the rows served beside interactive ones,
    # and batches of at most this many rows alone, once no interactive row was seen for batch_idle_ms.
    # 0.2: interactive p50 within ~1.2x beside a batch on the 2-core CPU (bench/batches.py: 0.15 gave 1.13x,
    # 0.25 gave 1.26x); a GPU, where a pass of 64 rows costs about what 8 do, can take far more.
    batch_share: Annotated[float, Field(ge=0, le=1)] = 0.2
    batch_max_rows: Annotated[int, Field(ge=1)] = 8
    batch_idle_ms: Annotated[float, Field(ge=0)] = 20.0  # float-ok: milliseconds
    pool_memory_mb: Annotated[int, Field(gt=0)] = 4096  # full model copies (full fine-tunes)
    adapter_pool_mb: Annotated[int, Field(gt=0)] = 2048  # resident LoRA adapters, per base model
    # Device pages for adapters (two tiers, backed by host memory): unset = 1024 on CUDA, one tier on the CPU;
    # 0 = one tier; N = N MiB of device pages (on the CPU too, where it only serves tests of the mechanism).
    adapter_device_mb: Annotated[int, Field(ge=0)] | None = None
    torch_threads: Annotated[int, Field(ge=0)] = 0  # 0: one per core
    # Engines (`serve --workers N`): one process per device; unset = every CUDA device, else the CPU.
    devices: str | None = None
    # batch_ms=<float>,row_us=<float>: engines wait instead of computing (capacity planning only; never a default).
    simulated_device: str | None = None
    # Set by `serve` for its fronts: the engines' ipc socket paths, comma-separated (in-process engine when unset).
    engine_sockets: str | None = None

    # Fine-tuning
    start_worker: bool = True
    max_file_bytes: Annotated[int, Field(gt=0)] = 50 * 1024 * 1024
    max_file_rows: Annotated[int, Field(gt=0)] = 200_000
    max_labels: Annotated[int, Field(ge=2)] = 100
    max_text_chars: Annotated[int, Field(gt=0)] = 10_000
    max_active_jobs_per_tenant: Annotated[int, Field(gt=0)] = 2
    worker_poll_s: Annotated[float, Field(gt=0)] = 1.0
    job_heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 120.0

    # Stripe (the relay runs inside `serve` when stripe_api_key is set; see billing/stripe/)
    stripe_sync_interval_s: Annotated[int, Field(ge=1)] = 10
    stripe_max_network_retries: Annotated[int, Field(ge=0, le=10)] = 2
    stripe_timeout_s: Annotated[int, Field(gt=0)] = 30
    stripe_max_attempts: Annotated[int, Field(ge=1)] = 10  # for errors Stripe will not fix by itself
    past_due_grace_s: Annotated[int, Field(ge=0)] = 7 * 24 * 3600  # past_due this long -> suspended

    # Usage alerts: the relay POSTing events to tenants' URLs runs inside `serve` (0 switches it off)
    alerts_relay_interval_s: Annotated[float, Field(ge=0)] = 2.0
    batch_interval_s: Annotated[float, Field(ge=0)] = 1.0  # the batch runner's claim loop (0: no runner)
    batch_lease_s: Annotated[int, Field(ge=1)] = 60  # a runner that stops renewing gives its batch up after this
    alerts_max_attempts: Annotated[int, Field(ge=1)] = 8  # then the delivery is `failed`
    alerts_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    alerts_refresh_s: Annotated[float, Field(gt=0)] = 1.0  # how soon a PUT on another replica takes effect here
    alerts_backoff_base_s: Annotated[int, Field(ge=1)] = 10  # 10 s, 20 s, 40 s, ... capped at an hour
    # Alert URLs may not point at loopback, private, link-local or other non-public addresses (the gateway would
    # POST into its own network for any tenant); a development set-up with a local receiver turns this on.
    alerts_allow_private_urls: bool = False

    # Observability and economics
    metrics_max_tenants: Annotated[int, Field(ge=0)] = 100
    dashboard_link_ttl_s: Annotated[int, Field(gt=0)] = 3600
    cpu_core_hour_cost: str = "0.05"
    gpu_hour_cost: str = "2.50"
    metrics_max_models: Annotated[int, Field(ge=0)] = 200
    metrics_db_ttl_s: Annotated[float, Field(ge=0)] = 15.0  # scrape-time database gauges are cached this long
    dashboard_secret: str | None = None  # signs dashboard links; derived from the admin token when unset
    metrics_token: str | None = None  # a bearer token for GET /metrics besides the admin token (Prometheus's)
    public_url: str | None = None  # the gateway's external base URL, for links made outside a request (CLI)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or the SQLite file inside the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'modelmeter.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


def private_data_dir(settings: Settings) -> Path:
    """The data directory, created (or narrowed) to 0700: it holds the SQLite database with alert secrets and
    Stripe ids, tenants' training files and models, and the admin token (issue 21: it was 0755, the database 0644)."""
    path = settings.data_dir
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def ensure_admin_token(settings: Settings) -> tuple[str, bool]:
    """Return the admin token and whether it was generated now (first start).

    An explicit ``MODELMETER_ADMIN_TOKEN`` wins; otherwise the token lives in the data dir (mode 0600).
    """
    if settings.admin_token:
        return settings.admin_token, False
    path = settings.data_dir / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        settings.admin_token = token
        return token, False
    private_data_dir(settings)
    token = "mmadmin_" + secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    settings.admin_token = token
    return token, True


# The secrets `serve` refuses: shorter than this, or a placeholder shipped in deploy/ (tests/unit/test_secrets.py
# reads every value deploy/ ships for these settings and checks each is listed here).
MIN_SECRET_CHARS = 32
PLACEHOLDER_SECRETS = frozenset({
    "mmadmin_change-me", "change-me-to-32-random-bytes", "mmadmin_change-me-to-a-long-random-token",
    "change-me-to-a-long-random-signing-secret", "change-me-to-a-long-random-metrics-token",
})
_CHECKED_SECRETS = {"admin_token": "MODELMETER_ADMIN_TOKEN", "dashboard_secret": "MODELMETER_DASHBOARD_SECRET",
                    "stripe_webhook_secret": "MODELMETER_STRIPE_WEBHOOK_SECRET",
                    "metrics_token": "MODELMETER_METRICS_TOKEN"}


def weak_secrets(settings: Settings) -> list[str]:
    """One message per secret that is set but too short or a shipped placeholder (empty means unset)."""
    problems = []
    for field, variable in _CHECKED_SECRETS.items():
        value = getattr(settings, field)
        if not value:
            continue
        if value in PLACEHOLDER_SECRETS or "change-me" in value:
            problems.append(f"{variable} is the placeholder shipped in deploy/: set a random value of its own")
        elif len(value) < MIN_SECRET_CHARS:
            problems.append(f"{variable} has {len(value)} characters; it needs at least {MIN_SECRET_CHARS} "
                            "(e.g. openssl rand -hex 24)")
    return problems


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own and pass them to ``create_app``)."""
    return Settings()
