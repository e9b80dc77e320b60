"""Keyed per-instance fingerprints (issue 20): the recipient holds the instance file."""

import json

import pytest
import torch

from faceprint.cli.main import main
from faceprint.fingerprint.keyed import (OwnerSecret, Residuals, instance_key, normal_tail, pattern_rows, sidak,
                                         threshold_for)
from faceprint.errors import InputError
from faceprint.io import load_artifact


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


def test_pattern_is_random_access_gaussian_and_keyed():
    k1 = instance_key(b"\x01" * 32, "ab" * 16)
    assert k1 != instance_key(b"\x01" * 32, "ac" * 16) and k1 != instance_key(b"\x02" * 32, "ab" * 16)
    full = pattern_rows(k1, torch.arange(40), 4, 8, 8)
    part = pattern_rows(k1, torch.tensor([37, 3, 3]), 4, 8, 8)
    assert torch.equal(part[0], full[37]) and torch.equal(part[1], full[3]) and torch.equal(part[2], full[3])
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05
    other = pattern_rows(instance_key(b"\x01" * 32, "ac" * 16), torch.arange(40), 4, 8, 8)
    c = float((full * other).sum() / (full.norm() * other.norm()))
    assert abs(c) < 0.05  # independent patterns: correlation about 1/sqrt(10240)


def test_threshold_and_sidak():
    t = threshold_for(1e-3, 16)
    assert sidak(normal_tail(t), 16) == pytest.approx(1e-3, rel=1e-6)
    assert threshold_for(1e-3, 1) < t < threshold_for(1e-6, 16)


def test_null_scores_are_standard_normal_for_any_residual():
    """T for a code that did not make the image is N(0, 1) given the residual: here residuals with
    strong structure (a constant, a ramp) and heavy tails still give mean 0, std 1."""
    sec = OwnerSecret()
    sec.master = b"\x07" * 32
    sec.directions_ = torch.eye(4, 2)
    sec.template_ = torch.eye(4, 2)
    sec.shape_ = (4, 4, 4)
    g = torch.Generator().manual_seed(0)
    v = torch.ones(50, 2, 4, 4) + torch.linspace(0, 5, 4).view(1, 1, 1, 4) + torch.randn(50, 2, 4, 4, generator=g) ** 3
    rows = torch.randint(0, 30, (50, 4, 4), generator=g)
    res = Residuals(v, rows, torch.zeros(50))
    codes = [f"{i:032x}" for i in range(200)]
    s = res.scores(sec, codes)
    assert abs(float(s.mean())) < 0.05 and abs(float(s.std()) - 1) < 0.05
    # the patterns expanded once for every row give the same scores as the per-call expansion
    from dataclasses import replace

    from faceprint.fingerprint.keyed import CodePatterns

    sec.config = replace(sec.config, directions=2)
    pats = CodePatterns(sec, codes[:7], 30)
    assert torch.allclose(res.scores(sec, codes[:7], patterns=pats), s[:, :7], atol=1e-5)
    with pytest.raises(InputError, match="other codes"):
        res.scores(sec, codes[1:8], patterns=pats)
    with pytest.raises(InputError, match="outside the 20 rows"):
        res.scores(sec, codes[:7], patterns=CodePatterns(sec, codes[:7], 20))


