"""Co-Merge (AlignGuard, arXiv 2412.10493): per-neuron selection of experts by activation frequency.

The authors did not release their merge code; this is our reading of the paper, stated precisely:

- experts share one LoRA architecture (same target modules; ranks may differ);
- a *neuron* is an output unit j of a LoRA layer's update dW = B A (a row of dW). With ``granularity="rank"`` the
  unit is a rank component k (row k of A, column k of B), which only makes sense for experts trained from the same
  LoRA initialisation;
- for each calibration input (the unsafe prompts of all categories, each at a few sampled timesteps) the
  activation of neuron j in expert e is |(B_e A_e x)_j| averaged over tokens, where x is the layer's input; the
  expert with the largest activation *wins* j for that input, and wins are counted over all inputs;
- the merged layer takes row j from the expert that won j most often, stored exactly as a LoRA of rank sum(r_e):
  A = [A_1; ...; A_E], B = [M_1 B_1, ..., M_E B_E] with M_e the 0/1 mask of the rows expert e owns.

Where x comes from is a choice (``activations``): ``per-expert`` runs the UNet once per expert with that expert
active (x is the expert's own hidden state); ``shared`` runs the base UNet once and feeds the same x to every
expert's branch (E times fewer UNet forwards).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..backbone import Backbone, Conditioning, unet_forward
from ..utils import derive_seed, progress
from .experts import Expert

Granularity = Literal["output", "rank"]
ActivationSource = Literal["per-expert", "shared"]
Factors = tuple[torch.Tensor, torch.Tensor]


# -- pure selection -----------------------------------------------------------------------------------------------

def win_counts(acts: torch.Tensor) -> torch.Tensor:
    """acts (E, N, U) activations of E experts on N inputs for U units -> counts (E, U) of inputs each expert won."""
    winners = acts.float().argmax(dim=0)  # (N, U)
    return torch.nn.functional.one_hot(winners, acts.shape[0]).sum(dim=0).T.contiguous()


def owners(counts: torch.Tensor) -> torch.Tensor:
    """counts (E, U) -> owner (U,): the expert that won each unit most often (ties: the earlier expert)."""
    return counts.argmax(dim=0)


def select_rows(factors: Sequence[Factors], owner: torch.Tensor) -> Factors:
    """Row j of the merged dW = row j of dW_{owner[j]}; exact LoRA of rank sum(r_e)."""
    a = torch.cat([f[0] for f in factors], dim=0)
    b = torch.cat([f[1] * (owner == e).to(f[1].dtype)[:, None] for e, f in enumerate(factors)], dim=1)
    return a, b


def select_ranks(factors: Sequence[Factors], owner: torch.Tensor) -> Factors:
    """Rank unit k of the merged LoRA = rank unit k of expert owner[k] (A row k, B column k)."""
    a = torch.stack([factors[int(e)][0][k] for k, e in enumerate(owner)])
    b = torch.stack([factors[int(e)][1][:, k] for k, e in enumerate(owner)], dim=1)
    return a, b


def unit_activations(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Mean |activation| over tokens of each unit of the branch B A x: (batch, units)."""
    x = x.float()
    if x.dim() == 2:
        x = x[:, None]
    h = x @ a.T  # (B, T, r)
    if granularity == "rank":
        return (h.abs() * b.norm(dim=0)).mean(dim=1)
    return (h @ b.T).abs().mean(dim=1)


# -- statistics from a UNet ---------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """The inputs statistics are collected on: noisy latents, timesteps and text conditioning."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    description: dict

    def __len__(self) -> int:
        return self.latents.shape[0]

    def key(self) -> str:
        h = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode())
        h.update(self.latents.float().numpy().tobytes()[:1 << 20])
        return h.hexdigest()[:16]


