"""No credentials are written into provenance, run files, chunk-cache folders, logs or error messages
(docs/security.md): a cache URL with user-info and a query token (on fsspec's in-memory filesystem, which takes
them as part of the path, so the commands really run on it) is extracted, recompressed, read through a chunk cache
and trained on, and the secret appears nowhere; nor does a DUNE_CACHE_STORAGE_OPTIONS value in an error."""
from __future__ import annotations

import json
import logging

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from dune_cache import CacheReader
from dune_cache.cli import app
from dune_cache.commands.stats import compute_stats
from dune_cache.format.stats import write_stats
from dune_cache.format.store import TeacherStore
from dune_cache.utils.redaction import redact_url as redact
from dune_cache.utils.redaction import redact_text
from dune_student.training.trainer import train
from test_train import TINY_STUDENT
from dune_student.config import load_config

SECRETS = ("SECRETX", "TOKENY")
TEACHER = "tiny_test_teacher"
runner = CliRunner()


@pytest.mark.parametrize("url, shown", [
    ("s3://AKID:SECRETX@bucket/x.zarr", "s3://***@bucket/x.zarr"),
    ("s3://AKID@bucket/x.zarr", "s3://***@bucket/x.zarr"),
    ("https://host/c.zarr?X-Amz-Signature=SECRETX&X-Amz-Credential=AKID", "https://host/c.zarr?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("simplecache::s3://AKID:SECRETX@bucket/x", "simplecache::s3://***@bucket/x"),
    ("s3://bucket/x.zarr", "s3://bucket/x.zarr"),
    ("/data/photos/cat@2x.png", "/data/photos/cat@2x.png"),
    ("file:///tmp/x.zarr", "file:///tmp/x.zarr"),
])
def test_a_location_is_shown_without_its_credentials(url, shown):
    assert redact(url) == shown if "::" not in url else redact_text(url) == shown
    assert redact_text(f"cannot open '{url}' (denied)") == f"cannot open '{shown}' (denied)"


def memory_url(name: str) -> str:
    return f"memory://AKID:SECRETX@{name}/cache.zarr?token=TOKENY"


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text[max(0, text.find(secret) - 300):text.find(secret) + 100]


def memory_contents(name: str) -> str:
    """Every object the in-memory filesystem holds for bucket ``name`` (their bytes; the paths hold the secret by
    construction of the test: that filesystem takes the user-info as part of the path)."""
    store = fsspec.filesystem("memory").store
    return "".join(bytes(f.getvalue()).decode("utf-8", "replace") for path, f in store.items() if name in path)


@pytest.fixture
def secret_cache(request, real_image_dir, tiny_checkpoint, caplog):
    """A cache extracted through ``dune-cache extract`` at a URL holding credentials; its URL."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    url = memory_url(name)
    caplog.set_level(logging.INFO)
    result = runner.invoke(app, ["extract", "--teacher", TEACHER, "--checkpoint", str(tiny_checkpoint),
                                 "--images", str(real_image_dir), "--out", url, "--student-patch", "8",
                                 "--student-resolution", "32",
                                 "--num-workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output, caplog.text)
    yield url
    fsspec.filesystem("memory").rm(f"/AKID:SECRETX@{name}", recursive=True)


def test_extract_and_recompress_record_and_log_no_credentials(secret_cache, caplog):
    source = TeacherStore.open(secret_cache, TEACHER)
    assert_no_secret(json.dumps(source.provenance))
    target = secret_cache.replace("cache.zarr", "int8.zarr")
    result = runner.invoke(app, ["recompress", secret_cache, "--out", target, "--encoding", "int8-token",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    recompressed = TeacherStore.open(target, TEACHER).provenance["recompressed"]
    assert recompressed["from"] == "memory://***@" + secret_cache.split("@", 1)[1].replace("TOKENY", "***")
    info = runner.invoke(app, ["info", target, "--json"])
    assert_no_secret(result.output, info.output, caplog.text, memory_contents(secret_cache.split("@")[1].split("/")[0]))


def test_reading_through_a_chunk_cache_and_training_record_no_credentials(secret_cache, tmp_path, real_image_dir,
                                                                           caplog):
    write_stats(secret_cache, TEACHER, compute_stats(secret_cache, TEACHER))
    reader = CacheReader(secret_cache, chunk_cache=tmp_path / "chunks")
    reader.read(torch.arange(2).numpy())
    [source] = (tmp_path / "chunks").rglob("source.json")
    assert json.loads(source.read_text())["url"].startswith("memory://***@")
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.cache={secret_cache}", f"data.images={real_image_dir}", f"out={out}", "steps=2",
                             "checkpoint_every=2", f"data.chunk_cache={tmp_path / 'chunks'}", *TINY_STUDENT])
    train(cfg)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["config"]["data"]["cache"].startswith("memory://***@")
    assert train(cfg).session_steps == 0  # the run resumes: the recorded config compares as redacted on both sides
    files = "".join(p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file())
    assert_no_secret(files, caplog.text)


def test_errors_name_locations_without_credentials(monkeypatch):
    missing = runner.invoke(app, ["info", "memory://AKID:SECRETX@nowhere/none.zarr?token=TOKENY"])
    assert missing.exit_code == 2 and "memory://***@nowhere/none.zarr?token=***" in missing.output, missing.output
    assert_no_secret(missing.output)
    for options in ('["SECRETX"]', '{"key": "SECRETX", "secret": '):
        monkeypatch.setenv("DUNE_CACHE_STORAGE_OPTIONS", options)
        refused = runner.invoke(app, ["info", "s3://bucket/x.zarr"])
        assert refused.exit_code == 2 and "DUNE_CACHE_STORAGE_OPTIONS" in refused.output, refused.output
        assert_no_secret(refused.output)
