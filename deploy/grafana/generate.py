"""Regenerate the Grafana dashboards: python deploy/grafana/generate.py deploy/grafana/dashboards

The JSON files are what Grafana provisions; edit the panels here and regenerate. Every expression may use only
metrics that src/modelmeter/telemetry.py exports (tests/integration/test_observability.py checks the JSON).
"""
import json, sys
from pathlib import Path

DS = {"type": "prometheus", "uid": "prometheus"}
OUT = Path(sys.argv[1])


class Board:
    def __init__(self):
        self.panels, self.id, self.y = [], 0, 0
        self.x, self.row_h = 0, 0

    def row(self, title):
        self._newline()
        self.id += 1
        self.panels.append({"id": self.id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0

    def add(self, ptype, title, targets, w=12, h=8, unit=None, desc=None, **extra):
        if self.x + w > 24:
            self._newline()
        self.id += 1
        field = {"defaults": {"unit": unit} if unit else {}, "overrides": []}
        if "thresholds" in extra:
            field["defaults"]["thresholds"] = {"mode": "absolute", "steps": extra.pop("thresholds")}
            field["defaults"]["color"] = {"mode": "thresholds"}
        if "minmax" in extra:
            lo, hi = extra.pop("minmax")
            field["defaults"]["min"], field["defaults"]["max"] = lo, hi
        panel = {"id": self.id, "type": ptype, "title": title, "datasource": DS,
                 "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}, "fieldConfig": field,
                 "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l,
                              **({"instant": True, "format": "table"} if ptype == "table" else {})}
                             for i, (e, l) in enumerate(targets)]}
        if desc:
            panel["description"] = desc
        if ptype == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        if ptype == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        if ptype == "bargauge":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}
        panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def dump(self, uid, title, desc, templating=None, tags=()):
        return {"uid": uid, "title": title, "description": desc, "tags": ["modelmeter", *tags],
                "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": False,
                "graphTooltip": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
                "templating": {"list": templating or []}, "annotations": {"list": []},
                "links": [{"title": "modelmeter", "type": "dashboards", "tags": ["modelmeter"], "asDropdown": True}],
                "panels": self.panels}


INFER = 'route=~"/v1/classify|/v1/embeddings|/models/.*"'

# --- overview ---------------------------------------------------------------------------------------
b = Board()
b.row("Traffic")
b.add("stat", "Requests / s", [('sum(rate(modelmeter_http_requests_total{route!="/metrics"}[5m]))', "")], w=4, h=5, unit="reqps")
b.add("stat", "5xx error ratio", [('sum(rate(modelmeter_http_requests_total{status=~"5.."}[5m])) / clamp_min(sum(rate(modelmeter_http_requests_total[5m])), 1e-9)', "")],
      w=4, h=5, unit="percentunit", thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01}, {"color": "red", "value": 0.02}])
b.add("stat", "p99 latency, inference", [(f'histogram_quantile(0.99, sum by (le) (rate(modelmeter_http_request_duration_seconds_bucket{{{INFER}}}[5m])))', "")],
      w=4, h=5, unit="s", thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.5}, {"color": "red", "value": 1}])
