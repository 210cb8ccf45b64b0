"""Every Prometheus metric of the platform, created on an injectable ``CollectorRegistry``.

Naming: ``modelmeter_*``; counters end in ``_total``, latency histograms in ``_seconds``; gauges computed from
the database at scrape time carry no suffix convention beyond their unit (``_cents``, ``_ratio``).

Labels are bounded and never come from request data:
    ``route``    the matched route's template (``/models/{model:path}``), ``unmatched`` otherwise; never a path
    ``method``   a standard HTTP method or ``other``;  ``status``: the response's status code
    ``model``    a registered model's id (the serving path only labels models it resolved), capped
    ``tenant``   a tenant id, capped at ``max_tenants`` distinct values; later tenants are ``other``
    ``reason``, ``state``, ``resource``, ``device``, ``plan``: small fixed sets (plans: the catalog)
Keys, key ids, texts, emails and tenant names never appear in a label.

Hot-path updates are counter increments and histogram observations; nothing here queries the database. Queue
and pool gauges are refreshed after each batch, load and eviction and at scrape time. The gauges read from the
database when Prometheus scrapes (fine-tune jobs, the Stripe outbox, quota utilisation, unit economics) live in
:mod:`modelmeter.gateway.collectors` and are added with :meth:`Telemetry.add_scrape_collector`.

Multiprocess mode: when the gateway runs several worker processes, ``PROMETHEUS_MULTIPROC_DIR`` must be set
(to an empty directory) before ``prometheus_client`` is imported; every process then writes its values to
files there and ``/metrics`` aggregates them with ``MultiProcessCollector``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from modelmeter import __version__
from modelmeter.billing.ledger import UsageRecord
from modelmeter.models.batching import OnBatch

if TYPE_CHECKING:
    from modelmeter.models.engine.core import EngineCounters
    from modelmeter.models.serving import ModelServer, ServerHooks

log = logging.getLogger("modelmeter.telemetry")

OTHER = "other"
NO_MODEL = "none"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})
RATE_REASONS = frozenset({"requests", "tokens", "too_large"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class LabelCap:
    """The first ``limit`` distinct values keep their own label; every later one is ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
        return value


