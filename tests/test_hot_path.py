"""The training step never waits for the device, batches pin, and non-finite steps are skipped on the device.

Host syncs are counted on the CPU the way they would stall a GPU: a ``TorchDispatchMode`` sees every op that reads a
device value on the host (``aten._local_scalar_dense``: ``.item()``, ``float()``/``int()``/``bool()`` of a tensor;
``aten.nonzero``: boolean indexing, ``nonzero``, ``masked_select``...), and ``Tensor.tolist``/``numpy``/``cpu`` are
counted too (a device→host copy on a GPU, no op on the CPU). The DataLoader's fetch and the read points (a log step,
a checkpoint) are left out: they are where the host is meant to read.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import cache, config  # noqa: F401 - cache: the tiny-teacher cache fixture
from torch.utils._python_dispatch import TorchDispatchMode

from dune_cache.utils.runtime import pin_fields
from dune_student.data.batches import InputPlan
from dune_student.loss.distill import drop_teachers
from dune_student.training import trainer as trainer_module
from dune_student.training.trainer import Trainer

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2,
            aten.is_nonzero}


class SyncCounter(TorchDispatchMode):
    """Counts, while ``active``, the ops that wait for the device and the Python-level device→host reads."""

    def __init__(self):
        super().__init__()
        self.active, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func.overloadpacket in SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting(self, active: bool = True):
        before, self.active = self.active, active
        try:
            yield
        finally:
            self.active = before


@pytest.fixture
def counted(monkeypatch):
    """A :class:`SyncCounter` counting in the training loop (the steps and what runs between them; not the set-up
    before it), paused in the loader's fetch and at the read points; host reads through ``tolist``/``numpy``/``cpu``
    counted as syncs too."""
    counter = SyncCounter()
    for name in ("tolist", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if counter.active:
                counter.seen.append(f"Tensor.{_name}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for method, active in (("train_steps", True), ("next_batch", False), ("read_metrics", False), ("save", False),
                           ("held_out_fidelity", False)):
        real = getattr(Trainer, method)

        def switched(self, *args, _real=real, _active=active, **kwargs):
            with counter.counting(_active):
                return _real(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, method, switched)
    return counter


def run_counted(counter: SyncCounter, cfg, monkeypatch, plan: dict | None = None) -> tuple[Trainer, list[int]]:
    """Train ``cfg`` with every step's syncs counted; (trainer, syncs per step)."""
    if plan is not None:
        monkeypatch.setattr(trainer_module, "input_plan", lambda cfg, device: InputPlan(**plan))
    per_step, real_step = [], Trainer.train_step

    def step(self, batch):
        before = len(counter.seen)
        real_step(self, batch)
        per_step.append(len(counter.seen) - before)

    monkeypatch.setattr(Trainer, "train_step", step)
    trainer = Trainer(cfg)
    with counter:
        trainer.run()
    return trainer, per_step


@pytest.mark.parametrize("extra, plan", [
    ((), None),
    (("loss.standardize=ema", "loss.sharing=own+generic"), None),
    ((), dict(decode_targets_on_device=True, photometric_on_device=True)),  # the CUDA placement, here on the CPU
], ids=["default", "ema-sharing", "device-placement"])
def test_a_training_step_waits_for_nothing(tmp_path, cache, real_image_dir, counted, monkeypatch, extra, plan):
    cfg = config(cache, real_image_dir, tmp_path / "run", "steps=8", "log_every=4", "checkpoint_every=8", *extra)
    _, per_step = run_counted(counted, cfg, monkeypatch, plan)
    assert len(per_step) == 8
    assert per_step == [0] * 8, counted.seen
    assert counted.seen == []  # nothing between the steps either (signals, bookkeeping)


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path, cache, real_image_dir):
    """The fused AdamW skips the update of a step flagged ``found_inf`` (the trainer's flag for a non-finite loss or
    gradient norm): parameters and the optimiser's step count stay exactly as they were."""
    trainer = Trainer(config(cache, real_image_dir, tmp_path / "run", "steps=2"))
    params = list(trainer.model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()  # builds the optimiser's state
    steps = {k: v["step"].clone() for k, v in trainer.optimizer.state.items()}
    frozen = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    trainer.optimizer.found_inf = torch.ones(())
    trainer.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, params))
    assert all(torch.equal(steps[k], v["step"]) for k, v in trainer.optimizer.state.items())
    for p in params:
        p.grad = torch.ones_like(p)
    trainer.optimizer.found_inf = torch.zeros(())
    trainer.optimizer.step()
    assert not any(torch.equal(a, b) for a, b in zip(frozen, params) if a.numel() > 1)


def test_every_batch_type_pins_every_tensor(tmp_path, cache, real_image_dir, monkeypatch):
    """``pin_memory()`` of the loader's batches (the hook ``DataLoader(pin_memory=True)`` calls, whose default
    handles only tensors and plain containers) returns every tensor pinned, also inside encoded targets, encoded
    images and photometric draws. Pinning needs a GPU; here ``Tensor.pin_memory`` marks what it would pin."""
    marked = []

    def pin(self):
        out = self.clone()
        marked.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    trainer = Trainer(config(cache, real_image_dir, tmp_path / "run", "data.image_decode=device"))
    trainer.source.plan = InputPlan(decode_targets_on_device=True, decode_images_on_device=True,
                                    photometric_on_device=True)
    batch = trainer.source[0]
    from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin

    pinned = dataloader_pin(batch)
    assert type(pinned) is type(batch) and pinned is not batch
    tensors = list(tensors_in(pinned))
    assert len(tensors) >= 10  # pixels, mask, samples, encoded parts, image bytes, photometric draws...
    assert all(any(t is m for m in marked) for t in tensors)
    assert pinned.encoded is not None and pinned.images is not None and pinned.photometric is not None


