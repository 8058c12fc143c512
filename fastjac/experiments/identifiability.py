"""Fig. 1, 5, 6 (App. C): a mean-field posterior picks out the true latent axes; a full one does not.

Data (per trial): x = ν(W z) + ε, z ~ N(0, I₂), ε ~ N(0, 0.05² I₂), ν ∈ {identity, tanh, sigmoid,
elu}. ``--mixing orthogonal`` (default): W = R·diag(2, 1), R a random rotation (the identifiable
case for identity ν); ``--mixing gaussian``: W's entries N(0, 1) with columns rescaled to norms 2
and 1 (the paper's wording), where a mean-field VAE aligns with W's principal axes instead, so the
angle to W's right singular vectors is reported too; ``--mixing aligned``: W = P·diag(2, 1), P a
random signed permutation, where every row of W reads one latent, so the true posterior is
mean-field in the true axes for every elementwise ν (a control: the decoder Jacobian
diag(ν′(Wz))·W has orthogonal columns at every z).

Reference runs (``--reference truth``, default): per data set the encoder is fitted to the TRUE
decoder and L-BFGS then runs on everything from there (:func:`truth_start`); with the decoder's
own angle (A ≈ W·Q) they tell an optimiser that misses the true axes from a model whose optimum
is elsewhere.

Model: decoder p(x|z) = N(ν(A z) + b, 0.05² I); posterior N(μ, Σ) with μ = O₁C′x + d and one Σ
(amortised) or free μᵢ, Σᵢ per point (unamortised); Σ = O₂ D′D′ᵀ O₂ᵀ with O₁, O₂ fixed random
rotations per trial, so plain gradient steps have no preferred axes. Diagonal Σ uses only
diag(O₂D′D′ᵀO₂ᵀ) (the off-diagonal entries are left out of the ELBO, as in the paper).
The expectation in the ELBO is a tensor-product Gauss–Hermite rule (exact for identity ν), so
full-batch training is deterministic. Step size: lr divided by 10 every n steps, 5n steps.

All trials of a setting are one batched computation: every tensor carries the trial as its first
dimension and the loss is the sum of the trials' losses, so their gradients never mix.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..objectives import gaussian_kl
from ..observations import Gaussian
from . import lbfgs, plotting
from .procrustes import latent_angle, rotation, rotation_angle
from .results import Progress, Results, log

NONLINEARITIES = {"identity": lambda t: t, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "elu": F.elu}
INFERENCE = ("amortised", "unamortised")
COVARIANCES = ("diagonal", "full")
MIXINGS = ("orthogonal", "gaussian", "aligned")
NOISE_STD = 0.05
COLUMN_NORMS = (2.0, 1.0)
PROFILE_ANGLES = tuple(-42.5 + 2.5 * k for k in range(36))    # (−45°, 45°] every 2.5°, 0° included
# nats/point: ELBO differences below this are the optimiser's tolerance, not the model's (a full-Σ
# profile, flat in exact arithmetic, varies by up to ~1e-8 where per-point L-BFGS stops early; the
# smallest real difference in the grids is ~1e-4)
FLAT = 1e-6
PAPER_STEPS = (100, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 20000)


@dataclass(frozen=True)
class Training:
    """What every setting shares."""
    num_points: int = 4000
    mixing: str = "orthogonal"
    optimizer: str = "adam"
    lr: float = 0.1
    stages: int = 5
    quadrature: int = 3
    seed: int = 0
    refine: str = "lbfgs"         # after the schedule: per-trial L-BFGS on the same ELBO, or "none"
    refine_iterations: int = 3000
    refine_tolerance: float = 1e-7  # stop a trial once its gradient's largest entry is below this
    reference: str = "truth"      # also start each data set at the true model (truth_start), or "none"
    profile: int = 8              # data sets whose ELBO profile over the decoder's angle is drawn


@dataclass(frozen=True)
class Setting:
    nonlinearity: str
    inference: str
    covariance: str
    steps_per_stage: int  # n: the step size drops by 10× every n steps

    @property
    def key(self) -> str:
        return f"{self.nonlinearity}/{self.inference}/{self.covariance}/n={self.steps_per_stage}"


class Data(NamedTuple):
    W: Tensor  # (T, 2, 2) mixing matrices
    Z: Tensor  # (T, N, 2) true latents
    X: Tensor  # (T, N, 2) observations


def trial_seeds(seed: int, setting: Setting, trial: int) -> tuple[int, int]:
    """(data seed, initialisation seed) of one trial, stable across runs so resumed runs match.

    The data depend only on (seed, ν, trial): trial t of every n, inference and covariance sees
    the same data set, so their ELBOs compare (a paired design); initialisations all differ."""
    data = zlib.crc32(f"{seed}/{setting.nonlinearity}/{trial}".encode())
    return data, zlib.crc32(f"{seed}/{setting.key}/{trial}".encode())


def _mixing(g: torch.Generator, mixing: str, dtype) -> Tensor:
    norms = torch.tensor(COLUMN_NORMS, dtype=dtype)
    if mixing == "orthogonal":
        return rotation(torch.rand((), generator=g, dtype=dtype) * 2 * math.pi) * norms
    if mixing == "aligned":                         # a random signed permutation times diag(2, 1)
        signs = torch.where(torch.rand(2, generator=g, dtype=dtype) < 0.5, -1.0, 1.0).to(dtype)
        W = torch.diag(norms) if torch.rand((), generator=g) < 0.5 else torch.diag(norms).flip(0)
        return signs[:, None] * W
    W = torch.randn(2, 2, generator=g, dtype=dtype)
    return W / W.norm(dim=0) * norms


def _trial(seeds: tuple[int, int], nonlinearity: str, inference: str, training: Training, dtype):
    """Data and initial parameters of one trial, each from its own generator."""
    g = torch.Generator().manual_seed(seeds[0])
    N = training.num_points
    W = _mixing(g, training.mixing, dtype)
    Z = torch.randn(N, 2, generator=g, dtype=dtype)
    X = NONLINEARITIES[nonlinearity](Z @ W.T) + NOISE_STD * torch.randn(N, 2, generator=g, dtype=dtype)
    g = torch.Generator().manual_seed(seeds[1])

    def randn(*shape, std=1.0):
        return std * torch.randn(*shape, generator=g, dtype=dtype)

    def rot():
        return rotation(torch.rand((), generator=g, dtype=dtype) * 2 * math.pi)

    def posterior_scale(*batch):
        # D′ with unequal singular values (log-uniform in [0.03, 0.3]): an isotropic start would sit
        # on the ELBO's saddle of equal posterior variances, where rotations cost nothing
        logs = torch.empty(*batch, 2, dtype=dtype).uniform_(math.log(0.03), math.log(0.3), generator=g)
        return torch.diag_embed(logs.exp()) + randn(*batch, 2, 2, std=0.01)

    params = {"A": randn(2, 2, std=0.5), "b": torch.zeros(2, dtype=dtype)}
    if inference == "amortised":
        params.update(C=randn(2, 2, std=0.5), d=torch.zeros(2, dtype=dtype), D=posterior_scale())
        fixed = {"O1": rot(), "O2": rot()}
    else:
        params.update(mu=randn(N, 2, std=0.1), D=posterior_scale(N))
        fixed = {"O2": rot().unsqueeze(0)}
    return Data(W, Z, X), params, fixed


def simulate(seeds, setting: Setting, training: Training, dtype=torch.float64, device="cpu"):
    """Stack the trials' data, trainable parameters and fixed rotations along dimension 0
    (drawn on the CPU, so a trial is the same on every device)."""
    trials = [_trial(s, setting.nonlinearity, setting.inference, training, dtype) for s in seeds]
    data = Data(*(torch.stack(parts).to(device) for parts in zip(*(t[0] for t in trials))))
    stack = lambda dicts: {k: torch.stack([t[k] for t in dicts]).to(device) for k in dicts[0]}  # noqa: E731
    params = {k: v.requires_grad_() for k, v in stack([t[1] for t in trials]).items()}
    return data, params, stack([t[2] for t in trials])


def _scale_tril(S: Tensor) -> Tensor:
    """Cholesky factor of 2×2 SPD matrices in closed form (NaN, never an exception, if not SPD,
    so one diverging trial cannot stop the others)."""
    a, c, e = S[..., 0, 0], S[..., 1, 0], S[..., 1, 1]
    l11 = a.sqrt()
    l21 = c / l11
    l22 = (e - l21 ** 2).sqrt()
    zero = torch.zeros_like(a)
    return torch.stack([torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)], -2)


def posterior(params, fixed, X: Tensor, covariance: str):
    """μ (T, N, 2) and the Cholesky factor of Σ, (T, 1, 2, 2) amortised or (T, N, 2, 2)."""
    if "C" in params:
        mu = X @ (fixed["O1"] @ params["C"]).mT + params["d"].unsqueeze(1)
        D = params["D"].unsqueeze(1)
    else:
        mu, D = params["mu"], params["D"]
    O = fixed["O2"].reshape(D.shape[0], 1, 2, 2)
    S = O @ D @ D.mT @ O.mT
    if covariance == "diagonal":
        return mu, torch.diag_embed(S.diagonal(dim1=-2, dim2=-1).sqrt())
    return mu, _scale_tril(S)


def hermite_rule(order: int, dtype=torch.float64):
    """Nodes (K, 2) and weights (K,) of the order² Gauss–Hermite rule for E_{ε~N(0, I₂)}."""
    x, w = np.polynomial.hermite_e.hermegauss(order)
    w = w / w.sum()
    nodes = torch.tensor(np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2), dtype=dtype)
    return nodes, torch.tensor(np.outer(w, w).reshape(-1), dtype=dtype)


def principal_factor(L: Tensor) -> Tensor:
    """U·Λ^½ with Σ = LLᵀ = UΛUᵀ: the quadrature's nodes along Σ's principal axes.

    A product rule is invariant only under signed permutations of its axes, so nodes placed by the
    Cholesky factor turn with Σ's coordinates, not with Σ: for nonlinear ν the approximate ELBO
    of a full Σ would then prefer some latent axes (a pure quadrature artefact, which a converged
    optimiser finds). Along Σ's eigenvectors the rule turns with Σ, so the approximate ELBO keeps
    the exact ELBO's invariance under latent rotations. For a diagonal Σ it equals L."""
    lam, U = torch.linalg.eigh(L @ L.mT)
    return U * lam.clamp_min(0).sqrt().unsqueeze(-2)


