"""Personalisation (papers/003, issue 16): reference checks, identity features, the mapping and its
expression dropout, prompts, consent (forgotten people), fingerprints, provenance and the CLI.

Tiny real configurations: 8 celeba-id people x 4 photos train the identity projection and a small
f_map; the base model is fitted on the first 96 celeba-10k photos (conftest)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from faceprint.errors import ForgottenPersonError, InputError

ID_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "celeba-id" / "images"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


def _people():
    if not ID_DIR.is_dir():
        pytest.skip(f"celeba-id not found at {ID_DIR}")
    return sorted(p.name for p in ID_DIR.iterdir())


@pytest.fixture(scope="module")
def parts():
    from faceprint.personalize import FaceFinder
    from faceprint.recognition import IdentityRecogniser, load_classifier

    return IdentityRecogniser(), FaceFinder(), load_classifier("celeba")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, parts, taef2):
    """A small mapping trained on 8 people x 4 photos (seeded), and its training data."""
    from faceprint.data import load_image
    from faceprint.personalize import MappingConfig, train_mapping
    from faceprint.personalize.training import describe_photos, training_data

    rec, finder, clf = parts
    root = tmp_path_factory.mktemp("pers")
    people = _people()[:8]
    paths, ids = [], []
    for p in people:
        fs = sorted((ID_DIR / p).iterdir())[:4]
        paths += fs
        ids += [p] * len(fs)
    lat = taef2.encode(torch.stack([load_image(f, 128) for f in paths]))
    cache = root / "descriptors.safetensors"
    d, lm, done = describe_photos(paths, rec, finder, cache=cache)
    assert all(done) and (os.stat(cache).st_mode & 0o777) == 0o600  # biometric data: owner only
    data = training_data(lat, d, lm, ids, clf)
    cfg = MappingConfig(steps=120, rank=6, pca=24, feature_pca=16, feature_lda=6, hidden=48, batch=16)
    mapping, report = train_mapping(data, cfg, seed=0)
    assert report["complete"] and report["steps"] == 120
    path = root / "mapping.safetensors"
    mapping.save(path)
    return root, path, mapping, data, cfg


@pytest.fixture(scope="module")
def model(celeba_latents, taef2):
    from faceprint.latent.generator import Generator, GeneratorConfig

    return Generator(GeneratorConfig(components=2), autoencoder=taef2).fit(celeba_latents, seed=0)


@pytest.fixture(scope="module")
def pers(model, trained, parts):
    from faceprint.personalize import Personalizer

    rec, finder, clf = parts
    return Personalizer(model, trained[2], recogniser=rec, finder=finder, classifier=clf)


def _ref(k=150, i=0):
    people = _people()
    return sorted((ID_DIR / people[k]).iterdir())[i]


# ------------------------------------------------------------------------------ features, mapping
def test_auc_is_the_probability_a_genuine_pair_outscores_an_impostor_pair():
    from faceprint.personalize.features import auc

    g = np.random.default_rng(0)
    gen, imp = g.normal(1, 1, 60).round(1), g.normal(0, 1, 80).round(1)  # rounded: ties count half
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in gen for b in imp])
    assert auc(gen, imp) == pytest.approx(brute, abs=1e-12)
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0], [1]) == 0.0


def test_identity_projection_discriminates_people_better_than_raw_latent_features(trained):
    """The MSID analog: on the fitted people, the LDA projection of every scale separates
    identities better than the PCA coordinates it is computed from."""
    from faceprint.personalize.features import SCALES, identity_auc_table

    _, _, mapping, data, _ = trained
    rows = identity_auc_table(mapping.features_, data.latents, data.descriptors, data.ids)
    assert rows[0]["raw"] > 0.9  # dlib
    for r in rows[1:]:
        assert r["msid"] > r["raw"], rows
    assert len(rows) == 1 + len(SCALES)


def test_conditioning_sets_identity_coordinates_only_inside_the_face_region(trained):
    _, _, mapping, data, _ = trained
    sp = mapping.space_
    z = data.latents[:3]
    S = torch.randn(1, sp.rank, generator=torch.Generator().manual_seed(0))
    out = sp.apply(z, S)
    full = sp.mask_.flatten()[sp.pixels_] > 0.999
    # where the mask weight is 1 the coordinates land on S exactly; outside the region nothing moves
    inner = sp.pixels_[full]
    region_out = torch.ones(256, dtype=torch.bool)
    region_out[sp.pixels_] = False
    assert torch.equal(out.flatten(2)[:, :, region_out], z.flatten(2)[:, :, region_out])
    assert torch.allclose(sp.apply(z, S, 0.0), z)
    assert inner.numel() > 20
    # the coordinates land on S (the step fades toward the soft rim, compensated inside)
    assert sp.coordinates(out).sub(S).norm() < 0.02 * sp.coordinates(z).sub(S).norm()
    half = sp.apply(z, S, 0.5)
    assert torch.allclose(sp.coordinates(half), (sp.coordinates(z) + S) / 2, atol=0.02 * float(S.abs().max()) + 1e-3)


def test_mapping_saves_loads_and_resumes_exactly(trained, tmp_path):
    from faceprint.personalize import PersonalizeMapping, train_mapping

    root, path, mapping, data, cfg = trained
    loaded = PersonalizeMapping.load(path)
    assert loaded.digest() == mapping.digest()
    z, d = data.latents[:2], data.descriptors[:2]
    assert torch.equal(loaded.encode(z, d), mapping.encode(z, d))
    # interrupted after its first step (minutes=0), then resumed: the same weights as one run
    ck = tmp_path / "ckpt.safetensors"
    part, rep = train_mapping(data, cfg, seed=0, checkpoint=ck, minutes=0.0)
    assert not rep["complete"] and rep["steps"] == 1
    assert (os.stat(ck).st_mode & 0o777) == 0o600
    done, rep = train_mapping(data, cfg, seed=0, checkpoint=ck)
    assert rep["complete"] and done.digest() == mapping.digest()
    other, _ = train_mapping(data, cfg, seed=1)
    assert other.digest() != mapping.digest()
    with pytest.raises(InputError, match="another training run"):
        train_mapping(data, cfg, seed=1, checkpoint=ck)


def test_expression_dropout_learns_a_null_that_inference_uses(trained):
    from faceprint.personalize import train_mapping

    _, _, mapping, data, cfg = trained
    net = mapping.net_
    assert net.null.abs().sum() > 0  # learned, not left at its initial zeros
    z, d, e = data.latents[:4], data.descriptors[:4], data.expression[:4]
    v_id, v_exp = mapping.inputs(z, d, e)
    with torch.no_grad():
        assert torch.allclose(mapping.encode(z, d), net(v_id, None) * mapping.target_scale_)
        assert not torch.allclose(net(v_id, v_exp), net(v_id, None))  # the reference's expression is dropped
    import dataclasses

    plain, _ = train_mapping(data, dataclasses.replace(cfg, expression="none", steps=20), seed=0)
    assert plain.net_.d_exp == 0 and plain.net_.l1.in_features == mapping.features_.dim("msid")


# ------------------------------------------------------------------------------ reference photos
def test_reference_is_found_aligned_and_checked(parts, tmp_path):
    from PIL import Image

    from faceprint.data import load_image
    from faceprint.personalize import find_reference

    rec, finder, _ = parts
    photo = _ref()
    ref = find_reference(photo, finder)
    assert ref.image.shape == (3, 128, 128) and ref.face_px >= 64
    # aligned to the frame of the photos the recogniser was measured on: the same person
    dist = float(rec.distance(rec.describe(ref.image[None]), rec.describe(load_image(photo, 128)[None]))[0, 0])
    assert dist < 0.35
    from faceprint.io import sha256_file

    assert ref.sha256 == sha256_file(photo) and "name" not in ref.record()
    with pytest.raises(InputError, match="face is turned too far from frontal"):
        find_reference(photo, finder, max_yaw=0.0)
    with pytest.raises(InputError, match="px wide, below the 200 px minimum"):
        find_reference(photo, finder, min_face=200)
    # a texture has no face
    import skimage.data

    tex = tmp_path / "brick.png"
    Image.fromarray(np.stack([skimage.data.brick()] * 3, -1)).save(tex)
    with pytest.raises(InputError, match="no face found"):
        find_reference(tex, finder)
    # two people side by side
    a = np.asarray(Image.open(photo).convert("RGB"))
    b = np.asarray(Image.open(_ref(151)).convert("RGB"))
    two = tmp_path / "two.png"
    Image.fromarray(np.concatenate([a, b], 1)).save(two)
    with pytest.raises(InputError, match="2 faces found"):
        find_reference(two, finder)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.jpg"):
        find_reference(bad, finder)


def test_pose_proxies():
    from faceprint.personalize.reference import pose_of
    from faceprint.recognition.identity import MEAN_LANDMARKS

    lm = np.asarray(MEAN_LANDMARKS) * 128
    yaw, roll = pose_of(lm)
    assert abs(yaw) < 0.1 and abs(roll) < 3
    turned = lm.copy()
    turned[4, 0] += 20  # nose base moved sideways: a head turned away
    assert abs(pose_of(turned)[0]) > 0.5


# ------------------------------------------------------------------------------ prompts
def test_prompts_refuse_unknown_contradictory_and_unreliable_attributes(parts):
    from faceprint.personalize import make_prompt

    clf = parts[2]
    assert make_prompt(["Smiling=1", "Eyeglasses=1"], clf).targets == {"Smiling": 1, "Eyeglasses": 1}
    with pytest.raises(InputError, match="unknown attribute; did you mean Smiling"):
        make_prompt(["smiling=1"], clf)
    with pytest.raises(InputError, match="value must be 1"):
        make_prompt(["Smiling=2"], clf)
    with pytest.raises(InputError, match="Bald=1 and --attribute Bangs=1 contradict"):
        make_prompt(["Bald=1", "Bangs=1"], clf)
    with pytest.raises(InputError, match="contradict"):
        make_prompt(["Blond_Hair=1", "Black_Hair=1"], clf)
    with pytest.raises(InputError, match="given twice"):
        make_prompt(["Smiling=1", "Smiling=0"], clf)
    with pytest.raises(InputError, match="Big_Lips: its classifier is unreliable .*0.6"):
        make_prompt(["Big_Lips=1"], clf)
    p = make_prompt(["Big_Lips=1", "Smiling=1"], clf, allow_unmeasured=True)
    assert p.unmeasured == ["Big_Lips"] and p.measured == ["Smiling"]


def test_prompt_model_draws_only_from_the_prompt_cell_and_warns_on_small_cells(pers, model):
    from faceprint.personalize import PromptWarning

    labels = pers._labels
    p, pm = pers.prompt({"Smiling": 1})
    z, prov, _ = pers.sample_latents(None, pm, 6, seed=0)
    used = prov[prov >= 0].unique()
    assert all(labels["Smiling"][int(i)] == 1 for i in used)  # every copied pixel from a smiling photo
    assert pm.cell_photos == sum(labels["Smiling"])
    few = [a for a in ("Eyeglasses", "Wearing_Hat", "Bald", "Gray_Hair", "Goatee") if 0 < sum(labels[a]) < 8]
    assert few, {a: sum(labels[a]) for a in ("Eyeglasses", "Wearing_Hat", "Bald", "Gray_Hair", "Goatee")}
    with pytest.warns(PromptWarning, match=f"only {sum(labels[few[0]])} of the model's 96 training photos"):
        _, pm2 = pers.prompt({few[0]: 1})
    assert pm2.warning and pm2.cell_photos < 8
    none = [a for a in labels if sum(labels[a]) == 0 and a in ("Bald", "Wearing_Hat", "Gray_Hair", "Eyeglasses",
                                                               "Goatee", "Mustache", "Blond_Hair", "Bangs")]
    if none:
        with pytest.raises(InputError, match="none of the model's 96 training photos"):
            pers.prompt({none[0]: 1})


# ------------------------------------------------------------------------------ generation
def test_personalised_faces_carry_the_identity_coordinates_and_the_prompt(pers, parts, trained):
    rec = parts[0]
    person = pers.encode(_ref())
    # features + f_map (the descriptor and the latent are timed apart); CPU time: a loaded machine's wall
    # clock says more about the other jobs than about this code
    assert person.seconds["mapping_cpu"] < 0.1
    images, record = pers.generate(person, {"Smiling": 1}, n=4, seed=3)
    _, pm = pers.prompt({"Smiling": 1})
    # identity coordinates only (reimposed after the refinement): they land on S*
    z, prov, _ = pers.sample_latents(person, pm, 4, seed=3, reimpose=True)
    z2, _, _ = pers.sample_latents(person, pm, 2, seed=3, start=2, reimpose=True)
    assert torch.equal(z[2:], z2)  # face i of seed s is the same alone or in a batch
    sp = pers.mapping.space_
    assert torch.allclose(sp.coordinates(z), person.S.expand(4, -1), atol=0.05 * float(person.S.abs().max()))
    assert (prov == -1).any() and (prov >= 0).any()  # face region set, background copied from the bank
    zc, _, _ = pers.sample_latents(None, pm, 4, seed=3)
    assert float((sp.coordinates(z) - person.S).norm()) < float((sp.coordinates(zc) - person.S).norm())
    # the method's reference pixels: only inside the face mask, never where the prompt's attribute lives
    zr, provr, _ = pers.sample_latents(person, pm, 4, seed=3, reference_discount=0.5, reimpose=False)
    took = provr == -2
    assert took.any() and not (took & (sp.mask_ <= 0.5)).any() and not (took & (pm.where >= 0.5)).any()
    assert torch.equal(zr.permute(0, 2, 3, 1)[took], person.latent[0].permute(1, 2, 0).expand(4, -1, -1, -1)[took])
    assert record["realised"]["Smiling"]["share"] >= 0.75
    assert record["sampling"]["latent_pixels"]["from_the_reference"] > 0
    # provenance: the photo's sha256 and the prompt, never the photo or its name
    from faceprint.io import sha256_file

    text = json.dumps(record)
    assert record["reference"]["sha256"] == sha256_file(_ref()) and _ref().name not in text
    assert record["prompt"]["targets"] == {"Smiling": 1} and record["mapping"]["digest"] == pers.mapping.digest()
    assert "94.4%" in record["identity_error_rates"]["accept@0.50"]
    # the identity moved toward the reference: closer (dlib) than the class model's same samples
    d_pers = rec.distance(rec.describe(images), person.descriptor).mean()
    d_class = rec.distance(rec.describe(pers.gen.autoencoder.decode(zc)), person.descriptor).mean()
    assert d_pers < d_class, (float(d_pers), float(d_class))


def test_a_forgotten_person_is_refused_by_hash_and_by_identity(tmp_path, taef2, trained, parts, celeba_latents):
    from faceprint.data import FaceFolder, LatentCache, LatentSet, encode_folder
    from faceprint.latent.generator import Generator, GeneratorConfig
    from faceprint.personalize import Personalizer
    from faceprint.taming import forget, match_training_photos

    rec, finder, clf = parts
    folder = tmp_path / "photos"
    folder.mkdir()
    person = sorted((ID_DIR / _people()[152]).iterdir())
    for f in person[:6]:
        (folder / f"p_{f.name}").symlink_to(f)
    own = encode_folder(FaceFolder(folder), taef2, cache=LatentCache(tmp_path / "c"))
    others = celeba_latents
    ls = LatentSet(torch.cat([own.latents, others.latents[:26]]), own.relpaths + others.relpaths[:26],
                   own.content_hashes + others.content_hashes[:26], None, own.root, 128)
    gen = Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(ls, seed=0)
    idx, _ = match_training_photos(gen, [folder / f"p_{f.name}" for f in person[:6]])
    tamed, _ = forget(gen, idx, name="person 152")
    pers = Personalizer(tamed, trained[2], recogniser=rec, finder=finder, classifier=clf)
    with pytest.raises(ForgottenPersonError, match="same sha256"):
        pers.encode(person[0])
    with pytest.raises(ForgottenPersonError, match="forgot .*identity distance .*98.0%"):
        pers.encode(person[10])  # another photo of the forgotten person
    ok = pers.encode(_ref(150))
    assert ok.consent["galleries"] == 1 and ok.consent["nearest"]["distance"] > 0.55


@pytest.mark.slow  # issuing a keyed instance measures its carrier directions (about a minute on a busy machine)
def test_a_fingerprinted_instance_personalises_with_its_fingerprint(tmp_path, model, trained, parts):
    """Personalised faces of a keyed instance verify to that instance (the background pixels come
    from its marked bank; the face region moves only the identity coordinates)."""
    from faceprint.cli.main import main
    from faceprint.fingerprint.owner import Owner, verify_keyed
    from faceprint.latent.generator import Generator
    from faceprint.personalize import Personalizer

    rec, finder, clf = parts
    m = tmp_path / "m.safetensors"
    model.save(m)
    owner = tmp_path / "owner"
    assert main(["fingerprint", "issue", str(m), "--to", "Alice", "-o", str(tmp_path / "alice.safetensors"),
                 "--seed", "1", "-q", "--owner", str(owner)]) == 0
    inst = Generator.load(tmp_path / "alice.safetensors")
    pers = Personalizer(inst, trained[2], recogniser=rec, finder=finder, classifier=clf)
    person = pers.encode(_ref())
    images, record = pers.generate(person, None, n=2, seed=0)
    assert record["model"]["fingerprint_instance"] == "alice"
    ow = Owner(owner)
    with ow.open_registry() as reg:
        entries = reg.all()
    verdicts = verify_keyed(images, ow, entries, inst.autoencoder.base)
    assert all(v.match and v.instance == "alice" for v in verdicts), [v.score for v in verdicts]


# ------------------------------------------------------------------------------ CLI
def test_cli_writes_faces_and_provenance_and_refuses_bad_input(tmp_path, model, trained, capsys):
    from faceprint.cli.main import main

    m = tmp_path / "m.safetensors"
    model.save(m)
    mp = str(trained[1])
    out = tmp_path / "out"
    desc = tmp_path / "me.safetensors"
    rc = main(["personalize", str(m), "--photo", str(_ref()), "--attribute", "Smiling=1", "-n", "2", "-o", str(out),
               "--mapping", mp, "--save-descriptor", str(desc), "-q"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["face_000000.png", "face_000001.png", "provenance.json"]
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["prompt"]["targets"] == {"Smiling": 1} and rec["files"] == ["face_000000.png", "face_000001.png"]
    assert (os.stat(desc).st_mode & 0o777) == 0o600
    capsys.readouterr()
    for extra, words in ((["--attribute", "Bald=1", "--attribute", "Bangs=1"], "contradict each other"),
                         (["--attribute", "Nope=1"], "unknown attribute"),
                         (["--attribute", "Oval_Face=1"], "unreliable")):
        out2 = tmp_path / "refused"
        assert main(["personalize", str(m), "--photo", str(_ref()), "-o", str(out2), "--mapping", mp, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and not out2.exists()
    assert main(["personalize", str(m), "--photo", str(m), "-o", str(tmp_path / "x"), "--mapping", mp]) == 2
    assert "--photo" in capsys.readouterr().err and not (tmp_path / "x").exists()
    from faceprint.cli.personalize import PACKAGED_MAPPING

    if not PACKAGED_MAPPING.is_file():
        assert main(["personalize", str(m), "--photo", str(_ref()), "-o", str(tmp_path / "y")]) == 2
        assert "no trained mapping" in capsys.readouterr().err
    else:  # the shipped mapping (bench personalize --write-mapping) is the default
        assert main(["personalize", str(m), "--photo", str(_ref()), "-n", "1", "-o", str(tmp_path / "y"), "-q"]) == 0
        rec = json.loads((tmp_path / "y" / "provenance.json").read_text())
        assert rec["mapping"]["file"] == "mapping.safetensors" and rec["files"] == ["face_000000.png"]


# ------------------------------------------------------------------------------ bench statistics
def test_bench_statistics_weights_bootstrap_and_best_of_n():
    from faceprint.bench.personalize import _hg, _row_stats, best_of_n, paired_bootstrap

    # a deterministic row's one face per prompt stands for `weight` faces
    one = {"results": [{"weight": 4, "id_cos": [0.8], "accepted": [1.0], "prompt": [0.5], "dir": [0.2]}]}
    many = {"results": [{"weight": 1, "id_cos": [0.8] * 4, "accepted": [1.0] * 4, "prompt": [0.5] * 4,
                         "dir": [0.2] * 4}]}
    a, b = _row_stats([one]), _row_stats([many])
    assert a["faces"] == b["faces"] == 4 and a["means"] == pytest.approx(b["means"])
    h = _hg({"id_cos": 0.8, "prompt": 0.5, "dir": 0.2})
    assert h["hmean"] == pytest.approx(3 / (1 / 0.8 + 1 / 0.5 + 1 / 0.2)) and h["gmean"] == pytest.approx(0.08 ** (1 / 3))
    assert _hg({"id_cos": 0.8, "prompt": 0.5, "dir": 0.0})["hmean"] == 0.0
    g = np.random.default_rng(0)
    x = g.normal(0, 1, 200)
    mean, lo, hi = paired_bootstrap(x + 0.5, x, seed=0)
    assert mean == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    mean, lo, hi = paired_bootstrap(x + 0.3 + g.normal(0, 0.5, 200), x, seed=0)
    assert lo < mean < hi and lo > 0
    doc = {"results": [{"id_cos": list(g.uniform(0.5, 1, 16)), "prompt": list(g.uniform(0, 1, 16)),
                        "dir": list(g.uniform(0, 1, 16))} for _ in range(5)]}
    curve = best_of_n([doc])
    assert list(curve) == [1, 2, 4, 8, 16] and all(curve[m] <= curve[n] for m, n in zip(list(curve), list(curve)[1:]))


def test_bench_shard_argument_is_checked():
    import argparse

    from faceprint.bench.personalize import _shard

    assert _shard("1/2") == (1, 2) and _shard("3/3") == (3, 3)
    for bad in ("0/2", "3/2", "1", "a/b", "1/2/3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shard"):
            _shard(bad)
