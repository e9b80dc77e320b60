"""Taming a fitted model: forget photos, set attribute shares, include a subgroup."""

import pytest
import torch

from faceprint.errors import InputError
from faceprint.latent.generator import Generator, GeneratorConfig
from faceprint.taming import forget, include, match_training_photos, rebalance, tilt_weights


class _LS:
    def __init__(self, latents, names, hashes):
        self.latents, self.relpaths, self.hashes = latents, names, hashes


@pytest.fixture(scope="module")
def fitted(celeba_latents):
    ls = celeba_latents
    g = Generator(GeneratorConfig(components=3, channels=16)).fit(
        _LS(ls.latents, ls.relpaths, ls.content_hashes), seed=0)
    return g


def _majority_photo(prov):
    return torch.mode(prov.reshape(prov.shape[0], -1), 1).values


def test_forget_removes_every_latent_pixel_of_the_photos(fitted, tmp_path):
    gone = list(range(0, 96, 8))  # 12 photos
    forgotten = fitted.bank_[gone]
    mix0 = fitted.mixture_
    state = [t.clone() for t in (fitted.bank_, mix0.weights_, mix0.means_, mix0.labels_, *mix0.eigvecs_, *mix0.eigvals_)]
    samples0 = fitted.sample_latents(20, seed=3).latents
    g2, rep = forget(fitted, gone, name="test person")
    assert g2.n_photos == 84 and fitted.n_photos == 96
    # the original model is untouched (the copy shares tensors it never writes)
    now = [fitted.bank_, mix0.weights_, mix0.means_, mix0.labels_, *mix0.eigvecs_, *mix0.eigvals_]
    assert fitted.mixture_ is mix0 and all(torch.equal(a, b) for a, b in zip(state, now))
    assert torch.equal(fitted.sample_latents(20, seed=3).latents, samples0)
    assert g2.mixture_ is not mix0 and g2.mixture_.weights_.numel() <= 3
    assert rep.components_before == 3
    assert all(a < b for a, b in zip(rep.log_prob_after, rep.log_prob_before))
    smp = g2.sample_latents(200, seed=1)
    assert int(smp.provenance.max()) < 84
    # no generated latent pixel is a copy of a forgotten photo's pixel at that position
    lat = smp.latents.to(torch.float16)  # the bank stores float16
    for f in forgotten:
        same = (lat == f[None]).all(1)  # (n, h, w)
        assert not bool(same.any())
    # ... while before forgetting such copies were everywhere
    before = fitted.sample_latents(200, seed=1)
    hit = torch.isin(before.provenance, torch.tensor(gone))
    assert bool(hit.any())
    assert [r for r in g2.training_.relpaths if r in {fitted.training_.relpaths[i] for i in gone}] == []
    path = tmp_path / "forgot.safetensors"
    g2.save(path)
    back = Generator.load(path, autoencoder=None)
    op = back.provenance_["operations"][-1]
    assert op["operation"] == "forget" and op["photos_removed"] == 12 and op["name"] == "test person"
    assert torch.equal(back.sample_latents(5, seed=2).latents, g2.sample_latents(5, seed=2).latents)


def test_match_training_photos_by_content(fitted, celeba_dir, tmp_path):
    files = sorted(celeba_dir.iterdir())
    d = tmp_path / "person"
    d.mkdir()
    for i in (3, 5):
        (d / f"renamed_{i}.jpg").write_bytes(files[i].read_bytes())
    (d / "stranger.jpg").write_bytes(files[500].read_bytes())
    idx, unmatched = match_training_photos(fitted, d)
    assert idx == [3, 5] and len(unmatched) == 1 and unmatched[0].endswith("stranger.jpg")
    with pytest.raises(InputError, match="not a folder"):
        match_training_photos(fitted, tmp_path / "nope")


def test_tilt_weights_matches_the_closed_form_for_separated_components():
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    rates = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)
    w = tilt_weights(pi, rates, torch.tensor([0.7], dtype=torch.float64))
    exp = torch.tensor([0.1 / 0.4 * 0.7, 0.2 / 0.6 * 0.3, 0.3 / 0.4 * 0.7, 0.4 / 0.6 * 0.3], dtype=torch.float64)
    assert torch.allclose(w, exp, atol=1e-9)
    with pytest.raises(InputError, match="cannot be reached"):
        tilt_weights(pi, torch.tensor([[0.5], [0.2], [0.5], [0.2]], dtype=torch.float64),
                     torch.tensor([0.9], dtype=torch.float64))


def test_rebalance_moves_the_sampled_share(fitted):
    N = fitted.n_photos
    # an attribute held by 25% of the photos, unrelated to the components
    attr = ["1" if (i * 37) % 4 == 0 else "0" for i in range(N)]
    lab = torch.tensor([int(a) for a in attr])
    before = lab[_majority_photo(fitted.sample_latents(400, seed=5).provenance)].float().mean()
    g2, rep = rebalance(fitted, {"A": attr}, {"A": {"1": 0.75}}, min_members=4)
    assert abs(rep.shares_after["A"]["1"] - 0.75) < 1e-6
    assert abs(rep.shares_before["A"]["1"] - 0.25) < 0.05
    smp = g2.sample_latents(400, seed=5)
    # every pixel of a face from a split part comes from photos with the part's value
    after = lab[_majority_photo(smp.provenance)].float().mean()
    assert float(before) < 0.4 and abs(float(after) - 0.75) < 0.07
    pure = (lab[smp.provenance.reshape(400, -1)].float().mean(1))
    assert float(((pure == 0) | (pure == 1)).float().mean()) > 0.9
    assert g2.provenance_["operations"][-1]["operation"] == "rebalance"
    with pytest.raises(InputError, match="no value"):
        rebalance(fitted, {"A": attr}, {"A": {"yes": 0.5}})
    with pytest.raises(InputError, match="no labels"):
        rebalance(fitted, {"A": attr}, {"B": {"1": 0.5}})


def test_include_gives_a_small_subgroup_its_floor(fitted):
    N = fitted.n_photos
    members = [i in (1, 9, 17, 33, 50, 71) for i in range(N)]
    g2, rep = include(fitted, {"S": members}, share=0.3, min_members=4)
    assert rep.share_before["S"] < 0.15 and abs(rep.share_after["S"] - 0.3) < 1e-6
    lab = torch.tensor(members)
    smp = g2.sample_latents(400, seed=8)
    got = lab[_majority_photo(smp.provenance)].float().mean()
    assert abs(float(got) - 0.3) < 0.07
