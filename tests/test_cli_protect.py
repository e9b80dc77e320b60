"""`faceprint fingerprint issue|calibrate|list` and `faceprint verify`, end to end on a real small model."""

import io
import json
import os
import stat

import pytest
import torch
from PIL import Image

from faceprint.cli.main import main
from faceprint.io import load_artifact


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def owned(tmp_path_factory, celeba_dir):
    """A model, two issued instances, their faces, a calibration: what an owner has."""
    root = tmp_path_factory.mktemp("owner")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted(celeba_dir.iterdir())[:64]:
        (photos / p.name).symlink_to(p)
    neg = root / "negatives"
    neg.mkdir()
    for p in sorted(celeba_dir.iterdir())[64:264]:
        (neg / p.name).symlink_to(p)
    owner = root / "keys"
    m = root / "m.safetensors"
    assert main(["fit", str(photos), "-o", str(m), "--components", "2", "-q"]) == 0
    # the owner's key from a fixed key seed (the CLI draws a secret one), so every run is the same
    from faceprint.autoencoder import TAEF2
    from faceprint.fingerprint.owner import Owner
    from faceprint.latent.generator import Generator

    Owner(owner).key_for(Generator.load(m, autoencoder=TAEF2.load()), key_seed=12345)
    ow = ["--owner", str(owner)]
    for name, seed in (("alice", "1"), ("bob", "2")):
        assert main(["fingerprint", "issue", str(m), "--to", name.title(), "--mechanism", "datalevel-bank",
                     "-o", str(root / f"{name}.safetensors"),
                     "--seed", seed, "-q", *ow]) == 0
        assert main(["generate", str(root / f"{name}.safetensors"), "-n", "6", "-o", str(root / name), "-q"]) == 0
    assert main(["generate", str(m), "-n", "4", "-o", str(root / "plain"), "--seed", "7", "-q"]) == 0
    assert main(["fingerprint", "calibrate", str(m), "--negatives", str(neg), "--faces", "60", "--instances", "1",
                 "--faces-per-instance", "60", "--min-negatives", "300", "--target-fpr", "0.02", "-q", *ow]) == 0
    return root, m, ow


def _verify(capsys, ow, *images):
    capsys.readouterr()
    assert main(["verify", "--json", *map(str, images), "-q", *ow]) == 0
    return [json.loads(line) for line in capsys.readouterr()[0].splitlines()]


def test_instances_verify_to_their_own_recipient(owned, capsys):
    root, _, ow = owned
    faces = sorted((root / "alice").glob("face_*.png")) + sorted((root / "bob").glob("face_*.png"))
    out = _verify(capsys, ow, *faces)
    assert len(out) == 12
    assert [v["instance"] for v in out] == ["alice"] * 6 + ["bob"] * 6
    assert all(v["match"] and v["recipient"] in ("Alice", "Bob") for v in out)
    assert min(v["bit_accuracy"] for v in out) > 0.85
    assert all(v["registry_size"] == 2 and v["fpr_upper_bound"] <= 0.02 for v in out)


def test_unfingerprinted_faces_and_real_photos_are_not_ours(owned, celeba_dir, capsys):
    root, _, ow = owned
    plain = sorted((root / "plain").glob("face_*.png"))
    real = sorted(celeba_dir.iterdir())[300:304]
    out = _verify(capsys, ow, *plain, *real)
    assert not any(v["match"] for v in out)
    assert all(v["instance"] is None and v["matching_bits"] < v["threshold"] for v in out)


def test_another_owner_key_reads_nothing(owned, tmp_path, capsys):
    """A face verified with a different owner's key and registry must not match: the code is
    bound to the key, not only to the registry."""
    root, m, _ = owned
    other = ["--owner", str(tmp_path / "other")]
    assert main(["fingerprint", "issue", str(m), "--to", "Carol", "-o", str(tmp_path / "c.safetensors"),
                 "--seed", "1", "-q", *other]) == 0  # same code seed as alice, other key
    (tmp_path / "other" / "calibration.safetensors").write_bytes((root / "keys" / "calibration.safetensors").read_bytes())
    out = _verify(capsys, other, *sorted((root / "alice").glob("face_*.png")))
    assert not any(v["match"] for v in out)


