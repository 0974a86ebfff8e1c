"""The one training loop every trainer shares (Diffusion-DPO experts, task LoRAs).

A trainer supplies an *objective*: ``loss_fn(model, step, micro, rank) -> (loss, metrics)``, where ``model`` is
the prepared (possibly DDP-wrapped) UNet the trainable forward must go through. The engine owns the rest:
Accelerate (devices, mixed precision, gradient accumulation, several processes), optimiser and schedule, gradient
clipping, resumable checkpoints, NaN handling, validation with best-checkpoint selection, progress and logging.

Determinism: every random choice of a step (batch indices, noise, timesteps) comes from a generator seeded by
``(seed, step, micro, rank)``, so a run resumed from a checkpoint continues exactly as the uninterrupted run would
have, without saving RNG states.

Checkpoints are ``<work>/checkpoints/step-NNNNNN/`` with ``adapter.safetensors``, ``optimizer.safetensors`` and
``state.json`` (step, config hash, optimiser hyper-parameters, schedule, validation history). No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..configuration import config_hash

from .config import TrainConfig
from ..errors import SafealignError, TrainingDiverged
from ..lora import lora_state_dict
from ..utils import logger, progress

LossFn = Callable[[torch.nn.Module, int, int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
ValidateFn = Callable[[int], dict[str, float]]


# -- optimiser and schedule -------------------------------------------------------------------------------------

def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return torch.optim.Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total, kind = cfg.warmup_steps, cfg.max_steps, cfg.lr_scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress_ = (step - warm) / max(1, total - warm)
        if kind == "linear":
            return max(0.0, 1.0 - progress_)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -- checkpoints (safetensors + JSON only) ------------------------------------------------------------------------

def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": rest}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, scalars in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(unet, adapter: str | None) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the adapter's LoRA weights, or every trainable parameter (full fine-tune)."""
    if adapter is not None:
        return lora_state_dict(unet, adapter)
    return {n: p.detach().cpu().contiguous().clone() for n, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state(unet, adapter: str | None, sd: dict[str, torch.Tensor]) -> None:
    if adapter is not None:
        from peft.utils import set_peft_model_state_dict
        set_peft_model_state_dict(unet, sd, adapter_name=adapter)
        return
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v)


def save_checkpoint(folder: Path, unet, adapter: str | None, opt: torch.optim.Optimizer, sched, step: int,
                    cfg_hash: str, extra: dict) -> Path:
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(unet, adapter), str(tmp / "adapter.safetensors"))
    tensors, meta = _split_optimizer_state(opt.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "config_hash": cfg_hash, "optimizer": meta, "scheduler": sched.state_dict(), **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    cks = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return cks[-1] if cks else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    cks = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for p in cks[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, unet, adapter: str | None, opt: torch.optim.Optimizer, sched, cfg_hash: str
                    ) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("config_hash") != cfg_hash:
        raise SafealignError(f"checkpoint {ckpt} was made with a different configuration; resume with the same "
                             "options, or remove the .partial folder to start over")
    load_trainable_state(unet, adapter, load_file(str(ckpt / "adapter.safetensors")))
    opt.load_state_dict(_join_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"]))
    sched.load_state_dict(state["scheduler"])
    return state


# -- the loop -------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    final_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_adapter: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
    steps_per_s: float = 0.0


def run_training(cfg: TrainConfig, accelerator, unet, adapter: str | None, loss_fn: LossFn, work: Path, *,
                 cfg_hash_extra: str = "", validate: ValidateFn | None = None, validate_every: int = 0,
                 desc: str = "train") -> TrainResult:
    """Optimise the trainable parameters of ``unet`` for ``cfg.max_steps`` steps.

    ``adapter``: the LoRA adapter being trained, or None for a full fine-tune (every parameter that requires grad).
    """
    cfg_hash = config_hash(cfg) + cfg_hash_extra
    ckpt_dir = work / "checkpoints"
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: add a LoRA adapter first")
    opt = build_optimizer(params, cfg)
    sched = build_scheduler(opt, cfg)
    start, history, validation = 0, [], []
    best_step, best_score = None, math.inf
    if cfg.resume:
        ck = latest_checkpoint(ckpt_dir)
        if ck is None:
            logger.info("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
        else:
            st = load_checkpoint(ck, unet, adapter, opt, sched, cfg_hash)
            start, validation = st["step"], st.get("validation", [])
            best_step = st.get("best_step")
            best_score = st.get("best_score") if st.get("best_score") is not None else math.inf
            logger.info("resumed from %s (step %d)", ck, start)
    model, opt_p = accelerator.prepare(unet, opt)
    rank = accelerator.process_index
    is_main = accelerator.is_main_process
    best_file = work / "best" / "adapter.safetensors"

    def do_validate(step: int) -> None:
        nonlocal best_step, best_score
        unet.eval()
        res = validate(step)  # type: ignore[misc]
        unet.train()
        res = {"step": step, **res}
        validation.append(res)
        accelerator.log({f"val/{k}": v for k, v in res.items() if k != "step"}, step=step)
        score = res.get("score", math.inf)
        logger.info("validation at step %d: %s", step, ", ".join(f"{k}={v:.3g}" for k, v in res.items()
                                                                  if k != "step"))
        if score < best_score and is_main:
            best_score, best_step = score, step
            best_file.parent.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(unet, adapter), str(best_file.with_suffix(".tmp")))
            os.replace(best_file.with_suffix(".tmp"), best_file)

    unet.train()
    t0 = time.perf_counter()
    bar = progress(range(start, cfg.max_steps), total=cfg.max_steps, initial=start, desc=desc,
                   disable=None if is_main else True)
    last: dict[str, float] = {}
    if validate is not None and validate_every and start == 0:
        do_validate(0)
    for step in bar:
        sums: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, metrics = loss_fn(model, step, micro, rank)
                if not torch.isfinite(loss):
                    ck = latest_checkpoint(ckpt_dir)
                    where = f"the last good checkpoint is {ck}" if ck else "no checkpoint was saved yet"
                    raise TrainingDiverged(f"loss became {loss.item()} at step {step}; training stopped and {where}"
                                           "; lower --learning-rate or --beta and rerun with --resume")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                opt_p.step()
                opt_p.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
        sched.step()
        last = {**sums, "lr": sched.get_last_lr()[0]}
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            history.append({"step": done, **last})
            accelerator.log(last, step=done)
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}",
                        acc=f"{last.get('rewards/accuracies', float('nan')):.2f}", refresh=False)
        if validate is not None and validate_every and done % validate_every == 0:
            do_validate(done)
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0) and done < cfg.max_steps:
            accelerator.wait_for_everyone()
            if is_main:
                save_checkpoint(ckpt_dir, unet, adapter, opt, sched, done, cfg_hash,
                                {"validation": validation, "best_step": best_step,
                                 "best_score": best_score if math.isfinite(best_score) else None})
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    secs = time.perf_counter() - t0
    n = cfg.max_steps - start
    res = TrainResult(steps=cfg.max_steps, final_metrics=last, history=history, validation=validation,
                      best_step=best_step, seconds=secs, steps_per_s=n / secs if secs > 0 else 0.0)
    if best_step is not None and best_file.is_file():
        res.best_adapter = load_file(str(best_file))
    return res
