"""The generator's scale path (em="fast"): saved, validated, reloaded; eigenpairs capped."""

import pytest
import torch

from faceprint.latent.generator import Generator, GeneratorConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class _Set:
    def __init__(self, latents):
        self.latents = latents
        self.relpaths = [f"{i:03d}.png" for i in range(latents.shape[0])]


def _latents(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(3, 4, 8, 8, generator=g)
    lab = torch.randint(3, (n,), generator=g)
    return centres[lab] + 0.5 * torch.randn(n, 4, 8, 8, generator=g)


def test_fast_em_model_round_trip_and_rank_cap(tmp_path):
    lat = _latents()
    cfg = GeneratorConfig(components=3, channels=4, em="fast", em_subsample=120, em_max_rank=10, patch_radius=1)
    fast = Generator(cfg).fit(_Set(lat), seed=0)
    exact = Generator(GeneratorConfig(components=3, channels=4, em="exact", patch_radius=1)).fit(_Set(lat), seed=0)
    assert fast.mixture_.config.subsample == 120 and exact.mixture_.config.subsample is None
    assert all(e.numel() <= 10 for e in fast.mixture_.eigvals_)
    assert fast.mixture_.noise_ is not None and (fast.mixture_.noise_ > 0).all()
    # every photo has a component, and the stored model is much smaller than the exact one
    assert fast.mixture_.labels_.shape == (400,)
    a, b = tmp_path / "fast.safetensors", tmp_path / "exact.safetensors"
    fast.save(a)
    exact.save(b)
    assert a.stat().st_size < b.stat().st_size
    back = Generator.load(a, autoencoder=None)
    assert torch.equal(back.mixture_.noise_, fast.mixture_.noise_)
    s1, s2 = fast.sample_latents(6, seed=2, guard=None), back.sample_latents(6, seed=2, guard=None)
    assert torch.equal(s1.latents, s2.latents) and torch.equal(s1.provenance, s2.provenance)


def test_auto_em_switches_at_the_documented_size():
    from faceprint.latent.generator import FAST_EM_ABOVE

    cfg = GeneratorConfig()
    assert cfg.mixture_config(FAST_EM_ABOVE).subsample is None
    big = cfg.mixture_config(FAST_EM_ABOVE + 1)
    assert big.subsample == cfg.em_subsample and big.max_rank == cfg.em_max_rank and big.dtype == "float32"