b.add("stat", "Billable tokens / s", [("sum(rate(modelmeter_billable_tokens_total[5m]))", "")], w=4, h=5, unit="short")
b.add("stat", "Gateways up", [('sum(up{job="modelmeter-gateway"})', "")], w=4, h=5,
      thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
b.add("stat", "Refusals / s (429)", [("(sum(rate(modelmeter_rate_limit_refusals_total[5m])) or vector(0)) + (sum(rate(modelmeter_quota_refusals_total[5m])) or vector(0)) + (sum(rate(modelmeter_queue_rejections_total[5m])) or vector(0))", "")],
      w=4, h=5, unit="reqps")
b.add("timeseries", "Requests by route and status", [('sum by (route, status) (rate(modelmeter_http_requests_total{route!="/metrics"}[5m]))', "{{route}} {{status}}")], unit="reqps")
b.add("timeseries", "Requests by model", [('sum by (model) (rate(modelmeter_http_requests_total{model!="none"}[5m]))', "{{model}}")], unit="reqps")
b.add("timeseries", "Request latency, inference routes", [
    (f'histogram_quantile(0.50, sum by (le) (rate(modelmeter_http_request_duration_seconds_bucket{{{INFER}}}[5m])))', "p50"),
    (f'histogram_quantile(0.95, sum by (le) (rate(modelmeter_http_request_duration_seconds_bucket{{{INFER}}}[5m])))', "p95"),
    (f'histogram_quantile(0.99, sum by (le) (rate(modelmeter_http_request_duration_seconds_bucket{{{INFER}}}[5m])))', "p99")], unit="s")
b.add("timeseries", "Queue and inference time (p95) by model", [
    ("histogram_quantile(0.95, sum by (le, model) (rate(modelmeter_request_queue_seconds_bucket[5m])))", "queue {{model}}"),
    ("histogram_quantile(0.95, sum by (le, model) (rate(modelmeter_request_inference_seconds_bucket[5m])))", "inference {{model}}")], unit="s",
    desc="Queue: until a request's first batch starts. Inference: from then to its last result.")
b.row("Batching")
b.add("timeseries", "Mean batch size by model", [("sum by (model) (rate(modelmeter_batch_size_sum[5m])) / sum by (model) (rate(modelmeter_batch_size_count[5m]))", "{{model}}")], w=8)
b.add("timeseries", "Padding waste", [('sum by (model) (rate(modelmeter_batch_tokens_total{kind="padding"}[5m])) / sum by (model) (rate(modelmeter_batch_tokens_total[5m]))', "{{model}}")],
      w=8, unit="percentunit", desc="Share of the tokens through the model that were padding.")
b.add("timeseries", "Forward pass p95 by model", [("histogram_quantile(0.95, sum by (le, model) (rate(modelmeter_batch_forward_seconds_bucket[5m])))", "{{model}}")], w=8, unit="s")
b.add("timeseries", "Queue depth (inputs waiting)", [("sum by (model) (modelmeter_queue_depth)", "{{model}}")], w=8)
b.add("timeseries", "Queue saturation (permits held)", [("sum by (model) (modelmeter_queue_requests) / sum by (model) (modelmeter_queue_capacity_requests)", "{{model}}")],
      w=8, unit="percentunit", minmax=(0, 1))
b.add("timeseries", "Batch size p50 / p95", [("histogram_quantile(0.5, sum by (le) (rate(modelmeter_batch_size_bucket[5m])))", "p50"),
                                              ("histogram_quantile(0.95, sum by (le) (rate(modelmeter_batch_size_bucket[5m])))", "p95")], w=12)
b.add("timeseries", "Padding per batch p50 / p95", [("histogram_quantile(0.5, sum by (le) (rate(modelmeter_batch_padding_ratio_bucket[5m])))", "p50"),
                                                    ("histogram_quantile(0.95, sum by (le) (rate(modelmeter_batch_padding_ratio_bucket[5m])))", "p95")],
      w=12, unit="percentunit", minmax=(0, 1), desc="Share of each batch's padded tokens that is padding: length grouping keeps it low.")
b.add("timeseries", "Batch wait p95 by model", [("histogram_quantile(0.95, sum by (le, model) (rate(modelmeter_batch_wait_seconds_bucket[5m])))", "{{model}}")], w=8, unit="s")
b.row("Model pool")
b.add("timeseries", "Pool memory", [("sum(modelmeter_pool_bytes)", "used"), ("sum(modelmeter_pool_budget_bytes)", "budget")], w=8, unit="bytes")
b.add("timeseries", "Models loaded", [("sum(modelmeter_pool_models)", "models")], w=8)
b.add("timeseries", "Loads and evictions", [("sum(rate(modelmeter_model_loads_total[5m]))", "loads"), ("sum(rate(modelmeter_model_evictions_total[5m]))", "evictions")],
      w=8, unit="ops", desc="Evictions close to loads means the pool is too small for the models in use.")
b.row("Tenant adapters (LoRA on the shared base)")
b.add("timeseries", "Adapters resident", [("sum by (model) (modelmeter_adapters_resident)", "{{model}}")], w=6,
      desc="LoRA adapters resident on each base model; every one is served by the base's single batcher.")
b.add("timeseries", "Adapter pool memory", [("sum(modelmeter_adapter_pool_bytes)", "used"), ("sum(modelmeter_adapter_pool_budget_bytes)", "budget")],
      w=6, unit="bytes")
b.add("timeseries", "Adapter loads and evictions", [("sum(rate(modelmeter_adapter_loads_total[5m]))", "loads"),
                                                    ("sum(rate(modelmeter_adapter_evictions_total[5m]))", "evictions"),
                                                    ("sum(rate(modelmeter_adapter_device_copies_total[5m]))", "copies to device")],
      w=6, unit="ops", desc="Evictions close to loads: MODELMETER_ADAPTER_POOL_MB is too small for the adapters in use.")
b.add("timeseries", "Distinct adapters per batch p50 / p95", [("histogram_quantile(0.5, sum by (le) (rate(modelmeter_batch_adapters_bucket[5m])))", "p50"),
                                                              ("histogram_quantile(0.95, sum by (le) (rate(modelmeter_batch_adapters_bucket[5m])))", "p95")],
      w=6, desc="How many tenants' adapters share one forward pass.")
b.row("Refusals and back office")
b.add("timeseries", "Refusals by reason", [("sum by (reason) (rate(modelmeter_rate_limit_refusals_total[5m]))", "rate limit: {{reason}}"),
                                           ("sum(rate(modelmeter_quota_refusals_total[5m]))", "quota / budget"),
                                           ("sum by (model) (rate(modelmeter_queue_rejections_total[5m]))", "queue full: {{model}}")], w=8, unit="reqps")
b.add("timeseries", "Fine-tuning jobs by state", [("max by (state) (modelmeter_fine_tuning_jobs)", "{{state}}")], w=8)
b.add("timeseries", "Stripe outbox", [("max(modelmeter_stripe_outbox_pending)", "pending"), ("max(modelmeter_stripe_outbox_failed)", "failed")], w=8,
      desc="Rows waiting to be sent to Stripe, and rows given up on.")
b.add("timeseries", "Margin this period by plan", [("max by (plan) (modelmeter_plan_margin_cents) / 100", "{{plan}}")], w=12, unit="currencyUSD",
      desc="Unit economics: revenue (invoice preview) minus compute cost, month to date. Details: the unit economics dashboard.")
b.add("timeseries", "Compute time by device", [("sum by (device) (rate(modelmeter_compute_seconds_total[5m]))", "{{device}}")], w=12, unit="s",
      desc="Forward-pass seconds per second spent on billed requests.")
(OUT / "overview.json").write_text(json.dumps(b.dump("modelmeter-overview", "modelmeter — operator overview",
    "Traffic, errors, latency, batching, queues, the model pool, tenant adapters, refusals, fine-tuning and Stripe sync."), indent=2) + "\n")

# --- tenants ----------------------------------------------------------------------------------------
T = 'tenant=~"$tenant"'
tmpl = [{"name": "tenant", "label": "Tenant", "type": "query", "datasource": DS, "refresh": 2, "multi": True, "includeAll": True,
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
         "definition": "label_values(modelmeter_billable_tokens_total, tenant)",
         "query": {"query": "label_values(modelmeter_billable_tokens_total, tenant)", "refId": "tenants"}}]
b = Board()
b.row("Usage")
b.add("timeseries", "Billable tokens / s by tenant", [(f"sum by (tenant) (rate(modelmeter_billable_tokens_total{{{T}}}[5m]))", "{{tenant}}")])
b.add("timeseries", "Billable requests / s by tenant", [(f"sum by (tenant) (rate(modelmeter_billable_requests_total{{{T}}}[5m]))", "{{tenant}}")], unit="reqps")
b.add("bargauge", "Tokens in the selected range", [(f"sort_desc(sum by (tenant) (increase(modelmeter_billable_tokens_total{{{T}}}[$__range])))", "{{tenant}}")], w=8, h=10)
b.add("bargauge", "Tokens by model (selected tenants)", [(f"sort_desc(sum by (model) (increase(modelmeter_billable_tokens_total{{{T}}}[$__range])))", "{{model}}")], w=8, h=10)
b.add("timeseries", "Compute time by tenant", [(f"sum by (tenant) (rate(modelmeter_compute_seconds_total{{{T}}}[5m]))", "{{tenant}}")], w=8, h=10, unit="s")
b.row("Revenue and limits (this period)")
b.add("bargauge", "Revenue this period", [(f"sort_desc(max by (tenant) (modelmeter_tenant_revenue_cents{{{T}}}) / 100)", "{{tenant}}")], w=8, h=10, unit="currencyUSD",
      desc="The running month's invoice preview per tenant (top tenants by revenue, up to the tenant cap).")
b.add("bargauge", "Margin this period", [(f"sort_desc(max by (tenant) (modelmeter_tenant_margin_cents{{{T}}}) / 100)", "{{tenant}}")], w=8, h=10, unit="currencyUSD",
      thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 0}])