def make_calibration(backbone: Backbone, clean_latents: torch.Tensor, cond: Conditioning, timesteps: int,
                     seed: int = 0, prompts: list[str] | None = None) -> Calibration:
    """Each (latent, prompt) at ``timesteps`` evenly spaced timesteps, with seeded noise."""
    n = clean_latents.shape[0]
    T = backbone.num_train_timesteps
    ts = torch.linspace(T * 0.1, T * 0.9, timesteps).round().long() if timesteps > 1 else torch.tensor([T // 2])
    lat = clean_latents.repeat(len(ts), 1, 1, 1)
    tt = ts.repeat_interleave(n)
    g = torch.Generator().manual_seed(derive_seed(seed, "calibration"))
    noise = torch.randn(lat.shape, generator=g)
    noisy = backbone.add_noise(lat, noise, tt)
    c = Conditioning.stack([cond] * len(ts))
    return Calibration(noisy, tt, c, {"n_inputs": n, "timesteps": ts.tolist(), "seed": seed,
                                      "prompts": sha_list(prompts or [])})


def sha_list(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


@torch.no_grad()
def collect_activations(unet: torch.nn.Module, experts: Sequence[Expert], calib: Calibration,
                        source: ActivationSource = "shared", granularity: Granularity = "output",
                        batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    """Per expert, per module: activations (N, units) on the calibration inputs.

    ``unet`` must carry no adapters: experts are applied by forward hooks that add their branch to the module's
    output (``per-expert``) or only observe the base model's input (``shared``).
    """
    modules = dict(unet.named_modules())
    names = list(experts[0].modules)
    missing = [m for m in names if m not in modules]
    if missing:
        from ..errors import SafealignError
        raise SafealignError(f"the model has no module {missing[0]}; the experts were made for another model")
    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    out: dict[str, dict[str, list]] = {e.name: {m: [] for m in names} for e in experts}
    factors = {e.name: {m: (a.to(dev), b.to(dev)) for m, (a, b) in e.modules.items()} for e in experts}

    def run(active: Expert | None, observed: Sequence[Expert]) -> None:
        handles = []
        for m in names:
            def hook(mod, inputs, output, m=m):
                x = inputs[0]
                for e in observed:
                    a, b = factors[e.name][m]
                    out[e.name][m].append(unit_activations(x, a, b, granularity).cpu())
                if active is not None:
                    a, b = factors[active.name][m]
                    return output + ((x.float() @ a.T) @ b.T).to(output.dtype)
                return None
            handles.append(modules[m].register_forward_hook(hook))
        try:
            for i in range(0, len(calib), batch_size):
                sl = slice(i, i + batch_size)
                c = Conditioning(calib.cond.encoder_hidden_states[sl],
                                 {k: v[sl] for k, v in calib.cond.added_cond_kwargs.items()}
                                 if calib.cond.added_cond_kwargs else None).to(dev, dtype)
                unet_forward(unet, calib.latents[sl].to(dev, dtype), calib.timesteps[sl].to(dev), c)
        finally:
            for h in handles:
                h.remove()

    if source == "shared":
        run(None, experts)
    else:
        for e in progress(experts, desc="activations per expert"):
            run(e, [e])
    return {e: {m: torch.cat(v).half() for m, v in mods.items()} for e, mods in out.items()}


def comerge(experts: Sequence[Expert], activations: dict[str, dict[str, torch.Tensor]],
            granularity: Granularity = "output") -> tuple[dict[str, Factors], dict[str, torch.Tensor]]:
    """Merge from activation statistics -> (merged factors per module, win counts (E, U) per module)."""
    if granularity == "rank":
        ranks = {e.rank for e in experts}
        inits = {(e.manifest or {}).get("lora_init_seed") for e in experts}
        if len(ranks) != 1 or len(inits) != 1:
            from ..errors import SafealignError
            raise SafealignError("--granularity rank needs experts of one rank trained from the same LoRA init")
    merged, counts = {}, {}
    for m in experts[0].modules:
        acts = torch.stack([activations[e.name][m] for e in experts])  # (E, N, U)
        c = win_counts(acts)
        own = owners(c)
        fs = [e.modules[m] for e in experts]
        merged[m] = select_rows(fs, own) if granularity == "output" else select_ranks(fs, own)
        counts[m] = c
    return merged, counts


def block_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def ownership_summary(expert_names: Sequence[str], counts: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Share of units each expert owns, per UNet block and overall."""
    tally: dict[str, torch.Tensor] = {}
    for m, c in counts.items():
        own = owners(c)
        per = torch.bincount(own, minlength=len(expert_names)).double()
        for key in (block_of(m), "all"):
            tally[key] = tally.get(key, torch.zeros(len(expert_names), dtype=torch.float64)) + per
    return {blk: {n: float(v[i] / v.sum()) for i, n in enumerate(expert_names)} for blk, v in tally.items()}
