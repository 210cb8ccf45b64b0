"""Classification scores: accuracy, macro F1, and per-label precision, recall, F1 and support."""

from __future__ import annotations

from typing import TypedDict


class LabelMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int


class Metrics(TypedDict):
    accuracy: float
    macro_f1: float
    per_label: dict[str, LabelMetrics]
    n_validation: int



def classification_metrics(gold: list[int], predicted: list[int], labels: list[str]) -> Metrics:
    """Accuracy, macro F1 and per-label scores from class ids; 0 wherever a ratio is undefined."""
    per_label = {label: _label_metrics(gold, predicted, i) for i, label in enumerate(labels)}
    correct = sum(g == p for g, p in zip(gold, predicted, strict=True))
    return Metrics(
        accuracy=_ratio(correct, len(gold)),
        macro_f1=sum(m["f1"] for m in per_label.values()) / len(labels) if labels else 0.0,
        per_label=per_label,
        n_validation=len(gold),
    )


def _label_metrics(gold: list[int], predicted: list[int], label_id: int) -> LabelMetrics:
    true_pos = sum(g == p == label_id for g, p in zip(gold, predicted, strict=True))
    n_predicted = predicted.count(label_id)
    support = gold.count(label_id)
    precision, recall = _ratio(true_pos, n_predicted), _ratio(true_pos, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return LabelMetrics(precision=precision, recall=recall, f1=f1, support=support)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
