"""The probes' scores on frozen features: linear (logistic and ridge, penalty by cross-validation) and kNN
classification, a per-patch disparity ridge probe, and zero-shot correspondence by nearest neighbours under known
homographies; each score keeps its per-item results (test images, pairs) and a bootstrap 95 % interval over them
(:func:`bootstrap_indices`, :func:`percentile_interval`), so that two models can be compared on the same resamples.
Pure functions of feature tensors; :mod:`dune_student.evaluation.probe` collects the features and reports.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .probe_data import ProbeConfig, ProbeData

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # L2 penalties the linear probes choose from
FOLDS = 3  # cross-validation folds of the training split that choose the penalty
LBFGS_STEPS = 100  # at most; it stops earlier once the gradient is below 1e-7
MIN_KNOWN = 0.5  # a patch has a ground-truth disparity when at least this share of its pixels has one
BOOTSTRAP_DRAWS = 1000  # resamples of the bootstrap intervals
BOOTSTRAP_SEED = 0
PCK_THRESHOLDS = (0.5, 1.0, 2.0)  # correspondence: distances to the true match, in patches of the student's grid


# ---------------------------------------------------------------------------------------
# Uncertainty
# ---------------------------------------------------------------------------------------
def bootstrap_indices(count: int, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``(draws, count)`` indices: ``draws`` resamples with replacement of ``count`` items. A pure function of its
    arguments, so that every model's score is resampled alike and paired differences are meaningful."""
    if count < 1:
        raise ValueError("bootstrap needs at least one item")
    return np.random.default_rng(seed).integers(0, count, (draws, count))


def percentile_interval(samples: np.ndarray) -> list[float]:
    """``[2.5th, 97.5th]`` percentile of bootstrap ``samples`` ``(draws,)``: a 95 % interval."""
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def mean_samples(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Bootstrap means ``(draws,)`` of per-item ``values`` ``(N,)`` (e.g. 0/1 hits of the test images), resampling
    the items."""
    values = np.asarray(values, dtype=np.float64)
    return values[bootstrap_indices(len(values))].mean(axis=1)


def pooled_share_samples(hits: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Bootstrap shares ``sum(hits) / sum(counts)`` ``(draws,)`` of per-pair ``hits`` and ``counts`` ``(P,)``,
    resampling whole pairs (patches of one pair are not independent)."""
    hits, counts = np.asarray(hits, np.float64), np.asarray(counts, np.float64)
    index = bootstrap_indices(len(hits))
    return hits[index].sum(axis=1) / np.maximum(counts[index].sum(axis=1), 1)


def r2_samples(errors: Sequence[float], targets: Sequence[float], groups: Sequence[int]) -> np.ndarray:
    """Bootstrap R² ``(draws,)`` of per-patch prediction ``errors`` and ``targets`` ``(Q,)``, resampling the
    groups (pairs) ``(Q,)`` whole."""
    errors, targets, groups = (np.asarray(a, np.float64) for a in (errors, targets, groups))
    names = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in names]
    samples = []
    for draw in bootstrap_indices(len(names)):
        rows = np.concatenate([members[g] for g in draw])
        total = np.square(targets[rows] - targets[rows].mean()).sum()
        samples.append(1 - np.square(errors[rows]).sum() / max(total, 1e-12))
    return np.array(samples)

