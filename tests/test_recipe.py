"""`recipe: alignguard` trains as the official SafetyDPO release does: asserted on the optimiser, schedule, clipping,
LoRA and captions the trainer really builds and uses, not only on the config."""

from __future__ import annotations

import json

import pytest
import torch

from safealign.backbone import load_backbone
from safealign.train import dpo, engine
from safealign.train.cache import EncodedPairs, with_empty_prompts
from safealign.train.config import ExpertConfig
from safealign.train.dpo import ExpertData, dpo_batch, train_expert
from safealign.train.engine import effective_learning_rate, make_accelerator


def _cfg(model, dataset, out, cache_dir, **kw):
    return ExpertConfig(model=str(model), dataset=str(dataset), category="violence", output=str(out),
                        cache_dir=str(cache_dir), recipe="alignguard", checkpoint_every=0, eval_split="",
                        resolution=16, **kw)


def _spy_run(cfg, monkeypatch):
    """Train ``cfg`` on a fresh backbone; record the optimiser, schedule, clipping calls, the LoRA right before
    training, and every text conditioning the UNet receives."""
    seen: dict = {"clip": [], "cond": []}
    real_opt, real_sched = engine.build_optimizer, engine.build_scheduler

    def opt_spy(params, c, num_processes=1):
        seen["A"] = [p.detach().clone() for n, p in bb.unet.named_parameters() if "lora_A" in n]
        seen["B"] = [p.detach().clone() for n, p in bb.unet.named_parameters() if "lora_B" in n]
        seen["checkpointing"] = bb.unet.is_gradient_checkpointing
        seen["opt"] = real_opt(params, c, num_processes)
        return seen["opt"]

    def sched_spy(opt, c):
        seen["sched"] = real_sched(opt, c)
        return seen["sched"]
    monkeypatch.setattr(engine, "build_optimizer", opt_spy)
    monkeypatch.setattr(engine, "build_scheduler", sched_spy)
    bb = load_backbone(cfg.model)
    acc = make_accelerator(cfg)
    real_clip = acc.clip_grad_norm_
    monkeypatch.setattr(acc, "clip_grad_norm_", lambda p, max_norm, **k: (seen["clip"].append(max_norm),
                                                                           real_clip(p, max_norm, **k))[1])
    hook = bb.unet.register_forward_pre_hook(
        lambda m, a, kw: seen["cond"].append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        [folder] = train_expert(cfg, backbone=bb, accelerator=acc)
    finally:
        hook.remove()
    seen["empty"] = bb.encode_prompts([""]).encoder_hidden_states[0]
    seen["manifest"] = json.loads((folder / "safealign.json").read_text())
    return seen


def test_alignguard_sd_trains_with_the_release_optimiser_schedule_lora_and_empty_prompts(
        tiny_paths, toy_dataset, cache_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_paths["sd1"], toy_dataset, tmp_path / "e", cache_dir, max_steps=3)
    seen = _spy_run(cfg, monkeypatch)
    opt, sched = seen["opt"], seen["sched"]
    # AdamW at 1e-5 x 1 process x batch 4 x accumulation 4 (--scale_lr), the release's AdamW settings
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert g["initial_lr"] == pytest.approx(1.6e-4)
    assert g["weight_decay"] == pytest.approx(1e-2) and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8
    # constant_with_warmup over 500 steps: linear to the peak, then constant to the end of 2,000 steps
    f = sched.lr_lambdas[0]
    assert f(0) == pytest.approx(1 / 500) and f(249) == pytest.approx(0.5) and f(499) == 1.0
    assert f(500) == f(1999) == f(10_000) == 1.0
    assert sched.get_last_lr()[0] == pytest.approx(1.6e-4 * 4 / 500)  # after 3 steps
    # gradients clipped at 1.0 once per optimiser step
    assert seen["clip"] == [1.0, 1.0, 1.0]
    # LoRA r=4, alpha=4, gaussian A (std 1/r), zero B, on to_q/to_k/to_v/to_out.0
    a = torch.cat([t.flatten() for t in seen["A"]])
    assert a.std().item() == pytest.approx(0.25, rel=0.1)
    assert all(torch.count_nonzero(b) == 0 for b in seen["B"])
    lora = seen["manifest"]["lora"]
    assert lora["r"] == 4 and lora["lora_alpha"] == 4.0
    assert sorted(lora["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert not seen["checkpointing"]
    # ~20% of the captions the UNet saw were the empty prompt's; winner and loser always share theirs
    rows = [c[: len(c) // 2] for c in seen["cond"]]
    assert all(torch.equal(c[: len(c) // 2], c[len(c) // 2:]) for c in seen["cond"])
    is_empty = torch.cat([torch.isclose(r, seen["empty"], atol=1e-5).flatten(1).all(1) for r in rows])
    assert len(is_empty) == 2 * 3 * 4 * 4  # reference and policy forward of 3 steps x 4 micro-steps x 4 pairs
    assert 0.08 < is_empty.float().mean().item() < 0.35
    # the run records the recipe and what was set instead of it
    rec = seen["manifest"]["recipe"]
    assert rec["name"] == "alignguard" and rec["family"] == "sd1"
    assert rec["overrides"] == {"max_steps": {"recipe": 2000, "used": 3}, "resolution": {"recipe": 512, "used": 16}}
    assert seen["manifest"]["config"]["empty_prompt_fraction"] == 0.2


def test_alignguard_sdxl_uses_adafactor_without_outer_clipping_and_checkpointing(
        tiny_paths, toy_dataset, cache_dir, tmp_path, monkeypatch):
    from transformers.optimization import Adafactor
    cfg = _cfg(tiny_paths["sdxl"], toy_dataset, tmp_path / "x", cache_dir, max_steps=2, gradient_accumulation_steps=1)
    seen = _spy_run(cfg, monkeypatch)
    opt, sched = seen["opt"], seen["sched"]
    assert type(opt) is Adafactor
    d = opt.defaults
    assert d["scale_parameter"] is False and d["relative_step"] is False and d["warmup_init"] is False
    assert d["clip_threshold"] == 1.0 and d["weight_decay"] == pytest.approx(1e-2)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(1e-5)  # no --scale_lr for SDXL
    assert sched.lr_lambdas[0](0) == 1.0  # --lr_warmup_steps=0
    assert seen["clip"] == []  # the release leaves clipping to Adafactor
    assert seen["checkpointing"]
    assert seen["manifest"]["recipe"]["values"]["resolution"] == 1024


def test_recipe_values_explicit_options_win_and_are_recorded(tiny_paths):
    base = dict(dataset="d", category="all", output="o", recipe="alignguard")
    sd = ExpertConfig(model=str(tiny_paths["sd1"]), **base)
    assert (sd.learning_rate, sd.scale_lr, sd.warmup_steps, sd.lr_scheduler, sd.optimizer) == \
        (1e-5, True, 500, "constant", "adamw")
    assert (sd.empty_prompt_fraction, sd.max_steps, sd.resolution, sd.beta, sd.lora_init) == \
        (0.2, 2000, 512, 5000.0, "gaussian")
    assert (sd.batch_size, sd.gradient_accumulation_steps, sd.max_grad_norm) == (4, 4, 1.0)
    assert effective_learning_rate(sd) == pytest.approx(1.6e-4)
    assert effective_learning_rate(sd, num_processes=8) == pytest.approx(1.28e-3)
    assert sd.recipe_overrides == {}
    mine = ExpertConfig(model=str(tiny_paths["sd1"]), learning_rate=1e-4, empty_prompt_fraction=0.0, **base)
    assert mine.learning_rate == 1e-4 and mine.empty_prompt_fraction == 0.0 and mine.warmup_steps == 500
    assert mine.recipe_overrides == {"learning_rate": {"recipe": 1e-5, "used": 1e-4},
                                     "empty_prompt_fraction": {"recipe": 0.2, "used": 0.0}}
    # ours: the options' own defaults, nothing filled
    ours = ExpertConfig(model="no/such-model", dataset="d", category="all", output="o")
    assert (ours.learning_rate, ours.scale_lr, ours.empty_prompt_fraction, ours.recipe_values) == (1e-4, False, 0.0, {})


def _data(n: int, fraction_states: int = 3) -> ExpertData:
    from safealign.backbone import Conditioning
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(n, fraction_states, 8, generator=g))
    pairs = EncodedPairs(torch.randn(n, 4, 2, 2, generator=g), torch.randn(n, 4, 2, 2, generator=g), cond)
    return ExpertData(pairs, None, None, None, None, Conditioning(torch.zeros(1, fraction_states, 8)))


def test_empty_prompt_fraction_replaces_that_share_of_captions_deterministically():
    data = _data(64)
    cfg = ExpertConfig(model="no/such-model", dataset="d", category="all", output="o", batch_size=8,
                       empty_prompt_fraction=0.2, seed=5)
    dropped = total = 0
    for step in range(250):
        idx, (_, _, cond), _ = dpo_batch(cfg, data, step, 0, 0)
        empty = (cond.encoder_hidden_states == 0).flatten(1).all(1)
        kept = data.pairs.cond.encoder_hidden_states[idx]
        assert torch.equal(cond.encoder_hidden_states[~empty], kept[~empty])  # the others untouched
        dropped, total = dropped + int(empty.sum()), total + len(idx)
    assert total == 2000 and 0.17 < dropped / total < 0.23
    again = dpo_batch(cfg, data, 7, 0, 0)[1][2].encoder_hidden_states
    assert torch.equal(again, dpo_batch(cfg, data, 7, 0, 0)[1][2].encoder_hidden_states)  # same seed, same draw
    # turning it on changes which captions are dropped only: pairs, noise and timesteps stay those of fraction 0
    off = ExpertConfig(model="no/such-model", dataset="d", category="all", output="o", batch_size=8, seed=5)
    i0, _, g0 = dpo_batch(off, _data(64), 7, 0, 0)
    i1, _, g1 = dpo_batch(cfg, data, 7, 0, 0)
    assert torch.equal(i0, i1) and torch.equal(torch.randn(4, generator=g0), torch.randn(4, generator=g1))


def test_with_empty_prompts_swaps_sdxl_pooled_embeddings_too():
    from safealign.backbone import Conditioning
    cond = Conditioning(torch.ones(6, 2, 4), {"text_embeds": torch.ones(6, 3), "time_ids": torch.ones(6, 6)})
    empty = Conditioning(torch.zeros(1, 2, 4), {"text_embeds": torch.zeros(1, 3), "time_ids": torch.ones(1, 6)})
    out, mask = with_empty_prompts(cond, empty, 0.5, torch.Generator().manual_seed(1))
    assert 0 < int(mask.sum()) < 6
    assert torch.equal(out.added_cond_kwargs["text_embeds"][:, 0] == 0, mask)
    assert torch.equal((out.encoder_hidden_states == 0).flatten(1).all(1), mask)


def test_lora_init_default_is_kaiming_not_gaussian(tiny_paths):
    from safealign.lora import LoraSpec
    stds = {}
    for init in ("gaussian", "default"):
        unet = load_backbone(tiny_paths["sd1"]).unet
        engine.attach_lora(unet, LoraSpec(rank=4, alpha=4.0), dpo.ADAPTER, seed=0, init=init)
        stds[init] = torch.cat([p.flatten() for n, p in unet.named_parameters() if "lora_A" in n]).std().item()
    assert stds["gaussian"] == pytest.approx(0.25, rel=0.1)
    assert stds["default"] < 0.2  # Kaiming-uniform: std 1/sqrt(3 fan_in) for fan_in 16..32


def test_recipe_waits_for_a_model_that_is_not_there_yet(tmp_path):
    from safealign.errors import SafealignError
    from safealign.testing import build_tiny_pipeline
    later = tmp_path / "later"
    cfg = ExpertConfig(model=str(later), dataset="d", category="all", output="o", recipe="alignguard", max_steps=7)
    assert cfg.learning_rate == 1e-4 and cfg.recipe_record()["family"] is None  # not resolved yet
    with pytest.raises(SafealignError, match="does not exist"):
        cfg.resolved()  # training would stop here, with the model's own error
    build_tiny_pipeline("sdxl").save_pretrained(later)
    ready = cfg.resolved()
    assert (ready.optimizer, ready.learning_rate, ready.max_steps, ready.resolution) == ("adafactor", 1e-5, 7, 1024)
    assert ready.recipe_record()["family"] == "sdxl"
