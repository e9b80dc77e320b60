"""The latent GAN (papers/004, Ch. 2): losses against an independent computation, the attention
layers, training reproducibility and resume, the artifact, the CLI, and bad input."""

import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from faceprint.errors import ArtifactError, ConfigError, InputError
from faceprint.gan import losses as L
from faceprint.gan.attention import SLOPE, PatchAttention
from faceprint.gan.model import (GANConfig, LatentGAN, SmallDataWarning, TrainingDivergedError,
                                 TrainingDivergedWarning, fit_gan_generator)
from faceprint.gan.networks import LatentD

pytestmark = pytest.mark.usefixtures("one_thread")

#: a GAN small enough for a few iterations in well under a second
MICRO = GANConfig(z_dim=16, g_channels=(16, 16, 8), d_width=8, batch_size=8, iterations=6, checkpoint_every=3,
                  log_every=1, attn_patch=3, attn_groups=4, attn_hidden=16, r1_every=2)


def _latents(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, 16, 16, generator=g) * 2 + 0.5


def _fit(cfg, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)
        return LatentGAN(cfg).fit(x, **kw)


# ------------------------------------------------------------------------------------ losses
def _naive_contrastive(real, fake):
    """Eqs. 2.1-2.2 term by term in Python floats (the first, ratio form of each equation)."""
    lr = sum(math.log(math.exp(r) / (math.exp(r) + sum(math.exp(f) for f in fake))) for r in real) / len(real)
    lf = sum(math.log(math.exp(-f) / (math.exp(-f) + sum(math.exp(-r) for r in real))) for f in fake) / len(fake)
    return lr, lf


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_dual_contrastive_matches_a_naive_float64_computation(scale):
    g = torch.Generator().manual_seed(3)
    real = torch.randn(5, generator=g, dtype=torch.float64) * scale
    fake = torch.randn(7, generator=g, dtype=torch.float64) * scale - 0.3 * scale
    lr, lf = _naive_contrastive(real.tolist(), fake.tolist())
    tr, tf = L.contrastive_terms(real, fake)
    assert abs(float(tr) - lr) < 1e-10 and abs(float(tf) - lf) < 1e-10
    assert abs(float(L.contrastive_d(real, fake)) - (-(lr + lf))) < 1e-10
    # the generator's loss is D's with the roles of reals and fakes swapped; the minimax form is -D's
    sr, sf = _naive_contrastive(fake.tolist(), real.tolist())
    assert abs(float(L.contrastive_g(real, fake)) - (-(sr + sf))) < 1e-10
    assert abs(float(L.contrastive_g_minimax(real, fake)) - (lr + lf)) < 1e-10
    # the softmax cross-entropy form of lightweight-gan's dual_contrastive_loss (re-written here: the
    # package itself is not installed), each sample's own logit as class 0 of its row
    rows_r = torch.cat([real[:, None], fake[None].expand(len(real), -1)], 1)
    rows_f = torch.cat([-fake[:, None], -real[None].expand(len(fake), -1)], 1)
    ce = F.cross_entropy(rows_r, torch.zeros(len(real), dtype=torch.long)) + \
        F.cross_entropy(rows_f, torch.zeros(len(fake), dtype=torch.long))
    assert abs(float(ce) - float(L.contrastive_d(real, fake))) < 1e-10
    # float32 logits large enough to overflow exp() stay finite in the logsumexp form
    big = L.contrastive_d(real.float() * 100, fake.float() * 100)
    assert torch.isfinite(big)


def test_one_real_one_fake_reduces_to_the_logistic_loss():
    for r, f in ((0.3, -1.2), (2.0, 2.5), (-4.0, 3.0)):
        real, fake = torch.tensor([r], dtype=torch.float64), torch.tensor([f], dtype=torch.float64)
        sp = float(F.softplus(torch.tensor(f - r, dtype=torch.float64)))
        tr, tf = L.contrastive_terms(real, fake)
        assert abs(float(tr) + sp) < 1e-12 and abs(float(tf) + sp) < 1e-12
        assert abs(float(L.ns_d(real, fake)) - (float(F.softplus(torch.tensor(-r))) + float(F.softplus(torch.tensor(f))))) < 1e-6


