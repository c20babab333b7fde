"""Noise schedules against diffusers' own schedulers (DDPM, Euler, flow matching)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from stepdistill.models.schedules import FlowSchedule, NoiseSchedule, VPSchedule, dynamic_shift

TYPES = ("x0", "epsilon", "v_prediction", "flow")


def _ddpm(beta_schedule: str, **kwargs) -> DDPMScheduler:
    if beta_schedule == "scaled_linear":  # Stable Diffusion's betas
        return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kwargs)
    return DDPMScheduler(beta_schedule="linear", **kwargs)


def _data(shape=(4, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _truth(schedule: NoiseSchedule, x0, eps, t) -> dict[str, torch.Tensor]:
    """Every prediction type computed from its definition, for a known (x0, eps)."""
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    return {"x0": x0, "epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0}


# ---- VP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_vp_add_noise_matches_ddpm(beta_schedule):
    scheduler = _ddpm(beta_schedule)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, VPSchedule) and schedule.kind == "vp"
    assert schedule.num_train_timesteps == 1000
    x0, eps = _data()
    t = torch.tensor([0, 10, 500, 999])
    expected = scheduler.add_noise(x0, eps, t)
    got = schedule.add_noise(x0, eps, t.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_v_prediction_matches_ddpm_get_velocity(beta_schedule):
    scheduler = _ddpm(beta_schedule, prediction_type="v_prediction")
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.prediction_type == "v_prediction"
    x0, eps = _data()
    t = torch.tensor([1, 250, 700, 999])
    v = scheduler.get_velocity(x0, eps, t)
    x_t = schedule.add_noise(x0, eps, t)
    # v from either x0 or eps, and back to both (1e-4: at t=999 of the linear schedule alpha = 0.006,
    # and recovering x0 from eps divides the float32 rounding error of x_t by it).
    torch.testing.assert_close(
        schedule.convert(eps, x_t, t, "epsilon", "v_prediction"), v, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        schedule.convert(x0, x_t, t, "sample", "v_prediction"), v, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(schedule.to_x0(v, x_t, t, "v_prediction"), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.to_eps(v, x_t, t, "v_prediction"), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.to_velocity(eps, x_t, t, "epsilon"), v, rtol=1e-4, atol=1e-4)


def test_vp_alpha_sigma_interpolates_between_integer_steps():
    schedule = NoiseSchedule.from_scheduler(_ddpm("scaled_linear"))
    acp = schedule.alphas_cumprod
    alpha, sigma = schedule.alpha_sigma(torch.tensor([10.0, 10.5, 11.0]))
    assert alpha.dtype == torch.float32
    torch.testing.assert_close(alpha**2, torch.stack([acp[10], (acp[10] + acp[11]) / 2, acp[11]]))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3))
    snr = schedule.snr(torch.arange(0, 1000, 50).float())
    assert torch.all(snr[1:] < snr[:-1]), "SNR must decrease with t"


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_from_scheduler_reads_other_vp_schedulers(scheduler_cls):
    scheduler = scheduler_cls(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, VPSchedule) and schedule.prediction_type == "v_prediction"
    torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.float())


def test_from_scheduler_rejects_a_scheduler_without_vp_or_flow_schedule():
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler"):
        NoiseSchedule.from_scheduler(ScoreSdeVeScheduler())


# ---- conversions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_conversions_between_every_pair_of_types(kind):
    if kind == "vp":
        schedule = NoiseSchedule.from_scheduler(_ddpm("scaled_linear"))
        t = torch.tensor([50.0, 300.0, 600.0, 900.0])
    else:
        schedule = FlowSchedule(shift=3.0)
        t = torch.tensor([50.0, 300.0, 600.0, 900.0])
    x0, eps = _data()
    x_t = schedule.add_noise(x0, eps, t)
    truth = _truth(schedule, x0, eps, t)
    for src, dst in itertools.product(TYPES, TYPES):
        got = schedule.convert(truth[src], x_t, t, src, dst)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, truth[dst], rtol=1e-4, atol=1e-4, msg=f"{src} -> {dst}")
        # and back again
        back = schedule.convert(got, x_t, t, dst, src)
        torch.testing.assert_close(back, truth[src], rtol=1e-4, atol=1e-4, msg=f"{src} -> {dst} -> {src}")


def test_conversion_accepts_low_precision_inputs_and_a_scalar_t():
    schedule = FlowSchedule()
    x0, eps = _data()
    x_t = schedule.add_noise(x0, eps, 400.0)
    x0_hat = schedule.to_x0((eps - x0).bfloat16(), x_t.bfloat16(), 400.0, "flow")
    assert x0_hat.dtype == torch.float32
    torch.testing.assert_close(x0_hat, x0, rtol=0.05, atol=0.05)


def test_unknown_prediction_type_is_a_value_error():
    schedule = FlowSchedule()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="Unknown prediction type"):
        schedule.convert(x, x, torch.tensor([1.0]), "score", "x0")


# ---- flow ----------------------------------------------------------------------------------------
def test_flow_add_noise_matches_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, FlowSchedule) and schedule.kind == "flow" and schedule.shift == 3.0
    x0, eps = _data()
    timesteps = scheduler.timesteps[[0, 100, 500, 999]]
    expected = scheduler.scale_noise(x0, timesteps, eps)
    torch.testing.assert_close(schedule.add_noise(x0, eps, timesteps), expected, rtol=1e-6, atol=1e-6)


def test_flow_shift_matches_scheduler_sigmas():
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    schedule = FlowSchedule(shift=3.0)
    torch.testing.assert_close(schedule.shift_sigma(plain.sigmas), shifted.sigmas, rtol=1e-6, atol=1e-6)
    # The scheduler's timesteps are its sigmas * T: alpha_sigma inverts that exactly.
    _, sigma = schedule.alpha_sigma(shifted.timesteps)
    torch.testing.assert_close(sigma, shifted.sigmas, rtol=1e-6, atol=1e-6)


def test_dynamic_shift_matches_flux_scheduler():
    config = dict(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, **config)
    for seq_len in (16, 1024, 4096):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(4, mu=mu)
        schedule = NoiseSchedule.from_scheduler(scheduler, image_seq_len=seq_len)
        assert (
            schedule.shift
            == pytest.approx(math.exp(mu))
            == pytest.approx(dynamic_shift(seq_len, scheduler.config))
        )
        unshifted = torch.linspace(1.0, 1 / 1000, 4)
        torch.testing.assert_close(
            schedule.shift_sigma(unshifted), scheduler.sigmas[:-1], rtol=1e-5, atol=1e-5
        )
    # Without a sequence length the config's static shift is used.
    assert NoiseSchedule.from_scheduler(scheduler).shift == 3.0


# ---- timesteps -----------------------------------------------------------------------------------
def test_timesteps_for_steps():
    vp = NoiseSchedule.from_scheduler(_ddpm("linear"))
    assert vp.timesteps_for_steps(4) == [999.0, 749.0, 499.0, 249.0]
    assert vp.timesteps_for_steps(1) == [999.0]
    assert vp.timesteps_for_steps(2) == [999.0, 499.0]
    assert FlowSchedule().timesteps_for_steps(4) == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    # shift 3: s -> 3s / (1 + 2s): 0.75 -> 0.9, 0.5 -> 0.75, 0.25 -> 0.5
    assert FlowSchedule(shift=3.0).timesteps_for_steps(4) == pytest.approx([1000.0, 900.0, 750.0, 500.0])
    with pytest.raises(ValueError):
        vp.timesteps_for_steps(0)


def test_vp_sample_timesteps_range_and_determinism():
    schedule = NoiseSchedule.from_scheduler(_ddpm("scaled_linear"))
    t = schedule.sample_timesteps(
        20000, min_frac=0.02, max_frac=0.98, generator=torch.Generator().manual_seed(0)
    )
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert torch.equal(t, t.round()), "VP timesteps are integers"
    assert int(t.min()) == 20 and int(t.max()) == 980
    again = schedule.sample_timesteps(
        20000, min_frac=0.02, max_frac=0.98, generator=torch.Generator().manual_seed(0)
    )
    other = schedule.sample_timesteps(
        20000, min_frac=0.02, max_frac=0.98, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(t, again) and not torch.equal(t, other)
    full = schedule.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert int(full.min()) == 0 and int(full.max()) == 999
    with pytest.raises(ValueError):
        schedule.sample_timesteps(4, min_frac=0.5, max_frac=0.5)


@pytest.mark.parametrize("min_frac, max_frac, lo, hi", [
    (0.02, 0.98, 20, 980),  # DMD Sec. 3.2 [0.02T, 0.98T]; DMD2 randint(20, min(980 + 1, 1000))
    (0.0, 1.0, 0, 999),     # the default: the whole training range, never T itself
    (0.5, 1.0, 500, 999),
    (0.0, 0.5, 0, 500),
])
def test_vp_sample_timesteps_hits_both_documented_ends(min_frac, max_frac, lo, hi):
    """Both ends of ``[round(min*T), min(round(max*T), T-1)]`` are drawn, nothing outside (T = 1000)."""
    schedule = NoiseSchedule.from_scheduler(_ddpm("scaled_linear"))
    t = schedule.sample_timesteps(
        200_000, min_frac=min_frac, max_frac=max_frac, generator=torch.Generator().manual_seed(0)
    )
    assert (int(t.min()), int(t.max())) == (lo, hi)
    assert torch.unique(t).numel() == hi - lo + 1, "every integer of the range is drawn"


def test_default_max_frac_keeps_its_draws():
    """max_frac = 1 (the critic's and most methods' default) draws exactly the numbers it drew before the
    top became inclusive: randint(0, T) with the same generator."""
    schedule = NoiseSchedule.from_scheduler(_ddpm("scaled_linear"))
    t = schedule.sample_timesteps(5000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(0, 1000, (5000,), generator=torch.Generator().manual_seed(3)).float())


def test_flow_sample_timesteps_range_and_determinism():
    schedule = FlowSchedule(shift=3.0)
    t = schedule.sample_timesteps(
        20000, min_frac=0.1, max_frac=0.9, generator=torch.Generator().manual_seed(0)
    )
    lo, hi = (float(schedule.shift_sigma(torch.tensor(f))) * 1000 for f in (0.1, 0.9))
    assert t.dtype == torch.float32
    assert lo <= float(t.min()) < lo + 5 and hi - 5 < float(t.max()) <= hi
    # shift 3 pushes samples towards high noise: the median sigma is shift(0.5) = 0.75
    assert float(t.median()) == pytest.approx(750.0, abs=10)
    again = schedule.sample_timesteps(
        20000, min_frac=0.1, max_frac=0.9, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(t, again)
    assert schedule.sample_timesteps(3, device="cpu").device.type == "cpu"


def test_seeded_steps_fix_a_flow_students_images_by_their_seeds():
    """SD3's pipeline draws the re-noising noise of steps 2..N from the global RNG; generate_images (eval,
    toy eval, bench quality) routes it through each image's generator: same seed, same image, whatever ran
    before and whatever else is in the batch."""
    from diffusers import DiffusionPipeline

    from stepdistill.eval.generate import generate_images
    from stepdistill.models.loading import resolve_pretrained
    from stepdistill.sampling.schedulers import seeded_steps

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd3"))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, kwargs = ["a red circle", "a blue square"], {"steps": 3, "guidance": 1.0, "resolution": 32}

    def plain():  # the pipeline alone: the same seeds give other images once the global RNG has moved
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        return pipe(prompts, generator=gens, num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
                    output_type="pt").images

    assert (plain() - plain()).abs().max() > 1e-4
    first, _ = generate_images(pipe, prompts, [5, 6], **kwargs)
    torch.rand(100)  # move the global RNG
    again, _ = generate_images(pipe, prompts, [5, 6], **kwargs)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    alone, _ = generate_images(pipe, prompts[1:], [6], **kwargs)  # another batch composition
    torch.testing.assert_close(alone[0], first[1], atol=1e-5, rtol=0)
    # A copy made inside the block steps its own state (HybridSampler copies its scheduler per call) and
    # draws from the generator too; afterwards the scheduler is its own class again, with no generator bound.
    import copy

    sample = torch.randn(1, 4, 8, 8)
    outs = []
    for _ in range(2):
        with seeded_steps(pipe, torch.Generator().manual_seed(3)):
            twin = copy.deepcopy(pipe.scheduler)
            twin.set_timesteps(2)
            outs.append(twin.step(torch.zeros_like(sample), twin.timesteps[0], sample, return_dict=False)[0])
            assert twin.step_index == 1 and pipe.scheduler.step_index != 1
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert not hasattr(pipe.scheduler, "_seeded_generator")
