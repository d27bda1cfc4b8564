"""``dune-cache convert-checkpoint IN OUT --trust-this-file``: the one explicit way to use a checkpoint that the safe
loader refuses (it pickles objects beyond weights).

The user vouches for IN: it is loaded with full unpickling (``torch.load(weights_only=False)``, the only place in
the project that does so, reached only with ``--trust-this-file``) and written as ONE safetensors file, which every
command then reads without executing anything: its tensors (contiguous, no shared storage) and, in the safetensors
metadata, a JSON tree that rebuilds the original nested structure (see
:class:`dune_cache.teachers.checkpoint_io.TreeEncoder`), the source file's name, size and sha256, and the objects
that have no plain form (an optimizer object, a custom class...), which are dropped and listed, never silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..teachers.checkpoint_io import write_converted
from ..teachers.spec import check_checkpoint_file
from ..utils.hashing import file_sha256

TRUST_FLAG = "--trust-this-file"


@dataclass
class ConvertResult:
    """What was written: the output file, its source's sha256, the tensors kept, what was dropped or converted."""

    out: Path
    source_sha256: str
    tensors: int
    dropped: list[dict[str, str]]
    converted: list[dict[str, str]]


def refusal(source: Path, out: Path) -> str:
    """Why the command does nothing without :data:`TRUST_FLAG`."""
    return (f"convert-checkpoint loads {source} with full unpickling, which runs any code the file holds: only do it "
            f"for a file you trust (e.g. downloaded from its authors' release page, its sha256 checked). To go on, "
            f"run it again with {TRUST_FLAG}: `dune-cache convert-checkpoint {source} {out} {TRUST_FLAG}`")


def convert_checkpoint(source: Path, out: Path, trusted: bool) -> ConvertResult:
    """Convert ``source`` into the safetensors file ``out`` (see the module docstring); a :class:`CheckpointError`
    without ``trusted``, for a missing source, or an ``out`` that is not ``.safetensors`` or is the source."""
    source, out = check_checkpoint_file(source), Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"OUT {out}: must end in .safetensors (the format every command reads safely)")
    if out.resolve() == source.resolve():
        raise CheckpointError(f"OUT {out} is the source file; choose another name")
    if not trusted:
        raise CheckpointError(refusal(source, out))
    import torch

    try:
        obj = torch.load(source, map_location="cpu", weights_only=False)  # the user vouched for it (TRUST_FLAG)
    except Exception as exc:  # noqa: BLE001 - whatever the file is, say so in one line
        raise CheckpointError(f"cannot read checkpoint {source}: {type(exc).__name__}: {exc}") from None
    sha = file_sha256(source)
    encoder = write_converted(obj, out, {"file": source.name, "sha256": sha, "bytes": source.stat().st_size})
    return ConvertResult(out=out, source_sha256=sha, tensors=len(encoder.tensors), dropped=encoder.dropped,
                         converted=encoder.converted)


def summary_lines(result: ConvertResult) -> list[str]:
    """What the command prints: the file written, then each object dropped or converted."""
    lines = [f"wrote {result.out}: {result.tensors} tensors (source sha256 {result.source_sha256})"]
    lines += [f"  converted {c['path']}: {c['type']} kept as {c['as']}" for c in result.converted]
    lines += [f"  dropped {d['path']}: {d['type']} has no plain form, left out (listed in the file's metadata)"
              for d in result.dropped]
    return lines