def test_gradient_signs_d_ascends_g_descends():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(6, generator=g).requires_grad_(True)
    fake = torch.randn(6, generator=g).requires_grad_(True)
    for d_loss, g_loss in ((L.contrastive_d, L.contrastive_g), (L.ns_d, L.ns_g), (L.hinge_d, L.hinge_g)):
        gr, gf = torch.autograd.grad(d_loss(real * 0.1, fake * 0.1), (real, fake))
        assert (gr < 0).all() and (gf > 0).all(), d_loss.__name__  # D: raise D(real), lower D(fake)
        (gg,) = torch.autograd.grad(g_loss(real.detach(), fake * 0.1), (fake,))
        assert (gg < 0).all(), g_loss.__name__  # G: raise D(G(z))


def test_contrastive_refuses_batches_of_one():
    one, two = torch.zeros(1), torch.zeros(2)
    with pytest.raises(InputError, match="at least 2"):
        L.contrastive_d(one, two)
    with pytest.raises(InputError, match="at least 2"):
        L.contrastive_g(two, one)
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        GANConfig(loss="contrastive", batch_size=1)


# ------------------------------------------------------------------------------------ attention
def _naive_attention(attn, primary, reference):
    """Eqs. 2.4-2.8 position by position in float64: K, Q from ``reference``; V, residual from ``primary``."""
    a = attn.double()
    p, r = primary.double(), reference.double()
    K = F.leaky_relu(a.key(r), SLOPE)[0]
    Q = F.leaky_relu(a.query(r), SLOPE)[0]
    V = F.leaky_relu(a.value(p), SLOPE)[0]
    C, H, W = V.shape
    s, half, G = a.patch, a.patch // 2, a.groups
    Kp, Vp = F.pad(K, (half,) * 4), F.pad(V, (half,) * 4)
    out = torch.zeros(C, H, W, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            k = Kp[:, i:i + s, j:j + s].reshape(-1)
            w = a.fc2(F.leaky_relu(a.fc1(torch.cat([k, Q[:, i, j]])), SLOPE)).view(G, s, s)
            for c in range(C):
                for m in range(s):
                    for n in range(s):
                        y, x = i + m - half, j + n - half
                        if 0 <= y < H and 0 <= x < W:
                            out[c, i, j] += w[c // (C // G), m, n] * Vp[c, i + m, j + n]
    attn.float()
    return out + p[0]


def test_attention_shapes_and_parameter_budget():
    attn = PatchAttention(128, patch=5, reduction=8, groups=8, hidden=64)
    x = torch.randn(2, 128, 8, 8)
    assert attn(x).shape == x.shape
    assert attn.weights(x).shape == (2, 64, 8, 25)
    mlp = sum(p.numel() for p in (*attn.fc1.parameters(), *attn.fc2.parameters()))
    assert mlp == (25 * 16 + 16) * 64 + 64 + 64 * 25 * 8 + 25 * 8 < 100_000
    assert mlp < 128 * 128 * 9  # cheaper than the 3x3 convolution it replaces
    with pytest.raises(ConfigError, match="odd"):
        PatchAttention(16, patch=4)
    with pytest.raises(InputError):
        attn(torch.randn(2, 64, 8, 8))


def test_attention_is_local_and_masks_outside_the_grid():
    torch.manual_seed(0)
    attn = PatchAttention(8, patch=3, reduction=2, groups=2, hidden=8)
    x = torch.randn(1, 8, 6, 6)
    y = x.clone()
    y[0, :, 0, 0] += 5.0
    d = (attn(y) - attn(x)).abs().sum(1)[0]  # (6, 6)
    assert d[0, 0] > 0 and d[1, 1] > 0  # inside the 3x3 patch around (0, 0)
    assert d[2:, :].max() == 0 and d[:, 2:].max() == 0  # further away: untouched
    w = attn.weights(x)  # (1, 36, groups, 9): the patch of the corner (0, 0) has 5 positions outside
    outside = torch.tensor([0, 1, 2, 3, 6])
    assert w[0, 0][:, outside].abs().max() == 0 and w[0, 0][:, [4, 5, 7, 8]].abs().min() > 0


def test_reference_attention_takes_k_q_from_the_reference_and_v_residual_from_the_primary():
    torch.manual_seed(1)
    attn = PatchAttention(8, patch=3, reduction=2, groups=4, hidden=8)
    with torch.no_grad():
        attn.fc2.weight.mul_(10)  # make the attention term large against the residual
        pri, ref = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
        out = attn(pri, ref).double()
        assert torch.allclose(out, _naive_attention(attn, pri, ref), atol=1e-5)
        swapped = attn(ref, pri).double()
        assert torch.allclose(swapped, _naive_attention(attn, ref, pri), atol=1e-5)
        assert not torch.allclose(out, swapped, atol=1e-2)
        assert torch.allclose(attn(pri).double(), _naive_attention(attn, pri, pri), atol=1e-5)  # self-attention
    D = LatentD(32, 8, {"patch": 3, "reduction": 8, "groups": 4, "hidden": 8})
    lat = torch.randn(3, 32, 16, 16)
    assert D(lat, lat.flip(0)).shape == (3,)
    assert not torch.equal(D(lat, lat), D(lat, lat.flip(0)))  # the reference changes the verdict
    with pytest.raises(ValueError, match="reference"):
        D(lat)


# ------------------------------------------------------------------------------------ training
def test_training_is_reproducible_and_resume_equals_uninterrupted(tmp_path):
    x = _latents()
    cfg = replace(MICRO, loss="contrastive", warmup_fraction=0.5, g_attention=True, d_reference_attention=True)
    a = _fit(cfg, x, seed=5, checkpoint=tmp_path / "a.safetensors")
    b1 = _fit(cfg, x, seed=5, until=3, checkpoint=tmp_path / "b.safetensors")
    assert b1.provenance_["iterations"] == 3
    b = _fit(cfg, x, seed=5, checkpoint=tmp_path / "b.safetensors", resume=True)
    assert b.provenance_["resumed_from"] == 3 and b.provenance_["iterations"] == 6
    assert [h["loss"] for h in a.history_] == ["ns"] * 3 + ["contrastive"] * 3
    assert a.history_ == b.history_
    from safetensors.torch import load_file

    ta, tb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert ta.keys() == tb.keys() and any(k.startswith("opt_d.state.") for k in ta)
    for k in ta:  # G, D, EMA and both optimizers bit-identical
        assert torch.equal(ta[k], tb[k]), k
    other = _fit(cfg, x, seed=6)
    assert not torch.equal(other.sample_latents(2, seed=0).latents, a.sample_latents(2, seed=0).latents)
    with pytest.raises(InputError, match="another config"):
        _fit(replace(cfg, lr_g=5e-4), x, seed=5, checkpoint=tmp_path / "b.safetensors", resume=True)
    with pytest.raises(InputError, match="another seed"):
        _fit(cfg, x, seed=7, checkpoint=tmp_path / "b.safetensors", resume=True)
    with pytest.raises(InputError, match="checkpoint="):
        _fit(cfg, x, seed=5, resume=True)


def test_diffaugment_policies_move_and_mask_the_grid_differentiably():
    from faceprint.gan.augment import augment, parse_policy

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16) + 1  # no zeros
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert augment(x, (), g(0)) is x
    # flip: every sample is itself or its mirror image
    f = augment(x, ("flip",), g(1))
    assert all(torch.equal(f[b], x[b]) or torch.equal(f[b], x[b].flip(2)) for b in range(2))
    # translation: a shift by at most 2 cells, zeros where the grid came from outside
    for seed in range(6):
        t = augment(x, ("translation",), g(seed))
        for b in range(2):
            hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                    if torch.equal(t[b], torch.roll(x[b], (dy, dx), (1, 2)) * _inside(dy, dx))]
            assert len(hits) == 1
    # cutout: one 8 x 8 square of zeros, the rest untouched
    c = augment(x, ("cutout",), g(2))
    for b in range(2):
        zero = c[b, 0] == 0
        assert int(zero.sum()) == 64 and torch.equal(c[b][:, ~zero], x[b][:, ~zero])
    # differentiable: the gradient reaches every input cell that is still shown
    xr = x.clone().requires_grad_(True)
    augment(xr, parse_policy("flip,translation,cutout"), g(3)).sum().backward()
    assert set(xr.grad.unique().tolist()) <= {0.0, 1.0} and float(xr.grad.sum()) > 0.5 * x[0].numel()
    with pytest.raises(ValueError, match="unknown augmentation blur"):
        parse_policy("flip,blur")
    with pytest.raises(ConfigError, match="augment"):
        GANConfig(augment="zoom")


