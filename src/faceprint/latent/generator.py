"""The face generator: autoencoder + PCA projector + mixture + NN refinement (papers/000, Fig. 2).

fit(LatentSet) learns the projector P0 (Sec. 3.1), the Gaussian mixture (Sec. 3.2) and the
refinement bank (Sec. 3.3). sample_latents(n, seed) draws latents with one of the methods of
the paper's ablation (Fig. 6), and generate(n, seed) decodes them to images. Every sample of
"lrgmm-nn" and "nn" carries its provenance map: the training photo each latent pixel was
copied from.

Methods:
  "lrgmm-nn"  low-rank mixture sample, then NN projection (the paper's model; default)
  "lrgmm"     low-rank mixture sample alone (Fig. 6d)
  "nn"        each latent pixel copied from a uniformly drawn training photo, then NN
              projection over all training photos (Fig. 6c, "NN step alone")
  "gaussian"  every latent pixel from a standard Gaussian in the autoencoder's space (Fig. 6a)

The refinement copies the training photo's latent pixel. With copy="full" (default) it copies
the autoencoder's full c-channel feature y_j(p), with copy="projected" the q-channel feature
P0* P0 y_j(p) as in Eq. (5). The match is made on the q-channel patches either way; "full"
avoids the PCA loss in the copied detail (measured by `python -m faceprint.bench core`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..errors import ArtifactError, ConfigError, CopyGuardError, InputError, NotFittedError
from ..io import load_artifact, now_iso, save_artifact
from ..seeding import check_seed
from ..seeding import generator as make_generator
from .lowrank import LowRankSampler, image_generator
from .mixture import GaussianMixture, MixtureConfig
from .projector import PCAProjector, ProjectorConfig
from .refine import NNRefiner, RefineConfig, gather

METHODS = ("lrgmm-nn", "lrgmm", "nn", "gaussian")
FAST_EM_ABOVE = 4096  # em = "auto": the exact EM up to this many photos, the scale path above
ARTIFACT_CLASS = "faceprint.Generator"


DECODER_PREFIX = "decoder."


def auto_components(n_photos: int) -> int:
    """K = clip(round(N / 128), 1, 64): the paper's settings K = 1 (N = 32), 8 (N = 1024), 64 (N = 28k)."""
    return int(min(64, max(1, round(n_photos / 128))))


@dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of the LR-GMM-NN generator.

    components: K (None: auto_components(N)).  channels: q kept by the projector.
    rank_temperature: lambda in d_k = floor(lambda pi_k d0).  patch_radius: rho of the NN
    patches.  iterations: NN projections.  reg_covar: r added to each covariance.
    copy: "full" or "projected" (see module docstring).  method: default sampling method.
    refinement, candidates, seam_weight, sweeps: the NN step's rule (module refine.py);
    guide_levels, guide_block, guide_weight: the "guided" rule's (levels, block, guide_weight).
    refine_max_members: components of more photos are searched by groups (refine.py; None: whole).
    share_cap: at most this share of a face's latent pixels from one photo, enforced inside the
    guided and seam refinements (the paper's rule ignores it). None: no cap. Models saved before
    the cap existed load with None, so they keep drawing the same faces.
    Defaults: the guided rule with share cap 0.35 and guide weight 3 (celeba-1k, 1,000 faces: FID
    30.6 against 34.8 for LatentPatch and 38.4 for the seam rule with cap 0.5, with fewer faces
    closer to a training photo than 95% of held-out photos than LatentPatch, 5.9% against 8.4%;
    docs/results/quality-celeba-1k-guided.md). Models saved before the guided rule existed store
    their rule and cap, and keep them.
    """

    components: int | None = None
    channels: int = 32
    rank_temperature: float = 0.12
    patch_radius: int = 2
    iterations: int = 1
    reg_covar: float = 1e-3
    copy: str = "full"
    method: str = "lrgmm-nn"
    em_max_iter: int = 100
    em_tol: float = 1e-3
    em: str = "auto"
    em_subsample: int = 4096
    em_top_components: int = 4
    em_max_rank: int = 128
    refinement: str = "guided"
    candidates: int = 8
    seam_weight: float = 0.3
    sweeps: int = 4
    share_cap: float | None = 0.35
    guide_levels: int = 3
    guide_block: int = 4
    guide_weight: float = 3.0
    refine_max_members: int | None = 512
    guide_polish: int = 0

    def mixture_config(self, n_photos: int) -> MixtureConfig:
        """The EM settings for n_photos: the exact EM, or the scale path (module mixture.py)
        when em = "fast", or em = "auto" and there are more than FAST_EM_ABOVE photos."""
        K = self.components or auto_components(n_photos)
        fast = self.em == "fast" or (self.em == "auto" and n_photos > FAST_EM_ABOVE)
        if not fast:
            return MixtureConfig(n_components=K, reg_covar=self.reg_covar, max_iter=self.em_max_iter, tol=self.em_tol)
        return MixtureConfig(n_components=K, reg_covar=self.reg_covar, max_iter=self.em_max_iter, tol=self.em_tol,
                             dtype="float32", max_rank=self.em_max_rank, top_components=self.em_top_components,
                             subsample=self.em_subsample, member_tol=1e-3)

    def refine_config(self) -> RefineConfig:
        return RefineConfig(self.patch_radius, self.iterations, mode=self.refinement, candidates=self.candidates,
                            seam_weight=self.seam_weight, sweeps=self.sweeps,
                            max_share=self.share_cap if self.refinement in ("seam", "guided") else None,
                            levels=self.guide_levels, block=self.guide_block, guide_weight=self.guide_weight,
                            max_members=self.refine_max_members, polish=self.guide_polish)

    def __post_init__(self):
        if self.components is not None and (isinstance(self.components, bool) or not isinstance(self.components, int)
                                            or self.components < 1):
            raise ConfigError(f"components must be a positive int or None (auto), got {self.components!r}")
        ProjectorConfig(self.channels)
        self.refine_config()
        MixtureConfig(n_components=self.components or 1, reg_covar=self.reg_covar,
                      max_iter=self.em_max_iter, tol=self.em_tol)
        if not (isinstance(self.rank_temperature, (int, float)) and self.rank_temperature > 0
                and math.isfinite(self.rank_temperature)):
            raise ConfigError(f"rank_temperature must be a positive number, got {self.rank_temperature!r}; "
                              "the paper uses 0.12")
        if self.em not in ("auto", "exact", "fast"):
            raise ConfigError(f"em must be 'auto', 'exact' or 'fast', got {self.em!r}")
        for name in ("em_subsample", "em_top_components", "em_max_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.copy not in ("full", "projected"):
            raise ConfigError(f"copy must be 'full' or 'projected', got {self.copy!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")


@dataclass(frozen=True)
class CopyGuard:
    """The copy guard: no face leaves the generator as a near-copy of a training photo.

    A face is redrawn (from its own next random stream, so face i of seed s stays the same
    image alone or in a batch) when its latent is closer to a training latent than the
    ``quantile`` of how close held-out photos come to the training set (leave-one-out
    distances, recorded at fit), or when more than ``max_share`` of its latent pixels come
    from one training photo. After ``max_attempts`` redraws of one face, generation stops
    with CopyGuardError rather than ship a copy."""

    quantile: float = 0.05
    max_share: float = 0.5
    max_attempts: int = 50

    def __post_init__(self):
        if not (isinstance(self.quantile, (int, float)) and 0 <= self.quantile < 1):
            raise ConfigError(f"copy guard quantile must be in [0, 1), got {self.quantile!r}; the default is 0.05")
        if not (isinstance(self.max_share, (int, float)) and 0 < self.max_share <= 1):
            raise ConfigError(f"copy guard max_share must be in (0, 1], got {self.max_share!r}; the default is 0.5")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"copy guard max_attempts must be a positive int, got {self.max_attempts!r}")


DEFAULT_GUARD = CopyGuard()


@dataclass
class Samples:
    """latents (n, c, h, w) in the autoencoder's space; components (n,) (-1 where none);
    provenance (n, h, w) training-photo index per latent pixel (-1 where nothing was copied);
    indices (n,) the image index of each sample within its seeded run; redraws (n,) how many
    times the copy guard redrew each face; guard the guard's settings and threshold (None: off)."""

    latents: torch.Tensor
    components: torch.Tensor
    provenance: torch.Tensor
    indices: torch.Tensor
    redraws: torch.Tensor | None = None
    guard: dict | None = None


@dataclass
class TrainingRecord:
    """What the generator was fitted on: photo names and content hashes, in bank order."""

    relpaths: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    data_hash: str = ""
    image_size: int = 128
    root: str = ""


class Generator:
    """LR-GMM-NN face generator. Learned state: projector_, mixture_, bank_ (N, c, h, w)."""

    def __init__(self, config: GeneratorConfig | None = None, autoencoder=None):
        self.config = config or GeneratorConfig()
        self.autoencoder = autoencoder
        self.projector_: PCAProjector | None = None
        self.mixture_: GaussianMixture | None = None
        self.bank_: torch.Tensor | None = None
        # keys of the refinement memory when they differ from its values (bank_): set only by a
        # key-value insertion of faceprint.rewrite.bank; None means the bank is its own key
        self.bank_keys_: torch.Tensor | None = None
        self.training_ = TrainingRecord()
        self.provenance_: dict = {}
        # A model instance may carry its own decoder weights (a fingerprinted copy: same
        # architecture, weights with the instance's code folded in) and what they are.
        self.decoder_state_: dict[str, torch.Tensor] | None = None
        self.fingerprint_: dict | None = None
        self.guard_distances_: torch.Tensor | None = None
        # a learned latent model beside the mixture (faceprint.gan.LatentGAN): method "gan"
        self.latent_model_ = None
        self._cache = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, latent_set, *, seed: int = 0) -> "Generator":
        """Fit on a LatentSet (latents (N, c, h, w) plus the photos' names and hashes)."""
        check_seed(seed)
        latents = latent_set.latents
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise InputError(f"latent_set.latents must be a (N, c, h, w) tensor, got {tuple(getattr(latents, 'shape', ()))}")
        N = latents.shape[0]
        if N < 2:
            raise InputError(f"need at least 2 photos to fit a generator, got {N}; add photos to the folder")
        K = self.config.components or auto_components(N)
        if K > N:
            raise ConfigError(f"components = {K} exceeds the number of photos ({N}); use --components {max(1, N // 32)} or fewer")
        # The bank is stored in float16; fit on exactly the values that are stored.
        bank = latents.detach().to(torch.float16).contiguous()
        full = bank.float()
        t0 = time.perf_counter()
        self.projector_ = PCAProjector(ProjectorConfig(self.config.channels)).fit(full)
        Y = self.projector_.transform(full)  # (N, q, h, w)
        t_projector = time.perf_counter() - t0
        t0 = time.perf_counter()
        mcfg = self.config.mixture_config(N)
        self.mixture_ = GaussianMixture(mcfg).fit(Y.reshape(N, -1), generator=make_generator(seed, "kmeans"))
        # EM runs in float64; the model keeps float32 parameters (half the artifact), and uses
        # exactly what it stores, so a saved and reloaded model draws the same faces.
        self.mixture_.astype(torch.float32)
        t_mixture = time.perf_counter() - t0
        self.bank_ = bank
        self.bank_keys_ = None
        self._cache = {}
        t0 = time.perf_counter()
        self._fit_guard(seed)
        t_guard = time.perf_counter() - t0
        self.training_ = TrainingRecord(
            relpaths=list(getattr(latent_set, "relpaths", [str(i) for i in range(N)])),
            hashes=list(getattr(latent_set, "hashes", getattr(latent_set, "content_hashes", [])) or []),
            data_hash=str(getattr(latent_set, "data_hash", "")),
            image_size=int(getattr(latent_set, "image_size", latents.shape[-1] * 8)),
            root=str(getattr(latent_set, "root", "")),
        )
        self.provenance_ = {
            "faceprint_version": __version__,
            "created": now_iso(),
            "seed": seed,
            "n_photos": N,
            "components": K,
            "data_hash": self.training_.data_hash,
            "em_iterations": self.mixture_.history_.n_iter,
            "em_converged": self.mixture_.history_.converged,
            "em_log_likelihood": self.mixture_.final_log_likelihood_,
            "autoencoder": getattr(self.autoencoder, "id", None),
            "fit_seconds": {"projector": round(t_projector, 4), "mixture": round(t_mixture, 4),
                            "copy_guard": round(t_guard, 4)},
            "operations": [],
        }
        self._cache = {}
        return self

    # ------------------------------------------------------------------ state
    def _check_fitted(self):
        if self.mixture_ is None:
            raise NotFittedError("Generator is not fitted; call fit(latent_set) or Generator.load(path)")

    @property
    def n_photos(self) -> int:
        self._check_fitted()
        return self.bank_.shape[0]

    @property
    def default_method(self) -> str:
        """The sampling method used when none is asked for: "gan" for a model with a learned
        latent model (faceprint.gan), the config's method otherwise."""
        return "gan" if getattr(self, "latent_model_", None) is not None else self.config.method

    @property
    def memory_keys(self) -> torch.Tensor:
        """The refinement memory's keys: the bank, unless a bank rewrite stored keys beside
        edited values (``bank_keys_``). The mixture and the patch search work on these."""
        keys = getattr(self, "bank_keys_", None)
        return self.bank_ if keys is None else keys

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        self._check_fitted()
        return tuple(self.bank_.shape[1:])

    def _projected_bank(self) -> torch.Tensor:
        if "projected" not in self._cache:
            keys = getattr(self, "bank_keys_", None)
            if keys is not None and keys.shape != self.bank_.shape:
                raise ArtifactError(f"the memory's keys {tuple(keys.shape)} no longer match its values "
                                    f"{tuple(self.bank_.shape)} (an edit after `faceprint rewrite --memory bank`); "
                                    "redo the rewrite on the edited model")
            self._cache["projected"] = self.projector_.transform((self.bank_ if keys is None else keys).float())
        return self._cache["projected"]

    def _refiner(self, single_cluster: bool = False) -> NNRefiner:
        key = ("refiner", single_cluster)
        if key not in self._cache:
            labels = None if single_cluster else self.mixture_.labels_
            self._cache[key] = NNRefiner(self.config.refine_config()).fit(self._projected_bank(), labels)
        return self._cache[key]

    def _sampler(self, rank_temperature: float) -> LowRankSampler:
        key = ("sampler", float(rank_temperature))
        if key not in self._cache:
            self._cache[key] = LowRankSampler(self.mixture_, rank_temperature)
        return self._cache[key]

    # ------------------------------------------------------------------ sampling
    def sample_latents(self, n: int, *, seed: int, start: int = 0, method: str | None = None,
                       rank_temperature: float | None = None, component: int | None = None,
                       chunk: int = 1024, guard: "CopyGuard | None" = None) -> Samples:
        """Draw n latents for image indices start..start+n-1 of the run seeded by ``seed``.

        Image i depends only on (seed, i, the model, the method and the guard), not on n or
        start. ``guard`` (a CopyGuard) redraws every face that is a near-copy of a training
        photo; this raw sampler has none by default, :meth:`generate` (what the CLI and the web
        app ship) has DEFAULT_GUARD."""
        self._check_fitted()
        check_seed(seed)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a non-negative int, got {n!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InputError(f"start must be a non-negative int, got {start!r}")
        method = method or self.default_method
        allowed = METHODS + (("gan",) if getattr(self, "latent_model_", None) is not None else ())
        if method not in allowed:
            raise InputError(f"method must be one of {', '.join(allowed)}; got {method!r}"
                             + ("; 'gan' needs a model fitted with --method gan" if method == "gan" else ""))
        K = self.mixture_.weights_.numel()
        if component is not None and not (isinstance(component, int) and 0 <= component < K):
            raise InputError(f"component must be an int in [0, {K}), got {component!r}")
        if guard is not None and not isinstance(guard, CopyGuard):
            raise InputError(f"guard must be a CopyGuard or None, got {type(guard).__name__}")
        lam = self.config.rank_temperature if rank_temperature is None else rank_temperature
        c, h, w = self.latent_shape
        lat, comps, provs, redraws = [], [], [], []
        threshold = self.guard_threshold(guard.quantile) if guard is not None else None
        for s in range(start, start + n, chunk):
            idx = list(range(s, min(start + n, s + chunk)))
            z, comp, prov = self._draw(idx, seed, 0, method, lam, component)
            tries = torch.zeros(len(idx), dtype=torch.int64)
            if guard is not None:
                bad = self._copies(z, prov, threshold, guard)
                attempt = 0
                while bad.any():
                    attempt += 1
                    rows = torch.nonzero(bad).squeeze(1)
                    if attempt > guard.max_attempts:
                        first = idx[int(rows[0])]
                        raise CopyGuardError(
                            f"face {first} of seed {seed} is still a near-copy of a training photo after "
                            f"{guard.max_attempts} redraws (closer than the held-out {guard.quantile:g} quantile "
                            f"{threshold:.3g}, or more than {guard.max_share:g} of it from one photo); the model "
                            "memorises its photos: fit on more photos, use fewer components, or a lower "
                            "--max-share only if you accept copies")
                    z2, comp2, prov2 = self._draw([idx[int(r)] for r in rows], seed, attempt, method, lam, component)
                    z[rows], comp[rows], prov[rows] = z2, comp2, prov2
                    tries[rows] = attempt
                    bad[rows] = self._copies(z2, prov2, threshold, guard)
            lat.append(z)
            comps.append(comp)
            provs.append(prov)
            redraws.append(tries)
        empty = (torch.zeros(0, c, h, w), torch.zeros(0, dtype=torch.int64), torch.zeros(0, h, w, dtype=torch.int64))
        return Samples(
            latents=torch.cat(lat) if lat else empty[0],
            components=torch.cat(comps) if comps else empty[1],
            provenance=torch.cat(provs) if provs else empty[2],
            indices=torch.arange(start, start + n),
            redraws=torch.cat(redraws) if redraws else empty[1],
            guard=None if guard is None else {**asdict(guard), "threshold": threshold,
                                              "threshold_source": self.guard_stats_source()},
        )

    def _draw(self, idx: list[int], seed: int, attempt: int, method: str, lam: float, component):
        """One draw of the faces ``idx`` (their ``attempt``-th): latents, components, provenance."""
        m = len(idx)
        c, h, w = self.latent_shape
        q = self.config.channels
        none = torch.full((m, h, w), -1, dtype=torch.int64)
        if method == "gan":  # a learned latent model: nothing copied, no provenance
            return self.latent_model_.draw(idx, seed, attempt), torch.full((m,), -1, dtype=torch.int64), none
        if method == "gaussian":
            z = torch.stack([torch.randn(c, h, w, generator=image_generator(seed, "gaussian", i, attempt)) for i in idx])
            return z, torch.full((m,), -1, dtype=torch.int64), none
        if method == "nn":
            N = self.n_photos
            init = torch.stack([torch.randint(N, (h, w), generator=image_generator(seed, "nn", i, attempt)) for i in idx])
            z0 = gather(self._projected_bank(), init)
            _, prov = self._refiner(single_cluster=True).refine(z0)
            if self.config.iterations == 0:
                prov = init
            comp = torch.full((m,), -1, dtype=torch.int64)
        else:
            zf, comp = self._sampler(lam).draw_at(idx, seed, attempt=attempt, component=component)
            z0 = zf.reshape(m, q, h, w)
            if method == "lrgmm":
                return self.projector_.inverse(z0), comp, none
            _, prov = self._refiner().refine(z0, comp)
        if self.config.copy == "full":
            return gather(self.bank_, prov).float(), comp, prov
        return self.projector_.inverse(gather(self._projected_bank(), prov)), comp, prov

    # ------------------------------------------------------------------ copy guard
    def _bank_flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training latents as float32 rows (N, D) and their squared norms (N,)."""
        if "bank_flat" not in self._cache:
            B = self.bank_.reshape(self.bank_.shape[0], -1).float()
            self._cache["bank_flat"] = (B, (B * B).sum(1))
        return self._cache["bank_flat"]

    def nearest_training_distance(self, latents: torch.Tensor, *, exclude: torch.Tensor | None = None,
                                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distance of each latent (B, c, h, w) to its nearest training latent, and that
        photo's index: ((B,), (B,)). ``exclude`` (B,) names one training photo per row to leave out
        (leave-one-out distances of the training photos themselves)."""
        self._check_fitted()
        Bk, b2 = self._bank_flat()
        X = latents.reshape(latents.shape[0], -1).float()
        dist = torch.empty(X.shape[0])
        arg = torch.empty(X.shape[0], dtype=torch.int64)
        for s in range(0, X.shape[0], chunk):
            x = X[s:s + chunk]
            d2 = (x * x).sum(1, keepdim=True) + b2[None] - 2 * x @ Bk.T  # (b, N)
            if exclude is not None:
                d2[torch.arange(x.shape[0]), exclude[s:s + chunk]] = float("inf")
            v, i = d2.min(1)
            dist[s:s + chunk], arg[s:s + chunk] = v.clamp_min(0).sqrt(), i
        return dist, arg

    def _fit_guard(self, seed: int, max_queries: int = 1024) -> None:
        """Leave-one-out nearest-neighbour distances of (up to ``max_queries``, seeded) training
        photos: each photo is held out of the bank in turn, which is how close a new photo of the
        same distribution comes to the N - 1 others (a held-out split would give the same
        distribution, but would take photos away from the model)."""
        N = self.n_photos
        if N < 2:
            self.guard_distances_ = torch.zeros(0)
            return
        g = make_generator(seed, "copy-guard")
        rows = torch.randperm(N, generator=g)[:max_queries].sort().values
        d, _ = self.nearest_training_distance(self.bank_[rows].float(), exclude=rows)
        self.guard_distances_ = d.sort().values.float()

    def guard_stats_source(self) -> str:
        return f"leave-one-out nearest-photo distances of {int(self.guard_distances_.numel())} training photos"

    def guard_threshold(self, quantile: float) -> float:
        """The distance below which a face counts as a near-copy: the ``quantile`` of the
        training photos' leave-one-out nearest-photo distances (computed at fit)."""
        self._check_fitted()
        if getattr(self, "guard_distances_", None) is None:
            self._fit_guard(int(self.provenance_.get("seed", 0) or 0))
        d = self.guard_distances_
        if d.numel() == 0:
            return 0.0
        return float(torch.quantile(d.double(), quantile))

    def _copies(self, z: torch.Tensor, prov: torch.Tensor, threshold: float, guard: "CopyGuard",
                candidates: int = 8) -> torch.Tensor:
        """(B,) bool: faces the guard refuses.

        Share rule: more than guard.max_share of the latent pixels come from one photo.
        Distance rule: beyond the pixels it copies from a training photo, the face is still
        closer to that photo than new photos come to the training set. For training photo j the
        distance is the root of the mean squared latent-pixel distance over the pixels *not*
        copied from j (all pixels for a face without provenance), scaled to a whole latent, and
        it is compared with the held-out threshold. (A plain latent distance would flag most
        collages: a pixel copied from j is at distance 0 from j, so any collage sits closer to
        its sources than a new photo does, whether or not it looks like them.) It is evaluated
        for the ``candidates`` photos nearest to the face and the two it copies most from."""
        B = z.shape[0]
        N = self.n_photos
        _, h, w = self.latent_shape
        flat = prov.reshape(B, -1)
        bad = torch.zeros(B, dtype=torch.bool)
        counts = None
        if (prov >= 0).any():
            counts = torch.zeros(B, N + 1, dtype=torch.int64)
            counts.scatter_add_(1, flat.clamp_min(-1) + 1, torch.ones_like(flat))
            counts = counts[:, 1:]
            share = counts.max(1).values.double() / flat.shape[1]
            bad |= share > guard.max_share
        if threshold <= 0:
            return bad
        Bk, b2 = self._bank_flat()
        X = z.reshape(B, -1).float()
        d2 = (X * X).sum(1, keepdim=True) + b2[None] - 2 * X @ Bk.T  # (B, N)
        cand = d2.topk(min(candidates, N), dim=1, largest=False).indices
        if counts is not None:
            cand = torch.cat([cand, counts.topk(min(2, N), dim=1).indices], 1)
        C = self.bank_.shape[1]
        T = self.bank_[cand].float().reshape(B, cand.shape[1], C, h * w)  # (B, M, C, hw)
        per_px = ((T - z.reshape(B, 1, C, h * w).float()) ** 2).sum(2)  # (B, M, hw)
        keep = flat[:, None, :] != cand[:, :, None]  # pixels not copied from the candidate
        n_keep = keep.sum(2)
        mean_sq = (per_px * keep).sum(2) / n_keep.clamp_min(1)
        mean_sq[n_keep == 0] = 0.0  # wholly copied: distance 0
        dist = (mean_sq * (h * w)).sqrt()  # on the scale of a whole-latent distance
        bad |= dist.min(1).values < threshold
        return bad

    def generate(self, n: int, *, seed: int, start: int = 0, method: str | None = None,
                 rank_temperature: float | None = None, progress: bool = False,
                 guard: CopyGuard | None = DEFAULT_GUARD) -> tuple[torch.Tensor, Samples]:
        """Draw n faces: (images (n, 3, S, S) float in [0, 1], Samples). See sample_latents."""
        if self.autoencoder is None:
            raise NotFittedError("this Generator has no autoencoder; pass autoencoder= or use Generator.load()")
        samples = self.sample_latents(n, seed=seed, start=start, method=method, rank_temperature=rank_temperature,
                                      guard=guard)
        images = self.autoencoder.decode(samples.latents, progress=progress)
        return images, samples

    def centroids(self) -> torch.Tensor:
        """The mixture means mapped back to the autoencoder's space: (K, c, h, w) (paper Fig. 7)."""
        self._check_fitted()
        q = self.config.channels
        _, h, w = self.latent_shape
        return self.projector_.inverse(self.mixture_.means_.float().reshape(-1, q, h, w))

    def provenance_summary(self, provenance: torch.Tensor) -> list[dict]:
        """Per face: distinct training photos used and the largest share taken from one photo."""
        out = []
        for p in provenance:
            flat = p.flatten()
            flat = flat[flat >= 0]
            if flat.numel() == 0:
                out.append({"distinct_photos": 0, "max_share": 0.0, "top_photo": None})
                continue
            counts = torch.bincount(flat)
            top = int(counts.argmax())
            out.append({"distinct_photos": int((counts > 0).sum()), "max_share": float(counts[top]) / flat.numel(),
                        "top_photo": self.training_.relpaths[top] if top < len(self.training_.relpaths) else str(top)})
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """One .safetensors artifact (tensors + JSON metadata), written atomically."""
        self._check_fitted()
        tensors = {"bank": self.bank_}
        if getattr(self, "bank_keys_", None) is not None:
            tensors["bank.keys"] = self.bank_keys_.contiguous()
        if self.guard_distances_ is not None:
            tensors["guard.distances"] = self.guard_distances_.float().contiguous()
        tensors.update(self.projector_.state_tensors())
        tensors.update(self.mixture_.state_tensors())
        if self.decoder_state_ is not None:
            tensors.update({DECODER_PREFIX + k: v.contiguous() for k, v in self.decoder_state_.items()})
        meta = {
            "class": ARTIFACT_CLASS,
            "config": asdict(self.config),
            "mixture_config": asdict(self.mixture_.config),
            "mixture_converged": self.mixture_.history_.converged,
            "training": asdict(self.training_),
            "provenance": self.provenance_,
            "autoencoder": {"name": "taef2", "id": self._autoencoder_id()},
            "fingerprint": self.fingerprint_,
        }
        if getattr(self, "latent_model_", None) is not None:
            tensors.update(self.latent_model_.state_tensors("gan."))
            meta["latent_model"] = self.latent_model_.meta()
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path, *, autoencoder="auto", weights=None) -> "Generator":
        """Load an artifact written by save(). autoencoder="auto" loads TAEF2 (weights lookup as
        in faceprint.autoencoder) and checks it is the one the model was fitted with; None skips it."""
        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            stored = dict(meta["config"])
            # models written before the seam-aware refinement used the paper's rule: keep it
            stored.setdefault("refinement", "paper")
            # models written before the share cap had none: keep their faces
            stored.setdefault("share_cap", None)
            # and before the refinement searched large components by groups: keep searching them whole
            stored.setdefault("refine_max_members", None)
            config = GeneratorConfig(**stored)
            mcfg = MixtureConfig(**meta["mixture_config"])
            g = cls(config)
            g.projector_ = PCAProjector.from_state(ProjectorConfig(config.channels), tensors)
            g.mixture_ = GaussianMixture.from_state(mcfg, tensors, converged=bool(meta.get("mixture_converged", True)))
            g.bank_ = tensors["bank"]
            g.bank_keys_ = tensors.get("bank.keys")
            if g.bank_keys_ is not None and g.bank_keys_.shape != g.bank_.shape:
                raise KeyError(f"bank.keys has shape {tuple(g.bank_keys_.shape)}, bank {tuple(g.bank_.shape)}")
            g.guard_distances_ = tensors.get("guard.distances")
            g.training_ = TrainingRecord(**meta["training"])
            g.provenance_ = meta.get("provenance", {})
            dec = {k[len(DECODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(DECODER_PREFIX)}
            g.decoder_state_ = dec or None
            g.fingerprint_ = meta.get("fingerprint")
            if meta.get("latent_model") is not None:
                from ..gan.model import LatentGAN

                g.latent_model_ = LatentGAN.from_state(meta["latent_model"], tensors, "gan.",
                                                       where=f"model file {str(path)!r}")
        except (KeyError, TypeError, ConfigError, RuntimeError) as e:
            raise ArtifactError(f"model file {str(path)!r} is incomplete or inconsistent ({e.__class__.__name__}: {e}); "
                                "re-create it with `faceprint fit`") from None
        expected = (meta.get("autoencoder") or {}).get("id")
        if autoencoder == "auto":
            from ..autoencoder import TAEF2
            autoencoder = TAEF2.load(weights)
        if autoencoder is not None and expected and getattr(autoencoder, "id", None) != expected:
            raise ArtifactError(f"model file {str(path)!r} was fitted with autoencoder {expected}, but the loaded "
                                f"weights are {getattr(autoencoder, 'id', None)}; pass --weights with the original weights")
        if autoencoder is not None and g.decoder_state_ is not None:
            autoencoder = autoencoder.with_decoder_state(g.decoder_state_)
        g.autoencoder = autoencoder
        return g

    def _autoencoder_id(self):
        """The pretrained autoencoder the model was fitted with (kept when loaded without one)."""
        ae = self.autoencoder
        if ae is not None:
            return getattr(ae, "base_id", getattr(ae, "id", None))
        return self.provenance_.get("autoencoder")

    def copy(self, *, share: tuple[str, ...] = ()) -> "Generator":
        """An independent copy of the fitted state (the autoencoder is shared, not copied).

        ``share`` names attributes the copy takes by reference instead of copying (e.g.
        ``("bank_",)`` when the caller replaces the bank anyway: it saves copying the memory)."""
        self._check_fitted()
        for name in share:
            if name not in ("bank_", "bank_keys_", "projector_", "mixture_", "training_"):
                raise ValueError(f"share: {name!r} is not a shareable attribute")
        held = {name: getattr(self, name) for name in ("autoencoder", *share)}
        cache, self._cache = self._cache, {}
        for name in held:
            setattr(self, name, None)
        try:
            g = copy.deepcopy(self)
        finally:
            for name, v in held.items():
                setattr(self, name, v)
            self._cache = cache
        for name, v in held.items():
            setattr(g, name, v)
        return g

    def record_operation(self, op: dict) -> None:
        """Append an edit (taming, fingerprinting, ...) to the model's provenance, stamped with
        the time and faceprint version."""
        entry = {"when": now_iso(), "faceprint_version": __version__, **op}
        self.provenance_ = dict(self.provenance_)
        self.provenance_["operations"] = list(self.provenance_.get("operations", [])) + [entry]

    def with_decoder(self, decoder_state: dict[str, torch.Tensor], fingerprint: dict | None = None) -> "Generator":
        """A copy of this model (sharing its fitted state) that decodes with other decoder weights
        of the same architecture, e.g. a fingerprinted instance; saved and loaded with the model."""
        self._check_fitted()
        g = copy.copy(self)
        g._cache = {}
        g.decoder_state_ = {k: v.detach().cpu().contiguous() for k, v in decoder_state.items()}
        g.fingerprint_ = dict(fingerprint) if fingerprint is not None else None
        g.provenance_ = dict(self.provenance_)
        if self.autoencoder is not None:
            base = getattr(self.autoencoder, "base", self.autoencoder)
            g.autoencoder = base.with_decoder_state(g.decoder_state_)
        return g
