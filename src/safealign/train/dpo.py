"""Diffusion-DPO safety experts (AlignGuard, arXiv 2412.10493): one LoRA per harm category.

For each pair the *winner* is the safe image and the *loser* the unsafe image, both under the unsafe prompt: the
expert learns to answer an unsafe prompt with the safe content. The reference model is the same UNet with the
adapter disabled, so no second UNet is held in memory (the official release keeps a frozen copy). The scaffolding
(accelerator, work folder, checkpoints, final save) is :mod:`.engine`'s; this module holds the DPO step and its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import check_output_free, read_manifest, release_output, write_manifest
from ..backbone import Backbone, Conditioning, unet_forward
from ..configuration import OPERATIONAL, to_dict
from ..data.dataset import PairedDataset
from ..data.taxonomy import normalise_category
from ..errors import SafealignError
from ..lora import WEIGHT_NAME, lora_state_dict, save_lora
from ..names import safe_join
from ..utils import derive_seed, logger
from .cache import (
    EncodedPairs,
    at_resolution,
    default_cache_dir,
    encode_pairs,
    encode_prompts_cached,
    with_empty_prompts,
)
from .config import ExpertConfig
from .engine import (
    attach_lora,
    load_frozen,
    lora_spec,
    make_accelerator,
    prepare_trainable,
    run_training,
    save_artifact,
    tracking,
    work_folder,
)
from .losses import diffusion_dpo_loss, dpo_preserve_loss, per_sample_mse
from .preservation import Preservation, kept_prompts
from .text_basis import fix_kv_basis, hazard_basis, hazard_states, text_preservation

ADAPTER = "safealign_expert"

#: ``--category pooled``: ONE expert trained on every category's pairs at once (AlignGuard's "single expert on
#: all data" baseline for Co-Merge)
POOLED = "pooled"


def _data_category(category: str) -> str | None:
    return None if category == POOLED else category


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
    from ..judges import load_judge
    from .validation import make_validator
    judge = load_judge(cfg.judge)
    unsafe, safe = _validation_pairs(cfg, backbone, ds, category)
    benign = list(cfg.benign_prompts)
    if not benign and backbone.plugin is not None:
        benign = backbone.plugin.benign_prompts(cfg.validation_prompts, cfg.seed, "validation")
    return make_validator(backbone.pipe, judge, _data_category(category), unsafe, safe, benign, cfg.validation_seeds,
                          cfg.sampling.resolve(backbone.sampling_defaults()))


def _validation_pairs(cfg: ExpertConfig, backbone: Backbone, ds: PairedDataset, category: str
                      ) -> tuple[list[str], list[str]]:
    """What training watches: a plugin model's validation-pool pairs (:mod:`safealign.protocol`; never a test
    prompt), else the dataset's held-out split (``--eval-split``), else its training split."""
    cat = _data_category(category)
    if backbone.plugin is not None and cat is not None:
        ps = backbone.plugin.evaluation_prompts(cfg.validation_prompts, 0, cfg.seed, ("unsafe", "safe"), (cat,),
                                                "validation").table
        return ps.loc[ps["set"] == "unsafe", "prompt"].tolist(), ps.loc[ps["set"] == "safe", "prompt"].tolist()
    pairs = (ds.pairs(cat, cfg.eval_split or None) or ds.pairs(cat, cfg.split))[: cfg.validation_prompts]
    return [p.unsafe_prompt for p in pairs], [p.safe_prompt for p in pairs]


def expert_dir(cfg: ExpertConfig, category: str) -> Path:
    """``<output>/<category>``; a category that is not a plain folder name is refused."""
    return safe_join(cfg.output, category, what="category")


def requested_categories(cfg: ExpertConfig, ds: PairedDataset) -> list[str]:
    """The categories ``--category`` names: every one of the dataset ('all'), the pooled expert, or one."""
    if POOLED in ds.categories:
        raise SafealignError(f"dataset {cfg.dataset} has a category named {POOLED!r}, a name safealign reserves "
                             "for the one expert trained on every category; rename that category")
    cat = normalise_category(cfg.category, "--category")
    if cat == "all":
        return list(ds.categories)
    return [cat]


def _options(config: dict) -> dict:
    """What determines an expert's weights, from its config dict (operational options and category aside)."""
    import json
    skip = set(OPERATIONAL) | {"category"}
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in skip}, default=str))