def _inside(dy, dx):
    """(16, 16) mask of the cells a shift by (dy, dx) fills from inside the grid."""
    ys, xs = torch.arange(16).view(16, 1), torch.arange(16).view(1, 16)
    return (((ys - dy) >= 0) & ((ys - dy) < 16) & ((xs - dx) >= 0) & ((xs - dx) < 16)).float()


def test_augmented_training_is_reproducible_and_differs_from_plain(tmp_path):
    x = _latents()
    cfg = replace(MICRO, augment="flip,translation,cutout")
    a = _fit(cfg, x, seed=5)
    b = _fit(cfg, x, seed=5)
    plain = _fit(MICRO, x, seed=5)
    assert torch.equal(a.sample_latents(3, seed=1).latents, b.sample_latents(3, seed=1).latents)
    assert not torch.equal(a.sample_latents(3, seed=1).latents, plain.sample_latents(3, seed=1).latents)
    path = tmp_path / "aug.safetensors"
    a.save(path)
    assert LatentGAN.load(path).config.augment == "flip,translation,cutout"


def test_a_time_budget_plans_the_iterations_from_the_measured_speed(monkeypatch):
    import types

    import faceprint.gan.model as model

    # a clock that advances 0.05 s each time it is read: the plan depends on the measured speed
    # only, not on how busy the machine running the test is
    ticks = {"t": 0.0}

    def clock():
        ticks["t"] += 0.05
        return ticks["t"]

    monkeypatch.setattr(model, "time", types.SimpleNamespace(perf_counter=clock))
    m = _fit(replace(MICRO, iterations=10**6, checkpoint_every=10**6), _latents(), seed=0, max_seconds=3.0)
    pv = m.provenance_
    per = 0.05 * (1 + 1 / 10)  # the readings per iteration seen by the calibration (10 iterations)
    assert 10 < pv["planned_iterations"] < 10**6  # planned from the speed, not the config's 10**6
    assert abs(pv["planned_iterations"] - (10 + 0.97 * (3.0 - 10 * per) / per)) <= 6
    assert pv["iterations"] <= pv["planned_iterations"] and pv["train_seconds"] <= 3.0 + 0.2


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import faceprint.gan.model as model

    calls = {"n": 0}

    def g_nan_at_five(real, fake):
        calls["n"] += 1
        out = L.ns_g(real, fake)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(model, "losses_for", lambda name: (L.ns_d, g_nan_at_five))
    x = _latents()
    cfg = replace(MICRO, checkpoint_every=2)
    with pytest.warns(TrainingDivergedWarning, match="iteration 5"):
        m = _fit(cfg, x, seed=0, checkpoint=tmp_path / "c.safetensors")
    assert m.provenance_["stopped"]["reason"] == "diverged" and m.provenance_["iterations"] == 4
    assert torch.isfinite(m.sample_latents(2, seed=0).latents).all()
    calls["n"] = 0
    with pytest.raises(TrainingDivergedError, match="before the first checkpoint"):
        _fit(replace(MICRO, checkpoint_every=5), x, seed=0)


