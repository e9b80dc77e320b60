"""Full-covariance Gaussian mixture fitted by EM, in member space (papers/000, Sec. 3.2).

The model is the one of scikit-learn's GaussianMixture(covariance_type="full"):
Sigma_k = S_k + r I, where S_k is the responsibility-weighted scatter of the data around the
component mean and r = reg_covar. The fit is exact, but it never forms or factorizes a
d x d matrix when a component has fewer effective members than dimensions:

* S_k = A_k A_k^T with A_k = (X_m - mu_k)^T diag(sqrt(gamma_mk / n_k)) over the members m of
  component k (points with responsibility above ``member_tol``), so its nonzero spectrum is
  that of the small Gram matrix A_k^T A_k (n_m x n_m). We keep S_k as eigenpairs
  (U_k: d x m_k orthonormal, e_k: m_k), m_k <= min(n_m, d).
* Then Sigma_k^-1 = I/r - U_k diag(e / (r (e + r))) U_k^T and
  log det Sigma_k = sum log(e + r) + (d - m_k) log r, so the E-step costs O(N d m_k) per
  component instead of O(d^3 + N d^2).

The eigenpairs are exactly what the low-rank sampler of Eq. (3)-(4) needs, so fitting and
sampling share one representation.

Large N (faceprint's scale path; every approximation is optional and measured against the exact
EM by `python -m faceprint.bench scale`):

* ``max_rank``: each component keeps at most that many leading eigenpairs of S_k, and the rest
  of its spectrum becomes an isotropic residual, as in probabilistic PCA (Tipping & Bishop
  1999): sigma_k^2 = (trace S_k - sum of the kept eigenvalues) / (d - max_rank), and
  Sigma_k = U diag(e - sigma_k^2) U^T + (sigma_k^2 + r) I, so the kept directions keep their
  variance and the total variance is unchanged. The model file then grows with
  K * max_rank * d instead of N * d. A component with more than 4 * max_rank members finds its
  leading eigenpairs by a randomized range finder (Halko, Martinsson & Tropp 2011: a Gaussian
  test matrix of max_rank + 32 columns drawn from a generator seeded by the component's index,
  two power iterations, then the exact eigenpairs of the small projected problem) instead of
  the full n x n eigendecomposition: at N = 28,000 one component of about 6,900 photos took
  most of the fit. The trace, and so the residual, stays exact.
* ``top_components``: the E-step scores each point against only the T components whose means
  are nearest (the others get responsibility 0): O(N K d + N T d m) instead of O(N K d m).
* ``subsample``: EM runs on that many points (drawn with the fit's generator), then one
  assignment pass over all N points (an E-step, an M-step, and the final E-step for labels_),
  so every point still gets its component and every component is estimated from all its points. Responsibilities below ``member_tol`` are treated as zero
in the M-step (an error of that relative order in S_k); with member_tol = 0 the M-step is
the textbook one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..validation import all_finite
from ..errors import ConfigError, InputError, NotFittedError

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class MixtureConfig:
    """Settings of the EM fit.

    n_components: K.  reg_covar: r, added to every covariance's diagonal (in the whitened
    units of the projector, where each channel has unit variance).  max_iter, tol: EM stops
    when the mean log-likelihood per sample changes by less than tol.  kmeans_iter,
    kmeans_init: the k-means++ initialisation (number of Lloyd iterations, restarts).
    member_tol: responsibilities below this are zero in the M-step.  dtype: "float64"
    (default, exact enough to match scikit-learn) or "float32".
    """

    n_components: int = 8
    reg_covar: float = 1e-3
    max_iter: int = 100
    tol: float = 1e-3
    kmeans_iter: int = 50
    kmeans_init: int = 1
    member_tol: float = 1e-10
    dtype: str = "float64"
    max_rank: int | None = None
    top_components: int | None = None
    subsample: int | None = None

    def __post_init__(self):
        def _int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")

        _int("n_components", 1)
        _int("max_iter", 1)
        _int("kmeans_iter", 0)
        _int("kmeans_init", 1)
        if not (isinstance(self.reg_covar, (int, float)) and self.reg_covar > 0 and math.isfinite(self.reg_covar)):
            raise ConfigError(f"reg_covar must be a positive number, got {self.reg_covar!r}; try 1e-3")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ConfigError(f"tol must be a non-negative number, got {self.tol!r}")
        if not (0 <= self.member_tol < 1):
            raise ConfigError(f"member_tol must be in [0, 1), got {self.member_tol!r}")
        for name in ("max_rank", "top_components", "subsample"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive int or None, got {v!r}")
        if self.dtype not in ("float64", "float32"):
            raise ConfigError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")


@dataclass
class FitHistory:
    """Mean log-likelihood per sample after each E-step, and whether EM converged."""

    log_likelihood: list[float] = field(default_factory=list)
    converged: bool = False
    n_iter: int = 0


class GaussianMixture:
    """Gaussian mixture with full covariances Sigma_k = U_k diag(e_k) U_k^T + r I.

    Learned state (set by fit): weights_ (K,), means_ (K, d), eigvals_ list of (m_k,),
    eigvecs_ list of (d, m_k), labels_ (N,) hard assignment of the training points,
    history_ (FitHistory).
    """

    def __init__(self, config: MixtureConfig | None = None):
        self.config = config or MixtureConfig()
        self.weights_ = None
        self.means_ = None
        self.eigvals_ = None
        self.eigvecs_ = None
        self.labels_ = None
        self.noise_ = None  # (K,) the isotropic residual variance of each component (rank cap)
        self.history_ = FitHistory()

    # ------------------------------------------------------------------ public API
    def component_noise(self, k: int) -> float:
        """The variance component k adds in every direction: r plus its rank-cap residual."""
        extra = 0.0 if self.noise_ is None else float(self.noise_[k])
        return self.reg_covar + extra

    @property
    def n_features(self) -> int:
        self._check_fitted()
        return self.means_.shape[1]

    @property
    def reg_covar(self) -> float:
        return float(self.config.reg_covar)

    def fit(self, X: torch.Tensor, *, generator: torch.Generator | None = None,
            init_labels: torch.Tensor | None = None) -> "GaussianMixture":
        """Fit on X (N, d). Initial responsibilities come from ``init_labels`` (N,) if given,
        else from k-means++ driven by ``generator`` (required then: no global RNG)."""
        X = self._check_X(X, fitting=True)
        K = self.config.n_components
        N = X.shape[0]
        S = self.config.subsample
        if S is not None and S < N and init_labels is None:
            if generator is None:
                raise InputError("fit() needs generator= (a torch.Generator) or init_labels=; "
                                 "e.g. faceprint.seeding.generator(0)")
            rows = torch.randperm(N, generator=generator)[:max(S, K)].sort().values
            self._fit_em(X[rows], kmeans(X[rows], K, generator=generator, n_iter=self.config.kmeans_iter,
                                         n_init=self.config.kmeans_init))
            # one assignment pass over every point
            log_resp, _ = self._e_step(X)
            self._m_step(X, log_resp.exp())
            log_resp, mean_ll = self._e_step(X)
            self.labels_ = log_resp.argmax(1)
            self.final_log_likelihood_ = mean_ll
            return self
        if init_labels is not None:
            init_labels = torch.as_tensor(init_labels).long()
            if init_labels.shape != (N,) or init_labels.min() < 0 or init_labels.max() >= K:
                raise InputError(f"init_labels must be (N,) = ({N},) ints in [0, {K}), got shape "
                                 f"{tuple(init_labels.shape)}")
            labels = init_labels
        else:
            if generator is None:
                raise InputError("fit() needs generator= (a torch.Generator) or init_labels=; "
                                 "e.g. faceprint.seeding.generator(0)")
            labels = kmeans(X, K, generator=generator, n_iter=self.config.kmeans_iter,
                            n_init=self.config.kmeans_init)
        self._fit_em(X, labels)
        # final E-step so that labels_ agree with the final parameters (as scikit-learn does)
        log_resp, mean_ll = self._e_step(X)
        self.labels_ = log_resp.argmax(1)
        self.final_log_likelihood_ = mean_ll
        return self

    def _fit_em(self, X: torch.Tensor, labels: torch.Tensor) -> None:
        """EM from hard initial labels until the mean log-likelihood changes by less than tol."""
        N, K = X.shape[0], self.config.n_components
        resp = torch.zeros(N, K, dtype=X.dtype)
        resp[torch.arange(N), labels] = 1.0
        self.history_ = FitHistory()
        self._m_step(X, resp)
        prev = -math.inf
        for it in range(1, self.config.max_iter + 1):
            log_resp, mean_ll = self._e_step(X)
            self.history_.log_likelihood.append(mean_ll)
            self.history_.n_iter = it
            self._m_step(X, log_resp.exp())
            if abs(mean_ll - prev) < self.config.tol:
                self.history_.converged = True
                break
            prev = mean_ll

    def component_log_prob(self, X: torch.Tensor) -> torch.Tensor:
        """log N(x | mu_k, Sigma_k) for every row and component: (N, K)."""
        self._check_fitted()
        X = self._check_X(X)
        return self._component_log_prob(X)

    def log_prob(self, X: torch.Tensor) -> torch.Tensor:
        """log p(x) under the mixture, (N,)."""
        lp = self.component_log_prob(X) + self.weights_.to(X.dtype if X.is_floating_point() else torch.float64).log()
        return torch.logsumexp(lp, 1)

    def score(self, X: torch.Tensor) -> float:
        """Mean log-likelihood per sample (scikit-learn's score)."""
        return float(self.log_prob(X).mean())

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Most responsible component per row, (N,)."""
        self._check_fitted()
        X = self._check_X(X)
        return (self._component_log_prob(X) + self.weights_.to(X.dtype).log()).argmax(1)

    def covariance(self, k: int) -> torch.Tensor:
        """The full d x d covariance of component k (for tests and small problems only)."""
        self._check_fitted()
        U, e = self.eigvecs_[k], self.eigvals_[k]
        d = self.means_.shape[1]
        return (U * e) @ U.T + self.component_noise(k) * torch.eye(d, dtype=U.dtype)

    def astype(self, dtype: torch.dtype) -> "GaussianMixture":
        """Cast the learned parameters (e.g. to float32 for a compact artifact); returns self."""
        self._check_fitted()
        self.weights_ = self.weights_.to(dtype)
        self.means_ = self.means_.to(dtype)
        self.eigvals_ = [e.to(dtype) for e in self.eigvals_]
        self.eigvecs_ = [U.to(dtype).contiguous() for U in self.eigvecs_]
        return self

    def n_parameters(self) -> int:
        self._check_fitted()
        return int(self.weights_.numel() + self.means_.numel()
                   + sum(U.numel() + e.numel() for U, e in zip(self.eigvecs_, self.eigvals_)))

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        """Responsibilities p(k | x) for every row: (N, K)."""
        self._check_fitted()
        X = self._check_X(X)
        wlp = self._component_log_prob(X) + self.weights_.to(X.dtype).log()
        return (wlp - torch.logsumexp(wlp, 1, keepdim=True)).exp()

    # ------------------------------------------------------------------ exact edits
    def remove_points(self, X_removed: torch.Tensor, n_total: int, *, resp: torch.Tensor | None = None,
                      min_count: float = 1e-6) -> dict:
        """Take training points out of the fitted model exactly: afterwards the parameters are
        those of the M-step on the remaining n_total - M points, with every remaining point's
        responsibilities unchanged (papers/002's "forget" done as an exact edit, not a fine-tune).

        Component k is down-dated in closed form, with no pass over the remaining data:
        n_k' = n_k - sum_p g_pk, mu_k' = (n_k mu_k - sum_p g_pk x_p) / n_k' and
        S_k' = (n_k (S_k + mu_k mu_k^T) - sum_p g_pk x_p x_p^T) / n_k' - mu_k' mu_k'^T, whose range
        lies in span(U_k, mu_k, x_p): its eigenpairs come from a small (m_k + 1 + M)-square
        problem in an orthonormal basis of that span. g_pk are the removed points'
        responsibilities (``resp``, default: computed from the current parameters). A component
        left with (almost) no mass is dropped.

        Parameters
        ----------
        X_removed : (M, d) the points to take out, in the space the mixture was fitted in.
        n_total : the number of training points the model currently stands for (N).
        resp : optional (M, K) responsibilities of the removed points.
        min_count : a component whose remaining mass n_k' is below this is dropped.

        Returns
        -------
        dict with "kept_components" (old index of each remaining component), "dropped"
        (old indices), "mass_removed" (K,) and "updated" (old indices of changed components).
        """
        self._check_fitted()
        X = self._check_X(X_removed).double()
        M = X.shape[0]
        if not (isinstance(n_total, int) and n_total > M):
            raise InputError(f"n_total must be an int larger than the {M} removed points, got {n_total!r}")
        if resp is None:  # in the parameters' precision: no conversion of the eigenvectors
            dt = self.means_.dtype
            wlp = self._component_log_prob(X.to(dt)) + self.weights_.log()
            G = (wlp - torch.logsumexp(wlp, 1, keepdim=True)).exp().double()
        else:
            G = torch.as_tensor(resp).double()  # (M, K)
        K = self.weights_.numel()
        if G.shape != (M, K):
            raise InputError(f"resp must have shape ({M}, {K}), got {tuple(G.shape)}")
        dtype = self.means_.dtype
        # the d-sized products run in the parameters' own precision (float32 for a Generator's
        # mixture: no conversion of the (d, m_k) eigenvectors), the small eigenproblems in float64
        Xw = X.to(dtype)
        r_tol = self.config.member_tol
        nk = self.weights_.double() * n_total
        mass = G.sum(0)
        new_n = nk - mass
        means, eigvals, eigvecs, kept, dropped, updated = [], [], [], [], [], []
        for k in range(K):
            if new_n[k] < min_count:
                dropped.append(k)
                continue
            kept.append(k)
            rows = torch.nonzero(G[:, k] > r_tol).squeeze(1)
            if rows.numel() == 0:
                means.append(self.means_[k])
                eigvals.append(self.eigvals_[k])
                eigvecs.append(self.eigvecs_[k])
                continue
            updated.append(k)
            U, e, mu = self.eigvecs_[k], self.eigvals_[k].double(), self.means_[k].double()
            g, Xp = G[rows, k], X[rows]
            mu_new = (nk[k] * mu - g @ Xp) / new_n[k]
            # B = [U, Q]: an orthonormal basis of span(U, mu, x_p); C: coordinates of [mu, x_p] in it.
            # U's own coordinates are [I; 0] and need no product.
            Q, C = _extend_basis(U, torch.cat([self.means_[k][:, None], Xw[rows].T], 1))
            C = C.double()
            m, b = U.shape[1], C.shape[0]
            mub, Xb = C[:, 0], C[:, 1:].T  # (b,), (M_k, b)
            mnb = (nk[k] * mub - g @ Xb) / new_n[k]
            second = nk[k] * torch.outer(mub, mub) - (Xb.T * g) @ Xb
            second[:m, :m] += nk[k] * torch.diag(e)
            S = second / new_n[k] - torch.outer(mnb, mnb)
            S = (S + S.T) / 2
            ev, R = torch.linalg.eigh(S)
            keep = ev > 1e-10 * ev.max().clamp_min(0) + torch.finfo(torch.float64).tiny
            ev, R = ev[keep].flip(0), R[:, keep].flip(1)
            if R.numel():
                # deterministic signs without a pass over the (d, m') result: the column sums of
                # the new eigenvectors, 1^T B R, are positive
                colsum = torch.cat([U.sum(0), Q.sum(0)]).double() @ R
                sgn = torch.sign(colsum)
                sgn[sgn == 0] = 1
                R = R * sgn
            R = R.to(dtype)
            Unew = U @ R[:m]
            if b > m:
                Unew = Unew + Q @ R[m:]
            means.append(mu_new.to(dtype))
            eigvals.append(ev.to(dtype))
            eigvecs.append(Unew.contiguous())
        if not kept:
            raise InputError("removing these points would leave the mixture empty; the model has nothing else to keep")
        N_new = n_total - M
        if self.noise_ is not None:
            self.noise_ = self.noise_[kept]
        self.weights_ = (new_n[kept] / N_new).to(dtype)
        self.weights_ = self.weights_ / self.weights_.sum()
        self.means_ = torch.stack(means)
        self.eigvals_, self.eigvecs_ = eigvals, eigvecs
        return {"kept_components": kept, "dropped": dropped, "mass_removed": mass, "updated": updated}

    def split(self, X: torch.Tensor, groups: torch.Tensor, *, min_members: float = 8.0,
              resp: torch.Tensor | None = None) -> dict:
        """Split the mixture along a partition of the training points (e.g. an attribute), so
        that every component holds the points of one cell only.

        X (N, d) are the training points the model stands for and ``groups`` (N,) their cell
        (0 .. G-1). Where component k holds at least ``min_members`` effective points of cell g,
        it yields the part (k, g): the Gaussian fitted (the M-step formula) to k's
        responsibilities restricted to cell g, with weight sum_n r_nk [g_n = g] / N. The points
        of cell g in components where it is rarer are pooled into one part for g (their summed
        responsibilities), or, if that pool is itself smaller than ``min_members`` while g has
        parts of its own, added to g's largest part. So no part mixes cells, the parts' weights
        add up to the old components', and no part is fitted on fewer than min(min_members,
        size of the cell) photos.

        Returns dict with "parent" (new component -> list of old components it draws on),
        "cells" (new component -> its cell), "labels" (N,) the new hard assignment of the
        training points, and "cell_rates" (K', G), 1 where a component holds a cell.
        """
        self._check_fitted()
        X = self._check_X(X).double()
        N = X.shape[0]
        groups = torch.as_tensor(groups).long()
        if groups.shape != (N,) or groups.min() < 0:
            raise InputError(f"groups must be (N,) = ({N},) non-negative ints, got shape {tuple(groups.shape)}")
        Gn = int(groups.max()) + 1
        R = (self.predict_proba(X) if resp is None else torch.as_tensor(resp)).double()  # (N, K)
        K = R.shape[1]
        onehot = torch.nn.functional.one_hot(groups, Gn).double()  # (N, G)
        mass = R.T @ onehot  # (K, G) effective points of each cell in each component
        hard = R.argmax(1)
        dtype = self.means_.dtype
        parts = []  # (cell, list of components, weight vector over points)
        owner = {}  # (component, cell) -> part index
        for g in range(Gn):
            if mass[:, g].sum() <= 0:
                continue
            inside = (groups == g).double()
            big = [k for k in range(K) if mass[k, g] >= min_members]
            rest = [k for k in range(K) if k not in big and mass[k, g] > 0]
            for k in big:
                owner[(k, g)] = len(parts)
                parts.append((g, [k], R[:, k] * inside))
            if rest:
                w = R[:, rest].sum(1) * inside
                if float(w.sum()) >= min_members or not big:
                    i = len(parts)
                    parts.append((g, rest, w))
                else:  # too few to stand alone: join the cell's largest part
                    i = max((owner[(k, g)] for k in big), key=lambda j: float(parts[j][2].sum()))
                    cell, comps, w0 = parts[i]
                    parts[i] = (cell, comps + rest, w0 + w)
                for k in rest:
                    owner[(k, g)] = i
        weights, means, eigvals, eigvecs = [], [], [], []
        for g, comps, w in parts:
            members = torch.nonzero(w > self.config.member_tol).squeeze(1)
            nw = w[members].sum()
            mu = (w[members] @ X[members]) / nw
            A = (X[members] - mu) * (w[members] / nw).sqrt()[:, None]
            e, U = _scatter_eigh(A)
            weights.append(nw / N)
            means.append(mu.to(dtype))
            eigvals.append(e.to(dtype))
            eigvecs.append(U.to(dtype))
        labels = torch.tensor([owner[(int(hard[n]), int(groups[n]))] for n in range(N)], dtype=torch.int64)
        self.weights_ = torch.stack(weights).to(dtype)
        self.weights_ = self.weights_ / self.weights_.sum()
        self.means_ = torch.stack(means)
        self.eigvals_, self.eigvecs_ = eigvals, eigvecs
        self.noise_ = None
        self.labels_ = labels
        rates = torch.zeros(len(parts), Gn, dtype=torch.float64)
        rates[torch.arange(len(parts)), torch.tensor([p[0] for p in parts])] = 1
        return {"parent": [p[1] for p in parts], "cells": [p[0] for p in parts], "labels": labels,
                "cell_rates": rates}

    # ------------------------------------------------------------------ EM steps
    def _m_step(self, X: torch.Tensor, resp: torch.Tensor) -> None:
        N, d = X.shape
        eps = 10 * torch.finfo(X.dtype).eps
        nk = resp.sum(0) + eps  # (K,)
        self.weights_ = nk / N
        self.means_ = (resp.T @ X) / nk[:, None]
        self.eigvals_, self.eigvecs_ = [], []
        noise = torch.zeros(resp.shape[1], dtype=torch.float64)
        for k in range(resp.shape[1]):
            members = torch.nonzero(resp[:, k] > self.config.member_tol).squeeze(1)
            if members.numel() == 0:
                self.eigvals_.append(torch.zeros(0, dtype=X.dtype))
                self.eigvecs_.append(torch.zeros(d, 0, dtype=X.dtype))
                continue
            w = (resp[members, k] / nk[k]).sqrt()
            A = (X[members] - self.means_[k]) * w[:, None]  # (n_m, d)
            cap = self.config.max_rank
            if cap is not None and min(A.shape) > 4 * cap:
                e, U = _top_eigh(A, cap, seed=k)
                sigma2 = max(float((A * A).sum()) - float(e.sum()), 0.0) / max(d - cap, 1)
                noise[k] = sigma2
                e = (e - sigma2).clamp_min(0)
            else:
                e, U = _scatter_eigh(A)
            if cap is not None and e.numel() > cap:
                # probabilistic PCA: the discarded spectrum becomes an isotropic residual
                sigma2 = float(e[cap:].sum()) / max(d - cap, 1)
                noise[k] = sigma2
                e, U = (e[:cap] - sigma2).clamp_min(0), U[:, :cap].contiguous()
            self.eigvals_.append(e)
            self.eigvecs_.append(U)
        self.noise_ = noise if bool((noise > 0).any()) else None

    def _nearest_means(self, X: torch.Tensor, T: int) -> list[torch.Tensor]:
        """For each component, the rows whose T nearest means (Euclidean) include it."""
        M = self.means_.to(X.dtype)
        d2 = (M * M).sum(1)[None] - 2 * X @ M.T  # (N, K), up to the rows' own norms
        top = d2.topk(T, dim=1, largest=False).indices  # (N, T)
        mask = torch.zeros_like(d2, dtype=torch.bool).scatter_(1, top, True)
        return [torch.nonzero(mask[:, k]).squeeze(1) for k in range(M.shape[0])]

    def _component_log_prob(self, X: torch.Tensor, rows_of: list[torch.Tensor] | None = None) -> torch.Tensor:
        """log N(x | mu_k, Sigma_k), (N, K); with ``rows_of`` only those rows of each component
        are scored and the others are -inf."""
        N, d = X.shape
        dt = X.dtype
        full_x2 = (X * X).sum(1)  # (N,)
        if rows_of is None:
            out = torch.empty(N, len(self.eigvals_), dtype=dt)
        else:
            out = torch.full((N, len(self.eigvals_)), -math.inf, dtype=dt)
        Xall = X
        for k, (e, U) in enumerate(zip(self.eigvals_, self.eigvecs_)):
            if rows_of is None:
                X, x2 = Xall, full_x2
            else:
                rows = rows_of[k]
                if rows.numel() == 0:
                    continue
                X, x2 = Xall[rows], full_x2[rows]
            r = self.component_noise(k)
            mu = self.means_[k].to(dt)
            U = U.to(dt)
            e = e.to(dt)
            d2 = x2 - 2 * (X @ mu) + mu @ mu  # ||x - mu||^2
            if e.numel():
                proj = X @ U - mu @ U  # (N, m)
                shrink = (proj * proj) @ (e / (e + r))
                logdet = torch.log(e + r).sum() + (d - e.numel()) * math.log(r)
            else:
                shrink = torch.zeros_like(d2)
                logdet = d * math.log(r)
            maha = (d2 - shrink).clamp_min(0) / r
            val = -0.5 * (d * LOG_2PI + logdet + maha)
            if rows_of is None:
                out[:, k] = val
            else:
                out[rows_of[k], k] = val
        return out

    def _e_step(self, X: torch.Tensor) -> tuple[torch.Tensor, float]:
        T = self.config.top_components
        K = len(self.eigvals_)
        if T is not None and T < K:
            wlp = self._component_log_prob(X, rows_of=self._nearest_means(X, T)) + self.weights_.log()
        else:
            wlp = self._component_log_prob(X) + self.weights_.log()
        lse = torch.logsumexp(wlp, 1, keepdim=True)
        return wlp - lse, float(lse.mean())

    # ------------------------------------------------------------------ helpers
    def _check_fitted(self):
        if self.means_ is None:
            raise NotFittedError("GaussianMixture is not fitted; call fit(X) first")

    def _check_X(self, X, fitting: bool = False) -> torch.Tensor:
        if not isinstance(X, torch.Tensor) or X.ndim != 2:
            raise InputError(f"X must be a 2-D tensor (N, d), got {type(X).__name__} {tuple(getattr(X, 'shape', ()))}")
        dt = torch.float64 if self.config.dtype == "float64" else torch.float32
        X = X.to(dt)
        if not all_finite(X):
            raise InputError("X contains NaN or infinite values")
        if fitting:
            K = self.config.n_components
            if X.shape[0] < K:
                raise InputError(f"cannot fit {K} components on {X.shape[0]} samples; use at most "
                                 f"{X.shape[0]} components (n_components) or give more photos")
        elif X.shape[1] != self.means_.shape[1]:
            raise InputError(f"X has {X.shape[1]} features, the mixture was fitted on {self.means_.shape[1]}")
        return X

    # ------------------------------------------------------------------ persistence
    def state_tensors(self, prefix: str = "mixture.") -> dict[str, torch.Tensor]:
        self._check_fitted()
        ranks = torch.tensor([e.numel() for e in self.eigvals_], dtype=torch.int64)
        return {
            prefix + "weights": self.weights_,
            prefix + "means": self.means_,
            prefix + "ranks": ranks,
            prefix + "eigvals": torch.cat(self.eigvals_) if ranks.sum() else torch.zeros(0, dtype=self.means_.dtype),
            prefix + "eigvecs": torch.cat(self.eigvecs_, 1).contiguous(),
            prefix + "labels": self.labels_,
            prefix + "history": torch.tensor(self.history_.log_likelihood, dtype=torch.float64),
            **({} if self.noise_ is None else {prefix + "noise": self.noise_.double().contiguous()}),
        }

    @classmethod
    def from_state(cls, config: MixtureConfig, t: dict, prefix: str = "mixture.", converged: bool = True):
        m = cls(config)
        m.weights_ = t[prefix + "weights"]
        m.means_ = t[prefix + "means"]
        ranks = t[prefix + "ranks"].tolist()
        m.eigvals_ = list(torch.split(t[prefix + "eigvals"], ranks))
        m.eigvecs_ = list(torch.split(t[prefix + "eigvecs"], ranks, dim=1))
        m.labels_ = t[prefix + "labels"]
        m.noise_ = t.get(prefix + "noise")
        hist = t[prefix + "history"].tolist()
        m.history_ = FitHistory(hist, converged, len(hist))
        return m


def _extend_basis(U: torch.Tensor, W: torch.Tensor, rel_tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend the orthonormal U (d, m) to an orthonormal basis [U, Q] of span(U, W), W (d, n).

    Returns Q (d, r), the directions of W outside span(U) (two Gram-Schmidt passes, then an SVD
    of the rest), and C (m + r, n), the coordinates of W in [U, Q], obtained from the
    projections and the SVD without another (d, n) product: W = U A + V and V = Q S R^T give
    C = [A; S R^T]. Singular values below ``rel_tol`` (default: 1e-10 in float64, 1e-5 in
    float32) times the largest column norm of W are dropped.
    """
    if rel_tol is None:
        rel_tol = 1e-10 if W.dtype == torch.float64 else 1e-5
    A = U.T @ W
    V = W - U @ A
    A2 = U.T @ V
    V = V - U @ A2
    A = A + A2
    if V.numel() == 0:
        return V[:, :0], A
    Q, S, Rt = torch.linalg.svd(V, full_matrices=False)
    scale = max(float(W.norm(dim=0).max()), torch.finfo(W.dtype).tiny)
    keep = S > rel_tol * scale
    return Q[:, keep], torch.cat([A, S[keep, None] * Rt[keep]], 0)


def _top_eigh(A: torch.Tensor, rank: int, *, seed: int, oversample: int = 32,
              power_iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` leading eigenpairs of S = A^T A for A (n, d), descending, by a randomized
    range finder (module docstring); deterministic for a given A and seed."""
    n, d = A.shape
    ell = min(rank + oversample, n, d)
    g = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(d, ell, generator=g, dtype=torch.float64).to(A.dtype)
    Q = torch.linalg.qr(A @ omega).Q  # (n, ell): a basis of A's leading column space
    for _ in range(power_iterations):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    B = Q.T @ A  # (ell, d)
    e, W = torch.linalg.eigh(B @ B.T)  # ascending
    order = torch.argsort(e, descending=True)[:rank]
    e, W = e[order].clamp_min(0), W[:, order]
    keep = e > 1e-10 * float(e.max().clamp_min(0)) + torch.finfo(A.dtype).tiny
    e, W = e[keep], W[:, keep]
    U = (B.T @ W) / e.sqrt()  # (d, m), orthonormal columns
    idx = U.abs().argmax(0)
    sg = torch.sign(U[idx, torch.arange(U.shape[1])])
    sg[sg == 0] = 1
    return e, (U * sg).contiguous()


def _scatter_eigh(A: torch.Tensor, rel_tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzero eigenpairs of S = A^T A for A (n, d), descending; the dual (n x n) problem when n < d."""
    n, d = A.shape
    if n <= d:
        G = A @ A.T  # (n, n)
        e, Q = torch.linalg.eigh(G)
        keep = e > rel_tol * e.max().clamp_min(0) + torch.finfo(A.dtype).tiny
        e, Q = e[keep], Q[:, keep]
        U = (A.T @ Q) / e.sqrt()  # (d, m), orthonormal columns
    else:
        S = A.T @ A
        e, U = torch.linalg.eigh(S)
        keep = e > rel_tol * e.max().clamp_min(0) + torch.finfo(A.dtype).tiny
        e, U = e[keep], U[:, keep]
    order = torch.argsort(e, descending=True)
    e, U = e[order], U[:, order]
    # deterministic signs: the largest-magnitude entry of each eigenvector is positive
    if U.numel():
        idx = U.abs().argmax(0)
        s = torch.sign(U[idx, torch.arange(U.shape[1])])
        s[s == 0] = 1
        U = U * s
    return e, U.contiguous()


def kmeans(X: torch.Tensor, K: int, *, generator: torch.Generator, n_iter: int = 50,
           n_init: int = 1) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations; returns labels (N,) of the best of n_init runs."""
    N = X.shape[0]
    x2 = (X * X).sum(1)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        centres = torch.empty(K, X.shape[1], dtype=X.dtype)
        first = int(torch.randint(N, (1,), generator=generator))
        centres[0] = X[first]
        closest = (x2 - 2 * X @ centres[0] + centres[0] @ centres[0]).clamp_min(0)
        for c in range(1, K):
            total = closest.sum()
            if total <= 0:
                idx = int(torch.randint(N, (1,), generator=generator))
            else:
                idx = int(torch.multinomial(closest / total, 1, generator=generator))
            centres[c] = X[idx]
            dist = (x2 - 2 * X @ centres[c] + centres[c] @ centres[c]).clamp_min(0)
            closest = torch.minimum(closest, dist)
        labels = None
        for _it in range(max(n_iter, 1)):
            d = x2[:, None] - 2 * X @ centres.T + (centres * centres).sum(1)[None]
            new = d.argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            counts = torch.bincount(labels, minlength=K)
            sums = torch.zeros_like(centres).index_add_(0, labels, X)
            for c in torch.nonzero(counts == 0).flatten().tolist():
                # an empty cluster takes the point farthest from its centre
                far = int(d.min(1).values.argmax())
                sums[c], counts[c] = X[far], 1
                labels[far] = c
            centres = sums / counts[:, None].to(X.dtype)
        d = x2[:, None] - 2 * X @ centres.T + (centres * centres).sum(1)[None]
        labels = d.argmin(1)
        inertia = float(d.min(1).values.clamp_min(0).sum())
        if len(torch.unique(labels)) < K:
            # guarantee every cluster has a member so the first M-step is well posed
            dmin = d.min(1).values
            for c in range(K):
                if not (labels == c).any():
                    far = int(dmin.argmax())
                    labels[far] = c
                    dmin[far] = -1
        if inertia < best_inertia:
            best, best_inertia = labels.clone(), inertia
    return best