# ---------------------------------------------------------------------------------------
# Linear probes
# ---------------------------------------------------------------------------------------
@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside: the probes' problems are so small that OpenMP's synchronisation dominates
    them (an L-BFGS step took 20x longer on two threads of a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def standardizer(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(N, D)`` -> the map ``(M, D) -> (M, D)`` float64 that gives ``x``'s channels mean 0 and std 1."""
    mean, std = x.double().mean(dim=0), x.double().std(dim=0, unbiased=False).clamp_min(1e-6)
    return lambda v: (v.double() - mean) / std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, penalties: Sequence[float]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on standardised features ``x`` ``(N, D)``, labels ``y`` ``(N,)``, for each
    of ``P`` L2 ``penalties``: mean cross-entropy + penalty · ‖W‖², full-batch L-BFGS from zeros, the ``P``
    problems solved at once (their sum separates). Returns features ``(M, D)`` -> logits ``(P, M, C)``."""
    scale = standardizer(x)
    z, penalty = scale(x), torch.tensor(penalties, dtype=torch.float64)
    weight = torch.zeros(len(penalty), z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(penalty), 1, num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=LBFGS_STEPS, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("nd,pdc->pnc", z, weight) + bias
        cross_entropy = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(penalty)), reduction="none")
        loss = (cross_entropy.view(len(penalty), -1).mean(dim=1) + penalty * weight.square().sum(dim=(1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    weight, bias = weight.detach(), bias.detach()
    return lambda v: torch.einsum("md,pdc->pmc", scale(v), weight) + bias


def fit_ridge(x: torch.Tensor, y: torch.Tensor, penalties: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Ridge regression of ``y`` ``(N,)`` on standardised features ``x`` ``(N, D)``, in float64, for each of ``P``
    ``penalties``: the standardised target minimises mean squared error + penalty · ‖w‖² (one eigendecomposition
    of the Gram matrix serves every penalty). Returns features ``(M, D)`` -> predictions ``(P, M)``."""
    scale = standardizer(x)
    z, penalty = scale(x), torch.tensor(penalties, dtype=torch.float64)
    mean, std = y.double().mean(), y.double().std(unbiased=False).clamp_min(1e-6)
    eigenvalues, vectors = torch.linalg.eigh(z.T @ z / len(z))
    along = vectors.T @ (z.T @ ((y.double() - mean) / std) / len(z))  # (D,) in the eigenbasis
    weights = vectors @ (along[:, None] / (eigenvalues[:, None] + penalty[None]))  # (D, P)
    return lambda v: (scale(v) @ weights).T * std + mean


def cross_validated_penalty(scores: Callable[[np.ndarray, np.ndarray], np.ndarray], groups: np.ndarray,
                            seed: int) -> float:
    """The penalty of :data:`PENALTIES` with the best mean validation score over :data:`FOLDS` folds of whole
    ``groups`` ``(N,)`` (seeded); the largest on ties. ``scores(fit_rows, eval_rows)`` (bool ``(N,)`` masks) gives
    the validation score of every penalty ``(P,)``."""
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    fold_of = {group: k % FOLDS for k, group in enumerate(unique.tolist())}
    folds = np.array([fold_of[group] for group in groups.tolist()])
    used = [f for f in range(FOLDS) if (folds == f).any() and (folds != f).any()]
    mean = np.mean([scores(folds != f, folds == f) for f in used], axis=0)
    return PENALTIES[len(PENALTIES) - 1 - int(np.argmax(mean[::-1]))]


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, num_classes: int, k: int,
                temperature: float) -> torch.Tensor:
    """DINO's weighted kNN: the ``k`` training features ``(N, D)`` most cosine-similar to each query ``(M, D)``
    vote for their label with weight ``exp(similarity / temperature)``; returns the winning labels ``(M,)``."""
    similarity = F.normalize(query_x, dim=1) @ F.normalize(train_x, dim=1).T
    top, index = similarity.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(query_x), num_classes).scatter_add_(1, train_y[index], (top / temperature).exp())
    return votes.argmax(dim=1)


@dataclass
class ClassificationScores:
    """Top-1 accuracy on the test split, in [0, 1], with bootstrap 95 % intervals over the test images."""

    knn: float
    linear: float
    penalty: float  # L2 penalty of the linear probe, chosen by cross-validation on the training split
    knn_ci95: list[float]
    linear_ci95: list[float]
    knn_correct: list[int]  # per test image (the split's order): 1 if kNN got it right
    linear_correct: list[int]


@one_thread()
def classification_scores(x: torch.Tensor, data: ProbeData, cfg: ProbeConfig) -> ClassificationScores:
    """kNN and linear-probe accuracy of features ``x`` ``(N, D)`` of the classification images."""
    train, test = ~data.test, data.test
    labels, num_classes = torch.from_numpy(data.labels), len(data.classes)
    train_x, train_y, test_x, test_y = x[train], labels[train], x[test], labels[test]
    knn = knn_predict(train_x, train_y, test_x, num_classes, cfg.k, cfg.temperature)

    def accuracies(fit_rows: np.ndarray, eval_rows: np.ndarray) -> np.ndarray:
        predict = fit_logistic(train_x[fit_rows], train_y[fit_rows], num_classes, PENALTIES)
        return (predict(train_x[eval_rows]).argmax(dim=2) == train_y[eval_rows]).double().mean(dim=1).numpy()

    penalty = cross_validated_penalty(accuracies, np.arange(len(train_x)), cfg.seed)
    linear = fit_logistic(train_x, train_y, num_classes, [penalty])(test_x)[0].argmax(dim=1)
    knn_correct, linear_correct = (knn == test_y).int().tolist(), (linear == test_y).int().tolist()
    return ClassificationScores(knn=float(np.mean(knn_correct)), linear=float(np.mean(linear_correct)),
                                penalty=penalty, knn_ci95=percentile_interval(mean_samples(knn_correct)),
                                linear_ci95=percentile_interval(mean_samples(linear_correct)),
                                knn_correct=knn_correct, linear_correct=linear_correct)


