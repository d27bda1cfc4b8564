"""Distillation loss, teacher dropping, data sharing and target standardisation."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch

from dune_cache.format.stats import TeacherStats
from dune_student.loss.standardize import Standardizer, ema_momentum
from dune_student.loss.distill import drop_teachers, sharing_mask, teacher_losses, token_loss, use_cls_from_provenance

# Hand-computed token losses, 0.5·(1 − cos) + 0.5·mean_c SmoothL1(β=1):
#   [1, 0] vs [0, 1]: cos 0 -> 0.5;  |diff| = (1, 1) -> SmoothL1 (0.5, 0.5), mean 0.5 -> 0.25;  total 0.75
#   [2, 0] vs [1, 0]: cos 1 -> 0;    |diff| = (1, 0) -> (0.5, 0), mean 0.25 -> 0.125;          total 0.125
#   [3, 4] vs [3, 0]: cos 9/15 = 0.6 -> 0.2; |diff| = (0, 4) -> (0, 3.5), mean 1.75 -> 0.875; total 1.075
#   [0.5, 0] vs [0, 0.5]: cos 0 -> 0.5; |diff| = (0.5, 0.5) -> 0.5·0.25 = 0.125 each -> 0.0625; total 0.5625
PRED = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 4.0], [0.5, 0.0]])
TARGET = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.5]])
EXPECTED = torch.tensor([0.75, 0.125, 1.075, 0.5625])


def test_token_loss_matches_hand_computed_values():
    assert torch.allclose(token_loss(PRED, TARGET), EXPECTED, atol=1e-6)


def test_patch_loss_is_the_mean_over_tokens():
    pred = PRED.reshape(1, 2, 2, 2)  # one image, 2×2 grid of the four tokens above
    target = TARGET.reshape(1, 2, 2, 2)
    assert torch.allclose(token_loss(pred, target), EXPECTED.mean().reshape(1), atol=1e-6)


def test_token_loss_is_fp32_for_bf16_inputs_and_under_autocast():
    torch.manual_seed(0)
    pred = torch.randn(4, 3, 5, 64).bfloat16()
    target = (pred.float() + 0.1 * torch.randn(4, 3, 5, 64)).bfloat16()
    reference = token_loss(pred.float(), target.float())
    direct = token_loss(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = token_loss(pred, target)
    assert direct.dtype == autocast.dtype == torch.float32
    assert torch.equal(direct, reference) and torch.equal(autocast, reference)


def test_token_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        token_loss(torch.zeros(2, 4, 4, 8), torch.zeros(2, 3, 3, 8))


def test_teacher_losses_average_cls_and_patch_and_skip_cls_when_asked():
    cls_pred, cls_target = PRED[:1], TARGET[:1]                       # CLS loss 0.75
    patch_pred, patch_target = PRED[1:2].view(1, 1, 1, 2), TARGET[1:2].view(1, 1, 1, 2)  # patch loss 0.125
    pair = (cls_pred, patch_pred), (cls_target, patch_target)
    preds = {"dino": pair[0], "mast3r": pair[0]}
    targets = {"dino": pair[1], "mast3r": pair[1]}
    losses = teacher_losses(preds, targets, ["mast3r", "dino"], use_cls={"mast3r": False})
    assert losses.shape == (1, 2)
    assert torch.allclose(losses, torch.tensor([[0.125, (0.75 + 0.125) / 2]]))


def test_use_cls_follows_the_cached_cls_source():
    provenance = {"dino": {"teacher": {"cls_source": "token"}}, "mast3r": {"teacher": {"cls_source": "mean_patch"}},
                  "siglip2": {"teacher": {"cls_source": "attn_pool"}}}
    assert use_cls_from_provenance(provenance) == {"dino": True, "mast3r": False, "siglip2": True}


def test_dropping_always_keeps_the_highest_loss_teacher_and_drops_others_at_rate_p():
    generator = torch.Generator().manual_seed(0)
    b, t, p = 20000, 3, 0.5
    losses = torch.rand(b, t, generator=generator)
    available = torch.ones(b, t, dtype=torch.bool)
    weights = drop_teachers(losses, available, p, generator)
    kept = weights > 0
    highest = losses.argmax(dim=1)
    assert kept[torch.arange(b), highest].all()
    others = kept.clone()
    others[torch.arange(b), highest] = False
    drop_rate = 1 - others.sum().item() / (b * (t - 1))
    assert abs(drop_rate - p) < 4 * np.sqrt(p * (1 - p) / (b * (t - 1)))
    # UNIC/DUNE renormalisation: every kept (image, teacher) pair weighs 1 / number of kept pairs
    assert torch.allclose(weights[kept], torch.full((int(kept.sum()),), 1 / kept.sum().item()))
    assert weights.sum().item() == pytest.approx(1.0)


def test_unavailable_teachers_get_zero_weight_and_never_count_as_highest():
    generator = torch.Generator().manual_seed(1)
    losses = torch.tensor([[9.0, 1.0, 2.0], [0.1, 0.2, 0.3], [5.0, 6.0, 7.0]]).repeat(2000, 1)
    available = torch.tensor([[False, True, True], [True, True, True], [False, False, False]]).repeat(2000, 1)
    weights = drop_teachers(losses, available, 0.9, generator)
    assert (weights[~available] == 0).all()
    assert (weights[0::3, 2] > 0).all()   # teacher 0 has the largest loss but no target: teacher 2 is kept
    assert (weights[1::3, 2] > 0).all()
    assert (weights[2::3] == 0).all()     # no teacher at all: the image contributes nothing


def test_dropping_with_p_zero_keeps_every_available_teacher_and_is_reproducible():
    losses = torch.rand(64, 3)
    available = torch.rand(64, 3) > 0.3
    weights = drop_teachers(losses, available, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(weights > 0, available)
    first = drop_teachers(losses, available, 0.5, torch.Generator().manual_seed(7))
    again = drop_teachers(losses, available, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert torch.equal(drop_teachers(losses, torch.zeros_like(available), 0.5), torch.zeros(64, 3))


TEACHERS = ["dino", "mast3r", "hmr"]


def test_sharing_all_lets_every_image_supervise_every_teacher():
    assert sharing_mask(["dino", "generic", ""], TEACHERS, "all").all()


def test_sharing_own_data_and_own_plus_generic():
    tags = ["dino", "mast3r", "hmr", "generic", ""]
    own = sharing_mask(tags[:3], TEACHERS, "own_data")
    assert torch.equal(own, torch.eye(3, dtype=torch.bool))
    mixed = sharing_mask(tags, TEACHERS, "own+generic")
    assert torch.equal(mixed[:3], torch.eye(3, dtype=torch.bool))
    assert mixed[3:].all()  # generic and untagged images supervise everybody


def test_sharing_with_a_teacher_as_generic_tag_reproduces_dune():
    tags = ["dino", "mast3r", "hmr"]  # DUNE: DINOv2's data is the generic data
    own = sharing_mask(tags, TEACHERS, "own_data", generic_tag="dino")
    mixed = sharing_mask(tags, TEACHERS, "own+generic", generic_tag="dino")
    assert own[0].tolist() == [True, False, False]
    assert mixed[0].all() and mixed[1].tolist() == [False, True, False]


def test_sharing_rejects_images_no_teacher_may_use():
    with pytest.raises(ValueError, match="generic"):
        sharing_mask(["dino", "generic"], TEACHERS, "own_data")
    with pytest.raises(ValueError, match="bedlam"):
        sharing_mask(["bedlam"], TEACHERS, "own+generic")
    with pytest.raises(ValueError, match="unknown data-sharing mode"):
        sharing_mask(["dino"], TEACHERS, "own")


def correlated_tokens(n: int, d: int, seed: int) -> torch.Tensor:
    """``(n, 2, 2, d)`` float64 tokens with a non-zero mean and a strongly correlated covariance."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(0.1, 3.0, d)
    rows = rng.normal(size=(n * 4, d)) @ mixing.T + rng.normal(size=d) * 5
    return torch.from_numpy(rows.reshape(n, 2, 2, d))