def negative_elbo(params, fixed, X: Tensor, *, nonlinearity: str, covariance: str, rule) -> Tensor:
    """−ELBO per data point, averaged over the points of each trial: (T,).

    Includes the Gaussian normaliser log(2πσ²), so it is minus a true ELBO."""
    nodes, weights = rule
    T, N, _ = X.shape
    mu, L = posterior(params, fixed, X, covariance)
    F = principal_factor(L) if covariance == "full" else L
    z = mu.unsqueeze(2) + torch.einsum("tnij,kj->tnki", F, nodes)            # (T, N, K, 2)
    out = NONLINEARITIES[nonlinearity](torch.einsum("tnki,tji->tnkj", z, params["A"]))
    out = out + params["b"][:, None, None, :]
    target = X.unsqueeze(2).expand_as(out)
    nll = Gaussian(NOISE_STD).nll(out.reshape(-1, 2), target.reshape(-1, 2)).reshape(T, N, -1)
    # KL(N(μ, Σ) ‖ N(0, I)) = ½‖μ‖² + KL(N(0, Σ) ‖ N(0, I)): the second part once per Σ
    kl_sigma = gaussian_kl(torch.zeros_like(L[..., 0]).reshape(-1, 2), L.reshape(-1, 2, 2))
    kl = 0.5 * (mu ** 2).sum(-1) + kl_sigma.reshape(L.shape[:2])
    constant = math.log(2 * math.pi * NOISE_STD ** 2)                          # (D/2) log 2πσ², D = 2
    return (nll @ weights + kl).mean(1) + constant


def _loss_function(fixed, X: Tensor, setting: Setting, training: Training):
    rule = tuple(t.to(X.device) for t in hermite_rule(training.quadrature, X.dtype))
    return lambda params: negative_elbo(params, fixed, X, nonlinearity=setting.nonlinearity,
                                        covariance=setting.covariance, rule=rule)


