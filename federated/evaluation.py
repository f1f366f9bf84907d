"""The evaluation protocol, the same for every method.

Per client, on its own test split: accuracy, balanced accuracy (mean recall over the classes present
in that client's test labels, as the reference), macro- and weighted-F1 (over the classes present in
the labels or predictions, scikit-learn's convention). Summaries: unweighted mean and population std
(ddof 0) across clients.
"""
from __future__ import annotations

import numpy as np
import torch


def client_metrics(y_true: torch.Tensor | np.ndarray, y_pred: torch.Tensor | np.ndarray) -> dict:
    y_true = np.asarray(torch.as_tensor(y_true).cpu())
    y_pred = np.asarray(torch.as_tensor(y_pred).cpu())
    if len(y_true) == 0:
        return {"acc": float("nan"), "bacc": float("nan"), "f1_macro": float("nan"),
                "f1_weighted": float("nan")}
    present = np.unique(y_true)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in present]
    labels = np.union1d(present, np.unique(y_pred))
    f1 = []
    support = []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        support.append(np.sum(y_true == c))
    f1, support = np.asarray(f1), np.asarray(support)
    return {
        "acc": float(np.mean(y_true == y_pred)),
        "bacc": float(np.mean(recalls)),
        "f1_macro": float(f1.mean()),
        "f1_weighted": float((f1 * support).sum() / support.sum()),
    }


def summarize(clients: list[dict]) -> dict:
    out = {}
    for key in ("acc", "bacc", "f1_macro", "f1_weighted"):
        values = np.array([c[key] for c in clients], dtype=float)
        out[f"{key}_mean"] = float(np.nanmean(values))
        out[f"{key}_std"] = float(np.nanstd(values))
    return out