def test_survives_mild_jpeg(owned, tmp_path, capsys):
    root, _, ow = owned
    paths = []
    for f in sorted((root / "bob").glob("face_*.png"))[:4]:
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, "JPEG", quality=90)
        p = tmp_path / (f.stem + ".jpg")
        p.write_bytes(buf.getvalue())
        paths.append(p)
    out = _verify(capsys, ow, *paths)
    assert sum(v["instance"] == "bob" for v in out) >= 3
    assert not any(v["match"] and v["instance"] != "bob" for v in out)


def test_key_is_private_and_not_in_the_released_instance(owned, capsys):
    root, _, ow = owned
    key = root / "keys" / "key.safetensors"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    _, meta = load_artifact(root / "alice.safetensors")
    fp = meta["fingerprint"]
    assert fp["instance"] == "alice" and fp["recipient"] == "Alice"
    assert "key_seed" not in json.dumps(fp)
    assert meta["provenance"]["operations"][-1]["operation"] == "fingerprint"
    assert stat.S_IMODE(os.stat(root / "alice.safetensors").st_mode) & 0o044  # a released file is readable


def test_registry_list_and_errors(owned, tmp_path, capsys):
    root, m, ow = owned
    capsys.readouterr()
    assert main(["fingerprint", "list", "--json", *ow]) == 0
    rows = json.loads(capsys.readouterr()[0])
    assert [r["instance"] for r in rows] == ["alice", "bob"] and len({r["code"] for r in rows}) == 2
    # an instance name is issued once
    code = main(["fingerprint", "issue", str(m), "--to", "X", "-o", str(tmp_path / "x.safetensors"),
                 "--instance", "alice", *ow])
    assert code == 2 and "alice" in capsys.readouterr()[1]
    # an instance is not a base for more instances
    code = main(["fingerprint", "issue", str(root / "alice.safetensors"), "--to", "X", "-o",
                 str(tmp_path / "y.safetensors"), *ow])
    assert code == 2 and "already a fingerprinted instance" in capsys.readouterr()[1]
    # verification needs a calibration
    code = main(["fingerprint", "issue", str(m), "--to", "D", "--mechanism", "datalevel-bank", "-o", str(tmp_path / "d.safetensors"),
                 "--owner", str(tmp_path / "fresh")])
    assert code == 0
    code = main(["verify", str(sorted((root / "alice").glob("face_*.png"))[0]), "--owner", str(tmp_path / "fresh")])
    assert code == 2 and "calibrate" in capsys.readouterr()[1]
    # too few negatives for the requested guarantee: refused, nothing written
    code = main(["fingerprint", "calibrate", str(m), "--negatives", str(root / "plain"), "--faces", "0",
                 "--instances", "0", "--owner", str(tmp_path / "fresh")])
    assert code == 2 and "negatives" in capsys.readouterr()[1]
    assert not (tmp_path / "fresh" / "calibration.safetensors").exists()


def test_existing_key_is_reused_and_a_different_key_seed_is_refused(owned, tmp_path):
    from faceprint.autoencoder import TAEF2
    from faceprint.errors import ConfigError
    from faceprint.fingerprint.owner import Owner
    from faceprint.latent.generator import Generator

    _, m, _ = owned
    gen = Generator.load(m, autoencoder=TAEF2.load())
    owner = Owner(tmp_path / "o")
    first = owner.key_for(gen, key_seed=5)
    again = owner.key_for(gen)  # no seed: the stored key, whatever made it
    assert again.config.key_seed == 5 and torch.equal(again.assign_, first.assign_)
    assert owner.key_for(gen, key_seed=5).config.key_seed == 5
    with pytest.raises(ConfigError, match="another key seed"):
        owner.key_for(gen, key_seed=6)