b.add("bargauge", "Quota used", [(f"sort_desc(max by (tenant, resource) (modelmeter_tenant_quota_utilisation_ratio{{{T}}}))", "{{tenant}} {{resource}}")],
      w=8, h=10, unit="percentunit", minmax=(0, 1),
      thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.75}, {"color": "red", "value": 0.9}],
      desc="Capped tenants only (hard-limit plans and tenants with a budget).")
b.add("table", "Revenue, compute cost and margin by tenant", [
    (f"max by (tenant) (modelmeter_tenant_revenue_cents{{{T}}}) / 100", "revenue"),
    (f"max by (tenant) (modelmeter_tenant_compute_cost_cents{{{T}}}) / 100", "compute cost"),
    (f"max by (tenant) (modelmeter_tenant_margin_cents{{{T}}}) / 100", "margin")], w=12, h=10, unit="currencyUSD",
    transformations=[{"id": "merge", "options": {}}, {"id": "organize", "options": {"excludeByName": {"Time": True},
        "renameByName": {"Value #A": "revenue", "Value #B": "compute cost", "Value #C": "margin"}}}])
b.add("timeseries", "Refusals by tenant", [(f"sum by (tenant, reason) (rate(modelmeter_rate_limit_refusals_total{{{T}}}[5m]))", "{{tenant}} rate limit {{reason}}"),
                                           (f"sum by (tenant) (rate(modelmeter_quota_refusals_total{{{T}}}[5m]))", "{{tenant}} quota")], w=12, h=10, unit="reqps")
