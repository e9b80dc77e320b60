"""The composed generator: reproducibility, provenance, persistence, ablation methods."""

from types import SimpleNamespace

import pytest
import torch

from faceprint.errors import ArtifactError, ConfigError, InputError, NotFittedError
from faceprint.latent.generator import METHODS, Generator, GeneratorConfig, auto_components
from faceprint.latent.refine import gather


def _synthetic_set(N=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, 32 * 8 * 8, generator=g)
    coef = torch.randn(N, 6, generator=g) * torch.linspace(3, 0.5, 6)
    lat = (coef @ basis).reshape(N, 32, 8, 8) + 0.1 * torch.randn(N, 32, 8, 8, generator=g)
    return SimpleNamespace(latents=lat, relpaths=[f"p{i:03d}.png" for i in range(N)],
                           hashes=[f"{i:064x}" for i in range(N)], data_hash="abc", image_size=64, root="/x")


@pytest.fixture(scope="module")
def fitted():
    return Generator(GeneratorConfig(components=3, channels=8, rank_temperature=0.5)).fit(_synthetic_set(), seed=1)


def test_auto_components_matches_paper_settings():
    assert auto_components(32) == 1 and auto_components(1024) == 8 and auto_components(28000) == 64


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_latent_at_batch_1_and_64(fitted, method):
    batch = fitted.sample_latents(64, seed=7, method=method)
    for i in (0, 31, 63):
        one = fitted.sample_latents(1, seed=7, start=i, method=method)
        assert torch.equal(one.latents[0], batch.latents[i])
        assert torch.equal(one.provenance[0], batch.provenance[i])
    other = fitted.sample_latents(4, seed=8, method=method)
    assert not torch.equal(other.latents, batch.latents[:4])


def test_provenance_points_at_the_copied_training_pixels(fitted):
    s = fitted.sample_latents(32, seed=3)
    assert (s.provenance >= 0).all() and (s.provenance < fitted.n_photos).all()
    # every latent pixel is exactly the training photo's pixel named by the map ...
    assert torch.equal(s.latents, gather(fitted.bank_, s.provenance).float())
    # ... and that photo belongs to the sample's mixture component (Eq. 5)
    labels = fitted.mixture_.labels_
    assert torch.equal(labels[s.provenance], s.components[:, None, None].expand_as(s.provenance))
    summary = fitted.provenance_summary(s.provenance)
    assert all(1 <= f["distinct_photos"] <= 64 and 0 < f["max_share"] <= 1 for f in summary)


def test_methods_without_copy_have_no_provenance(fitted):
    for method in ("lrgmm", "gaussian"):
        s = fitted.sample_latents(3, seed=0, method=method)
        assert (s.provenance == -1).all()
        assert s.latents.shape == (3, 32, 8, 8)


def test_save_load_identical(fitted, tmp_path):
    path = tmp_path / "m.safetensors"
    fitted.save(path)
    loaded = Generator.load(path, autoencoder=None)
    for method in METHODS:
        a = fitted.sample_latents(16, seed=2, method=method)
        b = loaded.sample_latents(16, seed=2, method=method)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.provenance, b.provenance)
    assert loaded.training_.relpaths == fitted.training_.relpaths
    assert loaded.config == fitted.config


def test_corrupted_and_foreign_artifacts(tmp_path, fitted):
    path = tmp_path / "m.safetensors"
    fitted.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="trunc.safetensors"):
        Generator.load(tmp_path / "trunc.safetensors", autoencoder=None)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ArtifactError):
        Generator.load(tmp_path / "text.safetensors", autoencoder=None)
    with pytest.raises(ArtifactError, match="does not exist"):
        Generator.load(tmp_path / "missing.safetensors", autoencoder=None)


def test_errors(fitted):
    with pytest.raises(NotFittedError):
        Generator().sample_latents(1, seed=0)
    with pytest.raises(ConfigError, match="exceeds the number of photos"):
        Generator(GeneratorConfig(components=100)).fit(_synthetic_set(N=20))
    with pytest.raises(ConfigError):
        GeneratorConfig(copy="half")
    with pytest.raises(InputError, match="method"):
        fitted.sample_latents(1, seed=0, method="diffusion")
    with pytest.raises(InputError, match="seed"):
        fitted.sample_latents(1, seed=-1)
    with pytest.raises(InputError, match="component"):
        fitted.sample_latents(1, seed=0, component=9)


def test_real_faces_reproducible_and_persisted(celeba_latents, taef2, tmp_path):
    gen = Generator(GeneratorConfig(components=2), autoencoder=taef2).fit(celeba_latents, seed=0)
    imgs, samples = gen.generate(64, seed=4)
    assert imgs.shape == (64, 3, 128, 128) and imgs.min() >= 0 and imgs.max() <= 1
    for i in (5, 63):  # the same seed gives the same image, bit for bit, at batch size 1 and 64
        one, _ = gen.generate(1, seed=4, start=i)
        assert torch.equal(one[0], imgs[i])
    path = tmp_path / "real.safetensors"
    gen.save(path)
    again, s2 = Generator.load(path).generate(64, seed=4)
    assert torch.equal(again, imgs)
    assert torch.equal(s2.provenance, samples.provenance)
    imgs = imgs[:9]
    # a generated face is a face-like image, not noise: close to the decoded training faces' statistics
    train = taef2.decode(celeba_latents.latents[:9])
    assert abs(float(imgs.mean()) - float(train.mean())) < 0.1
