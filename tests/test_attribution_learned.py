"""Learned attribution (papers/004 ch. 4; faceprint.attribution): classifier, open set, file,
baselines, FD ratio, sources cache and the `faceprint attribute` command's refusals.

Real photos from ../shared (skipped when absent), real JPEG codec, real networks; tiny sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from faceprint.attribution import Attributor, NetConfig, TrainConfig, read_image, train_network
from faceprint.attribution.baselines import PRNU, Eigenface, LogisticRegression, PixelKNN
from faceprint.attribution.evaluation import fd_ratio, rate_with_bound
from faceprint.attribution.network import RECEPTIVE_FIELDS, AttributionNet, band_filter
from faceprint.errors import ArtifactError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")
AE_ID = "taef2-30422dbdcebd409a"


@pytest.fixture(scope="module")
def photos(celeba_dir):
    """96 real photos at 128 px, uint8."""
    from faceprint.data import FaceFolder

    x, _, _ = FaceFolder(celeba_dir, size=128, limit=96).load()
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def two_sources(photos):
    """The same 48 photos from two sources: source 0 as they are, source 1 with a faint periodic
    pattern added (an 8 x 8 tile repeated, std 3 grey levels: the kind of grid trace an
    upsampling decoder leaves). Content cannot tell them apart, only the trace can.
    Returns (train x, train y, cal x, cal y, test x, test y)."""
    g = torch.Generator().manual_seed(0)
    pattern = (torch.randn(1, 3, 8, 8, generator=g) * (3.0 / 255)).repeat(1, 1, 16, 16)
    raw = photos[:48]
    marked = ((raw.float() / 255 + pattern).clamp(0, 1) * 255).round().to(torch.uint8)

    def split(a, b):
        return torch.cat([raw[a:b], marked[a:b]]), torch.cat([torch.zeros(b - a), torch.ones(b - a)]).long()
    return split(0, 24) + split(24, 36) + split(36, 48)


@pytest.fixture(scope="module")
def trained(two_sources):
    xtr, ytr, xcal, ycal, _, _ = two_sources
    att = Attributor(["raw", "marked"], AE_ID, NetConfig(width=8))
    att.fit(xtr, ytr, TrainConfig(epochs=8, batch_size=16, lr=2e-3, crop=64), seed=0)
    att.calibrate(xcal, ycal, coverage=0.9)
    return att


def test_classifier_separates_two_sources_with_a_clear_trace(trained, two_sources):
    *_, xte, yte = two_sources
    _, pred, _ = trained.scores(xte)
    assert (pred == yte).double().mean() >= 0.9
    # the model fingerprints are the last layer's rows; the image fingerprint is 512-d
    assert trained.net.model_fingerprints.shape == (2, 512)
    answers = trained.attribute(xte)
    assert {a.nearest for a in answers} == {"raw", "marked"}
    assert all(abs(sum(a.probabilities.values()) - 1) < 1e-5 for a in answers)


def test_open_set_threshold_is_calibrated_and_answers_unknown_below_it(trained, two_sources):
    # Whether an unseen source scores below the threshold is an empirical question (the bench's
    # open-set stage measures it; for this tiny 8-epoch network, uniform noise is rejected 0 to
    # 24 times in 24 depending on the initial weights). What must hold is the mechanism.
    _, _, xcal, ycal, xte, _ = two_sources
    _, _, s_cal = trained.scores(xcal)
    known_cal = (s_cal >= trained.threshold_).double().mean()
    assert 0.9 <= known_cal <= 0.9 + 2 / len(s_cal)  # coverage 0.9 of the held-out known images
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(24, 3, 128, 128, generator=g) * 255).round().to(torch.uint8)
    both = torch.cat([xte, noise])
    probs, pred, s = trained.scores(both)
    answers = trained.attribute(both)
    assert [a.source == "unknown" for a in answers] == (s < trained.threshold_).tolist()
    assert [a.nearest for a in answers] == [trained.sources[int(p)] for p in pred]  # nearest is kept
    assert all(a.threshold == trained.threshold_ for a in answers)
    # full coverage: every calibration image is answered with its source
    trained2 = type(trained).__new__(type(trained))
    trained2.__dict__.update(trained.__dict__)
    assert trained2.calibrate(xcal, ycal, coverage=1.0) == pytest.approx(float(s_cal.min()))
    assert all(a.source != "unknown" for a in trained2.attribute(xcal))
    n_unknown = sum(a.source == "unknown" for a in answers[len(xte):])
    r = rate_with_bound(24 - n_unknown, 24)
    assert r["rate"] == (24 - n_unknown) / 24 and r["upper95"] >= r["rate"]
    assert rate_with_bound(0, 24)["upper95"] == pytest.approx(1 - 0.05 ** (1 / 24))  # exact for k = 0


def test_same_seeds_same_classifier(two_sources):
    # the initial weights come from the Attributor's seed, not the global random state
    xtr, ytr, *_ = two_sources
    torch.manual_seed(123)
    a = Attributor(["raw", "marked"], AE_ID, NetConfig(width=4), seed=5)
    torch.manual_seed(456)
    b = Attributor(["raw", "marked"], AE_ID, NetConfig(width=4), seed=5)
    c = Attributor(["raw", "marked"], AE_ID, NetConfig(width=4), seed=6)
    sa, sb, sc = (m.net.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc.weight"], sc["fc.weight"])
    cfg = TrainConfig(epochs=1, batch_size=16, lr=2e-3, crop=64)
    few = torch.cat([torch.arange(8), torch.arange(24, 32)])  # 8 of each source
    a.fit(xtr[few], ytr[few], cfg, seed=0)
    b.fit(xtr[few], ytr[few], cfg, seed=0)
    assert all(torch.equal(a.net.state_dict()[k], b.net.state_dict()[k]) for k in sa)


def test_save_load_round_trip_and_autoencoder_refusal(trained, two_sources, tmp_path):
    *_, xte, _ = two_sources
    trained.error_rates_ = {"test_accuracy": 0.9, "n_test": 24}
    path = tmp_path / "clf.safetensors"
    trained.save(path)
    back = Attributor.load(path, autoencoder_id=AE_ID + "+abcdef")  # a fingerprinted decoder of the same base
    assert back.sources == trained.sources and back.threshold_ == trained.threshold_
    assert back.error_rates_["n_test"] == 24
    p1, _, s1 = trained.scores(xte[:4])
    p2, _, s2 = back.scores(xte[:4])
    assert torch.allclose(p1, p2) and torch.allclose(s1, s2)
    with pytest.raises(ArtifactError, match="autoencoder"):
        Attributor.load(path, autoencoder_id="taef2-0000000000000000")
    raw = path.read_bytes()
    assert b"pickle" not in raw[:2000]


def test_training_resumes_exactly_from_its_checkpoint(two_sources, tmp_path):
    xtr, ytr, *_ = two_sources
    cfg = TrainConfig(epochs=2, batch_size=16, crop=32)
    torch.manual_seed(1)
    a = AttributionNet(2, NetConfig(width=4))
    b = AttributionNet(2, NetConfig(width=4))
    b.load_state_dict(a.state_dict())
    train_network(a, xtr, ytr, cfg, seed=3)
    ck = tmp_path / "ck.safetensors"
    train_network(b, xtr, ytr, TrainConfig(epochs=2, batch_size=16, crop=32, max_seconds=1e-9), seed=3, checkpoint=ck)
    res = train_network(b, xtr, ytr, cfg, seed=3, checkpoint=ck)  # resumes at epoch 2
    assert res["complete"] and res["epochs_done"] == 2
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-6), ka


def test_component_variants_filter_the_band_they_claim():
    y, x = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    checker = (((x + y) % 2).float()[None, None].expand(1, 3, 128, 128))  # all energy at the top frequency
    smooth = (torch.sin(x / 20.0) * 0.5)[None, None].expand(1, 3, 128, 128).float()
    low = band_filter(checker, "low", 4)
    assert float(low.std()) < 0.02  # the checkerboard is gone below 32 px
    inner = (slice(None), slice(None), slice(32, 96), slice(32, 96))  # away from the reflected borders
    # the top octave of a smooth image is (nearly) empty; its 8 x 8 thumbnail keeps its shape
    assert float(band_filter(smooth, "high", 2)[inner].abs().mean()) < 0.05 * float(smooth[inner].abs().mean())
    lo16 = band_filter(smooth, "low", 16)[inner].flatten()
    assert float(torch.corrcoef(torch.stack([lo16, smooth[inner].flatten()]))[0, 1]) > 0.95
    assert float(band_filter(checker, "high", 2).std()) > 0.3
    assert RECEPTIVE_FIELDS[:5] == (3, 5, 9, 17, 33)
    net = AttributionNet(3, NetConfig(pool_after=3, width=4))
    assert net(torch.rand(2, 3, 128, 128)).shape == (2, 3)
    assert NetConfig(pool_after=3).patch == 9


def test_baselines_run_and_prnu_finds_a_fixed_pattern(photos):
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(3, 1, 128, 128, generator=g) * 0.03
    x = photos[:60].float() / 255
    y = torch.arange(60) % 3
    marked = ((x + patterns[y]).clamp(0, 1) * 255).round().to(torch.uint8)  # a sensor-like pattern per source
    tr, te = slice(0, 36), slice(36, 60)
    prnu = PRNU().fit(marked[tr], y[tr])
    assert (prnu.predict(marked[te]) == y[te]).double().mean() >= 0.9
    knn = PixelKNN().fit(marked[tr], y[tr])
    assert torch.equal(knn.predict(marked[tr]), y[tr])  # 1-NN of a training image is itself
    eig = Eigenface(components=10).fit(marked[tr], y[tr])
    assert eig.predict(marked[te]).shape == (24,)
    feats = torch.randn(60, 5, generator=g) + torch.nn.functional.one_hot(y, 5).double() * 4
    lr = LogisticRegression().fit(feats[tr], y[tr])
    assert (lr.predict(feats[te]) == y[te]).double().mean() >= 0.9


def test_fd_ratio_is_large_for_separated_sources_and_near_one_for_one_source():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    b = rng.normal(size=(200, 8)) + 3.0
    far = fd_ratio(np.concatenate([a, b]), np.array([0] * 200 + [1] * 200))
    same = fd_ratio(np.concatenate([a, rng.normal(size=(200, 8))]), np.array([0] * 200 + [1] * 200))
    assert far["ratio"] > 20 and same["ratio"] < 3


def test_read_image_refuses_conversions_unless_allowed(tmp_path, photos):
    from PIL import Image

    arr = photos[0].permute(1, 2, 0).numpy()
    ok = tmp_path / "ok.png"
    Image.fromarray(arr).save(ok)
    x, notes = read_image(ok)
    assert x.shape == (3, 128, 128) and notes == [] and torch.equal((x * 255).round().to(torch.uint8), photos[0])
    big = tmp_path / "big.png"
    Image.fromarray(arr).resize((200, 160)).save(big)
    with pytest.raises(InputError, match="not 128x128"):
        read_image(big)
    x, notes = read_image(big, resize=True)
    assert x.shape == (3, 128, 128) and "resized" in notes[0]
    grey = tmp_path / "grey.png"
    Image.fromarray(arr).convert("L").save(grey)
    with pytest.raises(InputError, match="greyscale"):
        read_image(grey)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    tp = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(tp)
    with pytest.raises(InputError, match="transparency"):
        read_image(tp)
    opaque = tmp_path / "opaque.png"
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(opaque)
    assert "opaque" in read_image(opaque)[1][0]
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(arr).convert("CMYK").save(cmyk)
    with pytest.raises(InputError, match="CMYK"):
        read_image(cmyk)


def _cli(argv, capsys):
    from faceprint.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_attributes_and_refuses_bad_input(trained, photos, tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.delenv("FACEPRINT_ATTRIBUTION_CLASSIFIER", raising=False)
    clf = tmp_path / "clf.safetensors"
    trained.error_rates_ = {"test_accuracy": 0.95, "n_test": 24, "coverage_known": 0.9, "accuracy_when_answered": 1.0,
                            "unseen": {"noise": {"k": 0, "n": 24, "rate": 0.0, "upper95": 0.117}}}
    trained.save(clf)
    arr = photos[60].permute(1, 2, 0).numpy()
    face = tmp_path / "face.png"
    Image.fromarray(arr).save(face)
    code, out, err = _cli(["attribute", str(face), "--classifier", str(clf)], capsys)
    assert code == 0, err
    assert "face.png:" in out and "accuracy 95.0 %" in out and "evidence, not proof" in out
    code, out, _ = _cli(["attribute", str(face), "--classifier", str(clf), "--json"], capsys)
    doc = json.loads(out)
    assert doc["answers"][0]["source"] in ("raw", "marked", "unknown") and doc["error_rates"]["n_test"] == 24

    code, _, err = _cli(["attribute", str(face)], capsys)  # no classifier anywhere
    packaged = __import__("faceprint.cli.attribute", fromlist=["PACKAGED"]).PACKAGED
    if not packaged.is_file():
        assert code == 2 and "--classifier" in err
    big = tmp_path / "big.png"
    Image.fromarray(arr).resize((256, 256)).save(big)
    code, _, err = _cli(["attribute", str(big), "--classifier", str(clf)], capsys)
    assert code == 2 and "big.png" in err and "256x256" in err and "--allow-resize" in err
    code, out, _ = _cli(["attribute", str(big), "--classifier", str(clf), "--allow-resize"], capsys)
    assert code == 0 and "note: resized from 256x256" in out
    tiny = tmp_path / "tiny.png"
    Image.fromarray(arr[:16, :16]).save(tiny)
    code, _, err = _cli(["attribute", str(tiny), "--classifier", str(clf)], capsys)
    assert code == 2 and "tiny.png" in err and "too small" in err
    grey = tmp_path / "grey.png"
    Image.fromarray(arr).convert("L").save(grey)
    code, _, err = _cli(["attribute", str(grey), "--classifier", str(clf)], capsys)
    assert code == 2 and "greyscale" in err and "--allow-convert" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, _, err = _cli(["attribute", str(broken), "--classifier", str(clf)], capsys)
    assert code == 2 and "broken.png" in err and "not a readable image" in err
    code, _, err = _cli(["attribute", str(tmp_path / "missing.png"), "--classifier", str(clf)], capsys)
    assert code == 2 and "missing.png" in err
    code, _, err = _cli(["attribute", str(face), "--classifier", str(tmp_path / "none.safetensors")], capsys)
    assert code == 2 and "none.safetensors" in err
    code, _, err = _cli(["attribute", str(face), "--classifier", str(clf), "--autoencoder-id", "taef2-ffffffffffffffff"],
                        capsys)
    assert code == 2 and "autoencoder" in err
    code, _, err = _cli(["attribute", "train", "a=photos:" + str(tmp_path)], capsys)
    assert code == 2 and "-o" in err


def test_real_sources_use_disjoint_photos_and_are_cached(celeba_dir, tmp_path):
    from faceprint.attribution.sources import SourceCache, SourceSpec

    spec = SourceSpec("real", "real-raw", first=100, spans=(6, 4))
    cache = SourceCache(tmp_path / "src", celeba_dir.parent.parent, autoencoder=None, seed=0)
    tr, cal, te = (cache.images(spec, s, n) for s, n in (("train", 6), ("cal", 4), ("test", 5)))
    flat = torch.cat([tr, cal, te]).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 15  # 15 different photos
    files = sorted((tmp_path / "src").rglob("*.safetensors"))
    assert len(files) == 3
    again = SourceCache(tmp_path / "src", celeba_dir.parent.parent, autoencoder=None, seed=0).images(spec, "test", 5)
    assert torch.equal(again, te)
    with pytest.raises(InputError, match="span"):
        cache.images(spec, "train", 7)
