"""Samplers and schedules against diffusers' schedulers on the same model function and noise."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from studio.engine import samplers as S

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 4, 6, 5)
PATTERN = torch.linspace(-1, 1, 6 * 5).reshape(1, 1, 6, 5)


def net(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth analytic eps (or v) predictor: depends on the input and on the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.8 * x + 0.2 * torch.sin(x) + 0.3 * torch.cos(t / 300.0) * PATTERN


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def model_schedule() -> S.DiscreteSchedule:
    return S.DiscreteSchedule.from_betas()


def run_diffusers_ve(sched, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """The usual diffusers loop for the k-diffusion-style schedulers (sample in VE units)."""
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
    for t in sched.timesteps:
        model_out = net(sched.scale_model_input(x, t), t)
        x = sched.step(model_out, t, x, **kwargs).prev_sample
    return x


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = (a - b).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs error {err}"


# ------------------------------------------------------------------ model sigmas and schedules


def test_training_sigmas_match_diffusers_alphas_cumprod():
    sched = EulerDiscreteScheduler(**SD)
    ref = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    ours = S.sigmas_from_betas()
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=0)  # diffusers is float32
    assert abs(ours[0].item() - 0.0292) < 1e-3 and abs(ours[-1].item() - 14.6146) < 1e-3


def test_sigma_to_t_inverts_t_to_sigma():
    ms = model_schedule()
    t = torch.tensor([0.0, 1.0, 10.5, 333.3, 998.9, 999.0])
    torch.testing.assert_close(ms.sigma_to_t(ms.t_to_sigma(t)), t, atol=2e-3, rtol=0)


def test_normal_schedule_matches_diffusers_linspace():
    # 999 / (steps - 1) is an integer for steps=10, where linear and log interpolation agree.
    sched = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    sched.set_timesteps(10)
    torch.testing.assert_close(S.get_sigmas("normal", model_schedule(), 10), sched.sigmas, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
def test_karras_and_exponential_sigmas_match_diffusers(name, flag):
    sched = EulerDiscreteScheduler(**SD, **{flag: True})
    sched.set_timesteps(12)
    torch.testing.assert_close(S.get_sigmas(name, model_schedule(), 12), sched.sigmas, rtol=1e-4, atol=0)


def test_sgm_uniform_drops_the_last_of_steps_plus_one_timesteps():
    ms = model_schedule()
    sigmas = S.get_sigmas("sgm_uniform", ms, 4)
    assert sigmas[-1] == 0 and len(sigmas) == 5
    torch.testing.assert_close(ms.sigma_to_t(sigmas[:-1]), torch.tensor([999.0, 749.25, 499.5, 249.75]),
                               atol=2e-3, rtol=0)


def test_ddim_uniform_matches_diffusers_ddim_timesteps():
    sched = DDIMScheduler(**SD, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(10)
    ms = model_schedule()
    ours = S.get_sigmas("ddim_uniform", ms, 10)
    torch.testing.assert_close(ours[:-1], ms.sigmas[sched.timesteps], rtol=1e-6, atol=0)


def test_unknown_schedule_and_sampler_names_say_what_exists():
    with pytest.raises(ValueError, match="karras"):
        S.get_sigmas("nope", model_schedule(), 10)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        S.get_sampler("nope")
    assert set(S.SAMPLERS) == {"euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "lcm"}
    assert {"normal", "karras", "exponential", "sgm_uniform"} <= set(S.SCHEDULES)


# ------------------------------------------------------------------ k-diffusion style samplers


def test_euler_matches_diffusers_euler():
    sched = EulerDiscreteScheduler(**SD)
    sched.set_timesteps(8)
    x = noise() * sched.init_noise_sigma
    ref = run_diffusers_ve(sched, x)
    ours = S.sample_euler(S.eps_denoiser(net, model_schedule()), x, sched.sigmas)
    close(ours, ref)


def test_euler_with_v_prediction_matches_diffusers():
    sched = EulerDiscreteScheduler(**SD, prediction_type="v_prediction")
    sched.set_timesteps(8)
    x = noise() * sched.init_noise_sigma
    ref = run_diffusers_ve(sched, x)
    ours = S.sample_euler(S.v_denoiser(net, model_schedule()), x, sched.sigmas)
    close(ours, ref)


def test_euler_ancestral_matches_diffusers_with_the_same_generator():
    sched = EulerAncestralDiscreteScheduler(**SD)
    sched.set_timesteps(8)
    x = noise() * sched.init_noise_sigma
    ref = run_diffusers_ve(sched, x, seed=7)
    ours = S.sample_euler_ancestral(S.eps_denoiser(net, model_schedule()), x, sched.sigmas,
                                    generator=torch.Generator().manual_seed(7))
    close(ours, ref)
    other = S.sample_euler_ancestral(S.eps_denoiser(net, model_schedule()), x, sched.sigmas,
                                     generator=torch.Generator().manual_seed(8))
    assert (other - ref).abs().max() > 1e-2  # the noise really enters


def test_heun_matches_diffusers_heun():
    sched = HeunDiscreteScheduler(**SD)
    sched.set_timesteps(6)
    x = noise() * sched.init_noise_sigma
    ref = run_diffusers_ve(sched, x)
    calls = []
    ours = S.sample_heun(S.eps_denoiser(net, model_schedule()), x, torch.unique_consecutive(sched.sigmas),
                         callback=lambda *a: calls.append(a[0]))
    close(ours, ref)
    assert calls == [1, 2, 3, 4, 5, 6]


def run_diffusers_vp(sched, noise_vp: torch.Tensor, seed: int | None = None, **step_kwargs) -> torch.Tensor:
    """Loop for the VP-parametrised schedulers (DPM-Solver, DDIM, LCM): the sample is x / sqrt(1 + sigma^2)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = noise_vp
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x, generator=g, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmpp_2m_and_2m_sde_match_diffusers_multistep(algorithm):
    sched = DPMSolverMultistepScheduler(**SD, algorithm_type=algorithm, solver_order=2)
    sched.set_timesteps(9)
    n = noise()
    ref = run_diffusers_vp(sched, n, seed=3)
    sigmas = sched.sigmas
    x = n * (sigmas[0] ** 2 + 1).sqrt()  # the same start in VE units
    fn = S.sample_dpmpp_2m if algorithm == "dpmsolver++" else S.sample_dpmpp_2m_sde
    ours = fn(S.eps_denoiser(net, model_schedule()), x, sigmas, generator=torch.Generator().manual_seed(3))
    close(ours, ref)


