"""The one training loop and the scaffolding every trainer shares (Diffusion-DPO experts, task fine-tunes).

A trainer supplies an *objective*: ``loss_fn(model, step, micro, rank) -> (loss, metrics)``, where ``model`` is
the prepared (possibly DDP-wrapped) UNet the trainable forward must go through. The engine owns the rest:
Accelerate (devices, mixed precision, gradient accumulation, several processes, experiment trackers), the frozen
model's load dtype, the ``<output>.partial`` work folder, LoRA attachment, optimiser and schedule, gradient
clipping, resumable checkpoints, NaN handling, validation with best-checkpoint selection, progress, logging and
the atomic final save.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import atomic_dir
from ..backbone import Backbone, load_backbone
from ..configuration import config_hash, to_dict
from ..errors import SafealignError, TrainingDiverged
from ..lora import LoraSpec, add_lora, lora_state_dict
from ..utils import derive_seed, logger, progress
from .config import TrainConfig

LossFn = Callable[[torch.nn.Module, int, int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
ValidateFn = Callable[[int], dict[str, float]]


# -- optimiser and schedule -------------------------------------------------------------------------------------

def effective_learning_rate(cfg: TrainConfig, num_processes: int = 1) -> float:
    """``--learning-rate``, times processes x batch x accumulation with ``--scale-lr`` (the official release's
    ``--scale_lr``: 1e-5 becomes 1.6e-4 on one process at batch 4, accumulation 4)."""
    if not cfg.scale_lr:
        return cfg.learning_rate
    return cfg.learning_rate * num_processes * cfg.batch_size * cfg.gradient_accumulation_steps


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, num_processes: int = 1
                    ) -> torch.optim.Optimizer:
    """AdamW, or transformers' Adafactor as the official SDXL run uses it: a fixed learning rate (no relative
    step, no parameter scaling, no warm-up init), its update clipped at RMS 1.0."""
    lr = effective_learning_rate(cfg, num_processes)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor
    return Adafactor(params, lr=lr, weight_decay=cfg.weight_decay, clip_threshold=1.0, scale_parameter=False,
                     relative_step=False, warmup_init=False)


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


# -- scaffolding: accelerator, trackers, frozen model, work folder, LoRA, final save ------------------------------

def make_accelerator(cfg: TrainConfig, logs: Path | None = None):
    """The Accelerator of a run: mixed precision, gradient accumulation and, with ``--log-with``, the tracker
    writing under ``logs`` (default ``<output>/logs``)."""
    from accelerate import Accelerator
    # without CUDA, processes started by `accelerate launch --multi_gpu` join up over gloo only with cpu=True
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       log_with=cfg.log_with or None,
                       project_dir=str(logs or Path(cfg.output) / "logs") if cfg.log_with else None)


@contextmanager
def tracking(accelerator, cfg: TrainConfig, project: str) -> Iterator[None]:
    """With ``--log-with``: start the trackers (the run's config as hyper-parameters), end them on exit. Metrics
    reach them through ``accelerator.log`` in :func:`run_training`."""
    if not cfg.log_with:
        yield
        return
    accelerator.init_trackers(project, config={k: (",".join(map(str, v)) if isinstance(v, list) else v)
                                               for k, v in to_dict(cfg).items()})
    try:
        yield
    finally:
        accelerator.end_training()


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the frozen model is loaded in: the mixed-precision one (trained parameters stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def load_frozen(cfg: TrainConfig, accelerator) -> Backbone:
    """``cfg.model`` on the accelerator's device, in :func:`frozen_dtype`."""
    return load_backbone(cfg.model, device=accelerator.device, dtype=frozen_dtype(cfg))


def work_folder(final: Path, cfg: TrainConfig, accelerator) -> Path:
    """``<final>.partial``, where checkpoints live until the artifact is written. The main process alone removes a
    stale attempt (unless ``--resume`` continues it) and creates the folder; the others wait for it."""
    work = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        if work.exists() and not cfg.resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return work


def lora_spec(cfg: TrainConfig) -> LoraSpec:
    """The LoRA a run trains (rank, alpha, targets, dropout from its config)."""
    return LoraSpec(rank=cfg.rank, alpha=cfg.alpha, targets=tuple(cfg.targets), dropout=cfg.lora_dropout)


def attach_lora(unet, spec: LoraSpec, adapter: str, seed: int, init: str = "gaussian") -> None:
    """Add the adapter to be trained. Its random A is seeded by ``seed`` alone, so every LoRA of one run shares its
    initialisation (what Co-Merge's rank granularity needs). ``init``: ``gaussian`` (peft's
    ``init_lora_weights="gaussian"``) or ``default`` (peft's Kaiming-uniform A); B starts at zero either way."""
    torch.manual_seed(derive_seed(seed, "lora-init"))
    add_lora(unet, spec, adapter)
    if init == "default":
        from peft.tuners.lora import LoraLayer
        torch.manual_seed(derive_seed(seed, "lora-init"))
        for m in unet.modules():
            if isinstance(m, LoraLayer) and adapter in m.lora_A:
                m.reset_lora_parameters(adapter, True)
    if hasattr(unet, "set_adapters"):
        unet.set_adapters([adapter])


def prepare_trainable(unet, cfg: TrainConfig) -> None:
    """Gradient checkpointing if asked; trained parameters in fp32 even when the frozen base is fp16/bf16."""
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def save_artifact(final: Path, work: Path, cfg: TrainConfig, accelerator, history: dict,
                  write: Callable[[Path], None]) -> None:
    """On the main process: turn the work folder into ``final`` atomically (checkpoints dropped), with
    ``history.json`` and whatever ``write(folder)`` adds (weights, manifest). Every process waits for it."""
    if accelerator.is_main_process:
        with atomic_dir(final, overwrite=cfg.overwrite, work=work) as tmp:
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
            shutil.rmtree(tmp / "best", ignore_errors=True)
            write(tmp)
            (tmp / "history.json").write_text(json.dumps(history, indent=1))
    accelerator.wait_for_everyone()


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


class _Validation:
    """Validation results so far and the best-scoring trainable state (kept in ``<work>/best``)."""

    def __init__(self, validate: ValidateFn | None, every: int, unet, adapter: str | None, accelerator,
                 work: Path):
        self.validate, self.every = validate, every
        self.unet, self.adapter, self.accelerator = unet, adapter, accelerator
        self.file = work / "best" / "adapter.safetensors"
        self.history: list[dict] = []
        self.best_step: int | None = None
        self.best_score = math.inf

    def due(self, step: int) -> bool:
        return self.validate is not None and bool(self.every) and step % self.every == 0

    def restore(self, state: dict) -> None:
        self.history = state.get("validation", [])
        self.best_step = state.get("best_step")
        self.best_score = state.get("best_score") if state.get("best_score") is not None else math.inf

    def state(self) -> dict:
        return {"validation": self.history, "best_step": self.best_step,
                "best_score": self.best_score if math.isfinite(self.best_score) else None}

    def __call__(self, step: int) -> None:
        self.unet.eval()
        res = self.validate(step)  # type: ignore[misc]
        self.unet.train()
        res = {"step": step, **res}
        self.history.append(res)
        self.accelerator.log({f"val/{k}": v for k, v in res.items() if k != "step"}, step=step)
        score = res.get("score", math.inf)
        logger.info("validation at step %d: %s", step, ", ".join(f"{k}={v:.3g}" for k, v in res.items()
                                                                  if k != "step"))
        if score < self.best_score and self.accelerator.is_main_process:
            self.best_score, self.best_step = score, step
            self.file.parent.mkdir(parents=True, exist_ok=True)
            save_file(trainable_state(self.unet, self.adapter), str(self.file.with_suffix(".tmp")))
            os.replace(self.file.with_suffix(".tmp"), self.file)


def _optimizer_step(cfg: TrainConfig, accelerator, model, opt, params, loss_fn: LossFn, step: int,
                    ckpt_dir: Path) -> dict[str, float]:
    """The micro-steps of one optimiser step; returns their metrics averaged."""
    sums: dict[str, float] = {}
    for micro in range(cfg.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, metrics = loss_fn(model, step, micro, accelerator.process_index)
            if not torch.isfinite(loss):
                ck = latest_checkpoint(ckpt_dir)
                where = f"the last good checkpoint is {ck}" if ck else "no checkpoint was saved yet"
                raise TrainingDiverged(f"loss became {loss.item()} at step {step}; training stopped and {where}"
                                       "; lower --learning-rate or --beta and rerun with --resume")
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
    return sums


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
    opt = build_optimizer(params, cfg, accelerator.num_processes)
    sched = build_scheduler(opt, cfg)
    val = _Validation(validate, validate_every, unet, adapter, accelerator, work)
    start, history = 0, []
    if cfg.resume:
        ck = latest_checkpoint(ckpt_dir)
        if ck is None:
            logger.info("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
        else:
            st = load_checkpoint(ck, unet, adapter, opt, sched, cfg_hash)
            start = st["step"]
            val.restore(st)
            logger.info("resumed from %s (step %d)", ck, start)
    model, opt_p = accelerator.prepare(unet, opt)
    unet.train()
    t0 = time.perf_counter()
    bar = progress(range(start, cfg.max_steps), total=cfg.max_steps, initial=start, desc=desc,
                   disable=None if accelerator.is_main_process else True)
    last: dict[str, float] = {}
    if start == 0 and val.due(0):
        val(0)
    for step in bar:
        sums = _optimizer_step(cfg, accelerator, model, opt_p, params, loss_fn, step, ckpt_dir)
        sched.step()
        last = {**sums, "lr": sched.get_last_lr()[0]}
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            history.append({"step": done, **last})
            accelerator.log(last, step=done)
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}",
                        acc=f"{last.get('rewards/accuracies', float('nan')):.2f}", refresh=False)
        if val.due(done):
            val(done)
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0) and done < cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt_dir, unet, adapter, opt, sched, done, cfg_hash, val.state())
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    secs = time.perf_counter() - t0
    n = cfg.max_steps - start
    res = TrainResult(steps=cfg.max_steps, final_metrics=last, history=history, validation=val.history,
                      best_step=val.best_step, seconds=secs, steps_per_s=n / secs if secs > 0 else 0.0)
    if val.best_step is not None and val.file.is_file():
        res.best_adapter = load_file(str(val.file))
    return res
