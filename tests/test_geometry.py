"""Teacher input geometry and DUNE's shared-grid rule."""
import pytest

from dune_cache.errors import GeometryError
from dune_cache.teachers.geometry import parse_size, resolve_geometry
from dune_cache.teachers import TeacherSpec

P14 = TeacherSpec(name="p14", arch="x", patch_size=14, embed_dim=8, native_resolution=(518, 518))
P16 = TeacherSpec(name="p16", arch="x", patch_size=16, embed_dim=8, native_resolution=(384, 512))


@pytest.mark.parametrize("student_res, t14, t16", [(336, (336, 336), (384, 384)), (448, (448, 448), (512, 512))])
def test_shared_grid_matches_dune(student_res, t14, t16):
    g14 = resolve_geometry(P14, student_patch=14, student_resolution=student_res)
    g16 = resolve_geometry(P16, student_patch=14, student_resolution=student_res)
    assert g14.resolution == t14 and g16.resolution == t16
    assert g14.grid == g16.grid == (student_res // 14,) * 2


def test_explicit_native_and_rectangular_resolution():
    assert resolve_geometry(P16).resolution == (384, 512)
    g = resolve_geometry(P16, resolution="320x480")
    assert g.grid == (20, 30) and g.to_json()["resolution"] == [320, 480]
    assert parse_size(224) == (224, 224) and parse_size("224") == (224, 224)


def test_bad_geometry_messages():
    with pytest.raises(GeometryError, match="nearest: 224x224"):
        resolve_geometry(P14, resolution=225)
    with pytest.raises(GeometryError, match="go together"):
        resolve_geometry(P14, student_patch=14)
    with pytest.raises(GeometryError, match="not both"):
        resolve_geometry(P14, resolution=224, student_patch=14, student_resolution=224)
    with pytest.raises(GeometryError, match="not a multiple of the student patch"):
        resolve_geometry(P14, student_patch=16, student_resolution=300)
    with pytest.raises(GeometryError, match="resize mode"):
        resolve_geometry(P14, resize="stretch")
    with pytest.raises(GeometryError, match="expected N or HxW"):
        parse_size("big")