def stats_of(cls: np.ndarray, tokens: np.ndarray, phis_matrix: np.ndarray | None = None) -> TeacherStats:
    d = tokens.shape[-1]
    return TeacherStats(cls_mean=cls.mean(0), cls_std=cls.std(0), patch_mean=tokens.mean(0),
                        patch_std=tokens.std(0), phis_mean=tokens.mean(0),
                        phis_matrix=np.eye(d) if phis_matrix is None else phis_matrix, count=len(cls))


def phis_matrix_of(tokens: np.ndarray) -> np.ndarray:
    """RADIO's PHI-S: ``H Uᵀ / sqrt(mean(e))`` for ``cov = U diag(e) Uᵀ``."""
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(tokens, rowvar=False, bias=True))
    hadamard = scipy.linalg.hadamard(tokens.shape[-1]) / np.sqrt(tokens.shape[-1])
    return hadamard @ eigenvectors.T / np.sqrt(eigenvalues.mean())


def test_channel_standardisation_gives_unit_channels_and_round_trips():
    patch = correlated_tokens(500, 8, seed=0)
    cls = patch.mean(dim=(1, 2)) * 3 + 1
    tokens = patch.reshape(-1, 8).numpy()
    standardizer = Standardizer({"dino": 8}, {"dino": stats_of(cls.numpy(), tokens)}, "channel")
    std_cls, std_patch = standardizer.standardize("dino", cls, patch)
    assert std_cls.dtype == std_patch.dtype == torch.float32
    flat = std_patch.reshape(-1, 8)
    assert torch.allclose(flat.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(flat.std(0, unbiased=False), torch.ones(8), atol=1e-4)
    assert torch.allclose(std_cls.std(0, unbiased=False), torch.ones(8), atol=1e-4)
    back_cls, back_patch = standardizer.destandardize("dino", std_cls, std_patch)
    assert torch.allclose(back_patch, patch.float(), atol=1e-3) and torch.allclose(back_cls, cls.float(), atol=1e-3)


def test_phis_standardisation_balances_channels_and_round_trips():
    patch = correlated_tokens(500, 8, seed=1)
    cls = patch.mean(dim=(1, 2))
    tokens = patch.reshape(-1, 8).numpy()
    stats = stats_of(cls.numpy(), tokens, phis_matrix_of(tokens))
    standardizer = Standardizer({"mast3r": 8}, {"mast3r": stats}, "phis")
    std_cls, std_patch = standardizer.standardize("mast3r", cls, patch)
    covariance = np.cov(std_patch.reshape(-1, 8).double().numpy(), rowvar=False, bias=True)
    # PHI-S: every channel has variance 1 (not whitening: off-diagonals keep the spectrum's shape)
    assert np.allclose(np.diag(covariance), 1.0, atol=1e-4)
    assert np.abs(covariance - np.eye(8)).max() > 0.1
    back_cls, back_patch = standardizer.destandardize("mast3r", std_cls, std_patch)
    assert torch.allclose(back_patch, patch.float(), atol=1e-3) and torch.allclose(back_cls, cls.float(), atol=1e-3)


def test_a_whitening_matrix_in_the_phis_slot_gives_identity_covariance():
    patch = correlated_tokens(500, 8, seed=2)
    tokens = patch.reshape(-1, 8).numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(tokens, rowvar=False, bias=True))
    whitening = eigenvectors @ np.diag(eigenvalues ** -0.5) @ eigenvectors.T
    stats = stats_of(tokens[:10], tokens, whitening)
    _, std_patch = Standardizer({"t": 8}, {"t": stats}, "phis").standardize("t", patch[:, :1, :1, 0], patch)
    covariance = np.cov(std_patch.reshape(-1, 8).double().numpy(), rowvar=False, bias=True)
    assert np.allclose(covariance, np.eye(8), atol=1e-4)


