"""Continuous-time flows: ODE solves, the instantaneous change of variables, and the bound on the
discrete log P(x) of a density on dequantized images. Shared by the flow-matching family and by
diffusion's probability-flow likelihood.

Chen, Rubanova, Bettencourt & Duvenaud, *Neural Ordinary Differential Equations* (NeurIPS 2018),
Theorem 1 (the instantaneous change of variables): a state moving by dx/dt = v(x, t) has

    d log p(x(t)) / dt = -tr(dv/dx(x(t), t)),

so, integrated between two times (Grathwohl et al., *FFJORD*, ICLR 2019, eq. 3, with a and b in
either order),

    log p_a(x(a)) = log p_b(x(b)) + ∫_a^b tr(dv/dx(x(t), t)) dt.

`integrate_with_divergence` solves the augmented state [x, ∫ tr] from a to b in one solve. The
trace is computed exactly (one backward pass per dimension) or by Hutchinson's estimator
tr(J) = E[eps^T J eps] (Hutchinson 1989; FFJORD sec. 2.3) with one probe eps per image, fixed along
the solve: unbiased for the integral of the trace, so the log-density it gives is an unbiased
estimate of the solved one, never exact. Probes come from the global torch generator (on the CPU,
then moved), so a seeded caller gets the same numbers on any device and the same probes for every
class it scores an image under (common random numbers).

Solvers are torchdiffeq's (`odeint`): fixed-step `euler`, `midpoint`, `heun` (Heun's second-order
method, torchdiffeq's "heun2") on an even grid, and the adaptive Dormand-Prince `dopri5` with
per-image error control (`per_image_norm`). The solution is the solver's, not the exact flow's: a
log-density from it is the exact one up to the solver's error (which rtol / atol bound per step).

Discrete data (Theis, van den Oord & Bethge 2016, sec. 3.1; Ho et al., *Flow++*, 2019, sec. 3.1):
`dequantized_bound` turns any density on the model's continuous space into a lower bound on
log P(x) of the integer image, by uniform dequantization within each level's bin and the scaling's
Jacobian; `gaussian_dequantized_bound` does so with a Gaussian around each bin's centre and the
levels' posterior under it as the decoder (the variational bound with Kingma et al. 2021's
q(z_0 | x) and p(x | z_0) of VDM, sec. 3). Either way `samples` draws average to an
unbiased estimate of the bound, or, with exact log-densities, combine into models/flow.py's
importance-weighted bound.

Layout: solver settings and the norm, plain solves, divergences, solves with the change of
variables, the Gaussian base, the dequantization bounds (uniform, then Gaussian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torchdiffeq import odeint

Method = Literal["euler", "midpoint", "heun", "dopri5"]
Divergence = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]

# v(x (B, ...), t (B,)) -> dx/dt (B, ...): one network evaluation of the batch per call.
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Our names of torchdiffeq's methods ("heun2" is Heun's method: an Euler predictor, then the
# trapezoidal rule; two evaluations per step, like midpoint).
TORCHDIFFEQ_METHOD: dict[Method, str] = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun": "heun2",
    "dopri5": "dopri5",
}


class Solver(NamedTuple):
    """How to solve: a fixed-step method over `steps` even steps, or `dopri5` with tolerances
    rtol and atol (per image: see `per_image_norm`); the other fields are ignored."""

    method: Method
    steps: int = 1
    rtol: float = 1e-5
    atol: float = 1e-5


class Solution(NamedTuple):
    x: torch.Tensor  # (B, ...) the state at the end time
    nfe: int  # evaluations of the velocity field (each one network pass of the batch)


class SolutionWithDensity(NamedTuple):
    x: torch.Tensor  # (B, ...) the state at the end time b
    delta_log_p: torch.Tensor  # (B,) ∫_a^b tr(dv/dx) dt: log p_a(x(a)) - log p_b(x(b))
    nfe: int  # evaluations of the velocity field (each with its divergence)


def per_image_norm(state: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """dopri5's error norm: the RMS of each image's (scaled) error, each part of a tupled state
    on its own (the log-density error counts in full, not as one of D + 1 entries, as in
    torchdiffeq's default mixed norm), then the largest over the batch.

    torchdiffeq's default is the RMS over the whole batch, which lets one image's error hide in
    the average of the others: its result for an image would then depend on the batch it came in.
    The largest over images makes every image meet the tolerance."""
    parts = state if isinstance(state, tuple) else (state,)
    b = parts[0].shape[0]
    rms = [p.reshape(b, -1).pow(2).mean(1).sqrt() for p in parts]  # each (B,)
    return torch.stack(rms, 1).amax()


def _odeint(
    func: Callable, state: torch.Tensor | tuple, t0: float, t1: float, solver: Solver, like
) -> tuple[torch.Tensor | tuple, int]:
    """Solve from t0 to t1 (either order) with torchdiffeq, counting evaluations of `func`."""
    nfe = 0

    def counted(t, y):
        nonlocal nfe
        nfe += 1
        return func(t, y)

    if solver.method == "dopri5":
        times = torch.tensor([t0, t1], dtype=like.dtype, device=like.device)
        out = odeint(
            counted,
            state,
            times,
            method="dopri5",
            rtol=solver.rtol,
            atol=solver.atol,
            options={"norm": per_image_norm},
        )
    else:
        # The solver steps exactly on this grid (torchdiffeq's fixed-grid default).
        times = torch.linspace(t0, t1, solver.steps + 1, dtype=like.dtype, device=like.device)
        out = odeint(counted, state, times, method=TORCHDIFFEQ_METHOD[solver.method])
    final = tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]
    return final, nfe


def _batch_times(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The solver's scalar time as one time per image, (B,)."""
    return t.to(x.dtype).expand(x.shape[0])


def integrate(
    velocity: Velocity, x: torch.Tensor, t0: float, t1: float, solver: Solver
) -> Solution:
    """x(t1) from x(t0) = x along dx/dt = v(x, t); x (B, ...)."""

    def func(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity(x, _batch_times(t, x))

    out, nfe = _odeint(func, x, t0, t1, solver, x)
    return Solution(out, nfe)


# -- divergence -------------------------------------------------------------------------------
def divergence_exact(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """tr(dv/dx) per image, (B,), for v = f(x) computed from x (B, ...) with its graph: one
    backward pass per dimension i, of sum_n v_n[i], whose gradient at image n is row i of image
    n's Jacobian (images are independent: f acts on each alone). A loop rather than one vmapped
    backward (`is_grads_batched`): on the 8x8 U-Net, one CPU thread, a batch of 64, 15 against
    29 ms per image and evaluation (Hutchinson's one product: 0.5 ms)."""
    v = v.flatten(1)  # (B, D)
    d = v.shape[1]
    trace = v.new_zeros(v.shape[0])
    for i in range(d):
        (row,) = torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < d - 1)  # (B, ...)
        trace = trace + row.flatten(1)[:, i]
    return trace


def draw_probe(like: torch.Tensor, probe: Probe) -> torch.Tensor:
    """Hutchinson probes shaped like `like` (B, ...) with E[eps eps^T] = I: Rademacher (+-1, the
    lower variance: 2 sum_{i != j} J_ij^2 against 2 ||J||_F^2 for Gaussian), or standard normal.
    From the global CPU generator, then moved to `like`'s device."""
    if probe == "rademacher":
        eps = torch.randint(0, 2, like.shape, dtype=like.dtype) * 2 - 1
    else:
        eps = torch.randn(like.shape, dtype=like.dtype)
    return eps.to(like.device)


def divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps^T (dv/dx) eps per image, (B,): an unbiased estimate of tr(dv/dx) for a probe with
    E[eps eps^T] = I. One vector-Jacobian product: grad_x (v . eps) = J^T eps."""
    (vjp,) = torch.autograd.grad(v, x, eps)
    return (vjp * eps).flatten(1).sum(1)


def integrate_with_divergence(
    velocity: Velocity,
    x: torch.Tensor,
    t0: float,
    t1: float,
    solver: Solver,
    divergence: Divergence,
    probe: Probe = "rademacher",
) -> SolutionWithDensity:
    """x(t1) and ∫_{t0}^{t1} tr(dv/dx(x(t), t)) dt from x(t0) = x (B, ...), solving the augmented
    state [x, ∫ tr] together (FFJORD eq. 4): log p_{t0}(x) = log p_{t1}(x(t1)) + delta_log_p.

    For evaluation: runs under torch.enable_grad() inside (callers are under no_grad) and detaches
    each evaluation, so nothing is differentiable through the solve. A Hutchinson solve draws one
    probe per image for the whole solve (`draw_probe`)."""
    eps = draw_probe(x, probe) if divergence == "hutchinson" else None

    def func(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x, _ = state
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = velocity(x, _batch_times(t, x))
            div = divergence_exact(v, x) if eps is None else divergence_hutchinson(v, x, eps)
        return v.detach(), div.detach()

    state = (x, x.new_zeros(x.shape[0]))
    (out, delta), nfe = _odeint(func, state, t0, t1, solver, x)
    return SolutionWithDensity(out, delta, nfe)


# -- densities and the discrete bound ---------------------------------------------------------
def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over every dimension but the batch: (B, ...) -> (B,)."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


class LevelScaling(NamedTuple):
    """The affine map s = scale * v + shift from v in units of levels (level k's bin is
    [k, k + 1)) to the model's continuous space; its log-Jacobian is D log(scale)."""

    scale: float
    shift: float

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale * v + self.shift


class DequantizedBound(NamedTuple):
    """K dequantization draws of a batch, and the two ways to combine them."""

    # (K, B) each draw's log-weight: log p_v(x + u_k), density per unit level (uniform), or
    # log p(s_k) + log P(x | s_k) - log q(s_k | x) (Gaussian); E_q of either is <= log P(x)
    log_p: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """(1/K) sum_k log w_k, (B,), the draws' log-weights `log_p`: an unbiased estimate of
        the one-draw bound E_q log w <= log P(x) (Jensen), whose variance shrinks as 1/K. Stays
        unbiased when each log-density in w is itself an unbiased (Hutchinson) estimate."""
        return self.log_p.mean(0)

    @property
    def importance_weighted(self) -> torch.Tensor:
        """log (1/K) sum_k w_k, (B,): the K-draw importance-weighted bound (Burda et al. 2016;
        models/flow.py's, with log q = 0 for uniform draws), which tightens as K grows. For exact
        log-densities only: the log-mean-exp of noisy estimates is biased upwards, by up to
        log E[exp(noise)] (var / 2 for Gaussian noise), and is then no bound."""
        return torch.logsumexp(self.log_p, dim=0) - math.log(self.log_p.shape[0])


def dequantized_bound(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scaling: LevelScaling,
    samples: int = 1,
) -> DequantizedBound:
    """K = `samples` draws of the dequantization bound on log P(x) of integer images x
    (B, C, H, W) in levels 0..L-1, under a model density `log_density(s)` (N, C, H, W) -> (N,) on
    the continuous space s = scaling(v):

        log P(x) = log ∫_{[0,1)^D} p_v(x + u) du >= E_u log p_v(x + u),   u ~ U[0, 1)^D,
        log p_v(v) = log p_s(scaling(v)) + D log(scaling.scale)   (the scaling's Jacobian).

    The bin of level k is the whole interval [k, k + 1) in level units, so the bins tile the
    data's range and a density uniform over it scores exactly -D log L. All K draws are scored in
    one call of `log_density` (K * B images, draw-major: image n of draw k is row k * B + n; chunk
    inside it if that is too many); u comes from the global CPU generator, moved to x's device."""
    b = x.shape[0]
    d = x[0].numel()
    u = torch.rand(samples, *x.shape).to(x.device)  # (K, B, C, H, W)
    v = (x.to(u.dtype)[None] + u).flatten(0, 1)  # (K*B, C, H, W) in levels
    log_p = log_density(scaling(v)).view(samples, b) + d * math.log(scaling.scale)  # (K, B)
    return DequantizedBound(log_p)


# Elements of the (rows, D, L) logits tensor the level posterior builds at once: 16 MiB in float32.
POSTERIOR_ELEMENTS = 1 << 22


def level_posterior_log_prob(
    s: torch.Tensor, x: torch.Tensor, scaling: LevelScaling, sigma: float, levels: int
) -> torch.Tensor:
    """log P(x | s) (N,) of levels x (N, C, H, W) given continuous s (N, C, H, W): per dimension
    the posterior of the level under s ~ N(c_k, sigma^2) with every level equally likely,

        P(k | s_d) = exp(-(s_d - c_k)^2 / 2 sigma^2) / sum_j exp(-(s_d - c_j)^2 / 2 sigma^2),

    c_k = scaling(k + 1/2) the centre of level k's bin, summed over dimensions. A distribution
    over the L levels for every s, so it is a decoder that a bound may use whatever s is. The
    normaliser runs over all L levels (no truncated window: dropping a term would overstate
    the probability), in chunks of rows."""
    centres = scaling(torch.arange(levels, device=s.device, dtype=s.dtype) + 0.5)  # (L,)
    flat_s, flat_x = s.flatten(1), x.flatten(1).long()  # (N, D)
    rows = max(1, POSTERIOR_ELEMENTS // (flat_s.shape[1] * levels))
    out = []
    for i in range(0, flat_s.shape[0], rows):
        si, xi = flat_s[i : i + rows], flat_x[i : i + rows]
        logits = -0.5 * ((si[..., None] - centres) / sigma).pow(2)  # (n, D, L)
        own = logits.gather(2, xi[..., None]).squeeze(2)  # (n, D)
        out.append((own - torch.logsumexp(logits, dim=2)).sum(1))
    return torch.cat(out)


def gaussian_dequantized_bound(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scaling: LevelScaling,
    sigma: float,
    levels: int,
    samples: int = 1,
) -> DequantizedBound:
    """K = `samples` draws of the Gaussian dequantization bound on log P(x) of integer images x
    (B, C, H, W) in levels 0..L-1, under a model density `log_density(s)` (N, C, H, W) -> (N,) on
    the continuous space, whose levels are read back by `level_posterior_log_prob`:

        log P(x) >= E_q [log p(s) + log P(x | s) - log q(s | x)],
        q(s | x) = N(c(x), sigma^2 I),  c(x) = scaling(x + 1/2) the bins' centres,

    the evidence lower bound of the discrete model "s ~ p, then each level from its posterior
    given s" (VDM's, Kingma et al. 2021, sec. 3). With p the mixture (1/L) sum_k N(c_k,
    sigma^2) in every dimension, every draw scores exactly -D log L. No Jacobian enters: p and q
    are densities on the same space. Draw-major rows as `dequantized_bound`'s; the noise comes
    from the global CPU generator, moved to x's device."""
    b = x.shape[0]
    d = x[0].numel()
    noise = torch.randn(samples, *x.shape).to(x.device).flatten(0, 1)  # (K*B, C, H, W)
    xs = x.repeat(samples, *([1] * (x.dim() - 1)))  # draw-major, as noise's rows
    s = scaling(xs.to(noise.dtype) + 0.5) + sigma * noise
    log_q = standard_normal_log_prob(noise) - d * math.log(sigma)
    decoder = level_posterior_log_prob(s, xs, scaling, sigma, levels)
    return DequantizedBound((log_density(s) + decoder - log_q).view(samples, b))
