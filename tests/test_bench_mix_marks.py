"""`python -m faceprint.bench mix-marks`: its run folder is its own."""

import pytest

from faceprint.bench.__main__ import main


def test_refuses_to_clear_a_folder_that_is_not_its_own_run(tmp_path, celeba_dir):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="not a mix-marks run folder"):
        main(["mix-marks", "--out", str(out), "--data", str(celeba_dir.parent.parent)])
    assert (out / "keep.txt").read_text() == "a user's file"


def test_names_missing_photos(tmp_path):
    with pytest.raises(SystemExit, match="no photos at"):
        main(["mix-marks", "--out", str(tmp_path / "o"), "--data", str(tmp_path)])