@pytest.fixture(scope="module")
def keyed_owner(tmp_path_factory, celeba_dir):
    root = tmp_path_factory.mktemp("keyed")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted(celeba_dir.iterdir())[:64]:
        (photos / p.name).symlink_to(p)
    m = root / "m.safetensors"
    assert main(["fit", str(photos), "-o", str(m), "--components", "2", "-q"]) == 0
    ow = ["--owner", str(root / "owner")]
    # the owner's master secret fixed (the CLI draws a random one), so every run reads the same scores
    from faceprint.autoencoder import TAEF2
    from faceprint.fingerprint.keyed import OwnerSecret
    from faceprint.fingerprint.owner import Owner
    from faceprint.latent.generator import Generator

    gen, owner = Generator.load(m, autoencoder=TAEF2.load()), Owner(root / "owner")
    owner._ensure_folder()
    OwnerSecret(master=bytes(range(32))).fit(gen.bank_.float(), gen.autoencoder).save(owner.secret_path)
    for name, seed in (("alice", "1"), ("bob", "2"), ("carol", "3")):
        assert main(["fingerprint", "issue", str(m), "--to", name.title(), "-o", str(root / f"{name}.safetensors"),
                     "--seed", seed, "-q", *ow]) == 0
        assert main(["generate", str(root / f"{name}.safetensors"), "-n", "6", "-o", str(root / name), "-q"]) == 0
    assert main(["generate", str(m), "-n", "4", "-o", str(root / "plain"), "--seed", "7", "-q"]) == 0
    return root, m, ow


def _alice(keyed_owner):
    """The autoencoder, alice's registry entry, the owner's secret, the base model and alice's faces."""
    from faceprint.autoencoder import TAEF2
    from faceprint.data.folder import load_image
    from faceprint.fingerprint.owner import Owner
    from faceprint.latent.generator import Generator

    root, m, _ = keyed_owner
    ae = TAEF2.load()
    owner = Owner(root / "owner")
    with owner.open_registry(create=False) as reg:
        alice = next(e for e in reg.all() if e.instance == "alice")
    base = Generator.load(m, autoencoder=ae)
    x = torch.stack([load_image(f, 128) for f in sorted((root / "alice").glob("face_*.png"))])
    return ae, alice, owner.load_secret(), base, x


def _verify(capsys, ow, *images):
    capsys.readouterr()
    assert main(["verify", "--json", *map(str, images), "-q", *ow]) == 0
    return [json.loads(line) for line in capsys.readouterr()[0].splitlines()]


def test_keyed_instances_verify_to_their_recipient_and_nothing_else_matches(keyed_owner, celeba_dir, capsys):
    root, _, ow = keyed_owner
    for name in ("alice", "bob", "carol"):
        out = _verify(capsys, ow, *sorted((root / name).glob("face_*.png")))
        assert len(out) == 6
        assert all(o["match"] and o["instance"] == name for o in out), [(o["instance"], o["score"]) for o in out]
        assert all(o["fpr_bound"] == pytest.approx(1e-5, rel=1e-6) for o in out)  # the default target
    plain = sorted((root / "plain").glob("face_*.png"))
    real = sorted(celeba_dir.iterdir())[300:306]
    out = _verify(capsys, ow, *plain, *real)
    assert not any(o["match"] for o in out), [(o["nearest_instance"], o["score"]) for o in out]