(OUT / "tenants.json").write_text(json.dumps(b.dump("modelmeter-tenants", "modelmeter — tenants: usage and revenue",
    "Per-tenant usage (tokens, requests, compute), revenue and margin this period, quota use and refusals.", tmpl, ("tenants",)), indent=2) + "\n")

# --- economics --------------------------------------------------------------------------------------
b = Board()
b.row("This period (month to date, invoice preview against compute cost)")
b.add("stat", "Revenue", [("sum(max by (plan) (modelmeter_plan_revenue_cents)) / 100", "")], w=6, h=5, unit="currencyUSD")
b.add("stat", "Compute cost", [("sum(max by (plan) (modelmeter_plan_compute_cost_cents)) / 100", "")], w=6, h=5, unit="currencyUSD")
b.add("stat", "Margin", [("sum(max by (plan) (modelmeter_plan_margin_cents)) / 100", "")], w=6, h=5, unit="currencyUSD",
      thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 0}])
b.add("stat", "Margin ratio", [("sum(max by (plan) (modelmeter_plan_margin_cents)) / clamp_min(sum(max by (plan) (modelmeter_plan_revenue_cents)), 1)", "")],
      w=6, h=5, unit="percentunit", thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0.3}, {"color": "green", "value": 0.6}])
b.add("bargauge", "Revenue and compute cost by plan", [("max by (plan) (modelmeter_plan_revenue_cents) / 100", "{{plan}} revenue"),
                                                       ("max by (plan) (modelmeter_plan_compute_cost_cents) / 100", "{{plan}} compute")],
      w=12, h=9, unit="currencyUSD", desc="Is serving a large model a good business? Revenue per plan against the compute it cost.")
b.add("timeseries", "Margin by plan over time", [("max by (plan) (modelmeter_plan_margin_cents) / 100", "{{plan}}")], w=12, h=9, unit="currencyUSD")
b.add("table", "Tenants: revenue, compute cost, margin", [
    ("max by (tenant) (modelmeter_tenant_revenue_cents) / 100", "revenue"),
    ("max by (tenant) (modelmeter_tenant_compute_cost_cents) / 100", "compute cost"),
    ("max by (tenant) (modelmeter_tenant_margin_cents) / 100", "margin")], w=12, h=10, unit="currencyUSD",
    transformations=[{"id": "merge", "options": {}}, {"id": "organize", "options": {"excludeByName": {"Time": True},
        "renameByName": {"Value #A": "revenue", "Value #B": "compute cost", "Value #C": "margin"}}},
        {"id": "sortBy", "options": {"sort": [{"field": "margin", "desc": False}]}}],
    desc="Lowest margin first: the tenants that cost more than they pay are at the top.")
b.add("timeseries", "Compute seconds per token by model", [("sum by (model) (rate(modelmeter_compute_seconds_total[1h])) / clamp_min(sum by (model) (rate(modelmeter_billable_tokens_total[1h])), 1e-9)", "{{model}}")],
      w=12, h=10, unit="s", desc="Forward-pass time per billed token: what one more token costs to serve.")
b.add("bargauge", "Tenants by plan", [("sum by (plan) (max by (plan, status) (modelmeter_tenants))", "{{plan}}")], w=12, h=8)
b.add("timeseries", "Compute time by device", [("sum by (device) (rate(modelmeter_compute_seconds_total[5m]))", "{{device}}")], w=12, h=8, unit="s",
      desc="Priced at MODELMETER_CPU_CORE_HOUR_COST per core-hour (times the torch threads) or MODELMETER_GPU_HOUR_COST per GPU-hour.")
(OUT / "economics.json").write_text(json.dumps(b.dump("modelmeter-economics", "modelmeter — unit economics",
    "Revenue per plan and tenant against the compute it cost, and the margin.", tags=("economics",)), indent=2) + "\n")
