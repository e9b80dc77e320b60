"""`faceprint tame forget|rebalance|include` on a real small model."""

import json

import pytest

from faceprint.cli.main import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory, celeba_dir):
    d = tmp_path_factory.mktemp("photos")
    for p in sorted(celeba_dir.iterdir())[:64]:
        (d / p.name).symlink_to(p)
    labels = d.parent / "labels.csv"
    rows = ["file,Glasses,tone"] + [f"{p.name},{1 if i % 4 == 0 else -1},{['a', 'b', 'c'][i % 3]}"
                                    for i, p in enumerate(sorted(d.iterdir()))]
    labels.write_text("\n".join(rows) + "\n")
    m = d.parent / "m.safetensors"
    assert main(["fit", str(d), "-o", str(m), "--components", "2", "-q"]) == 0
    return m, d, labels


def _ops(capsys, path):
    main(["inspect", str(path), "--json"])
    out, _ = capsys.readouterr()
    return json.loads(out)["provenance"]["operations"]


def test_forget_cli(model, celeba_dir, tmp_path, capsys):
    m, d, _ = model
    person = tmp_path / "person"
    person.mkdir()
    files = sorted(d.iterdir())
    for f in files[:3]:
        (person / f"copy_{f.name}").write_bytes(f.read_bytes())
    out = tmp_path / "f.safetensors"
    assert main(["tame", "forget", str(m), "--photos", str(person), "-o", str(out), "--name", "p1", "-q"]) == 0
    text, _ = capsys.readouterr()
    assert "forgot 3 training photos" in text
    ops = _ops(capsys, out)
    assert ops[-1]["operation"] == "forget" and ops[-1]["photos_removed"] == 3 and ops[-1]["name"] == "p1"
    # the model still knows which autoencoder it needs
    main(["inspect", str(out), "--json"])
    info = json.loads(capsys.readouterr()[0])
    assert info["autoencoder"]["id"] and info["provenance"]["n_photos"] == 61
    # photos that were never training photos: nothing to forget, one error line
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "x.jpg").write_bytes(sorted(celeba_dir.iterdir())[0].read_bytes() + b"\0")
    code = main(["tame", "forget", str(m), "--photos", str(stranger), "-o", str(tmp_path / "g.safetensors")])
    err = capsys.readouterr()[1]
    assert code == 2 and "nothing to forget" in err
    code = main(["tame", "forget", str(m), "--photos", str(person), "-o", str(m)])
    assert code == 2 and "new file" in capsys.readouterr()[1]


def test_rebalance_and_include_cli(model, tmp_path, capsys):
    m, _, labels = model
    out = tmp_path / "r.safetensors"
    code = main(["tame", "rebalance", str(m), "--attribute", "Glasses=0.5", "--labels", str(labels),
                 "--min-members", "4", "-o", str(out), "-q"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "Glasses=1: 0.2" in text and "-> 0.500" in text
    op = _ops(capsys, out)[-1]
    assert op["operation"] == "rebalance" and abs(op["targets"]["Glasses"]["1"] - 0.5) < 1e-9
    code = main(["tame", "rebalance", str(m), "--attribute", "tone=uniform", "--labels", str(labels),
                 "--min-members", "4", "-o", str(tmp_path / "u.safetensors"), "-q"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert text.count("(requested 0.333)") == 3
    code = main(["tame", "rebalance", str(m), "--attribute", "tone=0.5", "--labels", str(labels), "-o",
                 str(tmp_path / "x.safetensors")])
    assert code == 2 and "not binary" in capsys.readouterr()[1]
    code = main(["tame", "include", str(m), "--include", "Glasses", "--share", "0.4", "--labels", str(labels),
                 "--min-members", "4", "-o", str(tmp_path / "i.safetensors"), "-q"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "-> 0.400" in text
