"""Evaluation shared by sites, the server (optional evaluation on a validation site) and simulations.

Metrics follow scikit-learn's definitions (checked in tests/test_training.py) without importing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Metrics:
    n: int
    loss: float
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    per_class_f1: list[float | None]  # None for a class absent from both labels and predictions

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, name: str) -> float:
        return float(getattr(self, name))


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Eval-mode logits in batches; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
            torch.empty(0)
    finally:
        model.train(was_training)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, balanced accuracy and F1 as scikit-learn defines them.

    Balanced accuracy: mean recall over the classes present in y_true. Macro-F1: mean F1 over the
    classes present in y_true or y_pred (a class predicted but absent counts with F1 0).
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    seen = (support > 0) | (predicted > 0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    n = len(y_true)
    return {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else float("nan"),
        "macro_f1": float(f1[seen].mean()) if seen.any() else float("nan"),
        "per_class_f1": [float(f1[c]) if seen[c] else None for c in range(n_classes)],
    }


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> Metrics:
    """Metrics of the model's eval-mode predictions; loss is the mean unweighted CE unless loss_fn is given."""
    logits = predict_logits(model, x, batch_size)
    n_classes = logits.shape[1] if logits.dim() == 2 else 0
    loss = float((loss_fn or F.cross_entropy)(logits, y)) if len(y) else float("nan")
    m = classification_metrics(y.numpy(), logits.argmax(dim=1).numpy(), n_classes)
    return Metrics(n=len(y), loss=loss, **m)