def test_dpmpp_sde_matches_diffusers_dpmsolver_sde_with_injected_noise(monkeypatch):
    # diffusers' DPMSolverSDEScheduler imports torchsde only for its Brownian tree; we replace the
    # tree with the same Gaussian sequence on both sides, so the solver arithmetic is compared exactly.
    try:
        import torchsde  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    module = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")
    sched = module.DPMSolverSDEScheduler(**SD)
    sched.set_timesteps(5)

    def sequence(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda sigma, sigma_next: torch.randn(SHAPE, generator=g)

    sched.noise_sampler = sequence(11)
    x = noise() * sched.init_noise_sigma
    ref = run_diffusers_ve(sched, x)
    ours = S.sample_dpmpp_sde(S.eps_denoiser(net, model_schedule()), x, torch.unique_consecutive(sched.sigmas),
                              noise_sampler=sequence(11))
    close(ours, ref)


def test_dpmpp_sde_default_noise_comes_from_the_generator():
    ms = model_schedule()
    sigmas = S.get_sigmas("karras", ms, 6)
    x = noise() * sigmas[0]
    a = S.sample_dpmpp_sde(S.eps_denoiser(net, ms), x, sigmas, generator=torch.Generator().manual_seed(1))
    b = S.sample_dpmpp_sde(S.eps_denoiser(net, ms), x, sigmas, generator=torch.Generator().manual_seed(1))
    c = S.sample_dpmpp_sde(S.eps_denoiser(net, ms), x, sigmas, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim(eta):
    sched = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                          timestep_spacing="leading")
    sched.set_timesteps(8)
    n = noise()
    ref = run_diffusers_vp(sched, n, seed=5, eta=eta)
    ms = model_schedule()
    # diffusers ends at alphabar[0] (set_alpha_to_one=False), i.e. at the smallest training sigma.
    sigmas = torch.cat([ms.sigmas[sched.timesteps], ms.sigmas[:1]])
    x = n * (sigmas[0] ** 2 + 1).sqrt()
    ours = S.sample_ddim(S.eps_denoiser(net, ms), x, sigmas, generator=torch.Generator().manual_seed(5), eta=eta)
    close(ours / (sigmas[-1] ** 2 + 1).sqrt(), ref)


def test_ddim_without_eta_is_euler():
    ms = model_schedule()
    sigmas = S.get_sigmas("normal", ms, 7)
    x = noise() * sigmas[0]
    model = S.eps_denoiser(net, ms)
    close(S.sample_ddim(model, x, sigmas), S.sample_euler(model, x, sigmas), 1e-5)


def test_lcm_matches_diffusers_lcm_scheduler():
    sched = LCMScheduler(**SD)
    sched.set_timesteps(4)
    n = noise()
    ref = run_diffusers_vp(sched, n, seed=9)
    ms = model_schedule()
    sigmas = torch.cat([ms.sigmas[sched.timesteps], torch.zeros(1)])
    x = n * (sigmas[0] ** 2 + 1).sqrt()
    model = S.lcm_denoiser(S.eps_denoiser(net, ms), ms)
    ours = S.sample_lcm(model, x, sigmas, generator=torch.Generator().manual_seed(9))
    close(ours, ref)


# ------------------------------------------------------------------ flow matching


def test_flow_sigmas_and_euler_match_diffusers_flow_match():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 9)[:-1].tolist())
    ours_sigmas = S.flow_sigmas(8, shift=3.0)
    torch.testing.assert_close(ours_sigmas, sched.sigmas, rtol=1e-5, atol=1e-6)
    x = noise()
    ref = x
    for t in sched.timesteps:
        ref = sched.step(net(ref, t), t, ref).prev_sample
    ours = S.sample_flow_euler(S.flow_denoiser(net), x, ours_sigmas)
    close(ours, ref)


