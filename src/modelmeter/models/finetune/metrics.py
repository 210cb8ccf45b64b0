"""Classification scores (accuracy, macro F1, per-label precision, recall, F1, support) and a tagger's entity-level
scores (seqeval)."""

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


class EntityMetrics(TypedDict):
    """seqeval's entity-level report: micro-averaged precision, recall and F1 over entities (exact span and
    type), the same per entity type, the number of validation sentences, and per-token accuracy."""

    precision: float
    recall: float
    f1: float
    per_type: dict[str, LabelMetrics]
    n_validation: int
    token_accuracy: float


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> EntityMetrics:
    """The entity-level report of IOB2 tag sequences, computed by seqeval (its default, conlleval-compatible
    mode; 0 where a ratio is undefined), unrounded."""
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    per_type = {kind: LabelMetrics(precision=float(r["precision"]), recall=float(r["recall"]),
                                   f1=float(r["f1-score"]), support=int(r["support"]))
                for kind, r in report.items() if not kind.endswith(" avg")}
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return EntityMetrics(precision=float(micro["precision"]), recall=float(micro["recall"]),
                         f1=float(micro["f1-score"]), per_type=per_type, n_validation=len(gold),
                         token_accuracy=float(accuracy_score(gold, predicted)))
