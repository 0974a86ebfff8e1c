import math

import pytest
import torch

from safealign.train.losses import denoising_loss, diffusion_dpo_loss, per_sample_mse


def test_loss_is_ln2_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    w, l_ = torch.rand(8, generator=g), torch.rand(8, generator=g)
    loss, m = diffusion_dpo_loss(w, l_, w.clone(), l_.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.0)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)  # ties count half


def test_loss_prefers_lower_winner_error_and_metrics_agree():
    ref_w, ref_l = torch.full((4,), 0.5), torch.full((4,), 0.5)
    good, mg = diffusion_dpo_loss(torch.full((4,), 0.4), torch.full((4,), 0.6), ref_w, ref_l, beta=10.0)
    bad, mb = diffusion_dpo_loss(torch.full((4,), 0.6), torch.full((4,), 0.4), ref_w, ref_l, beta=10.0)
    assert good < math.log(2) < bad
    assert mg["rewards/accuracies"] == 1.0 and mb["rewards/accuracies"] == 0.0
    assert mg["rewards/margins"] > 0 > mb["rewards/margins"]
    # -beta/2 * ((0.4-0.6) - 0) = 1.0  ->  loss = -log sigmoid(1)
    assert good.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)


def test_gradient_moves_toy_policy_toward_winner():
    """A toy 'denoiser' theta; its error on the winner must fall and on the loser rise under DPO descent."""
    torch.manual_seed(0)
    winner, loser = torch.randn(16), torch.randn(16)
    theta0 = torch.randn(16)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=0.05)
    ref_w, ref_l = per_sample_mse(theta0[None], winner[None]), per_sample_mse(theta0[None], loser[None])
    for _ in range(50):
        loss, _ = diffusion_dpo_loss(per_sample_mse(theta[None], winner[None]),
                                     per_sample_mse(theta[None], loser[None]), ref_w, ref_l, beta=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert per_sample_mse(theta[None], winner[None]) < ref_w
        assert per_sample_mse(theta[None], loser[None]) > ref_l
        assert loss.item() < math.log(2)


def test_reference_gets_no_gradient_and_beta_must_be_positive():
    pw = torch.tensor([0.3], requires_grad=True)
    rw = torch.tensor([0.5], requires_grad=True)
    loss, _ = diffusion_dpo_loss(pw, torch.tensor([0.5]), rw, torch.tensor([0.5]), beta=1.0)
    loss.backward()
    assert pw.grad is not None and rw.grad is None
    with pytest.raises(ValueError):
        diffusion_dpo_loss(pw, pw, pw, pw, beta=0.0)


def test_denoising_loss_is_mse():
    a, b = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    assert denoising_loss(a, b)[0].item() == pytest.approx(1.0)


def test_lora_output_change_is_the_relative_output_change_on_the_inputs():
    from safealign.train.losses import lora_output_change
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a, b = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    moment, energy = x.T @ x / 50, (x @ w.T).pow(2).sum(1).mean()
    got = lora_output_change(a, b, 0.5, moment, energy)
    direct = (0.5 * x @ a.T @ b.T).pow(2).sum(1).mean() / energy
    assert got.item() == pytest.approx(direct.item(), rel=1e-10) and got > 0
    # a LoRA whose A reads only directions the inputs never take changes nothing on them
    x0 = torch.cat([x[:, :4], torch.zeros(50, 2, dtype=torch.float64)], 1)
    a0 = torch.zeros_like(a)
    a0[:, 4:] = a[:, 4:]
    assert lora_output_change(a0, b, 0.5, x0.T @ x0 / 50, energy).item() == pytest.approx(0.0, abs=1e-14)
