"""A normalizing-flow latent prior with a "forget" fine-tune (papers/002, abstract: taming a
flow-based generative model by a fast fine-tune that changes the probability of given images).

The flow is an alternative to the Gaussian mixture of papers/000 (Sec. 3.2), fitted on the same
TAEF2 latents, so that forgetting by fine-tuning (papers/002) can be compared with the mixture's
exact down-date (:mod:`faceprint.taming.forget`).

Model (all maps are fixed after fit except the flow):

1. global PCA of the flattened latents x in R^d (d = c h w = 8192 for TAEF2 at 128 px) to D
   whitened coordinates:  u = diag(lambda)^(-1/2) W (x - m),  W (D, d) orthonormal rows,
   lambda (D,) their variances. PCA in the raw latent space reconstructs better through the
   decoder than PCA of the channel-whitened latents (celeba-1k, 128 unseen photos, PSNR of
   decode(reconstruction) vs decode(latent): D = 128: 17.7 vs 16.1 dB; D = 256: 18.6 vs 16.5 dB;
   D = 512: 19.4 vs 17.1 dB). D = 256 is the default: the flow fits in ~22 s on one core
   at N = 1,024, samples in ~55 ms per image, and beats the PCA Gaussian by ~13 nats on unseen
   photos (benchmark numbers in the pull request; re-measure with your data).
2. a zuko flow (MAF by default, or NSF; masked autoregressive) on u, trained by maximum
   likelihood with Adam and early stopping on a held-out split (val_fraction of the photos,
   which the PCA does not see either).
3. the channel PCA P0 of papers/000, Sec. 3.1 (:class:`~faceprint.latent.projector.PCAProjector`),
   used only by the NN refinement, which matches patches on P0 x as the Generator does. The
   default keeps q = 8 whitened channels: matching on all 32 (as the Generator does) gives flow
   samples black/white blocky backgrounds, because the raw-space PCA leaves the low-variance
   channels near their mean and whitening blows them up into the match (looked at on
   celeba-1k grids: q = 8 gives natural backgrounds, q = 4 noisier textures).

Densities. ``log_prob(x)`` returns log p_flow(u), the density of the D reduced coordinates
(space="reduced", the default; this is what the flow learns and what forget() changes).
space="latent" returns an exact density of x in R^d: the D retained directions carry the flow
(with the Jacobian -1/2 sum log lambda of the whitening) and the d - D residual directions an
isotropic Gaussian N(0, sigma^2 I), sigma^2 the mean residual variance of the training data:
log p(x) = log p_flow(u) - 1/2 sum_i log lambda_i - (d - D)/2 log(2 pi sigma^2)
- ||r||^2 / (2 sigma^2), r = the part of x - m outside the span of W. space="projected" is the
same density for a channel-whitened latent y = P0 x with an invertible P0 (q = c), e.g. the
Generator's projector (the space of its mixture's log p):
log p(y) = log p(x) + (h w / 2) sum_c log s0_c. Divide by d for a per-dimension value.

Sampling. Image i of a run with seed s draws its base noise eps_i ~ N(0, I_D) from
faceprint.seeding.generator(s, "flow", i). The inverse flow runs on fixed blocks of 16 image
indices (16 b .. 16 b + 15, always computed together, the unrequested ones discarded), because
a batched matmul does not give bit-identical rows for different batch sizes while a batch of one
is 20x slower; so image i is bit-for-bit the same whatever n and start. The latent is
x = m + W^T (sqrt(lambda) u). With ``refine_bank`` (training latents) every latent pixel is then
replaced by the pixel of the training photo whose 5 x 5 patch is nearest on the channel-whitened
latents P0 x (papers/000, Sec. 3.3: the NN projection of LR-GMM-NN, one cluster, copy="full"),
which gives a provenance map.

Forgetting (papers/002). ``forget(F, retain_latents=R)`` fine-tunes the flow with Adam on
    L = -mean_{r in batch of R} log p(r) + w mean_{f in F} softplus((log p(f) - t) / tau) tau
where t is a low quantile of the retained photos' log p under the original model (minus a margin):
the forgotten photos are pushed below nearly every retained photo, while maximum likelihood on the
retained photos keeps the rest of the model in place. It stops as soon as every forgotten latent
is below t (or after ``steps``). Only the flow changes: the PCA bases P0 and W were estimated
with the forgotten photos among others and are kept (second-order statistics of all photos);
fit a new prior without the photos if even that must go.

Parameter initialisation and mini-batch order are seeded explicitly; the module never draws from
(or leaves changed) the global RNG: the flow's layers are built inside torch.random.fork_rng()
seeded from (seed, "flow-init").
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..errors import ArtifactError, ConfigError, InputError, NotFittedError
from ..io import load_artifact, now_iso, save_artifact
from ..seeding import check_seed, derive_seed
from ..seeding import generator as make_generator
from .generator import Samples
from .projector import PCAProjector, ProjectorConfig
from .refine import NNRefiner, RefineConfig, gather

ARTIFACT_CLASS = "faceprint.FlowPrior"
FLOWS = ("nsf", "maf")
SPACES = ("reduced", "latent", "projected")
FLOW_PREFIX = "flow."
SAMPLE_BLOCK = 16  # images pushed through the inverse flow together (see sample_latents)
LOG_2PI = math.log(2 * math.pi)


def _is_int(v, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


def _is_pos_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class FlowPriorConfig:
    """Hyper-parameters of the flow prior.

    Parameters
    ----------
    channels : int
        q, channels kept by the channel PCA P0 that the NN refinement matches patches on
        (see the module docstring for why 8, not the Generator's 32).
    dims : int
        D, global PCA dimensions the flow models (must be < the number of training photos).
    flow : {"nsf", "maf"}
        zuko.flows.NSF (rational-quadratic splines) or zuko.flows.MAF (affine).
    transforms : int
        Number of autoregressive transforms.
    hidden : tuple of int
        Hidden layer sizes of each transform's masked MLP.
    bins : int
        Spline bins (NSF only).
    passes : int or None
        None: fully autoregressive transforms; 2: coupling transforms (faster sampling).
    val_fraction : float
        Share of the photos held out for early stopping (0 disables early stopping).
    batch_size, lr, weight_decay, grad_clip : training settings (Adam; gradient-norm clipping).
    noise : float
        Std of Gaussian noise added to the whitened coordinates u during training (0: none).
    max_epochs, patience : training stops after ``max_epochs`` or when the held-out mean log p
        has not improved for ``patience`` epochs; the best held-out state is kept.
        max_epochs = 0 fits the PCA maps only and leaves the flow at its initialisation (a
        baseline).
    patch_radius, refine_iterations : NN refinement of samples (papers/000, Sec. 3.3).
    refine_neighbours : int or None
        The refinement copies pixels only from the sample's k nearest bank photos (L2 on the
        channel-whitened latents), as LR-GMM-NN copies only from the sample's mixture component;
        None: from the whole bank.
    """

    channels: int = 8
    dims: int = 256
    flow: str = "maf"
    transforms: int = 3
    hidden: tuple[int, ...] = (256, 256)
    bins: int = 8
    passes: int | None = None
    val_fraction: float = 0.1
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    noise: float = 0.0  # std of Gaussian noise added to u in training (a regulariser)
    max_epochs: int = 300
    patience: int = 20
    patch_radius: int = 2
    refine_iterations: int = 1
    refine_neighbours: int | None = 128

    def __post_init__(self):
        ProjectorConfig(self.channels)
        RefineConfig(self.patch_radius, self.refine_iterations)
        if self.refine_neighbours is not None and not _is_int(self.refine_neighbours, 1):
            raise ConfigError(f"refine_neighbours must be None (whole bank) or an int >= 1, "
                              f"got {self.refine_neighbours!r}; try 128")
        for name, lo in (("dims", 2), ("transforms", 1), ("bins", 2), ("batch_size", 1),
                         ("max_epochs", 0), ("patience", 1)):
            if not _is_int(getattr(self, name), lo):
                raise ConfigError(f"{name} must be an int >= {lo}, got {getattr(self, name)!r}")
        if self.flow not in FLOWS:
            raise ConfigError(f"flow must be one of {', '.join(FLOWS)}; got {self.flow!r}")
        if not (isinstance(self.hidden, tuple) and self.hidden and all(_is_int(h, 1) for h in self.hidden)):
            raise ConfigError(f"hidden must be a non-empty tuple of positive ints, got {self.hidden!r}; "
                              "e.g. (256, 256)")
        if self.passes is not None and not _is_int(self.passes, 1):
            raise ConfigError(f"passes must be None (fully autoregressive) or an int >= 1, got {self.passes!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 <= self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be a number in [0, 0.5), got {self.val_fraction!r}; try 0.1")
        for name in ("lr", "grad_clip"):
            if not _is_pos_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise < 10:
            raise ConfigError(f"noise must be a number in [0, 10), got {self.noise!r}; try 0 or 0.1")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FlowPriorConfig":
        d = dict(d)
        if isinstance(d.get("hidden"), list):
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


@dataclass
class FlowForgetReport:
    """What :meth:`FlowPrior.forget` did and measured.

    log p values are in the reduced space (see the module docstring). ``groups`` maps a group
    name ("forgotten", "retained" and any name passed in ``evaluate``) to
    {"n", "mean_before", "mean_after", "median_before", "median_after"}.
    ``seconds`` is the fine-tune alone (target quantile + Adam steps), ``fit_seconds`` the
    original fit (flow training + PCA), ``time_ratio`` = seconds / fit_seconds.
    """

    n_forgotten: int
    n_retained: int
    steps_run: int
    max_steps: int
    converged: bool
    target: float
    seconds: float
    fit_seconds: float
    time_ratio: float
    retained_mean_change: float
    forgotten_below_target_after: float
    groups: dict = field(default_factory=dict)
    loss_history: list = field(default_factory=list)

    def table(self) -> str:
        """A plain-text table of the groups' mean log p before/after."""
        width = max([5] + [len(k) for k in self.groups]) + 2
        lines = [f"{'group':<{width}}{'n':>6}{'mean before':>14}{'mean after':>14}{'change':>10}"]
        for name, g in self.groups.items():
            lines.append(f"{name:<{width}}{g['n']:>6}{g['mean_before']:>14.2f}{g['mean_after']:>14.2f}"
                         f"{g['mean_after'] - g['mean_before']:>10.2f}")
        lines.append(f"steps {self.steps_run}/{self.max_steps}, converged {self.converged}, target {self.target:.2f}, "
                     f"{self.seconds:.2f} s = {100 * self.time_ratio:.2f}% of the fit ({self.fit_seconds:.1f} s)")
        return "\n".join(lines)


