"""Flow-matching UniPC and Euler against diffusers' schedulers on an analytic (Gaussian-data) model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.engine.context import JobCancelled
from studio.engine.flow_samplers import get_flow_sampler, sample_flow_unipc, wan_flow_sigmas
from studio.engine.samplers import sample_flow_euler

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402

MU, STD = 0.7, 0.5  # data x0 ~ N(MU, STD^2) per element


def gaussian_x0(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """E[x0 | x] for x = (1 - sigma) x0 + sigma noise with Gaussian x0: the exact denoiser."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1))).to(x.device)
    a = 1 - s
    var = a * a * STD**2 + s * s
    return (MU + a * STD**2 / var * (x.double() - a * MU)).to(x.dtype)


def exact_endpoint(noise: torch.Tensor) -> torch.Tensor:
    """The flow ODE keeps (x - a MU) / sqrt(a^2 STD^2 + s^2) fixed, so noise maps to MU + STD noise."""
    return MU + STD * noise


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed))


def _diffusers_unipc(shift: float) -> UniPCMultistepScheduler:
    # The configuration of the Wan 2.1 diffusers repositories' scheduler_config.json
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                   solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                   final_sigmas_type="zero", num_train_timesteps=1000)


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (25, 5.0), (2, 1.0)])
def test_wan_schedule_matches_diffusers_unipc_flow_sigmas(steps, shift):
    sched = _diffusers_unipc(shift)
    sched.set_timesteps(steps)
    ours = wan_flow_sigmas(steps, shift)
    assert ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-7, rtol=0)


def test_wan_schedule_matches_flow_match_euler_given_the_same_base_sigmas():
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 13)[:-1])
    torch.testing.assert_close(wan_flow_sigmas(12, 5.0), sched.sigmas.float(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("steps,shift", [(8, 3.0), (20, 5.0), (3, 1.0), (1, 5.0)])
def test_unipc_matches_diffusers_step_for_step(steps, shift):
    noise = _noise()
    sched = _diffusers_unipc(shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    theirs = []
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        v = (x - gaussian_x0(x, float(sigma))) / sigma  # flow_prediction: x0 = x - sigma v
        x = sched.step(v, t, x).prev_sample
        theirs.append(x)

    ours = []
    out = sample_flow_unipc(gaussian_x0, noise.clone(), wan_flow_sigmas(steps, shift),
                            callback=lambda i, n, xi, d: ours.append(xi.clone()))
    assert len(ours) == steps
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, theirs[-1], atol=2e-5, rtol=1e-5)


def test_euler_matches_flow_match_euler_scheduler():
    noise = _noise(1)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 11)[:-1])
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        x = sched.step((x - gaussian_x0(x, float(sigma))) / sigma, t, x).prev_sample
    ours = sample_flow_euler(gaussian_x0, noise.clone(), sched.sigmas.clone())
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-5)


def test_unipc_is_more_accurate_than_euler_at_equal_steps():
    noise = _noise(2)
    sigmas = wan_flow_sigmas(20, 1.0)  # a large shift leaves one long last step that dominates both errors
    exact = exact_endpoint(noise)
    err_unipc = (sample_flow_unipc(gaussian_x0, noise.clone(), sigmas) - exact).abs().max()
    err_euler = (sample_flow_euler(gaussian_x0, noise.clone(), sigmas) - exact).abs().max()
    assert err_unipc < err_euler / 5
    assert err_unipc < 2e-2


def test_cancel_is_checked_before_every_step():
    calls = []

    def cancel():
        if len(calls) == 3:
            raise JobCancelled()

    def model(x, s):
        calls.append(float(s[0]))
        return gaussian_x0(x, s)

    with pytest.raises(JobCancelled):
        sample_flow_unipc(model, _noise(), wan_flow_sigmas(10, 3.0), cancel=cancel)
    assert len(calls) == 3


def test_sampler_names():
    assert get_flow_sampler("unipc") is sample_flow_unipc
    assert get_flow_sampler("euler") is sample_flow_euler
    with pytest.raises(ValueError, match="unknown flow sampler 'dpm'"):
        get_flow_sampler("dpm")