def test_bad_input_is_refused_with_the_shape_and_what_to_do():
    with pytest.raises(InputError, match=r"built for \(32, 16, 16\).*--size 128"):
        _fit(MICRO, torch.randn(24, 32, 32, 32), seed=0)
    with pytest.raises(InputError, match="fewer than the batch size 8"):
        _fit(MICRO, _latents(5), seed=0)
    with pytest.warns(SmallDataWarning, match="fewer than 500"):
        LatentGAN(replace(MICRO, iterations=1)).fit(_latents(8), seed=0)
    with pytest.raises(InputError, match="NaN"):
        bad = _latents()
        bad[0, 0, 0, 0] = float("nan")
        _fit(MICRO, bad, seed=0)
    with pytest.raises(ConfigError, match="attn_patch"):
        GANConfig(attn_patch=4)
    with pytest.raises(ConfigError, match="loss"):
        GANConfig(loss="wasserstein")


def test_sampling_is_per_image_and_the_artifact_round_trips(tmp_path):
    m = _fit(replace(MICRO, g_attention=True), _latents(), seed=1)
    full = m.sample_latents(40, seed=3).latents
    part = m.sample_latents(5, seed=3, start=17).latents
    assert torch.equal(full[17:22], part) and full.shape == (40, 32, 16, 16)
    m.save(tmp_path / "g.safetensors")
    back = LatentGAN.load(tmp_path / "g.safetensors")
    assert torch.equal(back.sample_latents(40, seed=3).latents, full)
    assert back.config == m.config and back.history_ == m.history_
    # damaged weights are refused at load, with the file's name
    from faceprint.io import load_artifact, save_artifact

    t, meta = load_artifact(tmp_path / "g.safetensors")
    t["gan.std"] = -t["gan.std"]
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "faceprint_version")}
    save_artifact(tmp_path / "bad.safetensors", t, meta)
    with pytest.raises(ArtifactError, match="bad.safetensors"):
        LatentGAN.load(tmp_path / "bad.safetensors")


