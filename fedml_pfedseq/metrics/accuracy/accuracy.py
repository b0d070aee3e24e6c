"""Accuracy as an ``evaluate`` metric shipped with the package (the Hub's metric scripts are unreachable offline)."""
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy: the fraction of predictions that equal their reference label.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids of equal length",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references) if len(references) else float("nan")}
