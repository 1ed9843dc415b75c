"""Scores of attributions against ground truth: rankings, overlaps, Spearman, LDS, bootstrap, ROC."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch


def top_indices(values: np.ndarray | torch.Tensor, k: int, largest: bool = True) -> list[int]:
    """Indices of the k largest (or smallest) values; ties keep ascending index order."""
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    order = np.argsort(-v if largest else v, kind="stable")
    return order[:k].tolist()


def top_k_overlap(a: Iterable[int], b: Iterable[int], k: int) -> int:
    """How many items the first k of two rankings (index lists, best first) share."""
    return len(set(list(a)[:k]) & set(list(b)[:k]))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..m-1 along axis 0 of an (m,) or (m, t) array; tied values share their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        uniques, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts
        return (first + (counts - 1) / 2.0)[inverse]
    return np.stack([average_ranks(values[:, j]) for j in range(values.shape[1])], axis=1)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each column of a with the same column of b, (m, t) -> (t,).
    Ties get average ranks; a constant column gives NaN."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.ndim == 1:
        ra, rb = ra[:, None], rb[:, None]
    ra = ra - ra.mean(0)
    rb = rb - rb.mean(0)
    denominator = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(0) / np.where(denominator > 0, denominator, 1), np.nan)


def datamodel_predictions(attribution: np.ndarray, masks: np.ndarray, n_train: int,
                          base: np.ndarray | None = None, target: str = "loss") -> np.ndarray:
    """Predicted test outputs (m, t) of models trained on m subsets, from attributions (t, n).

    Sign convention (the project's): attribution > 0 = the training point helped its test point,
    so its presence lowers the test loss and raises the margin. For a subset S (mask row):
        loss:   predicted(S) = base - sum_{i in S} attribution_i / n_train
        margin: predicted(S) = base + sum_{i in S} attribution_i / n_train
    ``base`` only shifts each column and leaves the LDS unchanged (default 0).
    """
    summed = masks.astype(np.float64) @ np.asarray(attribution, dtype=np.float64).T / n_train
    sign = -1.0 if target == "loss" else 1.0
    return (0.0 if base is None else base[None, :]) + sign * summed


def lds(attribution: np.ndarray, masks: np.ndarray, measured: np.ndarray, target: str = "loss") -> np.ndarray:
    """Linear datamodeling score per test point (t,): Spearman correlation over the m subsets
    between the predicted (:func:`datamodel_predictions`) and the measured test output (m, t)."""
    predicted = datamodel_predictions(attribution, masks, masks.shape[1], target=target)
    return spearman_columns(predicted, np.asarray(measured, dtype=np.float64))


def bootstrap_mean(values: np.ndarray, draws: int = 1000, level: float = 0.95, seed: int = 0
                   ) -> tuple[float, float, float]:
    """Mean of the finite values and its percentile bootstrap interval (resampling the values)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(draws, len(v)))].mean(1)
    tail = (1.0 - level) / 2.0
    return float(v.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (NaN when one is constant)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more suspicious) for the boolean
    ``positives``: the probability that a random positive outranks a random negative (ties 1/2),
    from average ranks (Mann-Whitney U)."""
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positives].sum() - n_pos * (n_pos - 1) / 2.0) / (n_pos * n_neg))


def fraction_found(scores: np.ndarray, positives: np.ndarray, inspected: Iterable[float]) -> list[float]:
    """Fraction of the positives among the top ``f`` fraction of the ranking, for each f."""
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.cumsum(positives[order])
    return [float(hits[max(int(round(f * len(order))), 1) - 1] / max(positives.sum(), 1)) for f in inspected]
