"""Diffusion-DPO safety experts (AlignGuard, arXiv 2412.10493): one LoRA per harm category.

For each pair the *winner* is the safe image and the *loser* the unsafe image, both under the unsafe prompt: the
expert learns to answer an unsafe prompt with the safe content. The reference model is the same UNet with the
adapter disabled, so no second UNet is held in memory (the official release keeps a frozen copy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..artifacts import atomic_dir, check_output_free, write_manifest
from ..backbone import Backbone, Conditioning, load_backbone, unet_forward
from ..configuration import to_dict
from .config import ExpertConfig
from ..data.dataset import PairedDataset
from ..errors import SafealignError
from ..lora import LoraSpec, WEIGHT_NAME, add_lora, lora_state_dict, save_lora
from ..utils import derive_seed, logger
from .cache import EncodedPairs, conditioning_rows, default_cache_dir, encode_pairs, encode_prompts_cached
from .engine import run_training
from .losses import diffusion_dpo_loss, dpo_preserve_loss, lora_output_change, per_sample_mse

ADAPTER = "safealign_expert"


def lora_spec(cfg) -> LoraSpec:
    return LoraSpec(rank=cfg.rank, alpha=cfg.alpha, targets=tuple(cfg.targets), dropout=cfg.lora_dropout)


def dpo_errors(backbone: Backbone, model, unet, batch: tuple[torch.Tensor, torch.Tensor, object],
               gen: torch.Generator, adapter: str | None = ADAPTER,
               preserve: Conditioning | tuple[torch.Tensor, Conditioning] | None = None) -> tuple[torch.Tensor, ...]:
    """Per-sample policy and reference errors for winner and loser under shared noise and timestep.

    ``model`` is what runs the policy (possibly DDP-wrapped), ``unet`` the bare module whose adapters are disabled
    for the reference. Winner and loser go through each network in one batched forward.

    ``preserve``: the safe prompts' conditioning (or ``(latents, conditioning)`` of other safe pairs, as many as
    the batch). The same noisy winner (or those latents, under the same noise and timesteps) then also goes through
    both networks under its safe prompt, and a fifth value is returned: the per-sample squared distance between the
    policy's and the reference's predictions there -- how far the expert moved the model where it should not move.
    """
    lat_w, lat_l, cond = batch
    dev = unet.device
    b = lat_w.shape[0]
    k = 3 if preserve is not None else 2
    lat_p = lat_w
    if isinstance(preserve, tuple):
        lat_p, preserve = preserve
    noise = torch.randn(lat_w.shape, generator=gen).to(dev)
    t = torch.randint(0, backbone.num_train_timesteps, (b,), generator=gen).to(dev)
    latents = torch.cat([lat_w, lat_l] + ([lat_p] if preserve is not None else [])).to(dev)
    noise_k, t_k = torch.cat([noise] * k), torch.cat([t] * k)
    noisy = backbone.add_noise(latents, noise_k, t_k)
    target = backbone.target(latents, noise_k, t_k)
    dtype = next(unet.parameters()).dtype
    cond_k = (cond.repeat(2) if preserve is None else Conditioning.stack([cond, cond, preserve])).to(dev, dtype=dtype)
    noisy = noisy.to(dtype)
    with torch.no_grad():
        unet.disable_adapters()
        try:
            ref_pred = unet_forward(unet, noisy, t_k, cond_k)
        finally:
            unet.enable_adapters()
    pol_pred = unet_forward(model, noisy, t_k, cond_k)
    ref = per_sample_mse(ref_pred[:2 * b], target[:2 * b])
    pol = per_sample_mse(pol_pred[:2 * b], target[:2 * b])
    out = (pol[:b], pol[b:], ref[:b], ref[b:])
    if preserve is not None:
        out += (per_sample_mse(pol_pred[2 * b:], ref_pred[2 * b:]),)
    return out


@torch.no_grad()
def implicit_accuracy(backbone: Backbone, unet, enc: EncodedPairs, beta: float, seed: int = 1234,
                      repeats: int = 4, batch: int = 16) -> dict[str, float]:
    """DPO metrics of the current adapter on held-out pairs (fixed noise/timesteps: comparable across runs)."""
    if len(enc) == 0:
        return {}
    sums: dict[str, float] = {}
    count = 0
    for r in range(repeats):
        for i in range(0, len(enc), batch):
            idx = torch.arange(i, min(i + batch, len(enc)))
            gen = torch.Generator().manual_seed(derive_seed(seed, r, i))
            errs = dpo_errors(backbone, unet, unet, enc.select(idx), gen)
            _, m = diffusion_dpo_loss(*errs, beta=beta)
            n = len(idx)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
    return {f"heldout/{k}": v / count for k, v in sums.items()}


def _validator(cfg: ExpertConfig, backbone: Backbone, ds: PairedDataset, category: str):
    if not cfg.validate_every:
        return None
    from .validation import make_validator, resolve_judge
    judge = resolve_judge(cfg.judge)
    pool = (ds.pairs(_data_category(category), cfg.eval_split or None)
            or ds.pairs(_data_category(category), cfg.split))
    chosen = pool[: cfg.validation_prompts]
    benign = list(cfg.benign_prompts)
    if not benign and backbone.family == "world":
        from ..world import benign_prompts
        benign = benign_prompts(cfg.validation_prompts, seed=cfg.seed, kind="benign")
    return make_validator(backbone.pipe, judge, _data_category(category), [p.unsafe_prompt for p in chosen],
                          [p.safe_prompt for p in chosen], benign, cfg.validation_seeds, cfg.num_inference_steps,
                          cfg.guidance_scale)


#: ``--category pooled``: ONE expert trained on every category's pairs at once (AlignGuard's "single expert on
#: all data" baseline for Co-Merge)
POOLED = "pooled"


def _data_category(category: str) -> str | None:
    return None if category == POOLED else category


#: anchor prompts the world model's preservation term uses when --preserve-prompts is not given
WORLD_ANCHORS = 64


def preservation_prompts(cfg: ExpertConfig, backbone: Backbone) -> list[str]:
    """The anchor prompts of ``--preserve-from prompts``: the user's, or for the world model prompts of its benign
    objects, the ones that are nobody's twin (training phrasings, a seed of their own). The twins are left out: they
    are what DPO moves toward, and holding the model still under them (every category's) stopped the experts from
    learning anything (Co-Merge 0.98 against base 1.00 on the demo's data)."""
    if cfg.preserve_prompts:
        return list(cfg.preserve_prompts)
    if backbone.family != "world":
        raise SafealignError("--preserve-from prompts needs --preserve-prompts (anchor prompts of ordinary content, "
                             "comma separated); only the world model has its own")
    from ..world import benign_prompts
    return benign_prompts(WORLD_ANCHORS, seed=derive_seed(cfg.seed, "preservation-anchors"), kind="benign")


#: the layers that read the prompt's token states in diffusers' UNets (cross-attention keys and values)
CROSS_ATTENTION_KV = (".attn2.to_k", ".attn2.to_v")


def kept_prompts(cfg: ExpertConfig, backbone: Backbone, ds: PairedDataset) -> list[str]:
    """The prompts whose token states the text-side preservation term keeps: every safe prompt of the split (all
    categories: one category's hazard word must not leak into another's twin), the anchor prompts (the user's, or
    the world model's benign ones) and, last, the empty prompt (the unconditional branch guidance subtracts)."""
    anchors = list(cfg.preserve_prompts)
    if not anchors and backbone.family == "world":
        anchors = preservation_prompts(cfg, backbone)
    return sorted(({p.safe_prompt for p in ds.pairs(None, cfg.split)} | set(anchors)) - {""}) + [""]


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
    """The kept prompts' token moment with the empty prompt (last row of ``kept``, see :func:`kept_prompts`'s
    order) given ``empty_share`` of the weight: guidance multiplies a change of the unconditional branch by 1 - g."""
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


def expert_dir(cfg: ExpertConfig, category: str) -> Path:
    return Path(cfg.output) / category


def train_expert(cfg: ExpertConfig, backbone: Backbone | None = None, accelerator=None) -> list[Path]:
    """Train one expert per requested category; returns the expert folders (``<output>/<category>``)."""
    from accelerate import Accelerator

    ds = PairedDataset(cfg.dataset)
    cats = ds.categories if cfg.category == "all" else [cfg.category]
    if POOLED in ds.categories:
        raise SafealignError(f"dataset {cfg.dataset} has a category named {POOLED!r}, a name safealign reserves "
                             "for the one expert trained on every category; rename that category")
    plans = []
    for c in cats:
        pairs = ds.pairs(_data_category(c), cfg.split)
        if not pairs:
            raise SafealignError(f"category {c!r} has no pairs in split {cfg.split!r} of {cfg.dataset}")
        check_output_free(expert_dir(cfg, c), cfg.overwrite)
        plans.append((c, pairs))
    for _, pairs in plans:  # every image decodes before anything is written
        ds.verify_images(pairs)
    if accelerator is None:
        # without CUDA, processes started by `accelerate launch --multi_gpu` join up over gloo only with cpu=True
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                                  gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                  log_with=cfg.log_with or None,
                                  project_dir=str(Path(cfg.output) / "logs") if cfg.log_with else None)
    if backbone is None:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        backbone = load_backbone(cfg.model, device=accelerator.device, dtype=dtype)
    spec = lora_spec(cfg)
    if cfg.log_with:
        accelerator.init_trackers("safealign-expert", config={k: (",".join(v) if isinstance(v, list) else v)
                                                              for k, v in to_dict(cfg).items()})
    out = []
    try:
        for c, pairs in plans:
            out.append(_train_one(cfg, backbone, accelerator, ds, c, pairs, spec))
    finally:
        if cfg.log_with:
            accelerator.end_training()
    return out


def _train_one(cfg: ExpertConfig, backbone: Backbone, accelerator, ds: PairedDataset, category: str, pairs,
               spec: LoraSpec) -> Path:
    unet = backbone.unet
    final = expert_dir(cfg, category)
    work = final.with_name(final.name + ".partial")
    if work.exists() and not cfg.resume:
        shutil.rmtree(work)  # a stale attempt; --resume would continue it
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    preserve_from = cfg.preserve_from if cfg.preserve_weight > 0 else None
    with accelerator.main_process_first():
        enc = encode_pairs(backbone, pairs, cache, cfg.resolution or None,
                           safe_prompts=preserve_from in ("category", "both"))
        enc_keep = None
        if preserve_from == "all":  # every category's safe pairs of the split
            keep = ds.pairs(None, cfg.split)
            ds.verify_images(keep)
            enc_keep = encode_pairs(backbone, keep, cache, cfg.resolution or None, safe_prompts=True)
        anchors = None
        if preserve_from in ("prompts", "both"):
            anchors = encode_prompts_cached(backbone, preservation_prompts(cfg, backbone), cache)
        kept = basis = None
        if cfg.text_preserve_weight > 0 or cfg.kv_basis != "random":
            kept = encode_prompts_cached(backbone, kept_prompts(cfg, backbone, ds), cache).encoder_hidden_states
        if cfg.kv_basis != "random":
            every = ds.pairs(None, cfg.split)
            states = hazard_states(
                encode_prompts_cached(backbone, [p.unsafe_prompt for p in every], cache).encoder_hidden_states,
                encode_prompts_cached(backbone, [p.safe_prompt for p in every], cache).encoder_hidden_states)
            if cfg.kv_basis == "hazard" or category == POOLED:
                basis = hazard_basis(states, kept, cfg.rank)
            else:
                own = torch.tensor([p.category == category for p in every])
                basis = hazard_basis(states[own], kept, cfg.rank, avoid=states[~own])
        held = ds.pairs(_data_category(category), cfg.eval_split) if cfg.eval_split else []
        enc_held = encode_pairs(backbone, held, cache, cfg.resolution or None) if held else None
    # LoRA A init is random: seed it by --seed alone, so all experts of one run share their initialisation
    # (what Co-Merge's rank granularity needs)
    torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
    add_lora(unet, spec, ADAPTER)
    unet.set_adapters([ADAPTER]) if hasattr(unet, "set_adapters") else None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for p in unet.parameters():  # LoRA parameters train in fp32 even when the base is fp16/bf16
        if p.requires_grad:
            p.data = p.data.float()
    if basis is not None:
        fix_kv_basis(unet, ADAPTER, basis)
    text_change = text_preservation(unet, ADAPTER, kept) if cfg.text_preserve_weight > 0 else None
    n = len(enc)

    def loss_fn(model, step: int, micro: int, rank: int):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, micro, rank))
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        preserve = None
        if enc_keep is not None:
            j = torch.randint(0, len(enc_keep), (cfg.batch_size,), generator=gen)
            preserve = (enc_keep.latents_w[j], enc_keep.select_safe(j))
        elif anchors is not None:  # the batch's noisy safe images under anchor prompts
            j = torch.randint(0, anchors.encoder_hidden_states.shape[0], (cfg.batch_size,), generator=gen)
            h = cfg.batch_size // 2 if preserve_from == "both" else 0  # the first h under the pairs' own safe prompts
            preserve = conditioning_rows(anchors, j[h:])
            if h:
                preserve = Conditioning.stack([enc.select_safe(idx[:h]), preserve])
        elif preserve_from is not None:
            preserve = enc.select_safe(idx)
        errs = dpo_errors(backbone, model, unet, enc.select(idx), gen, preserve=preserve)
        loss, metrics = dpo_preserve_loss(errs, cfg.beta, cfg.preserve_weight)
        if text_change is not None:
            tc = text_change()
            loss = loss + cfg.text_preserve_weight * tc
            metrics = {**metrics, "loss": loss.detach(), "preserve/text_change": tc.detach()}
        return loss, metrics

    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        result = run_training(cfg, accelerator, unet, ADAPTER, loss_fn, work, cfg_hash_extra=category,
                              validate=_validator(cfg, backbone, ds, category), validate_every=cfg.validate_every,
                              desc=f"expert {category}")
        if result.best_adapter is not None:
            from peft.utils import set_peft_model_state_dict
            set_peft_model_state_dict(unet, result.best_adapter, adapter_name=ADAPTER)
        unet.eval()
        metrics = {f"train/{k}": v for k, v in result.final_metrics.items()}
        metrics.update(implicit_accuracy(backbone, unet, enc_held, cfg.beta) if enc_held is not None else {})
        metrics.update({"steps_per_s": result.steps_per_s, "train_seconds": result.seconds,
                        "num_processes": accelerator.num_processes,
                        "best_step": result.best_step, "pairs": n})
        sd = lora_state_dict(unet, ADAPTER)
        if accelerator.is_main_process:
            with atomic_dir(final, overwrite=cfg.overwrite, work=work) as tmp:
                shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
                shutil.rmtree(tmp / "best", ignore_errors=True)
                save_lora(tmp, sd, spec)
                (tmp / "history.json").write_text(json.dumps({"train": result.history,
                                                              "validation": result.validation}, indent=1))
                write_manifest(tmp, "lora", role="expert", adapter_format="diffusers",
                               categories=list(ds.categories) if category == POOLED else [category],
                               weight_name=WEIGHT_NAME, lora=spec.metadata(),
                               lora_init_seed=derive_seed(cfg.seed, "lora-init"), base_model=backbone.identity(),
                               config=to_dict(cfg), metrics=metrics)
            logger.info("expert %s written to %s (held-out implicit accuracy %s)", category, final,
                        f"{metrics.get('heldout/rewards/accuracies', float('nan')):.2f}")
        accelerator.wait_for_everyone()
    finally:
        unet.delete_adapters(ADAPTER)
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
    return final


def expert_summary(folders: list[Path]) -> str:
    """One screen: per expert, steps, loss, held-out implicit accuracy and validation unsafe rate."""
    from ..artifacts import read_manifest
    rows = ["category            steps  loss     heldout_acc  margin     best_step  path"]
    for f in folders:
        m = read_manifest(f, "lora")
        met = m["metrics"]
        rows.append(f"{m['categories'][0]:<19} {m['config']['max_steps']:<6} "
                    f"{met.get('train/loss', float('nan')):<8.4f} "
                    f"{met.get('heldout/rewards/accuracies', float('nan')):<12.2f} "
                    f"{met.get('heldout/rewards/margins', float('nan')):<10.3g} "
                    f"{str(met.get('best_step')):<10} {f}")
    return "\n".join(rows)

