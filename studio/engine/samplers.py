"""Samplers and sigma schedules, k-diffusion style: everything works in sigma space.

A *denoiser* is `model(x, sigma) -> denoised`, where x is the noisy latent in the
variance-exploding parametrisation (x = x0 + sigma * noise) and sigma has shape (B,).
`eps_denoiser` / `v_denoiser` wrap a UNet that predicts eps or v from the usual
discrete-timestep input; `flow_denoiser` wraps a flow-matching transformer.

Every sampler is `sample_<name>(model, x, sigmas, *, callback, generator, cancel) -> x`:
- `sigmas` is the schedule, descending and normally ending in 0 (shape (steps + 1,)).
- `callback(step, total, x, denoised)` is called after each step, step counting 1..total.
- `cancel()` is called before each step; it raises (JobCancelled) to stop.
- Keep x in float32 (the net casts its own input): the step arithmetic runs in x's dtype,
  and bf16 is too coarse for sigma scalings.
- Noise comes from `generator` (a torch.Generator), drawn in step order with
  `torch.randn(x.shape, generator=generator)`, the same calls diffusers makes, so seeds
  reproduce and the tests can compare with diffusers draw for draw.

The SDE samplers (DPM++ 2M SDE, DPM++ SDE) draw plain Gaussian noise per call instead of
k-diffusion's Brownian tree (torchsde), as diffusers' sde-dpmsolver++ does. Each draw has
the right N(0, 1) marginal; what is lost is the tree's coupling: DPM++ SDE's two draws in a
step (for [sigma, sigma_mid] and [sigma, sigma_next]) are independent here rather than
correlated, and one seed does not give one noise path across step counts. So seeds do not
reproduce A1111/ComfyUI SDE images exactly (they use the tree). A caller may pass
`noise_sampler(sigma, sigma_next) -> tensor` to use any other source, a Brownian tree included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
NoiseSampler = Callable[[float, float], torch.Tensor]


# ---------------------------------------------------------------- model sigmas


def sigmas_from_betas(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                      schedule: str = "scaled_linear") -> torch.Tensor:
    """The model's training sigmas, one per discrete timestep, ascending. (steps,) float32.

    sigma_t = sqrt((1 - alphabar_t) / alphabar_t); "scaled_linear" is SD1/SD2/SDXL.
    """
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}: use scaled_linear or linear")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


class DiscreteSchedule:
    """Maps between discrete timesteps t in [0, N-1] and sigmas, interpolating in log sigma
    (k-diffusion's DiscreteSchedule, also ComfyUI's ModelSamplingDiscrete)."""

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.float()  # (N,) ascending
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                   schedule: str = "scaled_linear") -> DiscreteSchedule:
        return cls(sigmas_from_betas(beta_start, beta_end, steps, schedule))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma - log_sigmas[:, None]  # (N, *sigma.shape) flattened below
        dists = dists.reshape(len(log_sigmas), -1)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * high
        return t.reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        log_sigmas = self.log_sigmas.to(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () sigma -> shape that broadcasts over x (B, C, ...)."""
    sigma = sigma.to(x.dtype)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (x.ndim - 1)))


def eps_denoiser(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 schedule: DiscreteSchedule) -> Denoiser:
    """Wrap `net(x_in, t) -> eps` (a UNet on the VP-scaled input) into a denoiser.

    c_in = 1 / sqrt(sigma^2 + 1) turns the VE latent into the unit-variance input the net
    was trained on; denoised = x - sigma * eps.
    """

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _bcast(sigma, x)
        eps = net(x / (s**2 + 1).sqrt(), schedule.sigma_to_t(sigma))
        return x - s * eps

    return model


def v_denoiser(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               schedule: DiscreteSchedule, sigma_data: float = 1.0) -> Denoiser:
    """Wrap a v-predicting `net(x_in, t) -> v` (SD2-768, some SDXL finetunes).

    k-diffusion's scalings: c_skip = sd^2 / (sigma^2 + sd^2), c_out = -sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2).
    """

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _bcast(sigma, x)
        denom = s**2 + sigma_data**2
        c_skip = sigma_data**2 / denom
        c_out = -s * sigma_data / denom.sqrt()
        c_in = 1 / denom.sqrt()
        return net(x * c_in, schedule.sigma_to_t(sigma)) * c_out + x * c_skip

    return model