def test_a_centre_cropped_face_is_read_at_its_crop_and_still_names_its_recipient(keyed_owner, tmp_path, capsys):
    from faceprint.cli.main import save_png
    from faceprint.data.folder import load_image
    from faceprint.fingerprint.attacks import crop_resize

    root, _, ow = keyed_owner
    faces = sorted((root / "alice").glob("face_*.png"))[:3]
    x = torch.stack([load_image(f) for f in faces])
    files = []
    for f in (0.93, 0.86):
        y = (crop_resize(x, f) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, a in enumerate(y):
            files.append(tmp_path / f"crop{f}-{i}.png")
            save_png(a, files[-1])
    out = _verify(capsys, ow, *files, *faces)
    assert all(o["match"] and o["instance"] == "alice" for o in out), [(o["instance"], o["score"]) for o in out]
    assert [o["crop"] for o in out] == [0.93] * 3 + [0.86] * 3 + [1.0] * 3  # uncropped faces stay full frame
    capsys.readouterr()
    assert main(["verify", str(files[3]), "-q", *ow]) == 0
    assert "centre crop of 86%" in capsys.readouterr()[0]


def test_crop_search_keeps_the_null_standard_normal(keyed_owner, celeba_dir):
    """The crop hypothesis is chosen from the image and the base bank only: innocent scores stay
    N(0, 1) whether an image is read at the full frame or at a crop."""
    from faceprint.autoencoder import TAEF2
    from faceprint.data.folder import load_image
    from faceprint.fingerprint.attacks import crop_resize
    from faceprint.fingerprint.keyed import BaseIndex, OwnerSecret
    from faceprint.latent.generator import Generator

    root, m, _ = keyed_owner
    ae = TAEF2.load()
    secret = OwnerSecret.load(root / "owner" / "secret.safetensors")
    files = sorted((root / "alice").glob("face_*.png")) + sorted((root / "plain").glob("face_*.png"))
    x = torch.stack([load_image(f) for f in files])
    x = torch.cat([x, crop_resize(x, 0.86)])
    res = BaseIndex(Generator.load(m).bank_, ae, secret).residuals(x)
    assert sorted(set(res.crop)) == [0.86, 1.0] and res.crop[-1] == 0.86
    s = res.scores(secret, [f"{i:032x}" for i in range(300)])  # codes that made none of them
    assert abs(float(s.mean())) < 0.05 and abs(float(s.std()) - 1) < 0.05


def test_keyed_verify_on_dask_gives_the_same_verdicts(keyed_owner, celeba_dir, capsys, one_thread):
    """Bit-identical to one process at one torch thread, as the workers run (thread count changes
    the order of float sums)."""
    pytest.importorskip("distributed")
    root, _, ow = keyed_owner
    imgs = sorted((root / "alice").glob("face_*.png"))[:3] + sorted(celeba_dir.iterdir())[300:303]
    here = _verify(capsys, ow, *imgs)
    assert main(["verify", "--json", *map(str, imgs), "-q", "--dask", "local:2", *ow]) == 0
    there = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert [o["match"] for o in here] == [True] * 3 + [False] * 3
    assert there == here


def test_the_released_file_holds_no_owner_secret_and_its_mixture_spans_the_marked_bank(keyed_owner):
    from faceprint.autoencoder import TAEF2
    from faceprint.fingerprint.keyed import project_on_mixture
    from faceprint.latent.generator import Generator

    root, m, ow = keyed_owner
    owner = root / "owner"
    secret = load_artifact(owner / "secret.safetensors")[0]["master"]
    raw = (root / "alice.safetensors").read_bytes()
    assert bytes(secret.tolist()) not in raw
    _, meta = load_artifact(root / "alice.safetensors")
    assert "master" not in json.dumps(meta)
    assert (owner / "secret.safetensors").stat().st_mode & 0o077 == 0
    # projecting the instance's bank on its own released subspaces keeps the mark
    ae = TAEF2.load()
    inst = Generator.load(root / "alice.safetensors", autoencoder=ae)
    base = Generator.load(m, autoencoder=ae)

    mark = inst.bank_.float() - base.bank_.float()
    kept_own = ((project_on_mixture(inst, inst.bank_) - base.bank_.float()) * mark).sum() / mark.pow(2).sum()
    kept_base = ((project_on_mixture(base, inst.bank_) - base.bank_.float()) * mark).sum() / mark.pow(2).sum()
    assert kept_own > 0.95  # the released subspaces contain the marked rows
    assert kept_base < 0.5  # the base model's subspaces would have stripped most of it


def test_two_colluders_averaging_their_banks_are_both_still_scored(keyed_owner):
    from faceprint.autoencoder import TAEF2
    from faceprint.fingerprint.keyed import BaseIndex, _q8
    from faceprint.fingerprint.owner import Owner
    from faceprint.latent.generator import Generator
    from faceprint.latent.refine import gather

    root, m, ow = keyed_owner
    ae = TAEF2.load()
    owner = Owner(root / "owner")
    with owner.open_registry(create=False) as reg:
        entries = {e.instance: e for e in reg.all()}
    a = Generator.load(root / "alice.safetensors", autoencoder=ae)
    b = Generator.load(root / "bob.safetensors", autoencoder=ae)
    smp = a.sample_latents(8, seed=3, guard=None)
    x = _q8(ae.decode(gather((a.bank_.float() + b.bank_.float()) / 2, smp.provenance)))
    base = Generator.load(m, autoencoder=ae)
    secret = owner.load_secret()
    s = BaseIndex(base.bank_, ae, secret).residuals(x).scores(
        secret, [entries[n].code for n in ("alice", "bob", "carol")])
    assert float(s[:, 0].median()) > 3 and float(s[:, 1].median()) > 3
    assert float(s[:, 2].abs().median()) < 2.5  # carol did not collude


def test_keyed_verify_refuses_crop_search_and_a_missing_base(keyed_owner, tmp_path, capsys):
    import shutil

    root, _, ow = keyed_owner
    face = sorted((root / "alice").glob("face_*.png"))[0]
    assert main(["verify", "--crop-search", "0.8", str(face), *ow]) == 2
    assert "crop-search" in capsys.readouterr()[1]
    moved = tmp_path / "owner"
    shutil.copytree(root / "owner", moved)
    shutil.rmtree(moved / "bases")
    assert main(["verify", str(face), "--owner", str(moved)]) == 2
    assert "base model" in capsys.readouterr()[1]


def test_keyed_calibration_measures_standard_normal_scores_on_negatives(keyed_owner, celeba_dir, tmp_path, capsys):
    import shutil

    root, m, ow = keyed_owner
    neg = tmp_path / "neg"
    neg.mkdir()
    for p in sorted(celeba_dir.iterdir())[400:440]:
        (neg / p.name).symlink_to(p)
    owner = tmp_path / "owner"
    shutil.copytree(root / "owner", owner)
    args = ["fingerprint", "calibrate", str(m), "--negatives", str(neg), "--faces", "16", "--instances", "1",
            "--faces-per-instance", "16", "--owner", str(owner)]
    assert main([*args, "--min-negatives", "100"]) == 2  # 72 negatives: refused, nothing written
    assert not (owner / "calibration-keyed.json").exists()
    capsys.readouterr()
    assert main([*args, "--min-negatives", "50", "-q"]) == 0
    doc = json.loads((owner / "calibration-keyed.json").read_text())
    assert doc["pairs"] == 72 * 64 and doc["negatives"]["photos"] == 40
    assert abs(doc["mean"]) < 0.15 and 0.85 < doc["std"] < 1.15
    assert doc["exceedances"]["4.0"]["count"] <= 3  # about 0.15 expected


def test_edited_faces_are_read_against_an_edited_reference(keyed_owner, celeba_dir):
    """A face shrunk to half size and back is matched against a reference that went through the
    same edit (chosen without looking at any pattern): its score is higher than against the plain
    reference, and real photos still score like N(0, 1) noise."""
    from faceprint.data.folder import load_image
    from faceprint.fingerprint.attacks import resize_down_up
    from faceprint.fingerprint.keyed import BaseIndex, apply_edit

    ae, alice, secret, base, x = _alice(keyed_owner)
    xh = resize_down_up(x, 0.5)
    edited = BaseIndex(base.bank_, ae, secret).residuals(xh)
    plain = BaseIndex(base.bank_, ae, secret, edits=("none",)).residuals(xh)
    se, sp = edited.scores(secret, [alice.code])[:, 0], plain.scores(secret, [alice.code])[:, 0]
    # the edit is chosen by match distance, without the pattern: most faces, not always all, pick "half"
    assert edited.edit.count("half") >= len(x) - 1, edited.edit
    assert BaseIndex(base.bank_, ae, secret).residuals(x).edit.count("none") >= len(x) - 1
    assert float(se.median()) > 1.15 * float(sp.median()), (se, sp)
    real = torch.stack([load_image(p, 128) for p in sorted(celeba_dir.iterdir())[500:524]])
    codes = [f"{i:032x}" for i in range(40)]
    s = BaseIndex(base.bank_, ae, secret).residuals(resize_down_up(real, 0.5)).scores(secret, codes)
    assert abs(float(s.mean())) < 0.15 and 0.85 < float(s.std()) < 1.15
    with pytest.raises(Exception, match="unknown edit"):
        apply_edit(x, "sharpen")


def test_a_failed_issue_leaves_no_owner_folder_registry_or_secret(keyed_owner, tmp_path):
    from faceprint.fingerprint.owner import Owner, issue_instance
    from faceprint.io import sha256_file
    from faceprint.latent.generator import Generator

    _, m, _ = keyed_owner
    gen = Generator.load(m)
    owner = Owner(tmp_path / "fresh-owner")

    def fail_after_commit(*a, **k):  # the write of the instance file fails inside the registry's transaction
        raise OSError("disk full (simulated)")

    gen_save = Generator.save
    try:
        Generator.save = fail_after_commit
        with pytest.raises(OSError, match="disk full"):
            issue_instance(gen, sha256_file(m), owner, "Dave", "dave", seed=4, output=tmp_path / "dave.safetensors")
    finally:
        Generator.save = gen_save
    assert not owner.folder.exists()  # no registry, secret, base copy or folder left behind
    assert not (tmp_path / "dave.safetensors").exists()
    # and a later issue works from scratch
    entry, _ = issue_instance(gen, sha256_file(m), owner, "Dave", "dave", seed=4)
    assert entry.instance == "dave" and owner.secret_path.is_file()


def test_bench_attribution_crops_option_parses_and_refuses():
    import argparse

    from faceprint.bench.attribution import _crops
    from faceprint.errors import ConfigError
    from faceprint.fingerprint.keyed import BaseIndex

    assert _crops("1,0.93,0.86") == (1.0, 0.93, 0.86) and _crops("1") == (1.0,)
    for bad in ("0.9,1", "1,0.3", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--crops"):
            _crops(bad)
    with pytest.raises(ConfigError, match="crops must start with 1.0"):
        BaseIndex(torch.zeros(2, 4, 4, 4), None, OwnerSecret(), crops=(0.9,))
    from faceprint.bench.attribution import READOUT_SETTINGS, _prefilters

    assert _prefilters("none,blur3,blur5") == ("none", "blur3", "blur5") and _prefilters("none") == ("none",)
    for bad in ("blur3", "none,blur4", "none,none", "none,jpeg50", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--prefilters"):
            _prefilters(bad)
    assert set(READOUT_SETTINGS) == {"crops", "weighting", "prefilters"}


def test_pixel_weighting_is_inverse_energy_floored_and_keeps_empty_cells_empty():
    from faceprint.errors import ConfigError
    from faceprint.fingerprint.keyed import BaseIndex

    idx = BaseIndex(torch.zeros(2, 4, 4, 4), None, OwnerSecret(), weight_floor=0.1)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 8, 4, 4, generator=g)
    v = v / v.pow(2).mean(1, keepdim=True).sqrt()  # every pixel's energy exactly 1
    assert torch.allclose(idx._weighted(v), v, atol=1e-5)  # equal energies: the residual is unchanged
    w = v.clone()
    w[0, :, 0, 0] *= 10  # a noisy pixel is divided by its energy 100 ...
    w[0, :, 1, 1] *= 1e-3  # ... a nearly empty one by the floor (0.1 x the median energy), not by 1e-6
    w[1, :, 2:] = 0  # cells outside an undone crop stay exactly zero and do not move the median
    out = idx._weighted(w)
    assert torch.allclose(out[0, :, 0, 0], w[0, :, 0, 0] / 100, rtol=1e-4)
    assert torch.allclose(out[0, :, 1, 1], w[0, :, 1, 1] / 0.1, rtol=1e-4)
    assert torch.equal(out[1, :, 2:], torch.zeros_like(out[1, :, 2:]))
    assert torch.allclose(out[1, :, :2], w[1, :, :2], atol=1e-5)
    for bad in ({"weighting": "sqrt"}, {"weight_floor": 0}, {"weight_floor": 2.0}, {"weight_floor": True}):
        with pytest.raises(ConfigError, match="weight"):
            BaseIndex(torch.zeros(2, 4, 4, 4), None, OwnerSecret(), **bad)


def test_noisy_faces_are_read_through_a_blur_and_clean_ones_as_they_are(keyed_owner, celeba_dir):
    """The pre-filter is chosen by how close the image's latents lie to the base bank: clean faces
    stay unfiltered, faces with strong noise are read through a blur and score higher for it,
    and real photos, whatever filter they get, still score like N(0, 1) noise."""
    from faceprint.data.folder import load_image
    from faceprint.fingerprint.attacks import gaussian_noise
    from faceprint.fingerprint.keyed import BaseIndex

    ae, alice, secret, base, x = _alice(keyed_owner)
    noisy = gaussian_noise(x, 0.05, generator=torch.Generator().manual_seed(0))
    idx = BaseIndex(base.bank_, ae, secret, crops=(1.0,))
    plain = BaseIndex(base.bank_, ae, secret, crops=(1.0,), prefilters=("none",))
    assert idx.residuals(x).prefilter == ["none"] * len(x)
    rn = idx.residuals(noisy)
    assert all(p != "none" for p in rn.prefilter), rn.prefilter
    filt = rn.scores(secret, [alice.code])[:, 0]
    raw = plain.residuals(noisy).scores(secret, [alice.code])[:, 0]
    assert float(filt.median()) > 1.3 * float(raw.median()), (filt, raw)
    real = torch.stack([load_image(p, 128) for p in sorted(celeba_dir.iterdir())[600:624]])
    real = torch.cat([real, gaussian_noise(real, 0.05, generator=torch.Generator().manual_seed(1))])
    s = idx.residuals(real).scores(secret, [f"{i:032x}" for i in range(40)])
    assert abs(float(s.mean())) < 0.15 and 0.85 < float(s.std()) < 1.15
    for bad in (("blur3",), ("none", "none"), ("none", "sharpen")):
        with pytest.raises(Exception, match="prefilters must start|unknown edit"):
            BaseIndex(base.bank_, ae, secret, prefilters=bad)


def test_mixes_of_fingerprinted_faces_are_still_read(keyed_owner, tmp_path, capsys):
    """`faceprint mix` re-encodes generated faces, harmonises and decodes them: a hybrid of two of
    alice's faces is still read as alice, and a hybrid of alice's and bob's faces as one of them
    (never a third recipient), each half carrying its own instance's mark."""
    root, _, ow = keyed_owner
    outs = []
    for i, second in enumerate(("alice", "alice", "bob", "bob")):
        o = tmp_path / f"h{i}.png"
        assert main(["mix", f"{root / 'alice.safetensors'}:seed={2 * i + 1}",
                     f"{root / (second + '.safetensors')}:seed={2 * i + 2}", "--mode", "hybrid", "-o", str(o), "-q"]) == 0
        outs.append(o)
    out = _verify(capsys, ow, *outs)
    assert [o["instance"] for o in out[:2]] == ["alice", "alice"] and all(o["match"] for o in out)
    assert all(o["instance"] in ("alice", "bob") for o in out[2:]), [(o["instance"], o["score"]) for o in out]
    # half of a face carries about half of an instance's mark: less than two halves of one instance
    assert min(o["score"] for o in out[:2]) > max(o["score"] for o in out[2:])
