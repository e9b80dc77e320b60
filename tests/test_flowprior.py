"""The normalizing-flow latent prior: fit, sampling, persistence, forgetting (papers/002), errors."""

import math

import pytest
import torch

from faceprint import __version__
from faceprint.errors import ArtifactError, ConfigError, InputError, NotFittedError
from faceprint.io import save_artifact
from faceprint.latent.flowprior import FlowPrior, FlowPriorConfig, _global_pca
from faceprint.latent.projector import PCAProjector, ProjectorConfig
from faceprint.latent.refine import gather

# tiny settings: 96 real photos, D = 16, a small MAF; the whole module runs in a few seconds
SMALL = dict(dims=16, transforms=2, hidden=(32, 32), batch_size=32, lr=3e-3, val_fraction=0.15,
             max_epochs=60, patience=15)
N_TRAIN = 72


@pytest.fixture(scope="module")
def lat(celeba_latents):
    return celeba_latents.latents  # (96, 32, 16, 16)


@pytest.fixture(scope="module")
def prior(lat):
    return FlowPrior(FlowPriorConfig(**SMALL)).fit(lat[:N_TRAIN], seed=0)


def test_fit_beats_untrained_flow_on_held_out_photos(prior, lat):
    held = lat[N_TRAIN:]
    untrained = FlowPrior(FlowPriorConfig(**{**SMALL, "max_epochs": 0})).fit(lat[:N_TRAIN], seed=0)
    assert torch.equal(untrained.components_, prior.components_)  # same PCA: only the flow differs
    trained_lp = prior.log_prob(held).mean().item()
    untrained_lp = untrained.log_prob(held).mean().item()
    assert trained_lp > untrained_lp + 1.0
    # and above the Gaussian on the same PCA coordinates (a standard normal in whitened u)
    u = prior.reduce(held)
    gauss_lp = (-0.5 * (u.pow(2).sum(1) + u.shape[1] * math.log(2 * math.pi))).mean().item()
    assert trained_lp > gauss_lp + 0.5
    hist = prior.history_
    assert hist[0]["epoch"] == 0 and prior.provenance_["val_log_prob"] > hist[0]["val_log_prob"]
    pv = prior.provenance_
    assert pv["n_train"] + pv["n_val"] == N_TRAIN and pv["fit_seconds"]["total"] > 0
    assert pv["faceprint_version"] == __version__ and pv["operations"] == []


def test_exact_density_prefers_real_latents_over_shuffled_ones(prior, lat):
    held = lat[N_TRAIN:]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(16 * 16, generator=g)
    shuffled = held.reshape(held.shape[0], 32, -1)[:, :, perm].reshape(held.shape)  # pixels moved
    real = prior.log_prob(held, space="latent")
    fake = prior.log_prob(shuffled, space="latent")
    assert real.mean() > fake.mean() + 1000
    full = PCAProjector(ProjectorConfig(32)).fit(lat[:N_TRAIN])
    proj = prior.log_prob(held, space="projected", projector=full)
    # log p(P0 x) = log p(x) - log|det P0| (per pixel: P0 = diag(s)^-1/2 V, V orthonormal)
    jac = 0.5 * 256 * full.variances_.double().log().sum()
    assert torch.allclose(proj.double(), real.double() + jac, rtol=1e-5)


