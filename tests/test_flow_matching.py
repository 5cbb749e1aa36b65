"""Flow matching, the Euler sampler and the shared DiT layers, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from fmtrain.models.adaln import timestep_sinusoid
from fmtrain.models.rope import apply_rope_3d, grid_positions, rope_3d_cos_sin
from fmtrain.objectives import flow_matching as fm


def test_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 4, 2, 5, 5, generator=g)  # data
    x0 = torch.randn(3, 4, 2, 5, 5, generator=g)  # noise
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = fm.interpolate(x0, x1, t)
    for i in range(3):
        assert torch.allclose(x_t[i], t[i] * x1[i] + (1 - t[i]) * x0[i])
    target = fm.velocity_target(x0, x1)
    prediction = torch.randn(3, 4, 2, 5, 5, generator=g)
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss_sum, count, reports = fm.loss_from_error_sums(fm.error_sums(prediction, target), weights, l1_weight=0.1)
    per_sample_mse = ((prediction - (x1 - x0)) ** 2).flatten(1).mean(1)
    per_sample_l1 = (prediction - (x1 - x0)).abs().flatten(1).mean(1)
    expected = (weights * (per_sample_mse + 0.1 * per_sample_l1)).mean()  # equal element counts
    assert float(loss_sum / count) == pytest.approx(float(expected), rel=1e-6)
    assert float(reports["mse"][0] / reports["mse"][1]) == pytest.approx(float(per_sample_mse.mean()), rel=1e-6)
    assert int(count) == 3 * 4 * 2 * 5 * 5


def test_microbatch_sums_give_the_batch_mean():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    w = torch.ones(4)
    whole, n, _ = fm.loss_from_error_sums(fm.error_sums(pred, target), w)
    a, na, _ = fm.loss_from_error_sums(fm.error_sums(pred[:1], target[:1]), w[:1])
    b, nb, _ = fm.loss_from_error_sums(fm.error_sums(pred[1:], target[1:]), w[1:])
    assert float((a + b) / (na + nb)) == pytest.approx(float(whole / n), rel=1e-6)
    assert float(whole / n) == pytest.approx(float(torch.nn.functional.mse_loss(pred, target)), rel=1e-6)


def test_time_shift_is_sd3_on_the_noise_level():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    sigma = 1 - t
    assert torch.allclose(fm.shift_time(t, s), 1 - s * sigma / (1 + (s - 1) * sigma))
    assert torch.equal(fm.shift_time(t, 1.0), t)
    # s > 1 moves every interior time toward noise (smaller t)
    assert bool((fm.shift_time(t[1:-1], s) < t[1:-1]).all())


def test_timestep_sampling_is_seeded_and_distributed_as_configured():
    seeds = torch.arange(4000)
    t1 = fm.sample_timesteps(fm.seeded_generators(seeds, "cpu", 1), mode="logit_normal")
    t2 = fm.sample_timesteps(fm.seeded_generators(seeds, "cpu", 1), mode="logit_normal")
    assert torch.equal(t1, t2)
    logits = torch.log(t1 / (1 - t1))
    assert float(logits.mean()) == pytest.approx(0.0, abs=0.08)
    assert float(logits.std()) == pytest.approx(1.0, abs=0.05)
    u = fm.sample_timesteps(fm.seeded_generators(seeds, "cpu", 1), mode="uniform")
    assert 0 <= float(u.min()) and float(u.max()) < 1 and float(u.mean()) == pytest.approx(0.5, abs=0.02)
    drop = fm.drop_condition(fm.seeded_generators(seeds, "cpu", 3), 0.1)
    assert float(drop.float().mean()) == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match="timestep_sampling"):
        fm.sample_timesteps(fm.seeded_generators(seeds[:2], "cpu", 1), mode="cosine")


def test_weighting_registry():
    t = torch.tensor([0.25, 0.5])
    assert torch.equal(fm.get_weighting("none")(t), torch.ones(2))
    assert float(fm.get_weighting("cosmap")(torch.tensor([0.5]))) == pytest.approx(2 / (math.pi * 0.5))
    with pytest.raises(ValueError, match="loss_weighting='nope'"):
        fm.get_weighting("nope")


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 1.0), (10, 13.0)])
def test_euler_integrates_a_constant_field_exactly(steps, shift):
    g = torch.Generator().manual_seed(2)
    x0, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = fm.euler_sample(lambda x, t: v, x0, steps=steps, shift=shift)
    assert torch.allclose(out, x0 + v, atol=1e-6)


def test_euler_follows_the_straight_path_to_its_end():
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    # The exact flow toward x1: v(x, t) = (x1 - x) / (1 - t); on the straight path it is x1 - x0.
    out = fm.euler_sample(lambda x, t: (x1 - x) / (1 - t[:, None]), x0, steps=6, shift=2.0)
    assert torch.allclose(out, x1, atol=1e-5)


def test_classifier_free_guidance_combination():
    x0 = torch.zeros(1, 3)
    vc, vu = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    out = fm.euler_sample(lambda x, t: vc, x0, steps=4, uncond_velocity=lambda x, t: vu, guidance_scale=3.0)
    assert torch.allclose(out, vu + 3.0 * (vc - vu))


def test_timestep_sinusoid_matches_the_formula():
    t = torch.tensor([0.0, 250.0, 999.0])
    emb = timestep_sinusoid(t, 8)
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    args = t[:, None] * freqs[None]
    assert torch.allclose(emb, torch.cat([torch.cos(args), torch.sin(args)], dim=1), atol=1e-5)


def test_rope_3d_depends_only_on_relative_positions():
    axes, theta = (4, 2, 2), 10000.0
    shape = (3, 4, 5)
    cos, sin = rope_3d_cos_sin(shape, axes, theta, "cpu")
    pos = grid_positions(shape)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    s = pos.shape[0]
    rq = apply_rope_3d(q.expand(s, 1, 1, 8), cos, sin, axes)[:, 0, 0]
    rk = apply_rope_3d(k.expand(s, 1, 1, 8), cos, sin, axes)[:, 0, 0]
    scores = rq @ rk.T  # [S, S]
    index = {tuple(p.tolist()): i for i, p in enumerate(pos)}
    # Same offset (1, 1, 2) from two different origins gives the same score.
    a = scores[index[(0, 0, 0)], index[(1, 1, 2)]]
    b = scores[index[(1, 2, 1)], index[(2, 3, 3)]]
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    # Rotation preserves norms, and position 0 is the identity.
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(s), rtol=1e-5)
    assert torch.allclose(rq[0], q)
    # Each axis chunk is a rotate-half rotation by its own positions (a complex multiplication).
    t_chunk = q[:4]
    angle = 2.0 * 1.0 / theta ** (torch.arange(0, 4, 2) / 4)  # t = 2, chunk of 4 channels
    z = torch.complex(t_chunk[:2], t_chunk[2:]) * torch.exp(1j * angle)
    expected = torch.cat([z.real, z.imag]).float()
    assert torch.allclose(rq[index[(2, 0, 0)], :4], expected, atol=1e-5)