def test_crop_search_recovers_a_centre_crop_the_aligned_decoder_misses(owned, tmp_path, capsys):
    """A face cropped to its central 110 x 110 pixels (saved at that size, as a user would crop
    it) loses the latent grid: the aligned read-out is chance. --crop-search finds the crop."""
    from faceprint.autoencoder import TAEF2
    from faceprint.data.folder import load_image
    from faceprint.fingerprint.datalevel import BankFingerprinter

    root, _, ow = owned
    faces = sorted((root / "alice").glob("face_*.png"))[:3]
    paths = []
    for f in faces:
        im = Image.open(f).convert("RGB")
        p = tmp_path / f"crop_{f.name}"
        im.crop((9, 9, 119, 119)).save(p)
        paths.append(p)
    aligned = _verify(capsys, ow, *paths)
    assert not any(v["match"] for v in aligned)
    assert max(v["bit_accuracy"] for v in aligned) < 0.7
    capsys.readouterr()
    assert main(["verify", "--json", "--crop-search", "0.8", *map(str, paths), "-q", *ow]) == 0
    searched = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert sum(v["match"] and v["instance"] == "alice" for v in searched) >= 2
    # the search is not perfect (bench fingerprint: crop 86% reads 0.77 of the bits); every match is at the crop
    assert sum(v["crop_size"] == 110 for v in searched) >= 2 and all(v["full_size"] == 128 for v in searched)
    assert all(v["crop_size"] == 110 for v in searched if v["match"])
    assert not any(v["match"] and v["instance"] != "alice" for v in searched)
    # an uncropped face: the search keeps the full frame and reads exactly what the aligned decoder reads
    key = BankFingerprinter.load(root / "keys" / "key.safetensors")
    ae = TAEF2.load()
    x = torch.stack([load_image(f, 128) for f in faces])
    p, size, score = key.decode_bits_searched(x, ae, min_fraction=0.9)
    assert size.tolist() == [128] * 3
    assert torch.equal(p > 0.5, key.decode_bits(x, ae) > 0.5)
    _, size_c, _ = key.decode_bits_searched(torch.stack([load_image(q, 128) for q in paths]), ae, min_fraction=0.8)
    assert size_c.tolist() == [v["crop_size"] for v in searched] and size_c.tolist().count(110) >= 2
    with pytest.raises(Exception, match="min_fraction"):
        key.decode_bits_searched(x, ae, min_fraction=0)


def _mix(root, tmp_path, mode, s1, s2, second="alice"):
    out = tmp_path / f"{mode}-{s1}-{s2}.png"
    assert main(["mix", f"{root / 'alice.safetensors'}:seed={s1}", f"{root / (second + '.safetensors')}:seed={s2}",
                 "--mode", mode, "-o", str(out), "-q"]) == 0
    return out


def test_a_hybrid_of_one_instances_faces_still_verifies_to_it(owned, tmp_path, capsys):
    # `faceprint mix` re-encodes both generated faces, harmonises and decodes them: the data-level
    # mark of the bank must still be read from the hybrid, and must name the right recipient
    root, _, ow = owned
    hybrids = [_mix(root, tmp_path, "hybrid", 1, 2), _mix(root, tmp_path, "hybrid", 3, 4)]
    out = _verify(capsys, ow, *hybrids)
    assert [v["instance"] for v in out] == ["alice", "alice"]
    assert all(v["match"] and v["bit_accuracy"] > 0.7 for v in out)


@pytest.mark.xfail(strict=True, reason="known shortfall (issue 15 closing note): a 50/50 dissolve of two faces of one "
                                       "instance averages their latents and the data-level mark is no longer read")
def test_a_dissolve_of_one_instances_faces_still_verifies_to_it(owned, tmp_path, capsys):
    root, _, ow = owned
    out = _verify(capsys, ow, _mix(root, tmp_path, "dissolve", 1, 2), _mix(root, tmp_path, "dissolve", 3, 4))
    assert all(v["match"] and v["instance"] == "alice" for v in out)