def _build_flow(config: FlowPriorConfig, seed: int):
    """The zuko flow of ``config``, its weights initialised from (seed, "flow-init")."""
    import zuko

    kwargs = dict(features=config.dims, transforms=config.transforms, hidden_features=tuple(config.hidden),
                  passes=config.passes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "flow-init"))
        if config.flow == "nsf":
            return zuko.flows.NSF(bins=config.bins, **kwargs)
        return zuko.flows.MAF(**kwargs)


def _as_latents(data, name: str) -> torch.Tensor:
    x = getattr(data, "latents", data)
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise InputError(f"{name} must be a LatentSet or a (N, c, h, w) latent tensor, got {type(data).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating point latents, got dtype {x.dtype}")
    if x.shape[0] < 1:
        raise InputError(f"{name} is empty (N = 0); pass at least one latent")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return x.detach().float()


class FlowPrior:
    """Normalizing-flow prior on TAEF2 latents: global PCA to D, then a zuko flow (plus a channel
    PCA for the NN refinement of samples).

    Learned state (set by fit): projector_ (PCAProjector), mean_ (d,), components_ (D, d),
    variances_ (D,), residual_variance_ (float), flow_ (zuko Flow), latent_shape_ (c, h, w),
    history_ (per-epoch training record), provenance_ (dict, with "operations").
    """

    def __init__(self, config: FlowPriorConfig | None = None):
        self.config = config or FlowPriorConfig()
        if not isinstance(self.config, FlowPriorConfig):
            raise ConfigError(f"config must be a FlowPriorConfig, got {type(self.config).__name__}")
        self.projector_: PCAProjector | None = None
        self.mean_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None
        self.variances_: torch.Tensor | None = None
        self.residual_variance_: float | None = None
        self.flow_ = None
        self.latent_shape_: tuple[int, int, int] | None = None
        self.history_: list[dict] = []
        self.provenance_: dict = {}
        self._cache: dict = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, data, *, seed: int = 0, progress: bool = False) -> "FlowPrior":
        """Fit the PCA maps and train the flow by maximum likelihood.

        Parameters
        ----------
        data : LatentSet or torch.Tensor
            Training latents (N, c, h, w).
        seed : int
            Drives the held-out split, the flow's initialisation and the mini-batch order.
        progress : bool
            Show a progress bar over epochs (only on a terminal).

        Returns
        -------
        self

        Raises
        ------
        InputError
            If the latents are not a finite (N, c, h, w) tensor.
        ConfigError
            If ``dims`` is not smaller than the number of training photos, or ``channels`` exceeds c.
        """
        check_seed(seed)
        x = _as_latents(data, "data")
        N, c, h, w = x.shape
        cfg = self.config
        if cfg.channels > c:
            raise ConfigError(f"channels = {cfg.channels} exceeds the latents' {c} channels; choose channels <= {c}")
        d = c * h * w
        n_val = int(round(cfg.val_fraction * N)) if cfg.val_fraction > 0 else 0
        if cfg.val_fraction > 0:
            n_val = max(1, n_val)
        n_train = N - n_val
        if cfg.dims >= min(n_train, d):
            raise ConfigError(f"dims (D) = {cfg.dims} must be smaller than the number of training photos after the "
                              f"held-out split ({n_train} of {N}) and than c*h*w = {d}; use dims <= "
                              f"{max(2, min(n_train, d) - 1)} or more photos")
        self.flow_ = None  # not fitted until the end (a failed fit leaves no half-fitted model)
        t_start = time.perf_counter()
        perm = torch.randperm(N, generator=make_generator(seed, "flow-split"))
        train, val = x[perm[n_val:]], x[perm[:n_val]]

        # 1-2: channel PCA (for the refinement's patch matching), global PCA of the flattened
        # latents (float64; from the n x n Gram matrix when n < d, else the d x d covariance)
        t0 = time.perf_counter()
        self.projector_ = PCAProjector(ProjectorConfig(cfg.channels)).fit(train)
        self.latent_shape_ = (c, h, w)
        self.mean_, self.components_, self.variances_, self.residual_variance_, explained = \
            _global_pca(train.reshape(n_train, d).double(), cfg.dims)
        t_pca = time.perf_counter() - t0
        self._cache = {}

        # 3: the flow, by maximum likelihood with early stopping on the held-out photos
        t0 = time.perf_counter()
        U = self._reduce(train)
        Uv = self._reduce(val) if n_val else None
        self.flow_ = _build_flow(cfg, seed)
        opt = torch.optim.Adam(self.flow_.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history_ = []
        best = (-math.inf, 0, copy.deepcopy(self.flow_.state_dict()))
        val0 = self._mean_lp(Uv) if n_val else None
        self.history_.append({"epoch": 0, "train_nll": None, "val_log_prob": val0})
        if n_val:
            best = (val0, 0, best[2])
        noise_gen = make_generator(seed, "flow-noise")
        bar = _bar(cfg.max_epochs, progress, "flow fit")
        for epoch in range(1, cfg.max_epochs + 1):
            self.flow_.train()
            order = torch.randperm(n_train, generator=make_generator(seed, "flow-batches", epoch))
            tot, cnt = 0.0, 0
            for s in range(0, n_train, cfg.batch_size):
                b = U[order[s:s + cfg.batch_size]]
                if cfg.noise > 0:  # Gaussian noise on the whitened coordinates: a regulariser
                    b = b + cfg.noise * torch.randn(b.shape, generator=noise_gen)
                loss = -self.flow_().log_prob(b).mean()
                if not torch.isfinite(loss):
                    break  # diverged: keep the best held-out state so far
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.flow_.parameters(), cfg.grad_clip)
                opt.step()
                tot += float(loss.detach()) * b.shape[0]
                cnt += b.shape[0]
            if cnt < n_train:
                self.history_.append({"epoch": epoch, "train_nll": None, "val_log_prob": None, "diverged": True})
                break
            rec = {"epoch": epoch, "train_nll": tot / cnt, "val_log_prob": None}
            if n_val:
                v = self._mean_lp(Uv)
                rec["val_log_prob"] = v
                if v > best[0]:
                    best = (v, epoch, copy.deepcopy(self.flow_.state_dict()))
            else:  # no held-out photos: keep the last completed epoch
                best = (-math.inf, epoch, copy.deepcopy(self.flow_.state_dict()))
            self.history_.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(val=rec["val_log_prob"], nll=rec["train_nll"])
            if n_val and epoch - best[1] >= cfg.patience:
                break
        if bar is not None:
            bar.close()
        self.flow_.load_state_dict(best[2])
        self.flow_.eval()
        t_flow = time.perf_counter() - t0
        t_total = time.perf_counter() - t_start
        gauss_val = float(_std_normal_lp(Uv).mean()) if n_val else None
        import zuko

        self.provenance_ = {
            "faceprint_version": __version__,
            "zuko_version": getattr(zuko, "__version__", None),
            "torch_version": torch.__version__,
            "created": now_iso(),
            "seed": seed,
            "n_photos": N,
            "n_train": n_train,
            "n_val": n_val,
            "data_hash": str(getattr(data, "data_hash", "")),
            "pca_explained_variance": explained,
            "epochs": len(self.history_) - 1,
            "best_epoch": best[1],
            "diverged": bool(self.history_[-1].get("diverged", False)),
            "val_log_prob": best[0] if n_val else None,
            "val_log_prob_untrained": val0,
            "val_log_prob_pca_gaussian": gauss_val,
            "fit_seconds": {"pca": round(t_pca, 4), "flow": round(t_flow, 4), "total": round(t_total, 4)},
            "threads": torch.get_num_threads(),
            "operations": [],
        }
        return self

    # ------------------------------------------------------------------ maps
    def _check_fitted(self):
        if self.flow_ is None:
            raise NotFittedError("FlowPrior is not fitted; call fit(latents, seed=...) or FlowPrior.load(path)")

    def _check_x(self, latents, name: str) -> torch.Tensor:
        x = _as_latents(latents, name)
        if tuple(x.shape[1:]) != tuple(self.latent_shape_):
            raise InputError(f"{name} must have shape (N, {', '.join(map(str, self.latent_shape_))}) like the "
                             f"training latents, got {tuple(x.shape)}")
        return x

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """latents (N, c, h, w) -> whitened reduced coordinates u (N, D)."""
        y = x.reshape(x.shape[0], -1) - self.mean_
        return (y @ self.components_.T) / self.variances_.sqrt()

    def _expand(self, u: torch.Tensor) -> torch.Tensor:
        """u (N, D) -> latents (N, c, h, w)."""
        y = (u * self.variances_.sqrt()) @ self.components_ + self.mean_
        return y.reshape(u.shape[0], *self.latent_shape_)

    def reduce(self, latents) -> torch.Tensor:
        """The flow's input for latents (N, c, h, w): whitened reduced coordinates (N, D)."""
        self._check_fitted()
        return self._reduce(self._check_x(latents, "latents"))

    def reconstruct(self, latents) -> torch.Tensor:
        """latents (N, c, h, w) through the D-dim reduction and back: (N, c, h, w)."""
        self._check_fitted()
        return self._expand(self.reduce(latents))

    def _mean_lp(self, U: torch.Tensor) -> float:
        with torch.no_grad():
            self.flow_.eval()
            return float(self._flow_lp(U).mean())

    def _flow_lp(self, U: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        dist = self.flow_()
        return torch.cat([dist.log_prob(U[s:s + chunk]) for s in range(0, U.shape[0], chunk)])

    # ------------------------------------------------------------------ density
    def log_prob(self, latents, *, space: str = "reduced", projector: PCAProjector | None = None) -> torch.Tensor:
        """Log density of latents (N, c, h, w): (N,) float32.

        Parameters
        ----------
        latents : LatentSet or torch.Tensor
        space : {"reduced", "latent", "projected"}
            "reduced": log p_flow(u) of the D whitened PCA coordinates (what the flow models
            and forget() changes). "latent": an exact density of the latent in R^(c h w): the
            flow on the PCA span (with the whitening Jacobian) times an isotropic Gaussian on
            the residual (see the module docstring). "projected": the same density expressed
            for the channel-whitened latent P0 x (the mixture's space).
        projector : PCAProjector, optional
            P0 for space="projected", with q = c channels (e.g. ``generator.projector_``, for
            numbers comparable with that generator's mixture). Default: this prior's own, which
            works only if ``config.channels`` = c.
        """
        self._check_fitted()
        if space not in SPACES:
            raise InputError(f"space must be one of {', '.join(SPACES)}; got {space!r}")
        x = self._check_x(latents, "latents")
        with torch.no_grad():
            self.flow_.eval()
            y = x.reshape(x.shape[0], -1) - self.mean_  # (N, d)
            coef = y @ self.components_.T  # (N, D)
            lp = self._flow_lp(coef / self.variances_.sqrt())
            if space != "reduced":
                d, D = y.shape[1], coef.shape[1]
                r2 = (y.double().pow(2).sum(1) - coef.double().pow(2).sum(1)).clamp_min(0)
                s2 = self.residual_variance_
                lp = (lp.double() - 0.5 * self.variances_.double().log().sum()
                      - 0.5 * (d - D) * (LOG_2PI + math.log(s2)) - r2 / (2 * s2))
            if space == "projected":
                c, h, w = self.latent_shape_
                proj = self.projector_ if projector is None else projector
                var = getattr(proj, "variances_", None)
                if not isinstance(var, torch.Tensor) or var.numel() != c:
                    raise InputError(f"space='projected' needs a fitted PCAProjector with all {c} channels (an "
                                     f"invertible channel map), got {'this prior' if projector is None else 'one'} "
                                     f"with {getattr(var, 'numel', lambda: None)()}; pass projector=generator.projector_ "
                                     "or use space='latent'")
                lp = lp + 0.5 * h * w * var.double().log().sum()
        return lp.float()

    # ------------------------------------------------------------------ sampling
    def sample_latents(self, n: int, *, seed: int, start: int = 0, temperature: float = 1.0,
                       refine_bank=None) -> Samples:
        """Draw n latents for image indices start..start+n-1 of the run seeded by ``seed``.

        Parameters
        ----------
        n, seed, start : ints
            Image i depends only on (seed, i, the model, temperature, refine_bank).
        temperature : float
            Scale of the base noise (1 = the fitted density; < 1 trades diversity for quality).
        refine_bank : LatentSet, torch.Tensor (M, c, h, w) or None
            Training latents for the NN refinement of papers/000 Sec. 3.3 (one cluster; the
            match is made on q-channel patches, the full c-channel pixel is copied). None: no
            refinement (provenance is -1).

        Returns
        -------
        Samples
            latents (n, c, h, w) float32, components (n,) = -1, provenance (n, h, w) (bank index
            of each copied pixel, -1 without refinement), indices (n,).
        """
        self._check_fitted()
        check_seed(seed)
        if not _is_int(n, 0):
            raise InputError(f"n must be a non-negative int, got {n!r}")
        if not _is_int(start, 0):
            raise InputError(f"start must be a non-negative int, got {start!r}")
        if not _is_pos_number(temperature):
            raise InputError(f"temperature must be a positive number, got {temperature!r}; try 1.0 or 0.8")
        c, h, w = self.latent_shape_
        D = self.config.dims
        bank = None
        if refine_bank is not None:
            bank = self._check_x(refine_bank, "refine_bank")
        B = SAMPLE_BLOCK
        lat, provs = [], []
        with torch.no_grad():
            self.flow_.eval()
            transform = self.flow_().transform
            for blk in range(start // B, (start + n + B - 1) // B):
                # the whole block of image indices blk*B .. blk*B+B-1 is computed, always with the
                # same rows, then the requested ones are kept: bit-identical for any n and start
                idx = range(blk * B, blk * B + B)
                eps = torch.stack([torch.randn(D, generator=make_generator(seed, "flow", i)) for i in idx])
                x = self._expand(transform.inv(eps * float(temperature)))  # (B, c, h, w)
                if bank is not None:
                    prov = self._refine(x, bank)  # (B, h, w)
                    x = gather(bank, prov).float()
                else:
                    prov = torch.full((B, h, w), -1, dtype=torch.int64)
                keep = [j for j, i in enumerate(idx) if start <= i < start + n]
                lat.append(x[keep])
                provs.append(prov[keep])
        return Samples(latents=torch.cat(lat) if lat else torch.zeros(0, c, h, w),
                       components=torch.full((n,), -1, dtype=torch.int64),
                       provenance=torch.cat(provs) if provs else torch.zeros(0, h, w, dtype=torch.int64),
                       indices=torch.arange(start, start + n))

    def _refine(self, x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Provenance (B, h, w) of the NN projection of latents x (B, c, h, w) onto the bank."""
        key = ("bank", bank.data_ptr(), tuple(bank.shape), float(bank.flatten()[:64].sum()))
        if key not in self._cache:
            self._cache = {}  # one bank at a time
            pb = self.projector_.transform(bank)  # (M, q, h, w)
            cfg = RefineConfig(self.config.patch_radius, self.config.refine_iterations)
            self._cache[key] = (pb, NNRefiner(cfg).fit(pb))
        pb, whole = self._cache[key]
        z = self.projector_.transform(x)  # (B, q, h, w)
        k = self.config.refine_neighbours
        if k is None or k >= pb.shape[0]:
            return whole.refine(z)[1]
        near = torch.cdist(z.flatten(1), pb.flatten(1)).topk(k, largest=False).indices  # (B, k)
        cfg = RefineConfig(self.config.patch_radius, self.config.refine_iterations)
        out = []
        for b in range(z.shape[0]):  # each sample refined on its own k nearest bank photos
            local = NNRefiner(cfg).fit(pb[near[b]]).refine(z[b:b + 1])[1]
            out.append(near[b][local])
        return torch.cat(out)

    # ------------------------------------------------------------------ forgetting
    def forget(self, latents_to_forget, *, retain_latents, steps: int = 300, seed: int = 0, lr: float = 1e-4,
               batch_size: int = 128, quantile: float = 0.01, margin: float = 0.0, forget_weight: float = 1.0,
               tau: float = 1.0, stop_when_done: bool = True, evaluate: dict | None = None,
               name: str | None = None) -> tuple["FlowPrior", FlowForgetReport]:
        """Lower the likelihood of given latents by a short fine-tune (papers/002).

        Parameters
        ----------
        latents_to_forget : LatentSet or torch.Tensor (M, c, h, w)
        retain_latents : LatentSet or torch.Tensor (R, c, h, w)
            Photos whose likelihood must be kept (e.g. the rest of the training set).
        steps : int
            Maximum Adam steps.
        seed : int
            Drives the retained mini-batches.
        lr, batch_size : Adam learning rate and retained batch size.
        quantile, margin : the target t = quantile of the retained photos' log p under this
            model, minus ``margin``.
        forget_weight, tau : weight w and softness tau of the softplus hinge on log p(f) - t.
        stop_when_done : stop as soon as every forgotten latent's log p is below t.
        evaluate : dict of name -> latents, optional
            Extra groups whose mean log p is reported before and after (e.g. unseen photos of the
            same person, other people); not used by the fine-tune.
        name : str, optional
            What is forgotten, for the provenance record.

        Returns
        -------
        (FlowPrior, FlowForgetReport)
            A new prior (this one is unchanged) and the measurements (log p in the reduced space;
            only the flow changes, so the before/after differences are the same in every space).
        """
        self._check_fitted()
        check_seed(seed)
        F_ = self._check_x(latents_to_forget, "latents_to_forget")
        R = self._check_x(retain_latents, "retain_latents")
        if not _is_int(steps, 1):
            raise InputError(f"steps must be an int >= 1, got {steps!r}; try a few hundred")
        if not _is_int(batch_size, 1):
            raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for nm, v in (("lr", lr), ("tau", tau), ("forget_weight", forget_weight)):
            if not _is_pos_number(v):
                raise InputError(f"{nm} must be a positive number, got {v!r}")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
            raise InputError(f"quantile must be a number in [0, 1], got {quantile!r}; try 0.01")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise InputError(f"margin must be a finite number, got {margin!r}")
        groups_in = {"forgotten": F_, "retained": R}
        for k, v in (evaluate or {}).items():
            if k in groups_in:
                raise InputError(f"evaluate may not use the reserved group name {k!r}")
            groups_in[str(k)] = self._check_x(v, f"evaluate[{k!r}]")
        before = {k: self.log_prob(v) for k, v in groups_in.items()}

        out = self.copy()
        t0 = time.perf_counter()
        Uf, Ur = out._reduce(F_), out._reduce(R)
        with torch.no_grad():
            out.flow_.eval()
            target = float(torch.quantile(out._flow_lp(Ur).double(), quantile)) - margin
        opt = torch.optim.Adam(out.flow_.parameters(), lr=lr)
        n_r = Ur.shape[0]
        gen = make_generator(seed, "flow-forget")
        order, pos = torch.randperm(n_r, generator=gen), 0
        losses, steps_run, converged = [], 0, False
        out.flow_.train()
        for step in range(1, steps + 1):
            if pos + min(batch_size, n_r) > n_r:
                order, pos = torch.randperm(n_r, generator=gen), 0
            b = Ur[order[pos:pos + batch_size]]
            pos += b.shape[0]
            lp = out.flow_().log_prob(torch.cat([b, Uf]))
            lp_r, lp_f = lp[: b.shape[0]], lp[b.shape[0]:]
            hinge = torch.nn.functional.softplus((lp_f - target) / tau).mean() * tau
            loss = -lp_r.mean() + forget_weight * hinge
            steps_run = step
            if stop_when_done and bool((lp_f.detach() < target).all()):
                converged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(out.flow_.parameters(), self.config.grad_clip)
            opt.step()
            losses.append(round(float(loss.detach()), 4))
        out.flow_.eval()
        seconds = time.perf_counter() - t0
        if not converged:
            converged = bool((out._flow_lp(Uf).detach() < target).all())
        after = {k: out.log_prob(v) for k, v in groups_in.items()}
        fit_s = float((self.provenance_.get("fit_seconds") or {}).get("total", float("nan")))
        groups = {k: {"n": int(before[k].numel()),
                      "mean_before": float(before[k].mean()), "mean_after": float(after[k].mean()),
                      "median_before": float(before[k].median()), "median_after": float(after[k].median())}
                  for k in groups_in}
        rep = FlowForgetReport(
            n_forgotten=F_.shape[0], n_retained=n_r, steps_run=steps_run, max_steps=steps, converged=converged,
            target=target, seconds=seconds, fit_seconds=fit_s,
            time_ratio=seconds / fit_s if fit_s > 0 else float("nan"),
            retained_mean_change=groups["retained"]["mean_after"] - groups["retained"]["mean_before"],
            forgotten_below_target_after=float((after["forgotten"] < target).float().mean()),
            groups=groups, loss_history=losses)
        out.record_operation({
            "operation": "forget", "method": "flow fine-tune (papers/002)", "name": name,
            "n_forgotten": F_.shape[0], "n_retained": n_r,
            "forgotten_content_sha256": list(getattr(latents_to_forget, "content_hashes", []) or []), "steps_run": steps_run, "max_steps": steps,
            "converged": converged, "seed": seed, "lr": lr, "quantile": quantile, "margin": margin,
            "forget_weight": forget_weight, "tau": tau, "target_log_prob": target,
            "seconds": round(seconds, 4), "time_ratio_to_fit": rep.time_ratio,
            "forgotten_mean_log_prob": [groups["forgotten"]["mean_before"], groups["forgotten"]["mean_after"]],
            "retained_mean_log_prob": [groups["retained"]["mean_before"], groups["retained"]["mean_after"]],
        })
        return out, rep

    # ------------------------------------------------------------------ state
    def copy(self) -> "FlowPrior":
        """An independent copy of the fitted state."""
        self._check_fitted()
        cache, self._cache = self._cache, {}
        try:
            return copy.deepcopy(self)
        finally:
            self._cache = cache

    def record_operation(self, op: dict) -> None:
        """Append an edit to the provenance, stamped with the time and faceprint version."""
        entry = {"when": now_iso(), "faceprint_version": __version__, **op}
        self.provenance_ = dict(self.provenance_)
        self.provenance_["operations"] = list(self.provenance_.get("operations", [])) + [entry]

    def save(self, path) -> None:
        """One .safetensors artifact (flow state_dict, PCA tensors; config, provenance), atomic."""
        self._check_fitted()
        tensors = {FLOW_PREFIX + k: v for k, v in self.flow_.state_dict().items()}
        tensors.update(self.projector_.state_tensors())
        tensors.update({"pca.mean": self.mean_, "pca.components": self.components_,
                        "pca.variances": self.variances_,
                        "pca.residual_variance": torch.tensor([self.residual_variance_], dtype=torch.float64)})
        meta = {"class": ARTIFACT_CLASS, "config": self.config.to_dict(), "latent_shape": list(self.latent_shape_),
                "provenance": self.provenance_, "history": self.history_}
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path) -> "FlowPrior":
        """Load an artifact written by :meth:`save`: the flow is rebuilt from the stored config and
        its state_dict loaded strictly."""
        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            config = FlowPriorConfig.from_dict(meta["config"])
            p = cls(config)
            p.projector_ = PCAProjector.from_state(ProjectorConfig(config.channels), tensors)
            p.mean_ = tensors["pca.mean"]
            p.components_ = tensors["pca.components"]
            p.variances_ = tensors["pca.variances"]
            p.residual_variance_ = float(tensors["pca.residual_variance"][0])
            p.latent_shape_ = tuple(int(v) for v in meta["latent_shape"])
            flow = _build_flow(config, 0)
            flow.load_state_dict({k[len(FLOW_PREFIX):]: v for k, v in tensors.items() if k.startswith(FLOW_PREFIX)},
                                 strict=True)
            flow.eval()
            p.flow_ = flow
            p.provenance_ = meta.get("provenance", {})
            p.history_ = meta.get("history", [])
            if p.components_.shape != (config.dims, p.mean_.numel()):
                raise ValueError(f"pca.components has shape {tuple(p.components_.shape)}, expected "
                                 f"({config.dims}, {p.mean_.numel()})")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"flow prior file {str(path)!r} is incomplete or inconsistent "
                                f"({e.__class__.__name__}: {e}); re-create it with FlowPrior.fit(...).save(path)") from None
        return p


def _global_pca(X: torch.Tensor, dims: int):
    """PCA of X (n, d) float64 to ``dims`` whitened directions.

    Returns mean (d,), components (dims, d) orthonormal rows (sign: largest-magnitude entry
    positive), variances (dims,), residual variance per remaining dimension (float) and the
    explained share of the variance (all float32 tensors / floats)."""
    n, d = X.shape
    mean = X.mean(0)
    Xc = X - mean
    if n < d:  # eigen-decompose the n x n Gram matrix: V = Xc^T A / sqrt(e)
        evals, A = torch.linalg.eigh(Xc @ Xc.T)
        order = torch.argsort(evals, descending=True)[:dims]
        e = evals[order].clamp_min(0)
        V = (Xc.T @ A[:, order]) / e.clamp_min(e[0] * 1e-12 + 1e-300).sqrt()  # (d, dims)
        V = V.T
        total = float(Xc.pow(2).sum())
    else:
        evals, vecs = torch.linalg.eigh(Xc.T @ Xc)
        order = torch.argsort(evals, descending=True)[:dims]
        e = evals[order].clamp_min(0)
        V = vecs[:, order].T
        total = float(evals.clamp_min(0).sum())
    idx = V.abs().argmax(1)
    signs = torch.sign(V[torch.arange(V.shape[0]), idx])
    signs[signs == 0] = 1
    V = V * signs[:, None]
    denom = max(n - 1, 1)
    var = e / denom
    floor = float(var[0]) * 1e-10 + 1e-30
    kept = float(e.sum())
    residual = max((total - kept) / denom / (d - dims), floor)
    explained = kept / total if total > 0 else 1.0
    return mean.float(), V.float().contiguous(), var.clamp_min(floor).float(), residual, explained


def _std_normal_lp(U: torch.Tensor) -> torch.Tensor:
    return -0.5 * (U.pow(2).sum(1) + U.shape[1] * LOG_2PI)


def _bar(total: int, progress: bool, desc: str):
    import sys

    if not (progress and sys.stderr is not None and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)
