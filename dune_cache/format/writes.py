"""Writing a teacher group's features: rows of images (float features encoded here, or their parts encoded already on
the extraction device), a whole work unit at once (one write per shard), in parallel over objects no two writers
share. :class:`FeatureWrites` is part of :class:`~dune_cache.format.store.TeacherStore`."""
from __future__ import annotations

from concurrent.futures import Executor
from functools import partial

import numpy as np
import zarr
import zarr.codecs

from ..encodings.base import check_range
from ..errors import StoreError
from .constants import WRITE_EVERY_CHUNK
from .levels import level_names
from .rows import ViewRows, contiguous_runs, disjoint_parts, run_all, take_rows


class FeatureWrites:
    """Feature writes of a teacher group (``self.encoding_of``, ``self.stored_arrays``, ``self.views``,
    ``self.blocks``, ``self.images_per_object`` come from :class:`~dune_cache.format.store.TeacherStore`)."""

    # ---- writing (one writer per unit) -------------------------------------------------
    def write_rows(self, indices: np.ndarray, cls: np.ndarray, patch: np.ndarray, views: ViewRows | None = None,
                   executor: Executor | None = None, parts: int = 1, levels: dict[str, np.ndarray] | None = None
                   ) -> None:
        """Write features of sorted image ``indices``: cls ``(B, D)``, patch ``(B, h, w, D)``, in a group with
        stored blocks their ``levels`` (``levels/b{k}/cls|patch`` -> ``(B, ...)``, every one of the group's) and,
        in a group with cached views, their ``views`` (with the same levels). With an ``executor``, the features
        are encoded and written in up to ``parts`` tasks that own disjoint objects (whole images, or whole shards), all
        but one on the executor; either way this returns once every write has finished, raising the first error."""
        levels = levels or {}
        self.check_rows(views, levels)
        if views is not None:  # one chunk per work unit: written here, in order
            for start, stop, offset in contiguous_runs(indices):
                for name in ("boxes", "flip"):
                    self.views[name][start:stop] = getattr(views, name)[offset:offset + stop - start]
        slices = disjoint_parts(indices // self.images_per_object, parts if executor is not None else 1)
        features = {"cls": cls, "patch": patch, **levels}
        run_all([partial(self.write_feature_rows, indices[s], {n: take_rows(v, s) for n, v in features.items()},
                         None if views is None else views.take(s)) for s in slices], executor)

    def check_rows(self, views: ViewRows | None, levels: dict[str, np.ndarray]) -> None:
        """Refuse rows to write that do not match the group: views for a group without (or the reverse), or other
        levels than the group stores."""
        if (views is None) != (self.views is None):
            raise StoreError(f"{self.group.path}: has {self.num_views} views per image; "
                             f"got {'no' if views is None else views.cls.shape[1]} views to write")
        wanted = set(level_names(self.blocks))
        if set(levels) != wanted or (views is not None and set(views.levels) != wanted):
            raise StoreError(f"{self.group.path}: stores blocks {list(self.blocks)}; got levels "
                             f"{sorted(levels)} to write")

    def write_unit_block(self, lo: int, hi: int, indices: np.ndarray, cls: np.ndarray, patch: np.ndarray,
                         views: ViewRows | None = None, executor: Executor | None = None,
                         levels: dict[str, np.ndarray] | None = None) -> None:
        """Write images ``lo .. hi`` (a whole work unit: whole shards) of every array at once, from the rows of
        sorted ``indices`` in ``[lo, hi)`` (cls ``(B, D)``, patch ``(B, h, w, D)``, ``levels``, ``views`` as in
        :meth:`write_rows`); images without rows (they failed to decode) are stored as each array's fill value. One
        write per array: zarr-python rewrites a whole shard on every partial write of it (docs/scale.md, "Writes"),
        so assembling the unit first writes each byte once. With an ``executor``, the arrays are written in parallel."""
        self.check_rows(views, levels or {})
        position = np.asarray(indices) - lo
        features = {"cls": cls, "patch": patch, **(levels or {})}
        tasks = [partial(self.write_block, name, lo, hi, position, values) for name, values in features.items()]
        if views is not None:
            tasks += [partial(self.write_block, f"views/{name}", lo, hi, position, values)
                      for name, values in {"cls": views.cls, "patch": views.patch, **views.levels}.items()]
            tasks += [partial(write_filled, self.views[name], lo, hi, position, getattr(views, name))
                      for name in ("boxes", "flip")]
        run_all(tasks, executor)

    def write_block(self, name: str, lo: int, hi: int, position: np.ndarray, values) -> None:
        """Store ``values`` (see :meth:`encoded`) at images ``lo + position`` of feature array ``name``, images
        ``lo .. hi`` written at once (the others as fill values); see :meth:`write_features`."""
        arrays = self.stored_arrays(name)
        for suffix, encoded in self.encoded(name, values).items():
            write_filled(arrays[suffix].with_config(WRITE_EVERY_CHUNK), lo, hi, position, encoded)

    def write_feature_rows(self, indices: np.ndarray, features: dict[str, np.ndarray], views: ViewRows | None) -> None:
        """Encode and write the feature arrays (not the view boxes and flips) of sorted image ``indices``:
        ``features`` name -> ``(B, ...)`` (``cls``, ``patch``, levels)."""
        for start, stop, offset in contiguous_runs(indices):
            rows = slice(offset, offset + stop - start)
            if views is not None:
                for name, values in {"cls": views.cls, "patch": views.patch, **views.levels}.items():
                    self.write_features(f"views/{name}", start, take_rows(values, rows))
            for name, values in features.items():
                self.write_features(name, start, take_rows(values, rows))

    def encoded(self, name: str, values) -> dict[str, np.ndarray]:
        """The parts of feature array ``name`` to store for ``values``: float rows ``(B, ..., D)`` encoded here, or
        parts encoded already (e.g. on the extraction's GPU), their float parts checked to lie in the storage
        dtype's range (:func:`dune_cache.encodings.base.check_range`)."""
        if not isinstance(values, dict):
            return self.encoding_of(name).encode(name, values)
        scheme = self.encoding_of(name).scheme(name)
        return values if scheme.passthrough else check_range(values, scheme.dtype)

    def write_features(self, name: str, start: int, values) -> None:
        """Store ``values`` (float ``(B, ..., D)`` or their encoded parts, see :meth:`encoded`) at images
        ``start .. start + B``. zarr's check for chunks equal to the fill value is skipped
        (:data:`WRITE_EVERY_CHUNK`): encoded features never are (finite values, int8 codes in [-127, 127]), and the
        check is a pass over every chunk, in software for float16 with a NaN fill (~7 ms CPU per 2 MB image, more
        than half of writing it uncompressed)."""
        arrays = self.stored_arrays(name)
        for suffix, encoded in self.encoded(name, values).items():
            arrays[suffix].with_config(WRITE_EVERY_CHUNK)[start:start + len(encoded)] = encoded


def write_filled(array: zarr.Array, lo: int, hi: int, position: np.ndarray, values: np.ndarray) -> None:
    """``array[lo:hi]`` written in one call: ``values`` ``(B, ...)`` at rows ``position`` (relative to ``lo``), the
    array's fill value elsewhere."""
    block = np.full((hi - lo, *values.shape[1:]), array.fill_value, dtype=values.dtype)
    block[position] = values
    array[lo:hi] = block