def test_noise_inputs_are_learned_drawn_per_image_and_absent_in_old_artifacts(tmp_path):
    x = _latents()
    m = _fit(replace(MICRO, iterations=4), x, seed=2)
    strengths = torch.cat([p.detach() for p in m.G_.noise_strength])
    assert m.G_.n_noise == 4 and strengths.abs().sum() > 0  # started at zero, moved by training
    z = torch.randn(3, MICRO.z_dim, generator=torch.Generator().manual_seed(0))
    n1, n2 = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.equal(m.G_(z, n1), m.G_(z, n2))  # the noise reaches the output
        assert torch.equal(m.G_(z, n1), m.G_(z, n1.clone()))
        with pytest.raises(ValueError, match="noise must have shape"):
            m.G_(z, n1[:, :2])
    # image i's noise comes from its own generator: the same face alone or in a batch
    assert torch.equal(m.sample_latents(20, seed=4).latents[18:20], m.sample_latents(2, seed=4, start=18).latents)
    # an artifact written before the switch existed (no "noise" in its config) loads without noise
    off = _fit(replace(MICRO, iterations=2, noise=False), x, seed=2)
    off.save(tmp_path / "old.safetensors")
    from faceprint.io import load_artifact, save_artifact

    t, meta = load_artifact(tmp_path / "old.safetensors")
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "faceprint_version")}
    del meta["config"]["noise"]
    save_artifact(tmp_path / "old2.safetensors", t, meta)
    old = LatentGAN.load(tmp_path / "old2.safetensors")
    assert old.config.noise is False and old.G_.n_noise == 0
    assert torch.equal(old.sample_latents(3, seed=0).latents, off.sample_latents(3, seed=0).latents)