def schedule(params, loss_of, setting: Setting, training: Training,
             progress: Optional[Progress] = None) -> None:
    """The paper's schedule: full-batch steps from ``lr``, divided by 10 every n steps, 5n steps."""
    opt_class = torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD
    opt = opt_class(list(params.values()), lr=training.lr)
    n = setting.steps_per_stage
    for step in range(training.stages * n):
        for group in opt.param_groups:
            group["lr"] = training.lr * 10.0 ** -(step // n)
        loss = loss_of(params)
        opt.zero_grad(set_to_none=True)
        # finite trials only: a diverged trial keeps its NaN and the others go on
        torch.nan_to_num(loss, nan=0.0, posinf=0.0).sum().backward()
        opt.step()
        if progress is not None:
            progress.update(step + 1)


def refine(params, loss_of, training: Training, on_step=None) -> Tensor:
    """Minimise the same −ELBO further by per-trial L-BFGS (:mod:`.lbfgs`) from where the schedule
    stopped; updates ``params`` in place and returns each trial's largest gradient entry (T,)."""
    names = list(params)
    sizes = [params[k][0].numel() for k in names]

    def unflat(x: Tensor) -> dict:
        parts = torch.split(x, sizes, dim=1)
        return {k: p.reshape(params[k].shape) for k, p in zip(names, parts)}

    def value_and_grad(x: Tensor):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            loss = loss_of(unflat(x))
            (g,) = torch.autograd.grad(torch.nan_to_num(loss, nan=0.0, posinf=0.0).sum(), x)
        return loss.detach(), g

    x0 = torch.cat([params[k].detach().reshape(params[k].shape[0], -1) for k in names], 1)
    x, g = lbfgs.minimise(value_and_grad, x0, iterations=training.refine_iterations,
                          tolerance=training.refine_tolerance, on_step=on_step)
    with torch.no_grad():
        for k, v in unflat(x).items():
            params[k].copy_(v)
    return g.abs().amax(-1)


def train(params, fixed, X: Tensor, setting: Setting, training: Training,
          progress: Optional[Progress] = None) -> Tensor:
    """The schedule, then the refinement if any; returns the final −ELBO per trial (T,)."""
    loss_of = _loss_function(fixed, X, setting, training)
    schedule(params, loss_of, setting, training, progress)
    if training.refine == "lbfgs":
        refine(params, loss_of, training)
    with torch.no_grad():
        return loss_of(params)


def _polar(M: Tensor) -> Tensor:
    """The orthogonal factor U·Vᵀ of M = U S Vᵀ (the orthogonal matrix closest to M)."""
    U, _, Vh = torch.linalg.svd(M)
    return U @ Vh


def decoder_angle(A: Tensor, W: Tensor) -> Tensor:
    """Angle (degrees, (−45, 45]) of the orthogonal Q closest to A ≈ W·Q (Procrustes): the
    rotation of the fitted decoder's latent axes against the true ones, (T, 2, 2) -> (T,).

    It equals the encoder-means angle of :func:`latent_angle` when the model's latents are Qᵀz."""
    return rotation_angle(_polar(W.mT @ A))


def _measure(params, fixed, data: Data, covariance: str, neg_elbo: Tensor) -> dict:
    """ELBO and angles (to the true latents and to W's right singular vectors) per trial, the
    decoder's angle (A ≈ W·Q) and the singular values of W⁻¹A (both 1 when A = W·Q exactly), and
    the angles of the decoder's and of W's axes to the data's coordinate axes (the orthogonal
    factors of A and W; the axes along which ν acts, so where a nonlinear ν saturates)."""
    with torch.no_grad():
        mu, _ = posterior(params, fixed, data.X, covariance)
        V = torch.linalg.svd(data.W).Vh.mT                                   # W = U S Vᵀ
        ok = torch.isfinite(mu).all(-1).all(-1) & torch.isfinite(neg_elbo)
        ok = ok & torch.isfinite(params["A"]).all(-1).all(-1)
        safe = torch.where(ok[:, None, None], mu, data.Z)
        A = torch.where(ok[:, None, None], params["A"], data.W)
        angle = torch.where(ok, latent_angle(data.Z, safe), torch.nan)
        principal = torch.where(ok, latent_angle(data.Z @ V, safe), torch.nan)
        decoder = torch.where(ok, decoder_angle(A, data.W), torch.nan)
        stretch = torch.where(ok[:, None], torch.linalg.svdvals(torch.linalg.solve(data.W, A)), torch.nan)
        data_axes = torch.where(ok, rotation_angle(_polar(A)), torch.nan)
    return {"elbo": (-neg_elbo).tolist(), "angle": angle.tolist(), "principal_angle": principal.tolist(),
            "decoder_angle": decoder.tolist(), "decoder_singular_values": stretch.tolist(),
            "data_axes_angle": data_axes.tolist(), "mixing_angle": rotation_angle(_polar(data.W)).tolist()}


def _truth_parameters(data: Data, params, fixed) -> dict:
    """The true decoder (A = W, b = 0) and an encoder started on the true latents: amortised
    μ = W⁻¹x (C = O₁ᵀW⁻¹), unamortised μᵢ = zᵢ; D′ as drawn for the trial."""
    out = {"A": data.W.clone(), "b": torch.zeros_like(params["b"]), "D": params["D"].detach().clone()}
    if "C" in params:
        out.update(C=fixed["O1"].mT @ torch.linalg.inv(data.W), d=torch.zeros_like(params["d"]))
    else:
        out["mu"] = data.Z.clone()
    return out


def _fit_encoder(start: dict, fixed, X: Tensor, setting: Setting, training: Training,
                 covariance: str) -> dict:
    """The encoder's parameters fitted by L-BFGS with the decoder (``start``'s A, b) held fixed."""
    decoder = {k: start[k] for k in ("A", "b")}
    encoder = {k: v.clone() for k, v in start.items() if k not in decoder}
    loss_of = _loss_function(fixed, X, replace(setting, covariance=covariance), training)
    refine(encoder, lambda p: loss_of({**p, **decoder}), training)
    return {**encoder, **decoder}


def true_decoder_axes(data: Data, start: dict, fixed, setting: Setting, training: Training) -> Tensor:
    """Amortised inference: where the mean-field optimum of the TRUE decoder lies, (T,) degrees.

    With the decoder held at A = W the best full Σ is fitted; turning decoder, encoder and Σ
    together by Q costs no ELBO (the prior and the full family are rotation invariant) and makes
    Σ diagonal when Q holds Σ's eigenvectors, so the best diagonal model whose decoder is the true
    one turned by Q sits at the angle of Q. 0 when the true posterior is mean-field in the true
    axes (identity ν, orthogonal W); W's right singular vectors for identity ν, Gaussian W."""
    fitted = _fit_encoder(start, fixed, data.X, setting, training, "full")
    with torch.no_grad():
        _, L = posterior(fitted, fixed, data.X, "full")
        _, U = torch.linalg.eigh(L[:, 0] @ L[:, 0].mT)                      # Σ = U Λ Uᵀ
    return rotation_angle(U)


def truth_start(data: Data, params, fixed, setting: Setting, training: Training) -> dict:
    """Reference runs of a setting's data sets, each started at the true model:

    ``at_truth``: the true decoder held fixed and the encoder (of the setting's Σ) fitted to it —
    the ELBO and angles of the true model within this variational family; ``true_decoder_axes``
    (amortised only, else None): :func:`true_decoder_axes`; then, from ``at_truth``, L-BFGS on
    all parameters: where the optimiser goes from the truth (elbo, angle, … as :func:`_measure`)."""
    start = _fit_encoder(_truth_parameters(data, params, fixed), fixed, data.X, setting, training,
                         setting.covariance)
    loss_of = _loss_function(fixed, data.X, setting, training)
    with torch.no_grad():
        at_truth = _measure(start, fixed, data, setting.covariance, loss_of(start))
    axes = (true_decoder_axes(data, start, fixed, setting, training).tolist() if "C" in start
            else [None] * data.X.shape[0])
    gradient = refine(start, loss_of, training)
    with torch.no_grad():
        final = _measure(start, fixed, data, setting.covariance, loss_of(start))
    return {"at_truth": at_truth, "true_decoder_axes": axes, "gradient_max": gradient.tolist(), **final}


def turn(params, fixed, angle: Tensor) -> dict:
    """The same model with its latent axes turned by ``angle`` (radians, (T,)): z′ = R(angle)ᵀz.

    Decoder A′ = A·R, posterior means μ′ = Rᵀμ, Σ′ = RᵀΣR (through C′, d, D′ and the fixed O₁, O₂).
    The prior and the full-Σ family are rotation invariant, so a full-Σ ELBO does not change; a
    diagonal Σ keeps only diag(Σ′), so this is where a mean-field ELBO sees the angle."""
    R = rotation(angle)                                                     # (T, 2, 2)
    O2 = fixed["O2"].reshape(R.shape[0], -1, 2, 2)
    turned = {k: v.detach().clone() for k, v in params.items()}
    turned["A"] = params["A"].detach() @ R
    turned["D"] = (O2.mT @ R.mT.unsqueeze(1) @ O2 @ params["D"].detach().reshape(O2.shape[0], -1, 2, 2)
                   ).reshape(params["D"].shape)
    if "C" in params:
        O1 = fixed["O1"]
        turned["C"] = O1.mT @ R.mT @ O1 @ params["C"].detach()
        turned["d"] = (params["d"].detach().unsqueeze(1) @ R).squeeze(1)
    else:
        turned["mu"] = params["mu"].detach() @ R
    return turned


def angle_profile(data: Data, params, fixed, setting: Setting, training: Training,
                  angles: Tensor) -> dict:
    """The ELBO profile over the decoder's angle θ_A: for each data set and angle, the best ELBO
    of the models whose decoder is turned exactly θ_A from the true axes, all else free.

    Args:
        data, params, fixed: m trials (leading dimension m), ``params`` converged runs.
        angles: (K,) degrees in (−45, 45].
    Returns:
        ``angle``: the K target angles; per data set (lists of m lists of K): ``elbo``,
        ``decoder_angle`` (measured: the target), ``means_angle`` (the posterior means' angle θ)
        and ``gradient_max``.

    The decoder is A = W⁻ᵀ·Q·P with Q orthogonal, fixed per angle, and P symmetric and free: Q is
    then the Procrustes factor of WᵀA while P stays positive definite (:func:`profile_curves`
    checks that the measured angle is the target), so θ_A stays put. Each
    angle starts at the run turned by θ_A − θ_A(run) (:func:`turn`) and L-BFGS maximises the same
    ELBO from there. A unique mean-field solution is one peak in (−45°, 45°]; a full Σ, which has
    no preferred axes, gives a flat profile. All m·K models are one batch."""
    m, K = data.X.shape[0], angles.shape[0]
    grow = lambda t: t.detach().repeat_interleave(K, 0)                   # noqa: E731
    data_k = Data(*(grow(t) for t in data))
    fixed_k = {k: grow(v) for k, v in fixed.items()}
    start = {k: grow(v) for k, v in params.items()}
    target = angles.to(data_k.W).repeat(m)
    Qb = _polar(data_k.W.mT @ start["A"])                               # the run's, at angle θ_A(run)
    # R(δ) on the right turns the decoder's angle by +δ, or by −δ when its Procrustes factor reflects
    own, sign = rotation_angle(Qb), torch.linalg.det(Qb).sign()
    turned = turn(start, fixed_k, torch.deg2rad(sign * (target - own)))
    Q = _polar(data_k.W.mT @ turned["A"])
    P = Q.mT @ data_k.W.mT @ turned["A"]
    W_inv_T = torch.linalg.inv(data_k.W).mT
    free = {k: v for k, v in turned.items() if k != "A"}
    free["P"] = torch.stack([P[:, 0, 0], 0.5 * (P[:, 0, 1] + P[:, 1, 0]), P[:, 1, 1]], -1)

    def model(p: dict) -> dict:
        A = W_inv_T @ Q @ torch.stack([p["P"][:, :2], p["P"][:, 1:]], -2)
        return {**{k: v for k, v in p.items() if k != "P"}, "A": A}

    loss_of = _loss_function(fixed_k, data_k.X, setting, training)
    gradient = refine(free, lambda p: loss_of(model(p)), training)
    fitted = model(free)
    with torch.no_grad():
        measured = _measure(fitted, fixed_k, data_k, setting.covariance, loss_of(fitted))
    per_set = lambda values: [values[i * K:(i + 1) * K] for i in range(m)]  # noqa: E731
    return {"angle": angles.tolist(), "elbo": per_set(measured["elbo"]),
            "decoder_angle": per_set(measured["decoder_angle"]), "means_angle": per_set(measured["angle"]),
            "gradient_max": per_set(gradient.tolist())}


def run_trials(seeds, setting: Setting, training: Training, *, dtype=torch.float64, device="cpu",
               progress: Optional[Progress] = None, reference: bool = False, profile: int = 0) -> dict:
    """Train the trials of one setting as one batched computation and measure them.

    Args:
        seeds: per trial, (data seed, initialisation seed); see :func:`trial_seeds`.
        reference: also run :func:`truth_start` on the same data sets (``truth``).
        profile: draw :func:`angle_profile` (``profile``) for this many of the trained runs.
    Returns lists over trials: elbo (nats per point), angle (degrees, true latents vs posterior
    means), principal_angle (vs W's right singular vectors), decoder_angle and
    decoder_singular_values (:func:`_measure`), the seeds, the same numbers where the schedule
    ended (``schedule``) and, when refined, each trial's largest gradient entry at the end
    (``gradient_max``: ~0 means a stationary point was reached)."""
    data, params, fixed = simulate(seeds, setting, training, dtype, device)
    record: dict = {"seeds": [list(p) for p in seeds]}
    if reference:
        record["truth"] = truth_start(data, params, fixed, setting, training)
    loss_of = _loss_function(fixed, data.X, setting, training)
    scheduled = setting.steps_per_stage * training.stages
    schedule(params, loss_of, setting, training, progress)
    with torch.no_grad():
        record["schedule"] = _measure(params, fixed, data, setting.covariance, loss_of(params))
    if training.refine == "lbfgs":
        on_step = None if progress is None else (lambda k: progress.update(scheduled + k))
        record["gradient_max"] = refine(params, loss_of, training, on_step).tolist()
    with torch.no_grad():
        record.update(_measure(params, fixed, data, setting.covariance, loss_of(params)))
    if profile:
        m = min(profile, len(seeds))
        first = lambda tensors: {k: v[:m] for k, v in tensors.items()}  # noqa: E731
        record["profile"] = angle_profile(Data(*(t[:m] for t in data)), first(params), first(fixed),
                                          setting, training, torch.tensor(PROFILE_ANGLES, dtype=dtype))
    return record


# ----------------------------------------------------------------------------- the experiment

QUICK = dict(nonlinearities=("identity", "tanh"), inference=("amortised",), steps=(100, 300), trials=8,
             num_points=300)
FULL = dict(nonlinearities=tuple(NONLINEARITIES), inference=INFERENCE, steps=PAPER_STEPS, trials=20,
            num_points=4000)


def add_arguments(parser) -> None:
    parser.add_argument("--mixing", choices=MIXINGS, default="orthogonal",
                        help="W = rotation·diag(2,1) (identifiable for identity ν, default), Gaussian "
                             "entries with column norms 2 and 1 (the paper's wording), or a signed "
                             "permutation·diag(2,1) (true posterior mean-field for every ν; a control)")
    parser.add_argument("--nonlinearities", nargs="+", choices=tuple(NONLINEARITIES))
    parser.add_argument("--inference", nargs="+", choices=INFERENCE,
                        help="amortised (Fig. 1/5) and/or unamortised (Fig. 6); quick: amortised")
    parser.add_argument("--steps", nargs="+", type=int, metavar="N",
                        help="n values: lr drops 10× every n steps for 5n steps (paper: 100 … 20000)")
    parser.add_argument("--trials", type=int, help="trials per setting (paper: 20, 100 for n ≥ 10000)")
    parser.add_argument("--points", type=int, help="data points per trial (paper: 4000)")
    parser.add_argument("--optimizer", choices=("adam", "gd"), default="adam",
                        help="full-batch Adam (default) or plain gradient descent")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="initial step size (the paper's 0.1; plain GD at 0.1 diverges at this noise "
                             "scale, hence Adam by default)")
    parser.add_argument("--refine", choices=("lbfgs", "none"), default="lbfgs",
                        help="after the schedule, minimise the same ELBO by per-trial L-BFGS until the "
                             "gradient vanishes (default), or stop where the schedule ends (the paper)")
    parser.add_argument("--refine-iterations", type=int, default=3000,
                        help="the most L-BFGS steps per trial")
    parser.add_argument("--quadrature", type=int, default=3, help="Gauss–Hermite points per latent axis")
    parser.add_argument("--reference", choices=("truth", "none"), default="truth",
                        help="also fit each data set's encoder to the TRUE decoder and run L-BFGS on "
                             "everything from there (once per data set and Σ, at the smallest n): the "
                             "ELBO the true model reaches in this family and where the optimum lies")
    parser.add_argument("--profile", type=int, default=8, metavar="DATA_SETS",
                        help="per setting (at the smallest n), the ELBO profile over the decoder's angle "
                             "for this many data sets: at each angle in (−45°, 45°] every 2.5°, the best ELBO "
                             "with the decoder turned exactly that far from the true axes (0: none)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing: summarise and plot the settings already in --out (e.g. of an "
                             "interrupted grid)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="the summary's near-best runs: ELBO within this many nats/point of the "
                             "best run (any Σ) on the same data set")


