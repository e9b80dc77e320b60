"""`faceprint evaluate`: the quality table of a user's model against a folder of real photos."""

import json

import pytest

from faceprint.cli.main import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


def test_evaluate_excludes_training_photos_and_reports_every_metric(tmp_path, celeba_dir, capsys):
    photos = sorted(celeba_dir.iterdir())
    train, real = tmp_path / "train", tmp_path / "real"
    train.mkdir()
    real.mkdir()
    for p in photos[:48]:
        (train / p.name).symlink_to(p)
    for p in photos[32:48] + photos[200:240]:  # 16 training photos mixed into 40 held-out ones
        (real / p.name).symlink_to(p)
    model = tmp_path / "m.safetensors"
    assert main(["fit", str(train), "-o", str(model), "--components", "1", "-q"]) == 0
    out_json = tmp_path / "eval.json"
    code = main(["evaluate", str(model), "--real", str(real), "-n", "40", "--batch", "20", "--json", str(out_json), "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "FID" in out and "coverage (k=5)" in out and "training photos per face" in out
    doc = json.loads(out_json.read_text())
    assert doc["n_real_in_training"] == 16 and doc["n_real"] == 40 and doc["n_generated"] == 40
    assert doc["training_reference"] == "photos"
    assert doc["fid"] > 0 and 0 <= doc["precision"] <= 1 and 0 <= doc["coverage"] <= 1
    # the faces copy latent pixels from training photos, so they sit nearer the training set
    mi = doc["memorization_inception"]
    assert mi["n_heldout"] == 40 and mi["gen_to_train_median"] <= mi["gen_to_heldout_median"]
    assert 1 <= doc["provenance"]["mean_distinct"] <= 48


def test_evaluate_bad_real_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    code = main(["evaluate", str(tmp_path / "m.safetensors"), "--real", str(tmp_path / "nope")])
    _, err = capsys.readouterr()
    assert code == 2 and "--real" in err and len(err.strip().splitlines()) == 1