def lcm_denoiser(model: Denoiser, schedule: DiscreteSchedule, timestep_scaling: float = 10.0,
                 sigma_data: float = 0.5) -> Denoiser:
    """LCM's consistency boundary condition on top of an eps/v denoiser (diffusers LCMScheduler):
    denoised = c_out * x0 + c_skip * x_vp, with x_vp the unit-variance sample."""

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = model(x, sigma)
        scaled_t = _bcast(schedule.sigma_to_t(sigma), x) * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2).sqrt()
        s = _bcast(sigma, x)
        return c_out * x0 + c_skip * x / (s**2 + 1).sqrt()

    return wrapped


# ---------------------------------------------------------------- schedules
# Each takes the model's DiscreteSchedule and a step count, returns (steps + 1,) sigmas ending in 0.


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def normal_schedule(schedule: DiscreteSchedule, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from t_max to t_min (A1111 / ComfyUI "normal"). With sgm=True
    the spacing has steps+1 points and drops the last (ComfyUI "sgm_uniform", for SDXL-turbo/LCM)."""
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    if sgm:
        ts = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        ts = torch.linspace(float(start), float(end), steps)
    return _append_zero(schedule.t_to_sigma(ts))


def sgm_uniform_schedule(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    return normal_schedule(schedule, steps, sgm=True)


def simple_schedule(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """ComfyUI "simple": every (N / steps)-th training sigma from the top, no interpolation."""
    stride = len(schedule.sigmas) / steps
    picked = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return _append_zero(torch.tensor(picked))


def ddim_uniform_schedule(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Timesteps 1, 1 + N//steps, ... (diffusers DDIM "leading" spacing with steps_offset=1)."""
    stride = max(len(schedule.sigmas) // steps, 1)
    ts = torch.arange(0, steps) * stride + 1
    ts = ts[ts < len(schedule.sigmas)].flip(0)
    return _append_zero(schedule.sigmas[ts])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) spacing: even in sigma^(1/rho). (steps + 1,) ending in 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Even in log sigma. (steps + 1,) ending in 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def karras_schedule(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    return karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)


def exponential_schedule(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    return exponential_sigmas(steps, schedule.sigma_min, schedule.sigma_max)


SCHEDULES: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "normal": normal_schedule,
    "karras": karras_schedule,
    "exponential": exponential_schedule,
    "sgm_uniform": sgm_uniform_schedule,
    "simple": simple_schedule,
    "ddim_uniform": ddim_uniform_schedule,
}


def get_sigmas(name: str, schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}: pick one of {', '.join(SCHEDULES)}") from None
    return fn(schedule, steps)


# ---------------------------------------------------------------- sampler helpers


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device so a CPU generator gives the same image on any device.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _gaussian_sampler(x: torch.Tensor, generator: torch.Generator | None) -> NoiseSampler:
    return lambda sigma, sigma_next: _noise_like(x, generator)


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_to into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class _Steps:
    """Shared per-step plumbing: cancel check, sigma as a (B,) tensor, callback."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None,
                 cancel: Callable[[], None] | None) -> None:
        self.sigmas = [float(s) for s in sigmas]
        self.total = len(self.sigmas) - 1
        self.callback, self.cancel = callback, cancel
        self.batch = x.shape[0]

    def __iter__(self):
        for i in range(self.total):
            if self.cancel is not None:
                self.cancel()
            yield i, self.sigmas[i], self.sigmas[i + 1]

    def s(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        return torch.full((self.batch,), sigma, dtype=torch.float32, device=x.device)

    def done(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i + 1, self.total, x, denoised)


# ---------------------------------------------------------------- samplers


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                 generator: torch.Generator | None = None, cancel: Callable[[], None] | None = None) -> torch.Tensor:
    steps = _Steps(x, sigmas, callback, cancel)
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           callback: Callback | None = None, generator: torch.Generator | None = None,
                           cancel: Callable[[], None] | None = None, eta: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    noise_sampler = noise_sampler or _gaussian_sampler(x, generator)
    steps = _Steps(x, sigmas, callback, cancel)
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                generator: torch.Generator | None = None, cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Heun's second-order method; the last step (to sigma 0) is plain Euler. 2 evaluations a step."""
    steps = _Steps(x, sigmas, callback, cancel)
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, steps.s(sigma_next, x))
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + (d + d_2) / 2 * dt
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                    generator: torch.Generator | None = None,
                    cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): multistep, reuses the previous denoised; first and last steps first order."""
    steps = _Steps(x, sigmas, callback, cancel)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda = -log sigma
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        callback: Callback | None = None, generator: torch.Generator | None = None,
                        cancel: Callable[[], None] | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (k-diffusion / diffusers sde-dpmsolver++)."""
    noise_sampler = noise_sampler or _gaussian_sampler(x, generator)
    steps = _Steps(x, sigmas, callback, cancel)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                     generator: torch.Generator | None = None, cancel: Callable[[], None] | None = None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                     noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++ (stochastic, single-step, 2 evaluations a step; k-diffusion sample_dpmpp_sde)."""
    noise_sampler = noise_sampler or _gaussian_sampler(x, generator)
    steps = _Steps(x, sigmas, callback, cancel)
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            # In t = -log(sigma): step to the point s a fraction r of the way, then on to t_next.
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            sigma_s = math.exp(-(t + h * r))
            fac = 1 / (2 * r)
            sd, su = _ancestral_step(sigma, sigma_s, eta)
            x_2 = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised
            x_2 = x_2 + noise_sampler(sigma, sigma_s) * s_noise * su
            denoised_2 = model(x_2, steps.s(sigma_s, x))
            sd, su = _ancestral_step(sigma, sigma_next, eta)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised_d
            x = x + noise_sampler(sigma, sigma_next) * s_noise * su
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                generator: torch.Generator | None = None, cancel: Callable[[], None] | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM. With eta=0 it is exactly Euler in sigma space; eta>0 adds DDIM's own variance
    (computed in the VP parametrisation, alphabar = 1 / (1 + sigma^2), as diffusers does)."""
    steps = _Steps(x, sigmas, callback, cancel)
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        eps = (x - denoised) / sigma
        a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        std = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        # x_next_vp = sqrt(a_next) x0 + sqrt(1 - a_next - std^2) eps + std z; divide by sqrt(a_next) for VE.
        x = denoised + math.sqrt(max(1 - a_next - std**2, 0.0) / a_next) * eps
        if std > 0:
            x = x + _noise_like(x, generator) * (std / math.sqrt(a_next))
        steps.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
               generator: torch.Generator | None = None, cancel: Callable[[], None] | None = None,
               noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Latent consistency sampling: jump to denoised, re-noise to the next sigma with fresh noise.
    Use with `lcm_denoiser` for LCM-distilled models."""
    noise_sampler = noise_sampler or _gaussian_sampler(x, generator)
    steps = _Steps(x, sigmas, callback, cancel)
    for i, sigma, sigma_next in steps:
        denoised = model(x, steps.s(sigma, x))
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next
        steps.done(i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}

# Display names as A1111 writes them in PNG parameters.
SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "ddim": "DDIM", "lcm": "LCM",
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}: pick one of {', '.join(SAMPLERS)}") from None


# ---------------------------------------------------------------- flow matching (SD3, Flux, Wan)


def flow_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution/time shift used by SD3 and Wan: shift s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow schedule: sigma from 1 to 0 evenly, then shifted. (steps + 1,)."""
    return flow_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def flow_denoiser(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], multiplier: float = 1000.0) -> Denoiser:
    """Wrap a velocity net `net(x, t) -> v` with x = (1 - sigma) x0 + sigma noise, t = sigma * multiplier."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x - _bcast(sigma, x) * net(x, sigma * multiplier)

    return model


@torch.no_grad()
def sample_flow_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                      generator: torch.Generator | None = None,
                      cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Euler on the flow ODE: x += (sigma_next - sigma) v, v = (x - denoised) / sigma. x starts as pure noise."""
    return sample_euler(model, x, sigmas, callback=callback, generator=generator, cancel=cancel)