def _config(args) -> tuple[Training, dict]:
    base = QUICK if args.quick else FULL
    training = Training(num_points=args.points or base["num_points"], mixing=args.mixing,
                        optimizer=args.optimizer, lr=args.lr, quadrature=args.quadrature,
                        seed=args.seed, refine=args.refine, refine_iterations=args.refine_iterations,
                        reference=args.reference, profile=args.profile)
    grid = dict(nonlinearities=tuple(args.nonlinearities or base["nonlinearities"]),
                inference=tuple(args.inference or base["inference"]), covariances=COVARIANCES,
                steps=tuple(args.steps or base["steps"]), trials=args.trials)
    for name, value in (("--steps", min(grid["steps"])), ("--points", training.num_points),
                        ("--quadrature", training.quadrature), ("--trials", args.trials or 1),
                        ("--profile", training.profile + 1),
                        ("--refine-iterations", training.refine_iterations + 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return training, grid


def trials_for(n: int, grid: dict, quick: bool) -> int:
    if grid["trials"]:
        return grid["trials"]
    return QUICK["trials"] if quick else (100 if n >= 10000 else 20)


def wrap_angle(degrees: float) -> float:
    """An angle difference taken modulo the signed permutations: into (−45, 45]."""
    return 45.0 - (45.0 - degrees) % 90.0


RUN_FIELDS = ("elbo", "angle", "principal_angle", "decoder_angle", "decoder_singular_values", "data_axes_angle",
              "mixing_angle")


def _at(values, t: int):
    return values[t] if values and t < len(values) else None


def _rows(runs: dict) -> list[dict]:
    rows = []
    for key, rec in runs.items():
        nu, inference, cov, n = key.split("/")
        after, truth = rec.get("schedule") or {}, rec.get("truth") or {}
        for t in range(len(rec["elbo"])):
            row = dict(nonlinearity=nu, inference=inference, covariance=cov, n=int(n[2:]), trial=t,
                       schedule_elbo=_at(after.get("elbo"), t), schedule_angle=_at(after.get("angle"), t),
                       gradient_max=_at(rec.get("gradient_max"), t),
                       truth_elbo_at_truth=_at((truth.get("at_truth") or {}).get("elbo"), t),
                       truth_angle_at_truth=_at((truth.get("at_truth") or {}).get("angle"), t),
                       true_decoder_axes=_at(truth.get("true_decoder_axes"), t),
                       truth_start_elbo=_at(truth.get("elbo"), t), truth_start_angle=_at(truth.get("angle"), t))
            row.update({k: _at(rec.get(k), t) for k in RUN_FIELDS})
            rows.append(row)
    return rows


def _minus(value, top: Optional[dict]):
    return None if value is None or top is None else value - top["elbo"]


def flatten(runs: dict) -> list[dict]:
    """One row per trained model, with ``gap`` = ELBO − the best ELBO any run (any n, diagonal or
    full Σ) reached on the same data set with the same ν and inference (None if it diverged),
    ``schedule_gap`` the same where the step-size schedule ended (before any refinement),
    ``best_of_kind``: whether it is the best run of its Σ on that data set, and ``angle_to_best``:
    its angle minus that best run's angle (modulo signed permutations); rows of a setting that ran
    :func:`truth_start` carry ``truth_gap`` (the true decoder with its fitted encoder) and
    ``truth_start_gap`` (where L-BFGS from there stopped) against the same best.

    The full-Σ family contains the diagonal one and has no preferred axes, so its best run marks
    the optimum: a mean-field run that aligned with the true axes (orthogonal W, identity ν) gets
    there too, one stuck at the equal-variance saddle stays below."""
    rows = _rows(runs)
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["elbo"] is not None:
            for k in ((r["nonlinearity"], r["inference"], r["trial"]),
                      (r["nonlinearity"], r["inference"], r["trial"], r["covariance"])):
                if k not in best or r["elbo"] > best[k]["elbo"]:
                    best[k] = r
    for r in rows:
        data_set = (r["nonlinearity"], r["inference"], r["trial"])
        top, own = best.get(data_set), best.get(data_set + (r["covariance"],))
        r["gap"] = _minus(r["elbo"], top)
        r["schedule_gap"] = _minus(r["schedule_elbo"], top)
        r["truth_gap"] = _minus(r["truth_elbo_at_truth"], top)
        r["truth_start_gap"] = _minus(r["truth_start_elbo"], top)
        r["best_of_kind"] = r["elbo"] is not None and r is own
        r["angle_to_best"] = (None if r["angle"] is None or own is None
                              else wrap_angle(r["angle"] - own["angle"]))
    return rows


def _abs_stats(row: dict, name: str, values: list) -> None:
    a = np.abs([v for v in values if v is not None]) if values else np.array([])
    row[f"{name}_median_abs"] = float(np.median(a)) if a.size else float("nan")
    row[f"{name}_max_abs"] = float(np.max(a)) if a.size else float("nan")


def _median(values: list) -> float:
    a = [v for v in values if v is not None]
    return float(np.median(a)) if a else float("nan")


def _reference_stats(row: dict, ok: list[dict], near: list[dict]) -> None:
    """The decoder of the near-best runs, and the runs started at the true model."""
    _abs_stats(row, "near_best_decoder_angle", [r["decoder_angle"] for r in near])
    _abs_stats(row, "near_best_data_axes_angle", [r["data_axes_angle"] for r in near])
    _abs_stats(row, "mixing_angle", [r["mixing_angle"] for r in near])
    sv = [r["decoder_singular_values"] for r in near if r["decoder_singular_values"] is not None]
    row["near_best_decoder_singular_values_median"] = [_median([v[i] for v in sv]) for i in (0, 1)]
    truth = [r for r in ok if r["truth_gap"] is not None]
    row["truth_data_sets"] = len(truth)
    row["truth_gap_median"] = _median([r["truth_gap"] for r in truth])
    row["truth_start_gap_median"] = _median([r["truth_start_gap"] for r in truth])
    _abs_stats(row, "true_decoder_axes", [r["true_decoder_axes"] for r in truth])
    _abs_stats(row, "truth_start_angle", [r["truth_start_angle"] for r in truth])


def profile_curves(profile: dict) -> list[Optional[np.ndarray]]:
    """Per data set of an :func:`angle_profile`, its ELBO at each angle, or None where a point is
    missing or its decoder did not stay at its angle (P left the positive definite cone, which
    turns WᵀA's orthogonal factor): such a curve is not a profile, so it is left out."""
    curves = []
    for elbo, measured in zip(profile["elbo"], profile["decoder_angle"]):
        held = all(e is not None and d is not None and abs(wrap_angle(d - a)) < 1e-6
                   for e, d, a in zip(elbo, measured, profile["angle"]))
        e = np.array([v if v is not None else np.nan for v in elbo], dtype=float)
        curves.append(e if held and np.isfinite(e).all() else None)
    return curves


def _count_peaks(e: np.ndarray) -> int:
    """Local maxima of a curve on the circle of angles, differences below ``FLAT`` ignored."""
    q = np.round((e - e.max()) / FLAT)
    q = q[q != np.roll(q, 1)]                       # one value per run of equal values
    return int(((q > np.roll(q, 1)) & (q > np.roll(q, -1))).sum()) if q.size > 1 else 0


def profile_stats(profile: dict, best: Optional[list] = None) -> list[dict]:
    """Per data set of an :func:`angle_profile`: the peak's angle ``peak_angle``, ``at_true_axes``:
    the ELBO at θ_A = 0 minus the peak's (≤ 0; 0 when the true axes are the optimum), ``range``:
    the peak's ELBO minus the lowest (0 for a flat profile: no preferred axes; below ``FLAT`` the
    profile has no peak and ``peak_angle`` and ``peaks`` are None), ``peaks``: how many local
    maxima it has on the circle of angles (−45° and 45° are one angle; 1 = a unique solution),
    ``gradient_max``; curves that are not profiles (:func:`profile_curves`) are left out;
    with ``best`` (per data set, the best ELBO any run reached on it), ``peak_gap``: the peak's ELBO
    minus that (≈ 0 when the profiled run was at the optimum, < 0 from a local optimum)."""
    angles = np.asarray(profile["angle"])
    zero = int(np.argmin(np.abs(angles)))
    out = []
    for t, (e, grad) in enumerate(zip(profile_curves(profile), profile["gradient_max"])):
        if e is None:
            continue
        flat = e.max() - e.min() <= FLAT
        stats = dict(peak_angle=None if flat else float(angles[int(np.argmax(e))]),
                     peaks=None if flat else _count_peaks(e),
                     at_true_axes=float(e[zero] - e.max()), range=float(e.max() - e.min()),
                     gradient_max=float(max(grad)))
        if best is not None and t < len(best) and best[t] is not None:
            stats["peak_gap"] = float(e.max() - best[t])
        out.append(stats)
    return out


def _profile_summary(row: dict, stats: list[dict]) -> None:
    row["profile_data_sets"] = len(stats)
    if stats:
        _abs_stats(row, "profile_peak_angle", [s["peak_angle"] for s in stats])
        row["profile_at_true_axes_median"] = _median([s["at_true_axes"] for s in stats])
        row["profile_range_median"] = _median([s["range"] for s in stats])
        row["profile_gradient_max"] = max(s["gradient_max"] for s in stats)
        peaks = [s["peaks"] for s in stats if s["peaks"] is not None]
        row["profile_peaks_max"] = max(peaks) if peaks else None
        gaps = [s["peak_gap"] for s in stats if "peak_gap" in s]
        if gaps:
            row["profile_peak_gap_median"] = _median(gaps)


def summarise(rows: list[dict], tolerance: float, profiles: Optional[dict] = None) -> list[dict]:
    """Per (ν, inference, Σ): |angle| of its best run on each data set, and of its runs within
    ``tolerance`` nats/point of the best run of any Σ on that data set (diagonal Σ should sit
    near 0°, full Σ should not); ``near_best_angle_to_best``: how far the other near-best runs
    sit from the best run of their Σ on the same data (a unique solution: ≈ 0); the decoder's
    angle and singular values of W⁻¹A of the near-best runs, and the runs started at the truth
    (:func:`_reference_stats`); with ``profiles`` ((ν, inference, Σ) → :func:`profile_stats`), the
    ELBO profiles over the decoder's angle."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["nonlinearity"], r["inference"], r["covariance"]), []).append(r)
    out = []
    for (nu, inference, cov), rs in sorted(groups.items()):
        ok = [r for r in rs if r["gap"] is not None]
        best = [r for r in ok if r["best_of_kind"]]
        near = [r for r in ok if r["gap"] >= -tolerance]
        gaps = [r["gap"] for r in best]
        grads = [r["gradient_max"] for r in ok if r["gradient_max"] is not None]
        row = dict(nonlinearity=nu, inference=inference, covariance=cov, runs=len(rs),
                   diverged=len(rs) - len(ok), data_sets=len(best), near_best_runs=len(near),
                   tolerance=tolerance, best_gap_min=float(min(gaps)) if gaps else float("nan"),
                   gradient_max=float(max(grads)) if grads else None)
        for name, sel in (("best", best), ("near_best", near)):
            for k in ("angle", "principal_angle"):
                _abs_stats(row, f"{name}_{k}", [r[k] for r in sel])
        _abs_stats(row, "near_best_angle_to_best", [r["angle_to_best"] for r in near
                                                    if not r["best_of_kind"]])
        _reference_stats(row, ok, near)
        _profile_summary(row, (profiles or {}).get((nu, inference, cov), []))
        out.append(row)
    return out


def _truth_markers(ax, rows: list[dict], colour: str, cov: str) -> None:
    """The reference runs: the true decoder with its fitted encoder (triangles), and where
    L-BFGS from there stopped (crosses)."""
    at = [(r["truth_gap"], r["truth_angle_at_truth"]) for r in rows
          if r["truth_gap"] is not None and r["truth_angle_at_truth"] is not None]
    end = [(r["truth_start_gap"], r["truth_start_angle"]) for r in rows
           if r["truth_start_gap"] is not None and r["truth_start_angle"] is not None]
    if at:
        ax.scatter(*zip(*at), s=16, marker="^", facecolors="none", edgecolors=colour, linewidths=0.8,
                   label=f"{cov} Σ, true decoder")
    if end:
        ax.scatter(*zip(*end), s=16, marker="x", color=colour, linewidths=0.8,
                   label=f"{cov} Σ, converged from the truth")


def _panel(ax, rows: list[dict], angle_key: str) -> None:
    colours = {"diagonal": "tab:blue", "full": "tab:orange"}
    for cov, colour in colours.items():
        mine = [r for r in rows if r["covariance"] == cov]
        start = [(r["schedule_gap"], r[f"schedule_{angle_key}"] if angle_key == "angle" else None)
                 for r in mine if r["schedule_gap"] is not None]
        start = [p for p in start if p[1] is not None]
        if start:
            ax.scatter(*zip(*start), s=9, facecolors="none", edgecolors=colour, alpha=0.5,
                       linewidths=0.6, label=f"{cov} Σ, end of schedule")
        end = [(r["gap"], r[angle_key]) for r in mine if r["gap"] is not None]
        if end:
            ax.scatter(*zip(*end), s=9, alpha=0.8, color=colour, label=f"{cov} Σ, converged"
                       if start else f"{cov} Σ")
        if angle_key == "angle":
            _truth_markers(ax, mine, colour, cov)
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_ylim(-46, 46)


def _figure(rows: list[dict], nonlinearities, inference, angle_key: str, title: str, path):
    fig, axes = plotting.panels(len(inference), len(nonlinearities), sharey=True, layout="constrained")
    for i, inf in enumerate(inference):
        for j, nu in enumerate(nonlinearities):
            ax = axes[i][j]
            _panel(ax, [r for r in rows if r["nonlinearity"] == nu and r["inference"] == inf], angle_key)
            ax.set_title(f"ν = {nu}, {inf}", fontsize=9)
            if i == len(inference) - 1:
                ax.set_xlabel("ELBO − best ELBO on the same data (any Σ)", fontsize=8)
            if j == 0:
                ax.set_ylabel("angle (degrees)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return plotting.save(fig, path)


def _best_by_data_set(rows: list[dict]) -> dict:
    """(ν, inference, trial) -> the best ELBO any run (any n, any Σ) reached on that data set, from
    the rows of :func:`flatten` (each carries its gap to that best)."""
    return {(r["nonlinearity"], r["inference"], r["trial"]): r["elbo"] - r["gap"]
            for r in rows if r["gap"] is not None}


def _profile_figure(runs: dict, rows: list[dict], nonlinearities, inference, path):
    """ELBO − the best ELBO on the same data set (any Σ) against the decoder's angle θ_A, one curve
    per profiled data set: a mean-field posterior has one peak, a full one is flat."""
    best = _best_by_data_set(rows)
    fig, axes = plotting.panels(len(inference), len(nonlinearities), layout="constrained")
    colours = {"diagonal": "tab:blue", "full": "tab:orange"}
    for i, inf in enumerate(inference):
        for j, nu in enumerate(nonlinearities):
            ax = axes[i][j]
            for key, rec in runs.items():
                k_nu, k_inf, cov, _ = key.split("/")
                if (k_nu, k_inf) != (nu, inf) or "profile" not in rec:
                    continue
                prof = rec["profile"]
                for t, curve in enumerate(profile_curves(prof)):
                    top = best.get((nu, inf, t))
                    if top is None or curve is None:
                        continue
                    ax.plot(prof["angle"], curve - top, color=colours[cov], lw=1, alpha=0.8,
                            label=f"{cov} Σ" if t == 0 else None)
            ax.axvline(0.0, color="grey", lw=0.6, ls=":")
            ax.set_title(f"ν = {nu}, {inf}", fontsize=9)
            ax.set_xlim(-45, 45)
            if i == len(inference) - 1:
                ax.set_xlabel("decoder angle θ_A (degrees; 0 = true axes)", fontsize=8)
            if j == 0:
                ax.set_ylabel("best ELBO at θ_A − best ELBO on the data", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("ELBO profile over the decoder's angle", fontsize=10)
    return plotting.save(fig, path)


def _run_setting(s: Setting, training: Training, grid: dict, args) -> dict:
    """One setting's trials; the reference runs at the truth go with the grid's smallest n."""
    T = trials_for(s.steps_per_stage, grid, args.quick)
    progress = Progress(s.key, training.stages * s.steps_per_stage + (
        training.refine_iterations if training.refine == "lbfgs" else 0))
    seeds = [trial_seeds(training.seed, s, t) for t in range(T)]
    first_n = s.steps_per_stage == min(grid["steps"])
    rec = run_trials(seeds, s, training, device=args.device, progress=progress,
                     reference=training.reference == "truth" and first_n,
                     profile=training.profile if first_n else 0)
    rec["seconds"] = progress.elapsed()
    return rec


def run(args) -> int:
    training, grid = _config(args)
    config = {"training": asdict(training), "grid": grid, "quick": bool(args.quick)}
    results = Results(args.out, "identifiability", config)
    settings = [Setting(nu, inf, cov, n) for nu in grid["nonlinearities"] for inf in grid["inference"]
                for cov in grid["covariances"] for n in grid["steps"]]
    log(f"identifiability: {len(settings)} settings, {training.num_points} points, mixing "
        f"{training.mixing}, {training.optimizer} lr {training.lr} ÷10 every n steps for "
        f"{training.stages}n steps, then {training.refine} → {args.out}")
    if args.summarise_only:
        settings = [s for s in settings if s.key in results]
    for i, s in enumerate(settings, 1):
        if s.key in results:
            log(f"[{i}/{len(settings)}] {s.key}: done already, skipped")
            continue
        rec = _run_setting(s, training, grid, args)
        results.put(s.key, rec)
        elbo = np.array([e if e is not None else np.nan for e in rec["elbo"]])
        ang = np.abs(np.array([a if a is not None else np.nan for a in rec["angle"]]))
        log(f"[{i}/{len(settings)}] {s.key}: {len(elbo)} trials in {rec['seconds']:.1f} s, "
            f"ELBO max {np.nanmax(elbo):.4f} median {np.nanmedian(elbo):.4f}, "
            f"|angle| median {np.nanmedian(ang):.1f}°")
    keys = {s.key for s in settings}
    runs = {k: r for k, r in results.runs.items() if k in keys}
    rows = flatten(runs)
    profiles: dict[tuple, list] = {}
    best_on = _best_by_data_set(rows)
    for key, rec in runs.items():
        if "profile" in rec:
            nu, inference, cov = key.split("/")[:3]
            best = [best_on.get((nu, inference, t)) for t in range(len(rec["profile"]["elbo"]))]
            profiles.setdefault((nu, inference, cov), []).extend(profile_stats(rec["profile"], best))
    summary = summarise(rows, args.tolerance, profiles)
    results.put_summary(summary)
    _print_summary(summary, training.mixing)
    _print_reference(summary)
    figures = [_figure(rows, grid["nonlinearities"], grid["inference"], "angle",
                       "angle between true and inferred latents", args.out / "identifiability.png")]
    if training.mixing == "gaussian":
        figures.append(_figure(rows, grid["nonlinearities"], grid["inference"], "principal_angle",
                               "angle between W's principal axes and inferred latents",
                               args.out / "identifiability_principal.png"))
    if profiles:
        _print_profiles(summary)
        figures.append(_profile_figure(runs, rows, grid["nonlinearities"], grid["inference"],
                                       args.out / "identifiability_profile.png"))
    log("figures: " + ", ".join(map(str, figures)))
    return 0


def _print_summary(rows: list[dict], mixing: str) -> None:
    log("\n|angle| (degrees) of each Σ's best run per data set, and of the runs within tolerance of "
        "the best run of any Σ on that data set; diagonal Σ should sit near 0°, full Σ should not; "
        "spread: near-best runs' angle to the best run of their Σ on the same data (unique: ≈ 0)")
    cols = [("best", "angle"), ("near_best", "angle")]
    if mixing == "gaussian":
        cols += [("best", "principal_angle"), ("near_best", "principal_angle")]
    names = {"angle": "θ", "principal_angle": "θ_W"}
    head = f"{'ν':9s} {'inference':12s} {'Σ':9s} {'runs':>5s} {'near':>5s} {'spread med':>10s}"
    for sel, k in cols:
        tag = f"{sel.replace('_', '-')} {names[k]}"
        head += f" {tag + ' med':>16s} {'max':>6s}"
    log(head)
    for r in rows:
        line = (f"{r['nonlinearity']:9s} {r['inference']:12s} {r['covariance']:9s} {r['runs']:5d} "
                f"{r['near_best_runs']:5d} {r['near_best_angle_to_best_median_abs']:10.1f}")
        for sel, k in cols:
            line += f" {r[f'{sel}_{k}_median_abs']:16.1f} {r[f'{sel}_{k}_max_abs']:6.1f}"
        log(line)


def _print_reference(rows: list[dict]) -> None:
    log("\nwhere the optimum lies: θ_A = the near-best runs' decoder angle (A ≈ W·Q), s = singular values "
        "of W⁻¹A (1, 1 if A = W·Q); θ_x, φ: the decoder's and W's axes against the data's coordinate axes; "
        "runs started at the truth: the true decoder's ELBO gap (its encoder fitted), its own mean-field "
        "axes ψ (amortised), and where L-BFGS from there stopped")
    log(f"{'ν':9s} {'inference':12s} {'Σ':9s} {'θ_A med':>8s} {'s med':>12s} {'|θ_x| med':>9s} {'|φ| med':>8s} "
        f"{'truth gap':>10s} {'|ψ| med':>8s} {'from truth: gap':>16s} {'|θ| med':>8s}")
    for r in rows:
        s1, s2 = r["near_best_decoder_singular_values_median"]
        log(f"{r['nonlinearity']:9s} {r['inference']:12s} {r['covariance']:9s} "
            f"{r['near_best_decoder_angle_median_abs']:8.1f} {s1:6.3f},{s2:5.3f} "
            f"{r['near_best_data_axes_angle_median_abs']:9.1f} {r['mixing_angle_median_abs']:8.1f} "
            f"{r['truth_gap_median']:10.4f} {r['true_decoder_axes_median_abs']:8.1f} "
            f"{r['truth_start_gap_median']:16.2e} {r['truth_start_angle_median_abs']:8.1f}")


def _print_profiles(rows: list[dict]) -> None:
    log("\nELBO profile over the decoder's angle θ_A (the best ELBO with the decoder turned exactly θ_A "
        "from the true axes): its peak, the ELBO at θ_A = 0 against the peak, and its range (0: flat)")
    log(f"{'ν':9s} {'inference':12s} {'Σ':9s} {'sets':>5s} {'peaks':>5s} {'|peak| med':>10s} {'at 0 − peak':>12s} "
        f"{'range med':>10s}")
    for r in rows:
        if r.get("profile_data_sets"):
            peaks = "flat" if r.get("profile_peaks_max") is None else str(r["profile_peaks_max"])
            log(f"{r['nonlinearity']:9s} {r['inference']:12s} {r['covariance']:9s} {r['profile_data_sets']:5d} "
                f"{peaks:>5s} {r['profile_peak_angle_median_abs']:10.1f} {r['profile_at_true_axes_median']:12.2e} "
                f"{r['profile_range_median']:10.2e}")