def test_global_pca_is_orthonormal_and_whitening(prior, lat):
    W = prior.components_
    assert torch.allclose(W @ W.T, torch.eye(W.shape[0]), atol=1e-4)
    assert (prior.variances_[:-1] >= prior.variances_[1:]).all()
    # both code paths (n >= d: covariance; n < d: Gram matrix) match an SVD of the centred data
    g = torch.Generator().manual_seed(1)
    X = (torch.randn(60, 5, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])).double()
    for data in (X, X[:4]):
        mean, V, var, resid, explained = _global_pca(data, 2)
        Xc = data - data.mean(0)
        _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
        assert torch.allclose((V.double() @ Vh[:2].T).abs(), torch.eye(2, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(var.double(), S[:2] ** 2 / (data.shape[0] - 1), rtol=1e-4)
        assert math.isclose(resid, float((S[2:] ** 2).sum()) / (data.shape[0] - 1) / 3, rel_tol=1e-4)
        assert 0 < explained <= 1
    u = prior.reduce(lat[:N_TRAIN])
    assert u.shape == (N_TRAIN, 16)


def test_samples_reproducible_and_independent_of_batch_size(prior):
    batch = prior.sample_latents(20, seed=7)
    assert batch.latents.shape == (20, 32, 16, 16) and batch.latents.dtype == torch.float32
    assert torch.isfinite(batch.latents).all() and (batch.provenance == -1).all()
    for i in (0, 5, 17):
        one = prior.sample_latents(1, seed=7, start=i)
        assert torch.equal(one.latents[0], batch.latents[i])
    assert torch.equal(prior.sample_latents(5, seed=7, start=15).latents, batch.latents[15:])
    assert torch.equal(prior.sample_latents(20, seed=7).latents, batch.latents)
    assert not torch.equal(prior.sample_latents(4, seed=8).latents, batch.latents[:4])
    assert prior.sample_latents(0, seed=7).latents.shape == (0, 32, 16, 16)


def test_refined_samples_copy_bank_pixels_reproducibly(prior, lat):
    bank = lat[:N_TRAIN]
    s = prior.sample_latents(6, seed=3, refine_bank=bank)
    assert s.provenance.shape == (6, 16, 16) and (s.provenance >= 0).all() and (s.provenance < N_TRAIN).all()
    assert torch.equal(s.latents, gather(bank, s.provenance).float())
    one = prior.sample_latents(1, seed=3, start=4, refine_bank=bank)
    assert torch.equal(one.latents[0], s.latents[4]) and torch.equal(one.provenance[0], s.provenance[4])


def test_refinement_restricted_to_nearest_bank_photos(lat):
    p = FlowPrior(FlowPriorConfig(**{**SMALL, "max_epochs": 3, "refine_neighbours": 8})).fit(lat[:N_TRAIN], seed=0)
    bank = lat[:N_TRAIN]
    s = p.sample_latents(4, seed=5, refine_bank=bank)
    raw = p.sample_latents(4, seed=5).latents
    pb = p.projector_.transform(bank).flatten(1)
    near = torch.cdist(p.projector_.transform(raw).flatten(1), pb).topk(8, largest=False).indices
    for i in range(4):
        assert set(s.provenance[i].unique().tolist()) <= set(near[i].tolist())
    one = p.sample_latents(1, seed=5, start=2, refine_bank=bank)
    assert torch.equal(one.provenance[0], s.provenance[2])


def test_global_rng_is_left_alone(lat):
    state = torch.get_rng_state()
    p = FlowPrior(FlowPriorConfig(**{**SMALL, "max_epochs": 2})).fit(lat[:N_TRAIN], seed=0)
    p.sample_latents(3, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    again = FlowPrior(FlowPriorConfig(**{**SMALL, "max_epochs": 2})).fit(lat[:N_TRAIN], seed=0)
    assert torch.equal(again.log_prob(lat[N_TRAIN:]), p.log_prob(lat[N_TRAIN:]))  # same seed, same model


def test_save_load_identical_samples_and_log_prob(prior, lat, tmp_path):
    path = tmp_path / "flow.safetensors"
    prior.save(path)
    back = FlowPrior.load(path)
    assert back.config == prior.config and back.provenance_ == prior.provenance_
    for space in ("reduced", "latent"):
        assert torch.equal(back.log_prob(lat, space=space), prior.log_prob(lat, space=space))
    assert torch.equal(back.sample_latents(5, seed=2).latents, prior.sample_latents(5, seed=2).latents)
    a = back.sample_latents(3, seed=2, refine_bank=lat)
    b = prior.sample_latents(3, seed=2, refine_bank=lat)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.provenance, b.provenance)


def test_forget_lowers_forgotten_log_p_and_keeps_the_rest(prior, lat, tmp_path):
    train = lat[:N_TRAIN]
    gone, kept = train[:8], train[8:]
    before_all = prior.log_prob(lat)
    new, rep = prior.forget(gone, retain_latents=kept, steps=200, seed=0, lr=1e-3,
                            evaluate={"never seen": lat[N_TRAIN:]}, name="8 photos")
    assert torch.equal(prior.log_prob(lat), before_all)  # the original prior is unchanged
    f = rep.groups["forgotten"]
    drop = f["mean_before"] - f["mean_after"]
    assert drop > 5.0
    assert abs(rep.retained_mean_change) < 0.25 * drop
    assert rep.converged and rep.forgotten_below_target_after == 1.0 and rep.steps_run <= 200
    assert (new.log_prob(gone) < rep.target).all()
    assert set(rep.groups) == {"forgotten", "retained", "never seen"} and rep.seconds > 0 and rep.time_ratio > 0
    assert "forgotten" in rep.table()
    op = new.provenance_["operations"][-1]
    assert op["operation"] == "forget" and op["faceprint_version"] == __version__ and op["when"]
    assert op["n_forgotten"] == 8 and op["name"] == "8 photos"
    path = tmp_path / "forgot.safetensors"
    new.save(path)
    back = FlowPrior.load(path)
    assert back.provenance_["operations"][-1]["operation"] == "forget"
    assert torch.equal(back.log_prob(gone), new.log_prob(gone))


def test_config_errors():
    for bad in (dict(dims=0), dict(dims=1.5), dict(flow="realnvp"), dict(hidden=()), dict(hidden=[64]),
                dict(val_fraction=0.6), dict(lr=0), dict(transforms=0), dict(passes=0), dict(noise=-1),
                dict(channels=0), dict(patience=0), dict(max_epochs=-1), dict(refine_neighbours=0)):
        with pytest.raises(ConfigError):
            FlowPriorConfig(**bad)


def test_input_errors(prior, lat, tmp_path):
    with pytest.raises(NotFittedError):
        FlowPrior().sample_latents(1, seed=0)
    with pytest.raises(NotFittedError):
        FlowPrior().log_prob(lat[:2])
    with pytest.raises(ConfigError, match="dims"):
        FlowPrior(FlowPriorConfig(**{**SMALL, "dims": 64})).fit(lat[:40], seed=0)
    nan = lat[:N_TRAIN].clone()
    nan[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        FlowPrior(FlowPriorConfig(**SMALL)).fit(nan, seed=0)
    with pytest.raises(InputError):
        FlowPrior(FlowPriorConfig(**SMALL)).fit(lat[0], seed=0)
    with pytest.raises(InputError):
        FlowPrior(FlowPriorConfig(**SMALL)).fit(lat[:N_TRAIN], seed=-1)
    with pytest.raises(InputError, match="shape"):
        prior.log_prob(lat[:, :16])
    with pytest.raises(InputError, match="space"):
        prior.log_prob(lat[:2], space="pixels")
    with pytest.raises(InputError):
        prior.sample_latents(-1, seed=0)
    with pytest.raises(InputError):
        prior.sample_latents(2, seed=0, temperature=0)
    with pytest.raises(InputError):
        prior.sample_latents(2, seed=0, refine_bank=lat[:, :, :8])
    with pytest.raises(InputError, match="steps"):
        prior.forget(lat[:4], retain_latents=lat[4:N_TRAIN], steps=0)
    with pytest.raises(InputError, match="quantile"):
        prior.forget(lat[:4], retain_latents=lat[4:N_TRAIN], quantile=2)
    with pytest.raises(InputError, match="projected"):
        prior.log_prob(lat[:2], space="projected")  # its own P0 keeps 8 of 32 channels
    q32 = FlowPrior(FlowPriorConfig(**{**SMALL, "channels": 32, "max_epochs": 1})).fit(lat[:N_TRAIN], seed=0)
    assert torch.isfinite(q32.log_prob(lat[:2], space="projected")).all()


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        FlowPrior.load(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_artifact(other, {"x": torch.zeros(2)}, {"class": "faceprint.Generator"})
    with pytest.raises(ArtifactError, match="FlowPrior"):
        FlowPrior.load(other)
    broken = tmp_path / "broken.safetensors"
    save_artifact(broken, {"x": torch.zeros(2)}, {"class": "faceprint.FlowPrior", "config": {"dims": 8}})
    with pytest.raises(ArtifactError, match="incomplete"):
        FlowPrior.load(broken)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ArtifactError):
        FlowPrior.load(trunc)
