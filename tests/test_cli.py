"""CLI behaviour: listings, clear errors with exit code 2, verify exit codes."""
from __future__ import annotations

from typer.testing import CliRunner

from dune_cache.cli import app

runner = CliRunner()


def test_teachers_lists_every_family_with_geometry():
    result = runner.invoke(app, ["teachers"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    for name in ["dinov2_vits14", "dinov2_vitl14_reg4", "dinov2_vitg14", "mast3r", "multihmr", "dino_vitb16",
                 "deit3_vitb16", "ibot_vitb16", "dbot_vitb16", "dino_vitb16_upstream_pos", "dinov3_vitl16",
                 "dinov3_vit7b16", "siglip2_so400m14_378", "sam_vith", "sam_vitb_encoder", "depth_anything_v2_vitl",
                 "timm:<model_name>"]:
        assert name in rows, name
    assert rows["mast3r"][2:5] == ["16", "1024", "0"] and rows["mast3r"][5] == "mean_patch"
    assert rows["dinov2_vitl14_reg4"][2:5] == ["14", "1024", "4"]
    assert rows["dinov3_vitl16"][2:6] == ["16", "1024", "4", "token"]
    assert rows["siglip2_so400m14_378"][2:7] == ["14", "1152", "0", "attn_pool", "378x378"]
    assert rows["sam_vith"][2:7] == ["16", "256", "0", "mean_patch", "1024x1024"]


def test_user_errors_are_one_clear_line_and_exit_2(tmp_path, tiny_checkpoint, real_image_dir):
    cases = [
        (["--teacher", "nope"], "unknown teacher 'nope'"),
        (["--teacher", "tiny_test_teacher", "--checkpoint", str(tmp_path / "missing.pth")], "checkpoint not found"),
        (["--teacher", "tiny_test_teacher"], "--checkpoint is required"),
        (["--teacher", "tiny_test_teacher", "--checkpoint", str(tiny_checkpoint), "--resolution", "33"],
         "not a multiple of tiny_test_teacher's patch size 8"),
        (["--teacher", "tiny_test_teacher", "--checkpoint", str(tiny_checkpoint), "--codec", "lzma"], "codec 'lzma'"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["extract", "--images", str(real_image_dir), "--out", str(tmp_path / "c"),
                                     "--no-progress", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output


def test_info_and_verify_on_a_missing_or_incomplete_cache(tmp_path, tiny_checkpoint, real_image_dir, monkeypatch):
    assert runner.invoke(app, ["info", str(tmp_path / "nothing")]).exit_code == 2
    from dune_cache.format.store import TeacherStore

    original = TeacherStore.write_rows
    calls = {"n": 0}

    def fail_second(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("no space left on device")
        return original(self, *args)

    monkeypatch.setattr(TeacherStore, "write_rows", fail_second)
    out = tmp_path / "c"
    result = runner.invoke(app, ["extract", "--teacher", "tiny_test_teacher", "--checkpoint", str(tiny_checkpoint),
                                 "--images", str(real_image_dir), "--out", str(out), "--batch-size", "2",
                                 "--num-workers", "0", "--no-progress"])
    assert result.exit_code != 0
    verify = runner.invoke(app, ["verify", str(out), "--no-progress"])
    assert verify.exit_code == 1
    assert "incomplete: 4 of 6 images pending" in verify.output
