"""SAK heads: levels, identity-initialised adapter paths, MoR routers, loss terms, export round trip."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dune_student.config import HeadConfig, load_config, loss_terms
from dune_student.model.export import SAKBackbone, export_sak, load_exported
from dune_student.model.heads import TeacherHeads
from dune_student.loss.distill import DUNE_TERMS, LossTerms, token_loss
from dune_student.model.student import Student
from dune_student.config import StudentConfig
from dune_student.model.router import MoRRouter, TaskRouters
from dune_student.model.sak import Adapter, at_larger_grid, pair_levels, student_levels

TEACHERS = {"dino": (24, (3, 4)), "mobile": (40, (6, 8))}


@pytest.fixture(scope="module")
def student() -> Student:
    torch.manual_seed(0)
    cfg = StudentConfig(arch="vit_tiny", patch_size=16, img_size=32, num_registers=4, layerscale=0.5, attention="sdpa")
    return Student(cfg).eval()


def test_levels_follow_sak_rule_and_pair_in_order():
    assert student_levels([], 12) == [2, 5, 8, 11] and student_levels([], 24) == [5, 11, 17, 23]
    assert student_levels([3, 11], 12) == [3, 11]
    with pytest.raises(ValueError, match="sak_levels"):
        student_levels([5, 3], 12)
    pairs = pair_levels([2, 5, 8, 11], {"a": (5, 11, 17, 23), "b": ()})
    assert pairs == {"a": [(2, 5), (5, 11), (8, 17), (11, 23)], "b": []}
    with pytest.raises(ValueError, match=r"teacher a: its cache stores blocks \[5, 11\].*\[2, 5, 8, 11\]"):
        pair_levels([2, 5, 8, 11], {"a": (5, 11)})


def test_adapter_with_zero_scale_is_the_identity_and_trains():
    torch.manual_seed(0)
    adapter = Adapter(16, 4, scale_init=0.0)
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x), x)
    adapter(x).square().sum().backward()
    assert adapter.scale.grad.abs().item() > 0  # the scale moves first; down/up follow once it is non-zero
    assert not torch.equal(Adapter(16, 4, scale_init=1.0)(x), x)


def test_paths_start_as_the_adapter_free_sak_path(student):
    heads = TeacherHeads(student, TEACHERS, HeadConfig(kind="sak"))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = student(x, return_blocks=True)
        for name, projector in heads.projectors.items():
            assert projector.levels == [2, 5, 8, 11] and len(projector.path.adapters) == 13
            tokens = projector.path_tokens(out)
            for k, level in enumerate(projector.levels):  # r_b = x_0 + x_1 + ... + x_b, then the level's LayerNorm
                running_sum = out.embedded + sum(out.blocks[: level + 1])
                expected = F.layer_norm(running_sum, (student.embed_dim,))
                torch.testing.assert_close(tokens[k], expected, rtol=1e-5, atol=1e-5)
            levels = projector.forward_levels(out)
            cls, patch = levels[-1]
            aligned = projector.aligners[-1](tokens[-1])
            torch.testing.assert_close(cls, aligned[:, 0])
            torch.testing.assert_close(patch, aligned[:, 5:].reshape(2, 3, 4, -1))
        final = heads(out)
    assert final["mobile"][1].shape == (2, 6, 8, 40)  # last level, resized to the teacher's grid
    assert [p.shape for _, p in heads.forward_levels(out)["dino"]] == [(2, 3, 4, 24)] * 4


def test_sak_head_without_blocks_is_an_error(student):
    heads = TeacherHeads(student, TEACHERS, HeadConfig(kind="sak"))
    with torch.no_grad(), pytest.raises(ValueError, match="return_blocks=True"):
        heads(student(torch.randn(1, 3, 48, 64)))


@pytest.mark.parametrize("pooling", ["global", "token"])
@pytest.mark.parametrize("training", [True, False])
def test_router_weights_sum_to_one_per_token(pooling, training):
    torch.manual_seed(0)
    router = MoRRouter(32, experts=3, pooling=pooling, noisy_gating=True).train(training)
    stem = torch.randn(2, 3, 4, 32)
    paths = [torch.randn(2, 3, 4, 32), torch.randn(2, 3, 4, 32)]
    routed, weights = router(stem, paths)
    assert weights.shape == (2, 3, 4, 3) and bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 3, 4))
    expected = weights[..., :1] * stem + weights[..., 1:2] * paths[0] + weights[..., 2:] * paths[1]
    torch.testing.assert_close(routed, expected)
    spread = weights.flatten(1, 2).std(dim=1).max().item()
    # global: one weight set per image, but SAK draws the gating noise per token while training
    assert (spread < 1e-6) == (pooling == "global" and not training)


def test_router_of_identical_representations_returns_them():
    router = MoRRouter(16, experts=3, noisy_gating=False).eval()
    stem = torch.randn(1, 2, 2, 16)
    routed, _ = router(stem, [stem.clone(), stem.clone()])
    torch.testing.assert_close(routed, stem)
    with pytest.raises(ValueError, match="3 representations"):
        router(stem, [stem])


def test_loss_terms_weigh_and_place_the_cosine():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    token_cos = F.cosine_similarity(pred, target, dim=-1).flatten(1).mean(1)
    map_cos = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)
    l1 = F.smooth_l1_loss(pred, target, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(token_loss(pred, target), 0.5 * (1 - token_cos) + 0.5 * l1)
    sak = LossTerms(0.9, 0.1, "map")
    torch.testing.assert_close(token_loss(pred, target, sak), 0.9 * (1 - map_cos) + 0.1 * l1)
    assert loss_terms(load_config(None, ["data.cache=c", "heads.kind=sak"])) == (0.9, 0.1, "map")
    assert loss_terms(load_config(None, ["data.cache=c"])) == (0.5, 0.5, "token") == tuple(vars(DUNE_TERMS).values())
    assert loss_terms(load_config(None, ["data.cache=c", "heads.kind=sak", "loss.cos_weight=0.7",
                                         "loss.cosine_over=token"])) == (0.7, 0.1, "token")


def test_smaller_map_is_resized_to_the_larger():
    small, large = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 8, 5)
    pred, target = at_larger_grid(small, large)
    assert pred.shape == target.shape == (2, 6, 8, 5) and target is large
    pred, target = at_larger_grid(large, small)
    assert pred is large and target.shape == (2, 6, 8, 5)


def test_sak_config_fields_parse_and_are_checked():
    cfg = load_config(None, ["data.cache=c", "heads.kind=sak", "heads.sak_levels=3,7,11", "heads.sak_reduction=8",
                             "heads.router_pooling=token"])
    assert cfg.heads.sak_levels == [3, 7, 11] and cfg.heads.sak_reduction == 8
    with pytest.raises(ValueError, match="heads.router_pooling"):
        load_config(None, ["data.cache=c", "heads.router_pooling=max"])


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("with_routers", [True, False])
def test_export_round_trip(student, tmp_path, no_network, with_routers):
    torch.manual_seed(1)
    heads = TeacherHeads(student, TEACHERS, HeadConfig(kind="sak", sak_scale_init=0.5)).eval()
    routers = TaskRouters(["depth", "faces"], 4, student.embed_dim, len(TEACHERS), pooling="token").eval()
    path = export_sak(student, heads.projectors, tmp_path / "sak.safetensors", routers if with_routers else None)
    loaded = load_exported(path)
    assert isinstance(loaded, SAKBackbone) and not loaded.training
    original = SAKBackbone(student.vit, heads.projectors, student.num_registers, student.patch_size,
                           routers if with_routers else None).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        got, want = loaded(x), original(x)
        paths = loaded.representations(x)
    assert set(got) == ({"depth", "faces"} if with_routers else {"stem", "dino", "mobile"})
    for name in want:
        assert len(got[name]) == 4 and got[name][0].shape == (2, 3, 5, student.embed_dim)
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = student(x, return_blocks=True)
    torch.testing.assert_close(paths["stem"][-1], out.patch, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, nn.Module) for m in loaded.projectors.values())


# ---- training from a cache with levels -------------------------------------------------------------------------
TIMM_TEACHER = "vit_tiny_patch16_224"  # 12 blocks, 192-d: `--blocks sak` stores [2, 5, 8, 11]
SAK_RUN = ["student.arch=vit_tiny", "student.patch_size=8", "student.img_size=32", "student.num_registers=1",
           "data.resolution=32", "data.batch_size=3", "data.num_workers=0", "data.shuffle_block=2",
           "data.shuffle_buffer=4", "log_every=1", "progress=false", "steps=3", "checkpoint_every=3",
           "heads.kind=sak", "loss.standardize=ema"]


@pytest.fixture(scope="module")
def level_cache(tmp_path_factory, real_image_dir, tiny_checkpoint):
    """The six photos: a timm ViT-Tiny teacher with SAK's levels and the tiny test teacher without levels."""
    from dune_cache.config import ExtractConfig
    from dune_cache.extract.run import run_extraction
    from dune_cache.teachers.timm_generic import create_timm_vit

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sak")
    checkpoint = folder / "vit_tiny.pth"
    torch.save(create_timm_vit(TIMM_TEACHER).state_dict(), checkpoint)
    out = folder / "cache.zarr"
    common = dict(images=real_image_dir, out=str(out), student_patch=8, student_resolution="32", batch_size=6,
                  num_workers=0, progress=False)
    run_extraction(ExtractConfig(teacher=f"timm:{TIMM_TEACHER}", checkpoint=checkpoint, blocks="sak", **common))
    run_extraction(ExtractConfig(teacher="tiny_test_teacher", checkpoint=tiny_checkpoint, **common))
    return out


