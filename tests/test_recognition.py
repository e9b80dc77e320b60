"""Tests of faceprint.recognition: dlib identity descriptors and the shipped attribute classifiers.

Real photos are read from ../shared/datasets at run time (skipped when absent); dlib tests are
skipped when dlib-bin / face-recognition-models are not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from faceprint.errors import ArtifactError, ConfigError, InputError, NotFittedError
from faceprint.recognition.attributes import (
    AttributeClassifier,
    AttributeConfig,
    Task,
    correct_proportions,
    correct_rate,
    dataset_labels,
    load_classifier,
    split_mask,
    task_metrics,
    weights_dir,
)

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
CELEBA_ID = DATASETS / "celeba-id"
CELEBA = DATASETS / "celeba-10k"

needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None,
    reason="dlib-bin and face-recognition-models are not installed",
)


# ------------------------------------------------------------------------------------------------
# rate correction


def test_correct_rate_inverts_the_measurement_model():
    tpr, fpr = 0.9, 0.05
    for p in (0.0, 0.1, 0.5, 1.0):
        m = p * tpr + (1 - p) * fpr
        assert correct_rate(m, tpr, fpr) == pytest.approx(p)
    arr = correct_rate(np.array([0.05, 0.9]), tpr, fpr)
    np.testing.assert_allclose(arr, [0.0, 1.0])
    # below the false-positive floor: visible unless clipped
    assert correct_rate(0.0, tpr, fpr) < 0
    assert correct_rate(0.0, tpr, fpr, clip=True) == 0.0


def test_correct_rate_bad_input():
    with pytest.raises(InputError, match="tpr"):
        correct_rate(0.3, 0.4, 0.4)
    with pytest.raises(InputError, match="measured"):
        correct_rate(1.5, 0.9, 0.1)
    with pytest.raises(InputError, match="fpr"):
        correct_rate(0.5, 0.9, -0.1)


def test_correct_proportions_inverts_the_confusion():
    conf = np.array([[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.0, 0.1, 0.9]])
    p = np.array([0.5, 0.3, 0.2])
    m = conf.T @ p
    np.testing.assert_allclose(correct_proportions(m, conf), p, atol=1e-12)
    # binary case agrees with correct_rate
    tpr, fpr = 0.85, 0.1
    c2 = np.array([[1 - fpr, fpr], [1 - tpr, tpr]])
    m1 = 0.3 * tpr + 0.7 * fpr
    assert correct_proportions([1 - m1, m1], c2)[1] == pytest.approx(correct_rate(m1, tpr, fpr))
    with pytest.raises(InputError, match="rows sum to 1"):
        correct_proportions([0.5, 0.5], [[0.5, 0.2], [0.5, 0.5]])
    with pytest.raises(InputError, match="singular"):
        correct_proportions([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]])


def test_task_metrics_counts():
    true = np.array([1, 1, 1, 0, 0, 0, 0, 0, -1])
    pred = np.array([1, 1, 0, 0, 0, 0, 1, 0, 1])
    m = task_metrics(pred, true, ("no", "yes"))
    assert m["n"] == 8
    assert m["tpr"] == pytest.approx(2 / 3)
    assert m["fpr"] == pytest.approx(1 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["majority"] == pytest.approx(5 / 8)


def test_split_mask_is_deterministic_and_by_key():
    keys = [str(i // 3) for i in range(3000)]  # 1000 "people", 3 photos each
    a = split_mask(keys, 0, 0.2)
    assert np.array_equal(a, split_mask(keys, 0, 0.2))
    assert 0.15 < a.mean() < 0.25
    assert not np.array_equal(a, split_mask(keys, 1, 0.2))
    per_person = a.reshape(-1, 3)
    assert (per_person.all(1) | (~per_person).all(1)).all()  # a person is on one side only


# ------------------------------------------------------------------------------------------------
# attribute classifier: synthetic fit, save/load, errors


def _toy(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, 16, 16, generator=g)
    y0 = (z[:, 0].mean((1, 2)) > 0).long()  # channel 0 brightness -> binary task
    y1 = torch.bucketize(z[:, 1].mean((1, 2)), torch.tensor([-0.03, 0.03]))  # 3 classes
    y = torch.stack([y0, y1], 1).numpy()
    y[:5, 1] = -1  # missing labels are ignored
    return z, y, [Task("bright", ("no", "yes")), Task("level", ("low", "mid", "high"))]


def test_fit_learns_a_planted_signal_and_round_trips(tmp_path):
    z, y, tasks = _toy()
    clf = AttributeClassifier(AttributeConfig(pool=16, epochs=100, batch_size=300, lr=0.1, dropout=0.0, weight_decay=0.0))
    clf.fit(z[:300], y[:300], tasks, seed=1)
    pred = clf.predict_latents(z[300:])
    assert (pred["bright"].numpy() == y[300:, 0]).mean() > 0.9
    assert (pred["level"].numpy() == y[300:, 1]).mean() > 0.7
    clf.metrics_ = {t.name: task_metrics(pred[t.name].numpy(), y[300:, j], t.classes) for j, t in enumerate(tasks)}
    path = tmp_path / "clf.safetensors"
    clf.save(path)
    back = AttributeClassifier.load(path)
    assert back.config == clf.config
    assert [t.name for t in back.tasks] == ["bright", "level"]
    for k, v in clf.predict_proba_latents(z[300:]).items():
        torch.testing.assert_close(back.predict_proba_latents(z[300:])[k], v)
    m = back.metrics_["bright"]
    assert back.corrected_rate("bright", 0.5) == pytest.approx(correct_rate(0.5, m["tpr"], m["fpr"]))
    # same seed, same model
    again = AttributeClassifier(clf.config).fit(z[:300], y[:300], tasks, seed=1)
    torch.testing.assert_close(again.weight_, clf.weight_)


def test_classifier_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="pool"):
        AttributeConfig(pool=3)
    with pytest.raises(ConfigError, match="lr"):
        AttributeConfig(lr=0)
    clf = AttributeClassifier()
    with pytest.raises(NotFittedError):
        clf.predict_latents(torch.zeros(1, 32, 16, 16))
    z, y, tasks = _toy(40)
    with pytest.raises(InputError, match="labels"):
        clf.fit(z, y[:10], tasks)
    with pytest.raises(InputError, match=r"\(N, 32, 16, 16\)"):
        clf.fit(z[:, :, :8], y, tasks)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an artifact")
    with pytest.raises(ArtifactError):
        AttributeClassifier.load(bad)
    fitted = AttributeClassifier(AttributeConfig(pool=16, epochs=1)).fit(z, y, tasks)
    with pytest.raises(InputError, match="128, 128"):
        fitted.classify(torch.rand(2, 3, 64, 64))
    with pytest.raises(InputError, match="no attribute"):
        fitted.corrected_rate("Bald", 0.1)
    with pytest.raises(InputError, match="dataset"):
        dataset_labels("lfw", {})


def test_shipped_artifacts_are_small_and_documented():
    for name in ("celeba", "utkface"):
        path = weights_dir() / f"{name}.safetensors"
        assert path.is_file(), f"missing {path}; run python -m faceprint.bench recognisers --train-attributes"
        assert path.stat().st_size < 600_000
        clf = load_classifier(name)
        prov = clf.provenance
        assert "--train-attributes" in prov["command"] and "seed" in prov and prov["split"]["test"] > 0
        for t in clf.tasks:
            for metrics in (clf.metrics_, clf.metrics_roundtrip_):
                m = metrics[t.name]
                assert m["balanced_accuracy"] > 0.5
                if t.binary:
                    assert m["tpr"] > m["fpr"]
            if t.binary:
                rt = clf.metrics_roundtrip_[t.name]
                assert clf.corrected_rate(t.name, rt["tpr"]) == pytest.approx(1.0)
                assert clf.corrected_rate(t.name, clf.metrics_[t.name]["fpr"], rates="photos") == pytest.approx(0.0)
    assert len(load_classifier("celeba").tasks) == 40


# ------------------------------------------------------------------------------------------------
# attribute classifier on real held-out photos


def _held_out_photos(attribute: str, per_class: int):
    from faceprint.data import read_labels

    table = read_labels(CELEBA / "attributes.csv")
    clf = load_classifier("celeba")
    held = split_mask(table.column("identity"), clf.provenance["seed"], clf.provenance["split"]["test_fraction"])
    vals = table.column(attribute)
    pos = [k for k, h, v in zip(table.keys, held, vals) if h and v == "1"][:per_class]
    neg = [k for k, h, v in zip(table.keys, held, vals) if h and v == "-1"][:per_class]
    return clf, pos, neg


@pytest.mark.parametrize("attribute", ["Male", "Eyeglasses"])
def test_celeba_classifier_beats_majority_on_held_out_photos(attribute, taef2):
    if not CELEBA.is_dir():
        pytest.skip("celeba-10k not found")
    from faceprint.data import load_image

    clf, pos, neg = _held_out_photos(attribute, 16)
    images = torch.stack([load_image(CELEBA / "images" / k, 128) for k in pos + neg])
    truth = np.array([1] * len(pos) + [0] * len(neg))
    lat = clf.encode(images, autoencoder=taef2)  # (N, 32, 16, 16)
    pred = clf.predict_latents(lat)[attribute].numpy()
    acc = (pred == truth).mean()
    majority = max(truth.mean(), 1 - truth.mean())  # 0.5 on this balanced sample
    assert acc >= majority + 0.25, f"{attribute}: accuracy {acc:.2f} vs majority {majority:.2f}"
    # the image entry point agrees with the latent one
    assert np.array_equal(clf.classify(images[:4], autoencoder=taef2)[attribute].numpy(), pred[:4])


# ------------------------------------------------------------------------------------------------
# identity


def _people(n_people: int, n_photos: int):
    from faceprint.data import load_image

    people = sorted(p.name for p in (CELEBA_ID / "images").iterdir() if p.is_dir())[:n_people]
    imgs, ids = [], []
    for p in people:
        for f in sorted((CELEBA_ID / "images" / p).iterdir())[:n_photos]:
            imgs.append(load_image(f, 128))
            ids.append(p)
    return torch.stack(imgs), ids


@pytest.fixture(scope="module")
def id_photos():
    if not CELEBA_ID.is_dir():
        pytest.skip("celeba-id not found")
    return _people(3, 3)


@needs_dlib
def test_identity_same_person_closer_than_others(id_photos):
    from faceprint.recognition.identity import IdentityRecogniser, pair_distances

    images, ids = id_photos
    rec = IdentityRecogniser()
    d = rec.describe(images)
    assert d.shape == (9, 128) and d.dtype == torch.float32
    gen, imp = pair_distances(d, ids)
    assert gen.size == 9 and imp.size == 27
    assert gen.max() < imp.min(), f"genuine {gen.round(3)} vs impostor {imp.round(3)}"
    assert np.mean(gen < 0.6) >= 8 / 9 and (imp > 0.6).all()  # dlib's threshold: one genuine pair is 0.609
    # each person's mean descriptor accepts their own third photo and rejects the others'
    gal = rec.enrol(d[[0, 1]], name=ids[0])
    acc = rec.accepts(d, gal).numpy()
    assert acc[2] and not acc[3:].any()
    assert bool(rec.same_person(d[:1], d[1:2])[0]) and not bool(rec.same_person(d[:1], d[3:4])[0])
    # deterministic, batch-independent
    torch.testing.assert_close(rec.describe(images[:1]), d[:1])


@needs_dlib
def test_identity_gallery_round_trip_and_bad_input(tmp_path, id_photos):
    from faceprint.recognition.identity import IdentityConfig, IdentityGallery, IdentityRecogniser

    images, ids = id_photos
    rec = IdentityRecogniser(IdentityConfig(align="fixed"))
    d = rec.describe(images[:3])
    gal = rec.enrol(d, name="p")
    gal.save(tmp_path / "g.safetensors")
    back = IdentityGallery.load(tmp_path / "g.safetensors")
    assert back.name == "p"
    torch.testing.assert_close(back.descriptors, gal.descriptors)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        rec.describe(images[:1] * 2)
    with pytest.raises(InputError, match="square"):
        rec.describe(torch.rand(1, 3, 128, 96))
    with pytest.raises(InputError, match="128"):
        rec.enrol(torch.zeros(2, 64))
    with pytest.raises(ConfigError, match="align"):
        IdentityConfig(align="detector")
    with pytest.raises(ConfigError, match="box"):
        IdentityConfig(box=(0.5, 0.2, 0.4, 0.9))


def test_roc_helpers():
    from faceprint.recognition.identity import gallery_rates, roc_points, threshold_at_far

    gen = np.array([0.2, 0.3, 0.5, 0.7])
    imp = np.linspace(0.4, 1.4, 1001)
    pts = roc_points(gen, imp, [0.6])[0]
    assert pts["tar"] == 0.75 and pts["far"] == pytest.approx(200 / 1001)
    t = threshold_at_far(imp, 1e-2)
    assert np.mean(imp < t) <= 1e-2 < np.mean(imp <= t) + 1e-9
    # two well separated people: the gallery rule accepts own probes only
    d = torch.zeros(6, 128)
    d[3:, 0] = 1.0
    d[:, 1] = torch.tensor([0.0, 0.01, 0.02, 0.0, 0.01, 0.02])
    r = gallery_rates(d, ["a"] * 3 + ["b"] * 3, enrol=2, thresholds=[0.5])[0]
    assert r["genuine_accept"] == 1.0 and r["impostor_accept"] == 0.0
    assert r["genuine_trials"] == 2 and r["impostor_trials"] == 2
