"""Flow-matching schedules and samplers for Wan (and any velocity-predicting model).

Same calling convention as samplers.py: `sample_<name>(model, x, sigmas, *, callback, generator,
cancel) -> x`, where `model(x, sigma)` is a denoiser returning the clean estimate x0 (wrap a
velocity net with `samplers.flow_denoiser`) and x = (1 - sigma) x0 + sigma noise.

UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework") in its data-prediction
form with the B(h) = e^h - 1 variant ("bh2") and order 2, the configuration Wan's reference code
and diffusers' Wan pipelines use. For flow matching alpha_t = 1 - sigma, sigma_t = sigma, and the
half log-SNR is lambda = log((1 - sigma) / sigma). The step is written from the paper's
equations for orders 1 and 2 (no general linear solve), and the tests hold it equal to diffusers'
UniPCMultistepScheduler step for step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from studio.engine.samplers import Callback, Denoiser, sample_flow_euler

TRAIN_STEPS = 1000


def wan_flow_sigmas(steps: int, shift: float = 5.0, train_steps: int = TRAIN_STEPS) -> torch.Tensor:
    """The schedule of Wan's reference sampler: (steps + 1,) float32, descending, ending in 0.

    sigma runs evenly from 1 to 1/train_steps over `steps` points, is shifted by
    shift * s / (1 + (shift - 1) s), and gets a final 0. The first sigma is pulled 1e-6 below 1 so
    log((1 - sigma) / sigma) stays finite (UniPC needs it; Euler does not care).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    s = np.linspace(1.0, 1.0 / train_steps, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


def _lam(sigma: float) -> float:
    """Half log-SNR of the flow path; +inf at sigma = 0 (the final, clean point)."""
    return math.inf if sigma <= 0 else math.log(1.0 - sigma) - math.log(sigma)


@torch.no_grad()
def sample_flow_unipc(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                      generator: torch.Generator | None = None, cancel: Callable[[], None] | None = None,
                      order: int = 2) -> torch.Tensor:
    """UniPC-bh2 predictor-corrector on the flow ODE. One model call per step.

    Each step: evaluate x0 at the current point, correct the current point with it (UniC, using
    the previous x0s), then predict the next point (UniP). The first step and the last are first
    order (warm-up, and `lower_order_final`, which keeps the few-step case stable).
    """
    if order not in (1, 2):
        raise ValueError("UniPC here supports order 1 or 2")
    sig = [float(s) for s in sigmas]
    total = len(sig) - 1
    x0s: list[torch.Tensor] = []  # the last `order` x0 estimates, newest last
    last_x: torch.Tensor | None = None  # the point the previous predictor started from
    prev_order = 1
    for i in range(total):
        if cancel is not None:
            cancel()
        s = torch.full((x.shape[0],), sig[i], dtype=x.dtype, device=x.device)
        denoised = model(x, s).to(x.dtype)
        if last_x is not None:
            # UniC: redo the previous step from last_x with the new x0 as an extra node.
            x = _unic(last_x, x0s, denoised, sig[i - 1], sig[i], sig[i - 2] if i >= 2 else None, prev_order)
        x0s = (x0s + [denoised])[-order:]
        this_order = min(order, total - i, len(x0s))
        last_x = x
        x = _unip(x, x0s, sig[i], sig[i + 1], sig[i - 1] if i >= 1 else None, this_order)
        prev_order = this_order
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x


def _phis(s0: float, t: float) -> tuple[float, float, float, float]:
    """-> (h, h_phi_1 = e^-h - 1, B(h) = e^-h - 1, phi_2-ish coefficient b1) for data prediction."""
    h = _lam(t) - _lam(s0)
    hh = -h
    h_phi_1 = math.expm1(hh)  # -1 when t = 0
    b_h = h_phi_1
    # b_1 = (h_phi_1 / hh - 1) / B(h); at t = 0 hh = -inf and it tends to 1 (h_phi_1 / hh -> 0)
    h_phi_k = (h_phi_1 / hh if math.isfinite(hh) else 0.0) - 1.0
    return h, h_phi_1, b_h, h_phi_k / b_h


def _base(x: torch.Tensor, m0: torch.Tensor, s0: float, t: float, h_phi_1: float) -> torch.Tensor:
    """First-order (DPM-Solver-1 / DDIM) step from x at s0 to t with x0 estimate m0."""
    return (t / s0) * x - (1.0 - t) * h_phi_1 * m0


def _unip(x: torch.Tensor, x0s: list[torch.Tensor], s0: float, t: float, s_prev: float | None,
          order: int) -> torch.Tensor:
    """Predictor from x at sigma s0 to sigma t; order 2 adds 0.5 * D1 (the paper's rho for p = 2)."""
    m0 = x0s[-1]
    h, h_phi_1, b_h, _ = _phis(s0, t)
    out = _base(x, m0, s0, t, h_phi_1)
    if order == 2 and s_prev is not None:
        rk = (_lam(s_prev) - _lam(s0)) / h
        d1 = (x0s[-2] - m0) / rk
        out = out - (1.0 - t) * b_h * 0.5 * d1
    return out


def _unic(x: torch.Tensor, x0s: list[torch.Tensor], model_t: torch.Tensor, s0: float, t: float,
          s_prev: float | None, order: int) -> torch.Tensor:
    """Corrector: the step from x at s0 to t again, now knowing x0 at t (model_t)."""
    m0 = x0s[-1]
    h, h_phi_1, b_h, b1 = _phis(s0, t)
    out = _base(x, m0, s0, t, h_phi_1)
    d1_t = model_t - m0
    if order == 1 or s_prev is None:
        return out - (1.0 - t) * b_h * 0.5 * d1_t
    # order 2: solve [[1, 1], [rk, 1]] rho = [b1, b2] for the weights of D1 (old node) and D1_t
    rk = (_lam(s_prev) - _lam(s0)) / h
    hh = -h
    b2 = ((h_phi_1 / hh - 1.0) / hh - 0.5) * 2.0 / b_h
    rho_old = (b1 - b2) / (1.0 - rk)
    rho_t = b1 - rho_old
    d1 = (x0s[-2] - m0) / rk
    return out - (1.0 - t) * b_h * (rho_old * d1 + rho_t * d1_t)


FLOW_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "unipc": sample_flow_unipc,
    "euler": sample_flow_euler,
}


def get_flow_sampler(name: str) -> Callable[..., torch.Tensor]:
    try:
        return FLOW_SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown flow sampler {name!r}; known: {', '.join(FLOW_SAMPLERS)}") from None