def run_config(cache, images, out, *extra):
    return load_config(None, [f"data.cache={cache}", f"data.images={images}", f"out={out}", *SAK_RUN, *extra])


@pytest.fixture(scope="module")
def sak_run(level_cache, real_image_dir, tmp_path_factory):
    """A 3-step SAK run on ``level_cache``: (trainer, result, run directory)."""
    from dune_student.training.trainer import Trainer

    out = tmp_path_factory.mktemp("sak_run") / "run"
    trainer = Trainer(run_config(level_cache, real_image_dir, out))
    return trainer, trainer.run(), out


def test_sak_training_distils_levels_checkpoints_paths_and_refuses_other_heads(sak_run, level_cache, real_image_dir,
                                                                                tmp_path):
    from dune_student.errors import RunMismatchError
    from dune_student.training.trainer import Trainer

    trainer, result, out = sak_run
    assert trainer.sak.pairs == {f"timm-{TIMM_TEACHER}": [(2, 2), (5, 5), (8, 8), (11, 11)], "tiny_test_teacher": []}
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    adapters = [k for k in ckpt["heads"] if ".path.adapters." in k]
    assert len(adapters) == 2 * 13 * 5  # 2 teachers x 13 adapters x (down w/b, up w/b, scale)
    scales = [v.item() for k, v in ckpt["heads"].items() if k.endswith(".scale")]
    assert any(s != 0.0 for s in scales)  # the paths trained away from the identity
    assert set(ckpt["sak_objective"]) >= {f"level_standardizer.teachers.timm-{TIMM_TEACHER}@b11.patch_mean"}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    with pytest.raises(RunMismatchError, match="heads.sak_reduction: checkpoint has 4, this run has 8"):
        Trainer(run_config(level_cache, real_image_dir, resumed, "heads.sak_reduction=8")).run()
    with pytest.raises(ValueError, match=r"teacher timm-vit_tiny_patch16_224: its cache stores blocks \[2, 5, 8, 11\]"):
        Trainer(run_config(level_cache, real_image_dir, tmp_path / "other", "heads.sak_levels=5,11"))