def tensors_in(value):
    """Every tensor inside ``value`` (dataclasses, dicts, lists, tuples)."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from tensors_in(getattr(value, field.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def test_pin_fields_keeps_non_tensors(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    from dune_cache.read.batches import TargetBatch

    batch = TargetBatch(cls={"t": torch.zeros(2, 3)}, patch={"t": torch.zeros(2, 1, 1, 3)},
                        mask=torch.ones(2, 1, dtype=torch.bool))
    pinned = pin_fields(batch)
    assert pinned.cls["t"] is not batch.cls["t"] and torch.equal(pinned.mask, batch.mask)
    assert pinned.level_cls == {} and pinned.damaged is None


def test_teacher_dropping_draws_on_the_losses_device():
    """The draws come from a generator on the losses' device (none copied from the host)."""
    losses = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    available = torch.ones(2, 2, dtype=torch.bool)
    weights = drop_teachers(losses, available, 0.5, torch.Generator().manual_seed(0))
    kept = weights > 0
    assert kept[0, 1] and kept[1, 0]  # the highest-loss teacher of each image is always kept
    np.testing.assert_allclose(weights.sum().item(), 1.0)


def test_training_results_do_not_depend_on_where_inputs_are_prepared(tmp_path, cache, real_image_dir, monkeypatch):
    """Decoding targets and applying photometric draws on the device (CUDA's placement) gives the loader's run
    bit for bit: the sync-free paths compute the same values."""
    def final_state(out: Path, plan: InputPlan) -> dict:
        monkeypatch.setattr(trainer_module, "input_plan", lambda cfg, device: plan)
        trainer = Trainer(config(cache, real_image_dir, out, "steps=4"))
        trainer.run()
        return {k: v.clone() for k, v in trainer.student.state_dict().items()}

    loader = final_state(tmp_path / "loader", InputPlan())
    device = final_state(tmp_path / "device", InputPlan(decode_targets_on_device=True, photometric_on_device=True))
    assert loader.keys() == device.keys()
    for key in loader:
        torch.testing.assert_close(loader[key], device[key], rtol=0, atol=0)


def load_tool(name: str):
    """A script of ``tools/`` as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_a_sharded_group_is_written_once_per_byte_stored(tmp_path, batch):
    """zarr-python rewrites a whole shard on each partial write: the writer gathers each unit (one shard) and writes
    it once, so the bytes the process writes (``/proc/self/io`` ``wchar``: features, metadata, failure records,
    status) stay within 10% of what the group holds; written batch by batch they would not."""
    bench = load_tool("bench_shard_writes")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((24, 8, 8, 64), dtype=np.float32).astype(np.float16)
    cls = features.mean(axis=(1, 2)).astype(np.float16)
    storage = bench.StorageConfig(codec="none", shard_images=8)
    gathered = bench.write_group(tmp_path / "gathered.zarr", features, cls, batch, storage, gathered=True)
    assert gathered["ratio"] <= 1.10, gathered
    per_batch = bench.write_group(tmp_path / "per_batch.zarr", features, cls, batch, storage, gathered=False)
    assert per_batch["stored"] == gathered["stored"]  # the same store either way
    if batch < 8:  # several batches per shard: each partial write rewrote the shard
        assert per_batch["ratio"] > 1.5, per_batch


def test_stats_read_a_bounded_sample_of_the_cache(tmp_path, cache, monkeypatch):
    """``dune-cache stats`` reads at most ``sample`` images, spread over the done ones, whatever the cache's size;
    the statistics say how many they cover and how many were done."""
    from dune_cache.commands.stats import compute_stats
    from dune_cache.format.store import TeacherStore

    read = []
    real = TeacherStore.read_features

    def counting(self, name, rows, check=True):
        read.append((name, len(np.atleast_1d(np.arange(self.count)[rows]))))
        return real(self, name, rows, check)

    monkeypatch.setattr(TeacherStore, "read_features", counting)
    stats = compute_stats(str(cache), "tiny_test_teacher", sample=3)
    assert stats.count == 3 and stats.done == 6
    assert sum(n for name, n in read if name == "patch") == 3 and sum(n for name, n in read if name == "cls") == 3
    read.clear()
    everything = compute_stats(str(cache), "tiny_test_teacher", sample=0)
    assert everything.count == everything.done == 6 and sum(n for name, n in read if name == "patch") == 6


def test_the_gpu_check_runs_on_the_cpu_at_tiny_shapes(tmp_path):
    """``tools/gpu_check.py --tiny`` (the one command for a lent GPU) keeps working: every stage measured or
    reported as not run with its reason."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["training"]["cached"]["images_per_s"] > 0 and result["training"]["live"]["images_per_s"] > 0
    assert result["extraction"]["images_per_s"] > 0 and result["extraction"]["cpu_s_per_image"] > 0
    assert result["lowrank"]["encode_images_per_s"] > 0 and result["jpeg_decode"]["run"] is False
    assert "not run" in (tmp_path / "gpu_check.md").read_text()
