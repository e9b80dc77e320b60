"""The helpers every benchmark shares: where the datasets are, how results are written."""

import json

import pytest

from faceprint.bench.machine import datasets_dir, write_results
from faceprint.errors import InputError


def test_datasets_dir_is_the_given_folder_or_the_shared_one(tmp_path, celeba_dir):
    assert datasets_dir(tmp_path) == tmp_path
    found = datasets_dir(None)
    assert (found / "celeba-10k" / "images").is_dir() and found / "celeba-10k" / "images" == celeba_dir


def test_write_results_writes_both_files_and_publishes_them(tmp_path, capsys):
    out, pub = tmp_path / "out", tmp_path / "docs" / "results"
    out.mkdir()
    write_results(out, "demo", "# table\n", {"x": 1, "path": out}, pub)
    assert (out / "demo.md").read_text() == "# table\n" and "# table" in capsys.readouterr()[0]
    assert json.loads((pub / "demo.json").read_text()) == {"x": 1, "path": str(out)}
    assert (pub / "demo.md").read_bytes() == (out / "demo.md").read_bytes()
    assert not list(out.glob("*.tmp*"))
    with pytest.raises(InputError, match="does not exist"):  # a missing run folder: a clear error, no mkdir
        write_results(tmp_path / "missing", "demo", "x", {}, None)