def test_route_trains_routers_per_task_and_exports_them(sak_run, tmp_path):
    from dune_demo.probe_data import write_probe_data
    from dune_student.evaluation.route import RouteConfig, run_routing

    _, _, out = sak_run
    data = write_probe_data(tmp_path / "probe")
    report = run_routing(RouteConfig(checkpoint=str(out / "checkpoint.pt"), data=str(data), out=str(tmp_path / "r"),
                                     steps=5))
    assert report["experts"] == ["stem", f"timm-{TIMM_TEACHER}", "tiny_test_teacher"]
    for task in ("disparity", "faces"):
        weights = torch.tensor(report["router_weights"][task])
        assert weights.shape == (4, 3)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
        assert set(report["scores"][task]) >= {"routed", "stem_only", "metric"}
    assert report["scores"]["disparity"]["test_items"] == 6
    assert (tmp_path / "r" / "router_weights.png").stat().st_size > 0
    backbone = load_exported(tmp_path / "r" / "sak.safetensors")
    assert backbone.routers.tasks == ["disparity", "faces"]
    with torch.no_grad():
        routed = backbone.route(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(routed["faces"][0][1].sum(dim=-1), torch.ones(1, 4, 4))


def test_export_command_writes_paths_of_a_sak_run(sak_run, tmp_path):
    from typer.testing import CliRunner

    from dune_student.cli import app

    trainer, _, out = sak_run
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(out / "checkpoint.pt"),
                                      "--out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 0, result.output
    backbone = load_exported(tmp_path / "s.safetensors")
    assert backbone.routers is None and list(backbone.projectors) == trainer.teachers
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        reps = backbone(x)
        expected = trainer.heads.projectors["tiny_test_teacher"].eval().path_tokens(trainer.student.eval()(x, True))
    torch.testing.assert_close(reps["tiny_test_teacher"][-1], expected[-1][:, 2:].reshape(1, 4, 4, -1))


def test_level_targets_are_cropped_like_the_final_ones_in_the_loader_and_on_the_device(level_cache, real_image_dir):
    from dune_cache.read.reader import CacheReader
    from dune_student.config import AugmentConfig, DataConfig
    from dune_student.data.batches import BatchSource, InputPlan

    def source(**plan) -> BatchSource:
        data = DataConfig(images=str(real_image_dir), batch_size=4, shuffle_block=2, shuffle_buffer=4)
        return BatchSource(CacheReader(str(level_cache), backend="zarr", levels=True), data, AugmentConfig(), 0,
                           np.arange(6), 32, InputPlan(**plan))

    teacher = f"timm-{TIMM_TEACHER}"
    loader, deferred = source(), source(decode_targets_on_device=True)
    for step in range(2):
        batch, encoded = loader[step], deferred[step]
        assert sorted(batch.level_patch[teacher]) == [2, 5, 8, 11] and batch.level_patch["tiny_test_teacher"] == {}
        for block, patch in batch.level_patch[teacher].items():
            assert patch.shape[:3] == batch.patch[teacher].shape[:3]  # the same grid crop as the final patch
            assert batch.level_cls[teacher][block].shape == batch.cls[teacher].shape
        decoded = loader.reader().decode(encoded.encoded)
        for block in (2, 11):
            torch.testing.assert_close(decoded.level_patch[teacher][block], batch.level_patch[teacher][block])
            torch.testing.assert_close(decoded.level_cls[teacher][block], batch.level_cls[teacher][block])
