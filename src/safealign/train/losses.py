"""Training losses as pure functions of tensors.

Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference Optimization", eq. 14;
the loss AlignGuard trains its safety experts with). For a pair (x_w preferred, x_l rejected) under prompt c,
with shared noise e and timestep t:

    L = -log sigmoid( -beta/2 * [ (|e - e_theta(x_w)|^2 - |e - e_theta(x_l)|^2)
                                 - (|e - e_ref(x_w)|^2   - |e - e_ref(x_l)|^2) ] )

where each squared error is averaged over C, H, W. A policy equal to the reference gives L = ln 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every dimension but the batch: shape (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(policy_err_w: torch.Tensor, policy_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Diffusion-DPO loss and its metrics from per-sample denoising errors (each shape (B,)).

    Returns ``(loss, metrics)``; metrics are detached scalars named as TRL names them:
    ``rewards/accuracies`` (implicit accuracy: the policy improved the winner more than the loser, relative to the
    reference), ``rewards/margins`` (the mean of the bracket above times -beta/2), and the four errors.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    policy_diff = policy_err_w - policy_err_l
    ref_diff = (ref_err_w - ref_err_l).detach()  # the reference is frozen
    inside = -0.5 * beta * (policy_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "rewards/accuracies": (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean(),
            "rewards/margins": inside.mean(),
            "errors/policy_winner": policy_err_w.mean(),
            "errors/policy_loser": policy_err_l.mean(),
            "errors/ref_winner": ref_err_w.mean(),
            "errors/ref_loser": ref_err_l.mean(),
        }
    return loss, metrics


def dpo_preserve_loss(errs: tuple[torch.Tensor, ...], beta: float, preserve_weight: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO on the first four errors, plus ``preserve_weight`` times the mean preservation error."""
    loss, metrics = diffusion_dpo_loss(*errs[:4], beta=beta)
    if len(errs) > 4:
        pres = errs[4].mean()
        loss = loss + preserve_weight * pres
        metrics = {**metrics, "loss": loss.detach(), "preserve/error": pres.detach()}
    return loss, metrics


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain diffusion MSE (epsilon or v target), for task fine-tuning; same return shape as the DPO loss."""
    loss = per_sample_mse(pred, target).mean()
    return loss, {"loss": loss.detach()}


def lora_output_change(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, second_moment: torch.Tensor,
                       base_energy: torch.Tensor) -> torch.Tensor:
    """How much a LoRA ``scaling * B @ A`` changes a linear layer's outputs on a set of inputs, relative to them.

    ``second_moment`` is ``X^T X / N`` over the inputs ``X`` (N x in) and ``base_energy`` the base layer's
    ``tr(W X^T X W^T) / N`` over the same inputs; the result is ``mean_n |scaling B A x_n|^2 / mean_n |W x_n|^2``,
    computed as ``tr(B (A M A^T) B^T)`` without ever touching ``X`` (exactly 0 when the LoRA leaves every input's
    output unchanged).
    """
    m = lora_a @ second_moment @ lora_a.T  # r x r
    return scaling ** 2 * ((lora_b @ m) * lora_b).sum() / base_energy
