"""Token-space linear algebra for the cross-attention key/value LoRA.

The cross-attention keys and values are the only UNet layers that read the prompt's token states. Two options act
on their LoRA: the text-side preservation term (how much the LoRA changes the keys/values of tokens that must not
change, computed from the tokens' second moment) and a fixed A basis (the directions of token space where the
hazard words' states are largest relative to the kept prompts', the top generalized eigenvectors of two moments).
"""

from __future__ import annotations

import torch

from ..errors import SafealignError
from .losses import lora_output_change

#: the layers that read the prompt's token states in diffusers' UNets (cross-attention keys and values)
CROSS_ATTENTION_KV = (".attn2.to_k", ".attn2.to_v")


def cross_kv_loras(unet, adapter: str, option: str) -> list:
    """The LoRA-wrapped cross-attention key/value layers of ``adapter`` (an error naming ``option`` if none)."""
    mods = [m for n, m in unet.named_modules()
            if n.endswith(CROSS_ATTENTION_KV) and hasattr(m, "lora_A") and adapter in m.lora_A]
    if not mods:
        raise SafealignError(f"{option} needs LoRA on the cross-attention keys/values: add attn2.to_k,attn2.to_v "
                             "to --targets")
    return mods


def text_preservation(unet, adapter: str, states: torch.Tensor):
    """A function giving the mean, over the LoRA-wrapped cross-attention key/value layers, of how much the adapter
    changes their outputs for ``states`` (token states, ... x dim) relative to the base outputs; see
    :func:`.losses.lora_output_change`. The states' second moment is computed once: the term costs nothing per step.
    """
    moment = kept_moment(states)
    terms = []
    for mod in cross_kv_loras(unet, adapter, "--text-preserve-weight"):
        w = mod.base_layer.weight.detach().double().cpu()
        energy = ((w @ moment) * w).sum()
        dev = mod.lora_A[adapter].weight.device
        terms.append((mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, float(mod.scaling[adapter]),
                      moment.float().to(dev), energy.float().to(dev)))

    def change() -> torch.Tensor:
        return torch.stack([lora_output_change(*t) for t in terms]).mean()
    return change


def token_moment(states: torch.Tensor) -> torch.Tensor:
    """``X^T X / N`` over the token states (... x dim), in float64."""
    x = states.reshape(-1, states.shape[-1]).double()
    return x.T @ x / x.shape[0]


def kept_moment(kept: torch.Tensor, empty_share: float = 0.25) -> torch.Tensor:
    """The kept prompts' token moment with the empty prompt (last row of ``kept``, see
    :func:`.preservation.kept_prompts`'s order) given ``empty_share`` of the weight: guidance multiplies a change of
    the unconditional branch by 1 - g."""
    return (1 - empty_share) * token_moment(kept[:-1]) + empty_share * token_moment(kept[-1:])


def hazard_states(unsafe: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """(N, dim) the hazard word's token state of each pair: the unsafe prompt's state at the first position where
    it differs from its safe twin's."""
    diff = (unsafe - safe).norm(dim=-1)
    if not bool((diff > 1e-6).any(dim=1).all()):
        raise SafealignError("--kv-basis: some unsafe prompts encode exactly like their safe twins")
    first = (diff > 1e-6).float().argmax(dim=1)
    return unsafe[torch.arange(len(unsafe)), first].double()


def hazard_basis(hazard: torch.Tensor, kept: torch.Tensor, rank: int, avoid: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``rank`` x dim: the directions of token space in which the hazard words' states (``hazard``, see
    :func:`hazard_states`) are largest relative to the kept prompts' states (the top generalized eigenvectors of the
    two moments), each row scaled to a random LoRA A row's norm. ``avoid``: hazard states of other categories,
    whose moment joins the kept prompts' with equal weight, so the basis reads them as little as kept tokens."""
    h = hazard.double()
    ch, ck = h.T @ h / len(h), kept_moment(kept)
    if avoid is not None and len(avoid):
        a = avoid.double()
        ck = 0.5 * ck + 0.5 * (a.T @ a / len(a))
    chol = torch.linalg.cholesky(ck + 1e-6 * ck.diagonal().mean() * torch.eye(len(ck), dtype=ck.dtype))
    inv = torch.linalg.inv(chol)
    _, vecs = torch.linalg.eigh(inv @ ch @ inv.T)
    basis = (inv.T @ vecs.flip(1)[:, :rank]).T
    basis = basis / basis.norm(dim=1, keepdim=True) * (1.0 / 3 ** 0.5)  # |row| of kaiming-uniform(a=sqrt 5)
    return basis.float()


def fix_kv_basis(unet, adapter: str, basis: torch.Tensor) -> None:
    """Set A of every LoRA-wrapped cross-attention key/value layer to ``basis`` and freeze it."""
    for mod in cross_kv_loras(unet, adapter, "--kv-basis"):
        w = mod.lora_A[adapter].weight
        w.data.copy_(basis.to(w.device, w.dtype))
        w.requires_grad_(False)