class Telemetry:
    """The platform's metrics and the hooks that update them; one per app (``services.telemetry``).

    ``registry`` is where the metrics are created (tests inject their own and read values back with
    ``registry.get_sample_value``). With ``multiprocess_dir`` the values live in that directory's files and
    :meth:`exposition` aggregates every process's.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, max_tenants: int = 100, max_models: int = 200,
                 multiprocess_dir: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            os.makedirs(multiprocess_dir, exist_ok=True)
        self.tenant = LabelCap(max_tenants)
        self.model = LabelCap(max_models)
        self._scrape_collectors: list[Collector] = []
        self._server: ModelServer | None = None
        self._http_children: dict[tuple[str, str, int, str | None], tuple[Any, Any]] = {}
        self._billing_cache: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._define_http()
        self._define_billing()
        self._define_serving()
        self._define_pool()
        self._define_adapters()
        if multiprocess_dir is None:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(_Forward(collector))

    # --- definitions ---------------------------------------------------------------------------------

    def _define_http(self) -> None:
        r = self.registry
        self.http_requests = Counter("modelmeter_http_requests_total", "HTTP requests by route template, method, "
                                     "status and model (none outside the serving routes).",
                                     ["route", "method", "status", "model"], registry=r)
        self.http_duration = Histogram("modelmeter_http_request_duration_seconds", "Time from the first byte in to "
                                       "the response's end, by route template.", ["route", "method"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.idempotent_replays = Counter("modelmeter_idempotent_replays_total", "Answers replayed for a repeated "
                                          "Idempotency-Key (the request not run, nor billed, again).", registry=r)
        self.build_info = Gauge("modelmeter_build_info", "1, labelled with the running version.", ["version"],
                                multiprocess_mode="max", registry=r)
        self.build_info.labels(__version__).set(1)

    def _define_billing(self) -> None:
        r = self.registry
        self.billable_requests = Counter("modelmeter_billable_requests_total", "Billed requests (committed to the "
                                         "usage ledger) by tenant and model.", ["tenant", "model"], registry=r)
        self.billable_tokens = Counter("modelmeter_billable_tokens_total", "Billed tokens (committed to the usage "
                                       "ledger) by tenant and model.", ["tenant", "model"], registry=r)
        self.compute_seconds = Counter("modelmeter_compute_seconds_total", "Forward-pass seconds attributed to "
                                       "billed requests (the ledger's compute_us).", ["tenant", "model", "device"],
                                       registry=r)
        self.rate_refusals = Counter("modelmeter_rate_limit_refusals_total", "Requests refused by the RPM/TPM "
                                     "limits.", ["tenant", "reason"], registry=r)
        self.quota_refusals = Counter("modelmeter_quota_refusals_total", "Requests refused by the plan's hard limit "
                                      "or the tenant's budget.", ["tenant"], registry=r)

    def _define_serving(self) -> None:
        r = self.registry
        self.queue_seconds = Histogram("modelmeter_request_queue_seconds", "Time a served request waited for its "
                                       "first batch.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("modelmeter_request_inference_seconds", "Time from a served request's "
                                           "first batch to its last result.", ["model"], buckets=LATENCY_BUCKETS,
                                           registry=r)
        self.batch_size = Histogram("modelmeter_batch_size", "Inputs per batch.", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_padding = Histogram("modelmeter_batch_padding_ratio", "Share of a batch's padded tokens that is "
                                       "padding.", ["model"], buckets=RATIO_BUCKETS, registry=r)
        self.batch_tokens = Counter("modelmeter_batch_tokens_total", "Tokens through the model: real and padding.",
                                    ["model", "kind"], registry=r)
        self.batch_forward = Histogram("modelmeter_batch_forward_seconds", "Forward-pass time per batch.", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_wait = Histogram("modelmeter_batch_wait_seconds", "How long a batch's oldest input waited.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_simulated = Gauge("modelmeter_engine_simulated", "1 when the engine's device is simulated "
                                      "(MODELMETER_SIMULATED_DEVICE: forward passes are waits, outputs are fake).",
                                      multiprocess_mode="max", registry=r)
        self.queue_depth = Gauge("modelmeter_queue_depth", "Inputs waiting for a batch.", ["model"],
                                 multiprocess_mode="livesum", registry=r)
        self.queue_requests = Gauge("modelmeter_queue_requests", "Requests holding a queue permit (queued or "
                                    "computing).", ["model"], multiprocess_mode="livesum", registry=r)
        self.queue_capacity = Gauge("modelmeter_queue_capacity_requests", "Queue permits per loaded model.",
                                    ["model"], multiprocess_mode="livesum", registry=r)
        self.queue_rejections = Counter("modelmeter_queue_rejections_total", "Requests refused because the model's "
                                        "queue was full (429 overloaded).", ["model"], registry=r)

    def _define_pool(self) -> None:
        r = self.registry
        self.pool_models = Gauge("modelmeter_pool_models", "Models loaded in the pool.",
                                 multiprocess_mode="livesum", registry=r)
        self.pool_bytes = Gauge("modelmeter_pool_bytes", "Bytes held by loaded models.", multiprocess_mode="livesum",
                                registry=r)
        self.pool_budget = Gauge("modelmeter_pool_budget_bytes", "The pool's memory budget.",
                                 multiprocess_mode="livesum", registry=r)
        self.model_loads = Counter("modelmeter_model_loads_total", "Model loads.", ["model"], registry=r)
        self.model_load_seconds = Histogram("modelmeter_model_load_seconds", "Time to load a model.",
                                            buckets=LOAD_BUCKETS, registry=r)
        self.model_evictions = Counter("modelmeter_model_evictions_total", "Models evicted from the pool.",
                                       ["model"], registry=r)

    def _define_adapters(self) -> None:
        r = self.registry
        self.adapters_resident = Gauge("modelmeter_adapters_resident", "LoRA adapters resident on a base model.",
                                       ["model"], multiprocess_mode="livesum", registry=r)
        self.adapter_pool_bytes = Gauge("modelmeter_adapter_pool_bytes", "Bytes held by resident adapters.",
                                        ["model"], multiprocess_mode="livesum", registry=r)
        self.adapter_pool_budget = Gauge("modelmeter_adapter_pool_budget_bytes", "The adapter pool's budget, per "
                                         "base model.", ["model"], multiprocess_mode="livesum", registry=r)
        self.adapter_loads = Counter("modelmeter_adapter_loads_total", "Adapters loaded onto a base model.",
                                     ["model"], registry=r)
        self.adapter_load_seconds = Histogram("modelmeter_adapter_load_seconds", "Time to read and place one "
                                              "adapter.", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter("modelmeter_adapter_evictions_total", "Adapters evicted from a base "
                                         "model's pool.", ["model"], registry=r)
        self.batch_adapters = Histogram("modelmeter_batch_adapters", "Distinct adapters in a batch that has any.",
                                        ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.adapter_device_copies = Counter("modelmeter_adapter_device_copies_total", "Adapters copied from host "
                                             "memory into device pages (two-tier pools).", ["model"], registry=r)

    # --- hooks (hot path) --------------------------------------------------------------------------------

    def observe_http(self, *, route: str, method: str, status: int, model: str | None, seconds: float) -> None:
        """One finished HTTP request (``route`` is a template; ``model`` a resolved, registered model)."""
        key = (route, method, status, model)
        children = self._http_children.get(key)
        if children is None:  # label lookups cost more than the update: keep the children (bounded label space)
            verb = method if method in HTTP_METHODS else OTHER
            children = (self.http_requests.labels(route, verb, str(status), self.model(model) if model else NO_MODEL),
                        self.http_duration.labels(route, verb))
            if len(self._http_children) < 10_000:
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_served(self, model_id: str, *, queue_s: float, inference_s: float) -> None:
        """Where a served request's time went."""
        label = self.model(model_id)
        self.queue_seconds.labels(label).observe(queue_s)
        self.inference_seconds.labels(label).observe(inference_s)

    def on_commit(self, records: Sequence[UsageRecord]) -> None:
        """The ledger committed ``records``: count what is billed (``LedgerWriter(on_commit=...)``)."""
        try:
            for r in records:
                requests, tokens, compute = self._billing_children(r.tenant_id, r.model_id, r.device)
                requests.inc(r.requests)
                tokens.inc(r.tokens)
                compute.inc(r.compute_us / 1e6)
        except Exception:  # metrics must never break the ledger writer
            log.exception("counting committed usage failed")

    def _billing_children(self, tenant_id: str, model_id: str, device: str) -> tuple[Any, Any, Any]:
        key = (tenant_id, model_id, device)
        children = self._billing_cache.get(key)
        if children is None:
            tenant, model = self.tenant(tenant_id), self.model(model_id)
            children = (self.billable_requests.labels(tenant, model), self.billable_tokens.labels(tenant, model),
                        self.compute_seconds.labels(tenant, model, device if device in DEVICES else OTHER))
            if len(self._billing_cache) < 100_000:
                self._billing_cache[key] = children
        return children

    def rate_limited(self, tenant_id: str, reason: str | None) -> None:
        self.rate_refusals.labels(self.tenant(tenant_id), reason if reason in RATE_REASONS else OTHER).inc()

    def quota_refused(self, tenant_id: str) -> None:
        self.quota_refusals.labels(self.tenant(tenant_id)).inc()

    def overloaded(self, model_id: str) -> None:
        self.queue_rejections.labels(self.model(model_id)).inc()

    def batch_hook(self, model_id: str) -> OnBatch:
        """The batcher's ``on_batch(batch_size, real_tokens, padded_tokens, queue_s, compute_s)`` for a model."""
        label = self.model(model_id)
        size, padding, forward = (m.labels(label) for m in (self.batch_size, self.batch_padding, self.batch_forward))
        wait, real_tokens = self.batch_wait.labels(label), self.batch_tokens.labels(label, "real")
        pad_tokens = self.batch_tokens.labels(label, "padding")

        def on_batch(batch_size: int, real: int, padded: int, queue_s: float, compute_s: float) -> None:
            size.observe(batch_size)
            padding.observe((padded - real) / padded if padded else 0.0)
            real_tokens.inc(real)
            pad_tokens.inc(padded - real)
            forward.observe(compute_s)
            wait.observe(queue_s)
            self._refresh_model(model_id)

        return on_batch

    def on_load(self, model_id: str, seconds: float) -> None:
        self.model_loads.labels(self.model(model_id)).inc()
        self.model_load_seconds.observe(seconds)
        self.refresh_live()

    def on_evict(self, model_id: str) -> None:
        label = self.model(model_id)
        self.model_evictions.labels(label).inc()
        for gauge in (self.queue_depth, self.queue_requests, self.queue_capacity):
            gauge.labels(label).set(0)

    def on_adapter_load(self, base_id: str, adapter_id: str, seconds: float) -> None:
        self.adapter_loads.labels(self.model(base_id)).inc()
        self.adapter_load_seconds.observe(seconds)
        self.refresh_live()

    def on_adapter_evict(self, base_id: str, adapter_id: str) -> None:
        self.adapter_evictions.labels(self.model(base_id)).inc()

    def adapter_batch_hook(self, base_id: str) -> Callable[[int, int], None]:
        """The shared base's per-batch callback: distinct adapters in the batch, adapters copied to the device."""
        label = self.model(base_id)
        distinct, copies = self.batch_adapters.labels(label), self.adapter_device_copies.labels(label)

        def on_adapter_batch(n_adapters: int, copied: int) -> None:
            distinct.observe(n_adapters)
            if copied:
                copies.inc(copied)

        return on_adapter_batch

    def server_hooks(self, counters: EngineCounters | None = None) -> ServerHooks:
        """The model server's callbacks onto these metrics, and onto the engine's ``counters`` when given."""
        from modelmeter.models.serving import AdapterHooks, ServerHooks  # the engine side: torch is loaded there

        def on_batch(model_id: str) -> OnBatch:
            hook = self.batch_hook(model_id)
            return counters.wrap(hook) if counters is not None else hook

        return ServerHooks(on_batch=on_batch, on_load=self.on_load, on_evict=self.on_evict,
                           adapters=AdapterHooks(on_load=self.on_adapter_load, on_evict=self.on_adapter_evict,
                                                 on_batch=self.adapter_batch_hook),
                           on_origins=counters.on_origins if counters is not None else None)

    # --- live gauges ---------------------------------------------------------------------------------

    def watch(self, server: ModelServer) -> None:
        """Read queue and pool gauges from ``server`` (after batches, loads and at scrape time)."""
        self._server = server

    def refresh_live(self) -> None:
        """Set the pool and queue gauges from the watched server (call on its event loop)."""
        if self._server is None:
            return
        pool = self._server.pool
        self.pool_models.set(len(pool.loaded()))
        self.pool_bytes.set(pool.used_bytes)
        self.pool_budget.set(pool.memory_budget_bytes)
        for model_id in pool.loaded():
            self._refresh_model(model_id)
        for base in self._server.shared_bases():
            label = self.model(base.model_id)
            self.adapters_resident.labels(label).set(len(base.adapters.loaded()))
            self.adapter_pool_bytes.labels(label).set(base.adapters.used_bytes)
            self.adapter_pool_budget.labels(label).set(base.adapters.memory_budget_bytes)
            self._refresh_model(base.model_id)

    def _refresh_model(self, model_id: str) -> None:
        server = self._server
        served = (server.pool.peek(model_id) or server.bases.peek(model_id)) if server is not None else None
        if served is None:
            return
        label = self.model(model_id)
        self.queue_depth.labels(label).set(served.batcher.queue_depth)
        self.queue_requests.labels(label).set(served.batcher.requests_in_flight)
        self.queue_capacity.labels(label).set(served.batcher.max_queue)

    # --- exposition ------------------------------------------------------------------------------------

    def add_scrape_collector(self, collector: Collector) -> None:
        """A collector that computes its values at scrape time (exposed once, in multiprocess mode too)."""
        self._scrape_collectors.append(collector)
        if self.multiprocess_dir is None:
            self.registry.register(collector)

    def exposition_registry(self) -> CollectorRegistry:
        """What ``/metrics`` serves: this process's registry, or every process's values aggregated."""
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped lib
        for collector in self._scrape_collectors:
            registry.register(collector)
        return registry

    def exposition(self) -> bytes:
        """The text exposition format (may query the database: call off the event loop)."""
        return generate_latest(self.exposition_registry())

    def close(self) -> None:
        """In multiprocess mode, drop this process's live gauges (its counters stay, as Prometheus expects)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped lib


def multiprocess_dir_from_env() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when set (it must be set before prometheus_client is imported)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Forward(Collector):
    """Expose a process-global collector (process, platform, GC) on another registry."""

    def __init__(self, inner: Collector) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        return self._inner.collect()