def finished_expert(cfg: ExpertConfig, folder: Path) -> bool:
    """With ``--resume``: whether ``folder`` already holds a finished expert trained with these options (kept,
    not retrained). One trained with other options is an error, unless ``--overwrite`` retrains it."""
    if not cfg.resume or not folder.is_dir():
        return False
    m = read_manifest(folder, "lora", required=False)
    if m is None or m.get("role") != "expert":
        return False
    theirs, ours = _options(m.get("config") or {}), _options(to_dict(cfg))
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if not diff:
        return True
    if cfg.overwrite:
        return False
    raise SafealignError(f"expert {folder} was trained with other options ({', '.join(diff[:4])}); pass the same "
                         "options to keep it, or --overwrite to train it again")


def train_expert(cfg: ExpertConfig, backbone: Backbone | None = None, accelerator=None) -> list[Path]:
    """Train one expert per requested category; returns the expert folders (``<output>/<category>``).

    With ``--resume``, experts already finished with the same options are kept and the others are trained
    (continuing from their checkpoints), so a killed ``--category all`` run is completed by running it again.
    Every output folder is checked and locked before anything is trained."""
    cfg = cfg.resolved()  # a --recipe whose model was not readable when the config was built
    ds = PairedDataset(cfg.dataset)
    cats = requested_categories(cfg, ds)
    plans = []
    for c in cats:
        pairs = ds.pairs(_data_category(c), cfg.split)
        if not pairs:
            raise SafealignError(f"category {c!r} has no pairs in split {cfg.split!r} of {cfg.dataset}")
        if finished_expert(cfg, expert_dir(cfg, c)):
            logger.info("expert %s is finished (same options): kept", c)
            continue
        check_output_free(expert_dir(cfg, c), cfg.overwrite)
        plans.append((c, pairs))
    try:
        _train_planned(cfg, ds, plans, cats, backbone, accelerator)
    except BaseException:
        for c, _ in plans:  # nothing half-written: the locks go, and the folders they made when still empty
            release_output(expert_dir(cfg, c))
        raise
    return [expert_dir(cfg, c) for c in cats]


def _train_planned(cfg: ExpertConfig, ds: PairedDataset, plans: list, cats: list[str], backbone, accelerator
                   ) -> None:
    for _, pairs in plans:  # every image decodes before anything is written
        ds.verify_images(pairs)
    if plans:
        if accelerator is None:
            accelerator = make_accelerator(cfg)
        if backbone is None:
            backbone = load_frozen(cfg, accelerator)
        if cfg.recipe != "safealign" and accelerator.is_main_process:
            logger.info("recipe %s; set instead of it: %s", cfg.recipe, ", ".join(
                f"{k}={d['used']} (recipe: {d['recipe']})" for k, d in cfg.recipe_overrides.items()) or "nothing")
        with tracking(accelerator, cfg, "safealign-expert"):
            for c, pairs in plans:
                _train_one(cfg, backbone, accelerator, ds, c, pairs, cats)


@dataclass
class ExpertData:
    """Everything one expert's training reads, encoded once (on CPU)."""

    pairs: EncodedPairs  # the category's training pairs
    preservation: Preservation
    kept: torch.Tensor | None  # token states of the kept prompts (text-side term, kv basis)
    basis: torch.Tensor | None  # the fixed A of the cross-attention key/value LoRA (--kv-basis)
    held: EncodedPairs | None  # held-out pairs for the final implicit accuracy
    empty: Conditioning | None = None  # the empty prompt's conditioning (--empty-prompt-fraction)


def _encode(cfg: ExpertConfig, backbone: Backbone, ds: PairedDataset, category: str, pairs) -> ExpertData:
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    res = cfg.resolution or None
    source = cfg.preserve_from if cfg.preserve_weight > 0 else None
    enc = encode_pairs(backbone, pairs, cache, res, safe_prompts=source in ("category", "both"))
    preservation = Preservation.encode(cfg, backbone, ds, cache)
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
    empty = (at_resolution(encode_prompts_cached(backbone, [""], cache), res or backbone.resolution)
             if cfg.empty_prompt_fraction > 0 else None)
    return ExpertData(enc, preservation, kept, basis, encode_pairs(backbone, held, cache, res) if held else None,
                      empty)