# ---------------------------------------------------------------------------------------
# Dense probes
# ---------------------------------------------------------------------------------------
def cell_disparity(disparity: np.ndarray, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth per patch of a grid ``(h, w)`` over a disparity map ``(H, W)`` (NaN unknown): the mean of
    each cell's known disparities ``(h, w)``, and whether at least :data:`MIN_KNOWN` of its pixels are known."""
    known = torch.from_numpy(np.isfinite(disparity)).double()[None, None]
    values = torch.from_numpy(np.nan_to_num(disparity, nan=0.0)).double()[None, None]
    share = F.adaptive_avg_pool2d(known, grid)[0, 0]
    return F.adaptive_avg_pool2d(values * known, grid)[0, 0] / share.clamp_min(1e-9), share >= MIN_KNOWN


@dataclass
class DisparityScores:
    """Per-patch disparity regression on the test pairs' left images."""

    rmse: float  # pixels of the pair images
    r2: float  # 1 - squared error / variance of the test patches' disparities
    penalty: float  # ridge penalty, chosen by cross-validation over the training pairs
    train_patches: int
    test_patches: int
    r2_ci95: list[float]  # bootstrap over the test pairs
    test_errors: list[float]  # per test patch: prediction - truth (pixels)
    test_targets: list[float]  # per test patch: the truth
    test_pair: list[int]  # per test patch: index of its pair


@one_thread()
def disparity_scores(left: torch.Tensor, data: ProbeData, seed: int) -> DisparityScores:
    """Ridge probe of each left patch's disparity from its token, ``left`` ``(P, h, w, D)``."""
    rows = {"train": ([], [], []), "test": ([], [], [])}  # split -> tokens (n, D), disparities (n,), pair (n,)
    for index, pair in enumerate(data.pairs):
        disparity, known = cell_disparity(pair.disparity, tuple(left.shape[1:3]))
        tokens, targets, groups = rows[pair.split]
        tokens.append(left[index][known])
        targets.append(disparity[known])
        groups.append(np.full(int(known.sum()), index))
    (train_x, train_y, train_g), (test_x, test_y, test_g) = ((torch.cat(t), torch.cat(d), np.concatenate(g))
                                                              for t, d, g in rows.values())

    def negative_mse(fit_rows: np.ndarray, eval_rows: np.ndarray) -> np.ndarray:
        predict = fit_ridge(train_x[fit_rows], train_y[fit_rows], PENALTIES)
        return -(predict(train_x[eval_rows]) - train_y[eval_rows]).square().mean(dim=1).numpy()

    penalty = cross_validated_penalty(negative_mse, train_g, seed)
    error = fit_ridge(train_x, train_y, [penalty])(test_x)[0] - test_y
    r2 = 1 - float(error.square().sum() / (test_y - test_y.mean()).square().sum().clamp_min(1e-12))
    errors, targets = error.tolist(), test_y.double().tolist()
    return DisparityScores(rmse=float(error.square().mean().sqrt()), r2=r2, penalty=penalty,
                           train_patches=len(train_y), test_patches=len(test_y),
                           r2_ci95=percentile_interval(r2_samples(errors, targets, test_g)), test_errors=errors,
                           test_targets=targets, test_pair=test_g.tolist())


def cell_centres(grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres ``(y, x)``, each ``(h * w,)`` row-major, of the cells of a grid ``(h, w)`` over an image of
    ``size`` ``(H, W)``."""
    (h, w), (height, width) = grid, size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w
    return ys.repeat_interleave(w), xs.repeat(h)


def nearest_neighbours(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each left patch of ``left`` ``(h, w, D)`` (row-major), the most cosine-similar patch of ``right``
    ``(h', w', D)`` ``(h * w,)``, and whether that right patch's nearest left patch is it (mutual) ``(h * w,)``."""
    similarity = F.normalize(left.flatten(0, 1), dim=-1) @ F.normalize(right.flatten(0, 1), dim=-1).T
    forward, backward = similarity.argmax(dim=1), similarity.argmax(dim=0)
    return forward, backward[forward] == torch.arange(len(forward))


def warped_centres(homography: np.ndarray, grid: tuple[int, int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the homography ``(3, 3)`` (source pixel (x, y, 1) -> warped pixel) takes the centre of each cell of a
    ``grid`` ``(h, w)`` over the ``size x size`` source image: warped ``(y, x)``, each ``(h * w,)`` row-major."""
    ys, xs = cell_centres(grid, (size, size))
    points = torch.stack([xs, ys, torch.ones_like(xs)]) .T @ torch.from_numpy(np.asarray(homography, np.float64)).T
    return points[:, 1] / points[:, 2], points[:, 0] / points[:, 2]


def match_errors(source: torch.Tensor, warped: torch.Tensor, homography: np.ndarray, size: int,
                 unit_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each source patch's nearest-neighbour warped patch to its true position, in patches of a
    ``unit_grid`` ``(h_u, w_u)``, and whether it is a mutual nearest neighbour, both ``(Q,)`` for the ``Q`` patches
    of ``source`` ``(h, w, D)`` whose centre the homography keeps inside the ``size x size`` warped image
    ``warped`` ``(h', w', D)``."""
    true_y, true_x = warped_centres(homography, tuple(source.shape[:2]), size)
    queries = (true_y >= 0) & (true_y < size) & (true_x >= 0) & (true_x < size)
    match, mutual = nearest_neighbours(source, warped)
    ys, xs = cell_centres(tuple(warped.shape[:2]), (size, size))
    error = torch.hypot((ys[match] - true_y) * unit_grid[0] / size, (xs[match] - true_x) * unit_grid[1] / size)
    return error[queries], mutual[queries]


def threshold_key(threshold: float) -> str:
    """JSON key of a PCK threshold: ``0.5`` -> ``"0.5"``, ``1.0`` -> ``"1"``."""
    return f"{threshold:g}"


@dataclass
class CorrespondenceScores:
    """Nearest-neighbour patch matches from each source image to its warped image, over all warp pairs: PCK, the
    share of the source patches (with a true position inside the warped image) matched within a distance, in
    patches of the student's grid; shares in [0, 1], bootstrap 95 % intervals over the pairs."""

    within_half_patch: float
    within_1_patch: float
    within_2_patches: float
    mutual_within_1_patch: float  # among the mutual nearest neighbours
    mutual_share: float  # share of the matches that are mutual
    queries: int  # source patches with a true position in the warped image
    ci95: dict[str, list[float]]  # PCK threshold (patches, "0.5", "1", "2") -> interval
    pair_queries: list[int]  # per warp pair (the data's order)
    pair_hits: dict[str, list[int]]  # PCK threshold -> per warp pair: source patches matched within it
    per_pair_within_1_patch: dict[str, float]


@one_thread()
def correspondence_scores(source: torch.Tensor, warped: torch.Tensor, data: ProbeData,
                          unit_grid: tuple[int, int]) -> CorrespondenceScores:
    """Zero-shot correspondence of patch tokens ``source``/``warped`` ``(W, h, w, D)`` of the warp pairs;
    distances in patches of ``unit_grid`` (the student's)."""
    results = [match_errors(source[i], warped[i], pair.homography, pair.size, unit_grid)
               for i, pair in enumerate(data.warps)]
    error, mutual = torch.cat([e for e, _ in results]), torch.cat([m for _, m in results])
    queries = [len(e) for e, _ in results]
    hits = {threshold_key(t): [int((e <= t).sum()) for e, _ in results] for t in PCK_THRESHOLDS}
    share = {key: sum(h) / max(sum(queries), 1) for key, h in hits.items()}
    return CorrespondenceScores(
        within_half_patch=share["0.5"], within_1_patch=share["1"], within_2_patches=share["2"],
        mutual_within_1_patch=float((error[mutual] <= 1).double().mean()) if mutual.any() else 0.0,
        mutual_share=float(mutual.double().mean()) if len(mutual) else 0.0, queries=len(error),
        ci95={key: percentile_interval(pooled_share_samples(h, queries)) for key, h in hits.items()},
        pair_queries=queries, pair_hits=hits,
        per_pair_within_1_patch={pair.name: float((e <= 1).double().mean()) if len(e) else 0.0
                                 for pair, (e, _) in zip(data.warps, results)})