def test_gan_inside_a_generator_artifact(tmp_path):
    from faceprint.latent.generator import DEFAULT_GUARD, Generator, GeneratorConfig

    x = _latents(32)
    with pytest.warns(SmallDataWarning):
        gen = fit_gan_generator(x, None, config=MICRO, generator_config=GeneratorConfig(components=1), seed=2)
    assert gen.default_method == "gan"
    smp = gen.sample_latents(6, seed=4)
    assert torch.equal(smp.latents, gen.latent_model_.sample_latents(6, seed=4).latents)
    assert (smp.provenance == -1).all()
    gen.save(tmp_path / "m.safetensors")
    back = Generator.load(tmp_path / "m.safetensors", autoencoder=None)
    assert back.default_method == "gan"
    assert torch.equal(back.sample_latents(6, seed=4).latents, smp.latents)
    assert back.sample_latents(2, seed=4, method="lrgmm").latents.shape == (2, 32, 16, 16)  # LR-GMM kept beside
    # the copy guard's distance rule applies to GAN faces (they have no provenance for its share rule)
    thr = back.guard_threshold(DEFAULT_GUARD.quantile)
    none = torch.full((6, 16, 16), -1)
    assert back._copies(x[:6], none, thr, DEFAULT_GUARD).all()  # a training latent is refused
    assert not back._copies(x[:6] + 3 * torch.randn(6, 32, 16, 16), none, thr, DEFAULT_GUARD).any()
    plain = Generator(GeneratorConfig(components=1)).fit(type("S", (), {"latents": x})(), seed=0)
    with pytest.raises(InputError, match="--method gan"):
        plain.sample_latents(1, seed=0, method="gan")


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cli_train_generate_inspect_evaluate_fingerprint(tmp_path, celeba_dir, capsys, two_threads):
    from faceprint.cli.main import main

    photos = sorted(celeba_dir.iterdir())
    train, real = tmp_path / "train", tmp_path / "real"
    train.mkdir()
    real.mkdir()
    for p in photos[:16]:  # few photos: evaluate takes Inception features of each
        (train / p.name).symlink_to(p)
    for p in photos[300:308]:
        (real / p.name).symlink_to(p)
    model = tmp_path / "gan.safetensors"
    code = main(["train-gan", str(train), "-o", str(model), "--preset", "tiny", "--iterations", "4",
                 "--batch-size", "8", "--loss", "contrastive", "--g-attention", "--d-reference-attention",
                 "--components", "1", "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "fewer than 500" in err and "4 iterations (warm-up 1)" in err
    assert not (tmp_path / "gan.ckpt.safetensors").exists()  # the default checkpoint goes after a finished run
    faces = tmp_path / "faces"
    # 4 iterations make faces near the mean face, which the copy guard's distance rule refuses
    assert main(["generate", str(model), "-n", "3", "-o", str(faces), "--seed", "2", "-q", "--no-copy-guard"]) == 0
    assert sorted(p.name for p in faces.iterdir()) == ["face_000000.png", "face_000001.png", "face_000002.png"]
    capsys.readouterr()
    code = main(["generate", str(model), "-n", "3", "-o", str(tmp_path / "f2"), "--provenance", "-q"])
    _, err = capsys.readouterr()
    assert code == 2 and "no provenance map" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f2").exists()
    assert main(["inspect", str(model), "--json"]) == 0
    doc = json.loads(capsys.readouterr()[0])
    assert doc["latent_model"]["config"]["loss"] == "contrastive" and "gan.g.fc.weight" in doc["tensors"]
    # evaluate's path on a GAN model (the CLI's `evaluate` is evaluate_generator; a cheap stand-in for
    # Inception keeps this test fast: the metric code itself is tested in test_metrics/test_cli_evaluate)
    from faceprint.latent.generator import Generator
    from faceprint.metrics.evaluate import evaluate_generator

    class PooledPixels:
        id = "test-pooled-pixels"

        def features(self, images):
            return F.adaptive_avg_pool2d(images.float(), 4).flatten(1).double().numpy()

    gen = Generator.load(model)
    ev = evaluate_generator(gen, real, n=8, batch=8, inception=PooledPixels())
    assert ev.n_generated == 8 and ev.n_real == 8 and ev.fid > 0 and not ev.provenance
    assert ev.settings["method"] == "gan"  # what was sampled, not the LR-GMM config's method
    inst = tmp_path / "alice.safetensors"
    code = main(["fingerprint", "issue", str(model), "--to", "Alice", "-o", str(inst), "--seed", "3",
                 "--owner", str(tmp_path / "owner")])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "model-level" in err
    assert main(["inspect", str(inst), "--json"]) == 0
    doc = json.loads(capsys.readouterr()[0])
    assert doc["fingerprint"]["recipient"] == "Alice" and any(k.startswith("decoder.") for k in doc["tensors"])
    assert doc["latent_model"] is not None
    ops = doc["provenance"]["operations"]
    assert ops[-1]["mechanism"] == "model-level-decoder"
    # the instance's faces differ from the base model's (its decoder carries the code) but not its latents
    assert main(["generate", str(inst), "-n", "3", "-o", str(tmp_path / "inst"), "--seed", "2", "-q",
                 "--no-copy-guard"]) == 0
    from PIL import Image
    import numpy as np

    a = np.asarray(Image.open(faces / "face_000000.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "inst" / "face_000000.png"), dtype=np.int16)
    assert 0 < np.abs(a - b).mean() < 10