def dpo_batch(cfg: ExpertConfig, data: ExpertData, step: int, micro: int, rank: int
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, Conditioning], torch.Generator]:
    """The pairs of one micro-step: (indices, (winner, loser, conditioning), the generator for noise/timesteps).

    With ``--empty-prompt-fraction`` each pair's prompt is replaced by the empty prompt with that probability,
    drawn from a generator of its own (seeded by seed, step, micro-step, process), so turning it on changes no
    other random choice."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, micro, rank))
    idx = torch.randint(0, len(data.pairs), (cfg.batch_size,), generator=gen)
    lat_w, lat_l, cond = data.pairs.select(idx)
    if data.empty is not None:
        drop = torch.Generator().manual_seed(derive_seed(cfg.seed, "empty-prompt", step, micro, rank))
        cond, _ = with_empty_prompts(cond, data.empty, cfg.empty_prompt_fraction, drop)
    return idx, (lat_w, lat_l, cond), gen


def _loss_fn(cfg: ExpertConfig, backbone: Backbone, data: ExpertData, text_change):
    """The DPO objective of one micro-step (batch, noise and timesteps drawn from a generator seeded by step)."""
    enc = data.pairs

    def loss_fn(model, step: int, micro: int, rank: int):
        idx, batch, gen = dpo_batch(cfg, data, step, micro, rank)
        preserve = data.preservation.batch(enc, idx, gen)
        errs = dpo_errors(backbone, model, backbone.unet, batch, gen, preserve=preserve)
        loss, metrics = dpo_preserve_loss(errs, cfg.beta, cfg.preserve_weight)
        if text_change is not None:
            tc = text_change()
            loss = loss + cfg.text_preserve_weight * tc
            metrics = {**metrics, "loss": loss.detach(), "preserve/text_change": tc.detach()}
        return loss, metrics
    return loss_fn


def _train_one(cfg: ExpertConfig, backbone: Backbone, accelerator, ds: PairedDataset, category: str, pairs,
               run_categories: list[str]) -> Path:
    unet, spec = backbone.unet, lora_spec(cfg)
    final = expert_dir(cfg, category)
    with accelerator.main_process_first():
        data = _encode(cfg, backbone, ds, category, pairs)
    attach_lora(unet, spec, ADAPTER, cfg.seed, cfg.lora_init)
    try:
        prepare_trainable(unet, cfg)
        if data.basis is not None:
            fix_kv_basis(unet, ADAPTER, data.basis)
        text_change = text_preservation(unet, ADAPTER, data.kept) if cfg.text_preserve_weight > 0 else None
        work = work_folder(final, cfg, accelerator)
        result = run_training(cfg, accelerator, unet, ADAPTER, _loss_fn(cfg, backbone, data, text_change), work,
                              cfg_hash_extra=category, validate=_validator(cfg, backbone, ds, category),
                              validate_every=cfg.validate_every, desc=f"expert {category}")
        if result.best_adapter is not None:
            from peft.utils import set_peft_model_state_dict
            set_peft_model_state_dict(unet, result.best_adapter, adapter_name=ADAPTER)
        unet.eval()
        metrics = {f"train/{k}": v for k, v in result.final_metrics.items()}
        metrics.update(implicit_accuracy(backbone, unet, data.held, cfg.beta) if data.held is not None else {})
        metrics.update({"steps_per_s": result.steps_per_s, "train_seconds": result.seconds,
                        "num_processes": accelerator.num_processes,
                        "best_step": result.best_step, "pairs": len(data.pairs)})
        sd = lora_state_dict(unet, ADAPTER)

        def write(folder: Path) -> None:
            save_lora(folder, sd, spec)
            write_manifest(folder, "lora", role="expert", adapter_format="diffusers",
                           categories=list(ds.categories) if category == POOLED else [category],
                           run_categories=list(run_categories),
                           weight_name=WEIGHT_NAME, lora=spec.metadata(),
                           lora_init_seed=derive_seed(cfg.seed, "lora-init"), lora_init=cfg.lora_init,
                           recipe=cfg.recipe_record(), base_model=backbone.identity(),
                           config=to_dict(cfg), metrics=metrics)
        save_artifact(final, work, cfg, accelerator, {"train": result.history, "validation": result.validation},
                      write)
        if accelerator.is_main_process:
            logger.info("expert %s written to %s (held-out implicit accuracy %s)", category, final,
                        f"{metrics.get('heldout/rewards/accuracies', float('nan')):.2f}")
    finally:
        unet.delete_adapters(ADAPTER)
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
    return final
