"""Exact edits of a fitted mixture: removing training points and splitting along a partition."""

import torch

from faceprint.latent.mixture import GaussianMixture, MixtureConfig
from faceprint.seeding import generator


def _data(N=120, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, d, generator=g, dtype=torch.float64) * 3
    lab = torch.arange(N) % 3
    X = centres[lab] + torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 1.5, d, dtype=torch.float64)
    return X, lab


def test_remove_points_equals_the_m_step_without_them():
    X, _ = _data()
    gm = GaussianMixture(MixtureConfig(n_components=3, member_tol=0.0)).fit(X, generator=generator(0))
    R = gm.predict_proba(X)
    gone = torch.tensor([3, 17, 18, 40, 77, 101])
    keep = torch.tensor([i for i in range(len(X)) if i not in set(gone.tolist())])
    ref = GaussianMixture(MixtureConfig(n_components=3, member_tol=0.0))
    ref._m_step(X[keep], R[keep])
    # the model the edit starts from: the M-step on all points with the same responsibilities
    gm._m_step(X, R)
    info = gm.remove_points(X[gone], len(X), resp=R[gone])
    assert info["dropped"] == [] and sorted(info["updated"]) == [0, 1, 2]
    assert torch.allclose(gm.weights_, ref.weights_, atol=1e-12)
    assert torch.allclose(gm.means_, ref.means_, atol=1e-10)
    for k in range(3):
        assert torch.allclose(gm.covariance(k), ref.covariance(k), atol=1e-9)
    # the removed points became less likely, the others barely moved
    before = GaussianMixture(MixtureConfig(n_components=3, member_tol=0.0))
    before._m_step(X, R)
    assert (gm.log_prob(X[gone]) < before.log_prob(X[gone])).all()


def test_remove_every_member_of_a_component_drops_it():
    X, lab = _data()
    gm = GaussianMixture(MixtureConfig(n_components=3)).fit(X, init_labels=lab)
    k = int(gm.labels_[0])
    members = torch.nonzero(gm.labels_ == k).squeeze(1)
    info = gm.remove_points(X[members], len(X))
    assert info["dropped"] == [k] and gm.weights_.numel() == 2
    assert abs(float(gm.weights_.sum()) - 1) < 1e-9


def test_split_parts_hold_one_cell_each_and_keep_the_component_mass():
    X, lab = _data(N=300)
    gm = GaussianMixture(MixtureConfig(n_components=3)).fit(X, init_labels=lab)
    w0 = gm.weights_.clone()
    cell = (torch.arange(300) * 7 % 10 < 3).long()  # 30% in cell 1, spread over all components
    info = gm.split(X, cell, min_members=5)
    assert gm.weights_.numel() == 6
    rates = info["cell_rates"]
    assert torch.all((rates == 0) | (rates == 1))
    for k in range(3):
        parts = [i for i, p in enumerate(info["parent"]) if p == [k]]
        assert abs(float(gm.weights_[parts].sum()) - float(w0[k])) < 1e-9
    # the new hard labels put each point in a part holding its own cell
    for n in range(300):
        assert int(cell[n]) == info["cells"][int(info["labels"][n])]
    # each part's mean is the mean of its cell's members (hard responsibilities here)
    i = info["cells"].index(1)
    members = torch.nonzero(info["labels"] == i).squeeze(1)
    assert torch.allclose(gm.means_[i], X[members].mean(0), atol=1e-6)


def test_split_pools_a_small_cell_into_one_part():
    X, lab = _data(N=300)
    gm = GaussianMixture(MixtureConfig(n_components=3)).fit(X, init_labels=lab)
    cell = torch.zeros(300, dtype=torch.long)
    cell[:4] = 1  # 4 photos spread over components: one pooled part, not three tiny ones
    info = gm.split(X, cell, min_members=8)
    assert gm.weights_.numel() == 4 and info["cells"].count(1) == 1
    i = info["cells"].index(1)
    assert sorted(info["parent"][i]) == sorted(set(lab[:4].tolist()))
    assert torch.allclose(gm.means_[i], X[:4].mean(0), atol=1e-6)
    assert abs(float(gm.weights_[i]) - 4 / 300) < 1e-9


def test_remove_points_in_float32_agrees_with_float64():
    """A Generator keeps float32 parameters; the edit then runs its large products in float32."""
    X, _ = _data()
    gm = GaussianMixture(MixtureConfig(n_components=3, member_tol=0.0)).fit(X, generator=generator(0))
    R = gm.predict_proba(X)
    gm._m_step(X, R)
    g32 = GaussianMixture(MixtureConfig(n_components=3, member_tol=0.0))
    g32._m_step(X, R)
    g32.astype(torch.float32)
    gone = torch.tensor([3, 17, 18, 40, 77, 101])
    info64 = gm.remove_points(X[gone], len(X))
    info32 = g32.remove_points(X[gone], len(X))
    assert info32["updated"] == info64["updated"] and g32.means_.dtype == torch.float32
    assert torch.allclose(g32.weights_.double(), gm.weights_, atol=1e-6)
    assert torch.allclose(g32.means_.double(), gm.means_, atol=1e-4)
    for k in range(3):
        c64 = gm.covariance(k)
        assert torch.allclose(g32.covariance(k).double(), c64, atol=1e-4 * float(c64.abs().max()))
        U = g32.eigvecs_[k].double()
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-4)
