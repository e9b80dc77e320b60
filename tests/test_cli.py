"""The `faceprint` command: a real fit/generate/inspect round trip and its bad-input behaviour."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceprint.cli.main import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, celeba_dir):
    """40 real photos by symlink (nothing copied), plus two bad files."""
    d = tmp_path_factory.mktemp("photos")
    for p in sorted(celeba_dir.iterdir())[:40]:
        (d / p.name).symlink_to(p)
    (d / "broken.jpg").write_bytes(b"this is not a jpeg")
    (d / "zz_empty.png").write_bytes(b"")
    return d


def test_fit_generate_inspect_round_trip(small_folder, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    code, out, err = _run(capsys, "fit", small_folder, "-o", model, "--components", "2", "--seed", "3", "-q")
    assert code == 0, err
    assert model.is_file()
    faces = tmp_path / "faces"
    code, out, err = _run(capsys, "generate", model, "-n", "5", "-o", faces, "--grid", tmp_path / "grid.png",
                          "--provenance", "--seed", "1", "-q")
    assert code == 0, err
    names = sorted(p.name for p in faces.iterdir())
    assert "face_000004.png" in names and "face_000004_map.png" in names and "provenance.json" in names
    img = Image.open(faces / "face_000000.png")
    assert img.size == (128, 128) and img.mode == "RGB"
    assert Image.open(tmp_path / "grid.png").size[0] > 128
    assert (tmp_path / "grid_provenance.png").is_file()
    doc = json.loads((faces / "provenance.json").read_text())
    assert len(doc["training_photos"]) == 40 and "broken.jpg" not in doc["training_photos"]
    from faceprint.latent.generator import Generator

    cfg = Generator.load(model).config
    assert cfg.refinement == "guided" and cfg.share_cap == 0.35  # the defaults
    for given, want in (("none", None), ("0.25", 0.25)):
        m2 = tmp_path / f"m-{given}.safetensors"
        code, out, err = _run(capsys, "fit", small_folder, "-o", m2, "--components", "2", "--refinement", "seam",
                              "--share-cap", given, "-q")
        assert code == 0, err
        cfg = Generator.load(m2).config
        assert cfg.refinement == "seam" and cfg.share_cap == want
    m = np.array(doc["faces"][0]["latent_map"])
    assert m.shape == (16, 16) and m.min() >= 0 and m.max() < 40
    # the copy guard is on by default, and what it did is on record
    guard = doc["copy_guard"]
    assert guard["enabled"] and guard["max_share"] == 0.5 and guard["quantile"] == 0.05 and guard["threshold"] > 0
    assert guard["faces_redrawn"] == sum(f["redraws"] > 0 for f in doc["faces"])
    assert all(f["max_share"] <= 0.5 for f in doc["faces"])
    code, out, err = _run(capsys, "generate", model, "-n", "2", "-o", tmp_path / "off", "--provenance",
                          "--no-copy-guard", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "off" / "provenance.json").read_text())["copy_guard"] == {"enabled": False}
    # the same seed and index give the same face
    code, _, err = _run(capsys, "generate", model, "-n", "1", "--start", "4", "-o", tmp_path / "again", "--seed", "1", "-q")
    assert code == 0, err
    a = np.array(Image.open(faces / "face_000004.png"))
    b = np.array(Image.open(tmp_path / "again" / "face_000004.png"))
    assert np.array_equal(a, b)
    code, out, err = _run(capsys, "inspect", model)
    assert code == 0 and "components" in out and "bank" in out and "40 photos" in out
    code, out, err = _run(capsys, "inspect", model, "--json")
    info = json.loads(out)
    assert info["config"]["components"] == 2 and info["provenance"]["n_photos"] == 40


def test_fit_reports_skipped_files_by_name(small_folder, tmp_path, capsys):
    code, out, err = _run(capsys, "fit", small_folder, "-o", tmp_path / "m.safetensors", "--components", "1",
                          "--limit", "42")
    assert code == 0
    assert "broken.jpg" in err and "zz_empty.png" in err


def test_strict_stops_at_bad_file(small_folder, tmp_path, capsys):
    code, out, err = _run(capsys, "fit", small_folder, "-o", tmp_path / "m.safetensors", "--strict")
    assert code == 2
    assert "broken.jpg" in _one_error_line(err)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "all_bad", "is_file"])
def test_fit_bad_folders(case, tmp_path, capsys):
    folder = tmp_path / "photos"
    if case == "empty":
        folder.mkdir()
    elif case == "all_bad":
        folder.mkdir()
        (folder / "a.jpg").write_text("nope")
        (folder / "b.png").write_bytes(b"\x89PNG\r\n")
    elif case == "is_file":
        folder.write_text("x")
    code, out, err = _run(capsys, "fit", folder, "-o", tmp_path / "m.safetensors")
    assert code == 2
    line = _one_error_line(err)
    assert "photos" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_model_files(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    for cmd in (["generate", bad, "-n", "1", "-o", tmp_path / "o"], ["inspect", bad],
                ["generate", tmp_path / "nope.safetensors", "-n", "1", "-o", tmp_path / "o"]):
        code, out, err = _run(capsys, *cmd)
        assert code == 2
        assert "safetensors" in _one_error_line(err)


def test_bad_arguments_exit_2(tmp_path, capsys):
    for argv in (["generate", "m.safetensors", "-n", "0", "-o", "x"],
                 ["fit", str(tmp_path), "-o", "m.safetensors", "--size", "100"],
                 ["fit", str(tmp_path), "-o", "m.safetensors", "--rank-temperature", "-1"],
                 ["fit", str(tmp_path), "-o", "m.safetensors", "--share-cap", "1.5"],
                 ["fit", str(tmp_path), "-o", "m.safetensors", "--share-cap", "0"],
                 ["fit"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    code, out, err = _run(capsys, "fit", tmp_path, "-o", tmp_path / "model.bin")
    assert code == 2 and ".safetensors" in _one_error_line(err)
    code, out, err = _run(capsys, "fit", tmp_path, "-o", tmp_path / "no" / "such" / "m.safetensors")
    assert code == 2 and "does not exist" in _one_error_line(err)


def test_demo_without_data_says_what_to_pass(tmp_path, capsys):
    code, out, err = _run(capsys, "demo", "--data", tmp_path / "nothing-here", "-o", tmp_path / "demo")
    assert code == 2
    assert "nothing-here" in _one_error_line(err)


def test_demo_small_run_and_console_script(tmp_path, celeba_dir):
    """The installed console script, end to end, on 64 photos."""
    exe = Path(sys.executable).with_name("faceprint")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "faceprint"]
    env = dict(os.environ, FACEPRINT_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(cmd + ["demo", "--limit", "64", "-n", "8", "-o", str(tmp_path / "demo"), "-q"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    grid = Image.open(tmp_path / "demo" / "grid.png")
    assert grid.size[0] > 128
    assert (tmp_path / "demo" / "grid_provenance.png").is_file()
    assert (tmp_path / "demo" / "model.safetensors").is_file()