# ------------------------------------------------------------------ contract: callback, cancel, seeds


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_every_sampler_reports_each_step_and_cancel_stops_within_one_step(name):
    ms = model_schedule()
    sigmas = S.get_sigmas("karras", ms, 5)
    x = noise() * sigmas[0]
    evaluations = []

    def model(x, sigma):
        evaluations.append(float(sigma[0]))
        return S.eps_denoiser(net, ms)(x, sigma)

    seen = []
    S.SAMPLERS[name](model, x, sigmas, callback=lambda step, total, x, d: seen.append((step, total, len(evaluations))),
                     generator=torch.Generator().manual_seed(0))
    assert [s[:2] for s in seen] == [(i, 5) for i in range(1, 6)]
    evaluations_in_two_steps = seen[1][2]

    evaluations.clear()
    state = {"calls": 0}

    def cancel():
        state["calls"] += 1
        if state["calls"] == 3:
            raise Stop()

    with pytest.raises(Stop):
        S.SAMPLERS[name](model, x, sigmas, cancel=cancel, generator=torch.Generator().manual_seed(0))
    # two steps ran, then the third was refused before any model call
    assert len(evaluations) == evaluations_in_two_steps


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_every_sampler_is_reproducible_for_a_seed_and_denoises_towards_the_data(name):
    ms = model_schedule()
    sigmas = S.get_sigmas("normal", ms, 6)
    x = noise() * sigmas[0]
    target = torch.full(SHAPE, 0.5)
    model = lambda x, sigma: target  # noqa: E731 - an oracle denoiser: every sampler must land on it
    a = S.SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(4))
    b = S.SAMPLERS[name](model, x, sigmas, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    close(a, target, 1e-4)