def test_missing_statistics_fall_back_to_ema_which_tracks_available_samples(caplog):
    patch = correlated_tokens(64, 8, seed=3).float()
    cls = patch.mean(dim=(1, 2))
    available = torch.arange(64) % 4 != 0
    patch[~available], cls[~available] = 0.0, 0.0  # what the reader returns for a missing target
    with caplog.at_level(logging.WARNING):
        standardizer = Standardizer({"dino": 8}, {"dino": None}, "channel")
    assert standardizer.modes == {"dino": "ema"} and "dune-cache stats" in caplog.text
    standardizer.observe("dino", cls, patch, available, momentum=1.0)
    std_cls, std_patch = standardizer.standardize("dino", cls, patch)
    flat = std_patch[available].reshape(-1, 8)
    assert torch.allclose(flat.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(flat.std(0), torch.ones(8), atol=1e-4)
    assert torch.allclose(std_cls[available].std(0), torch.ones(8), atol=1e-4)

    before = standardizer.teachers["dino"].patch_mean.clone()
    standardizer.observe("dino", cls, patch + 10, available, momentum=0.25)
    assert torch.allclose(standardizer.teachers["dino"].patch_mean, before + 2.5, atol=1e-4)


def _observe_my_half(rank: int, init: str, cls, patch, available, out: str) -> None:
    """One of two gloo processes (as torchrun ranks): observes its half of the global batch."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    half = slice(rank * 8, rank * 8 + 8)
    standardizer = Standardizer({"dino": 8}, {}, "ema")
    standardizer.observe("dino", cls[half], patch[half], available[half], momentum=1.0)
    torch.save(standardizer.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ema_statistics_pool_the_global_batch_under_ddp(tmp_path):
    """Two ranks each see half the batch (uneven availability) and end with the statistics one process
    computes over the whole batch; unpooled, each would standardise with its own half's statistics."""
    patch = correlated_tokens(16, 8, seed=5).float()
    patch[8:] += 3.0  # the two halves differ
    cls = patch.mean(dim=(1, 2))
    available = torch.tensor([True] * 3 + [False] * 5 + [True] * 8)
    torch.multiprocessing.spawn(_observe_my_half, args=(f"file://{tmp_path}/init", cls, patch, available,
                                                        str(tmp_path)), nprocs=2)
    single = Standardizer({"dino": 8}, {}, "ema")
    single.observe("dino", cls, patch, available, momentum=1.0)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, want in single.state_dict().items():
        for state in ranks:
            torch.testing.assert_close(state[key], want, rtol=1e-5, atol=1e-6)
    mine = Standardizer({"dino": 8}, {}, "ema")
    mine.observe("dino", cls[:8], patch[:8], available[:8], momentum=1.0)
    assert not torch.allclose(mine.state_dict()["teachers.dino.patch_mean"],
                              single.state_dict()["teachers.dino.patch_mean"])


def test_statistics_are_buffers_saved_in_the_state_dict():
    patch = correlated_tokens(16, 8, seed=4).float()
    cls = patch.mean(dim=(1, 2))
    trained = Standardizer({"dino": 8}, {}, "ema")
    trained.observe("dino", cls, patch, torch.ones(16, dtype=torch.bool), momentum=1.0)
    state = trained.state_dict()
    assert {"teachers.dino.cls_mean", "teachers.dino.patch_std"} <= set(state)
    restored = Standardizer({"dino": 8}, {}, "ema")
    restored.load_state_dict(state)
    for got, want in zip(restored.standardize("dino", cls, patch), trained.standardize("dino", cls, patch)):
        assert torch.equal(got, want)
    assert Standardizer({"dino": 8}, {}, "none").state_dict() == {}


def test_ema_momentum_follows_a_cosine_from_start_to_end():
    values = [ema_momentum(step, 101) for step in range(101)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(1e-3)
    assert values[50] == pytest.approx((1.0 + 1e-3) / 2)
    assert all(a >= b for a, b in zip(values, values[1:]))
