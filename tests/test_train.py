import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import expert_cfg
from safealign import cli
from safealign.backbone import load_backbone
from safealign.errors import SafealignError
from safealign.lora import load_lora
from safealign.train import dpo
from safealign.train.dpo import train_expert
from safealign.train.text_basis import CROSS_ATTENTION_KV


def _weights(folder):
    sd, spec = load_lora(folder)
    return sd, spec


def test_short_run_learns_and_leaves_base_untouched(tiny_paths, toy_dataset, cache_dir, tmp_path):
    bb = load_backbone(tiny_paths["sd1"])
    base = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", output=tmp_path / "exp",
                     max_steps=80, cache_dir=cache_dir, rank=4, alpha=8.0)
    [folder] = train_expert(cfg, backbone=bb)
    m = json.loads((folder / "safealign.json").read_text())
    assert m["kind"] == "lora" and m["role"] == "expert" and m["categories"] == ["violence"]
    assert m["base_model"]["family"] == "sd1" and m["config"]["beta"] == 2000.0
    assert m["metrics"]["heldout/rewards/accuracies"] > 0.5  # held-out pairs, not the training ones
    after = {k: v for k, v in bb.unet.state_dict().items() if "lora_" not in k}
    renamed = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert base.keys() == renamed.keys()
    assert all(torch.equal(base[k], renamed[k]) for k in base)  # bit-identical base weights
    assert not (folder.parent / "violence.partial").exists()
    assert not (folder / "checkpoints").exists()


def test_expert_folder_loads_in_diffusers_like_in_memory(tiny_paths, toy_dataset, cache_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="shocking", output=tmp_path / "e",
                     max_steps=10, cache_dir=cache_dir, rank=4, alpha=16.0, learning_rate=5e-2)
    bb = load_backbone(tiny_paths["sd1"])
    captured = {}
    orig = dpo.lora_state_dict

    def capture(unet, adapter):  # sample with the in-memory adapter right before it is saved
        captured["img"] = bb.pipe("a skull", num_inference_steps=3, output_type="np",
                                  generator=torch.Generator().manual_seed(3)).images
        return orig(unet, adapter)
    dpo.lora_state_dict = capture
    try:
        [folder] = train_expert(cfg, backbone=bb)
    finally:
        dpo.lora_state_dict = orig
    sd, spec = _weights(folder)
    assert spec.alpha == 16.0 and spec.rank == 4
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_paths["sd1"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a skull", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(3)).images
    pipe.load_lora_weights(folder)
    img = pipe("a skull", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(3)).images
    assert np.abs(img - captured["img"]).max() < 1e-5
    assert np.abs(img - plain).max() > 1e-4  # and the expert does change the output


@pytest.mark.parametrize("extra", [{}, {"targets": ("attn2.to_k", "attn2.to_v"), "kv_basis": "hazard",
                                        "text_preserve_weight": 10.0}], ids=["default", "kv-hazard-basis"])
def test_resume_equals_uninterrupted(tiny_paths, toy_dataset, cache_dir, tmp_path, monkeypatch, extra):
    kw = dict(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", max_steps=12, cache_dir=cache_dir,
              checkpoint_every=4, keep_checkpoints=2, **extra)
    [ref] = train_expert(expert_cfg(output=tmp_path / "a", **kw))
    calls = {"n": 0}
    real = dpo.dpo_preserve_loss  # the loss the training loop calls

    def crash_at_step_7(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # as if killed after the step-4 checkpoint
        return real(*a, **k)
    monkeypatch.setattr(dpo, "dpo_preserve_loss", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_expert(expert_cfg(output=tmp_path / "b", **kw))
    assert not (tmp_path / "b" / "violence").exists()  # nothing that looks finished
    assert (tmp_path / "b" / "violence.partial" / "checkpoints" / "step-000004").is_dir()
    monkeypatch.setattr(dpo, "dpo_preserve_loss", real)
    [res] = train_expert(expert_cfg(output=tmp_path / "b", resume=True, **kw))
    a, _ = _weights(ref)
    b, _ = _weights(res)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_checkpoint(tiny_paths, toy_dataset, cache_dir, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = dpo.dpo_preserve_loss  # the loss the training loop calls

    def nan_at_6(*a, **k):
        calls["n"] += 1
        loss, m = real(*a, **k)
        return (loss * float("nan"), m) if calls["n"] >= 6 else (loss, m)
    monkeypatch.setattr(dpo, "dpo_preserve_loss", nan_at_6)
    out = tmp_path / "n"
    code = cli.main(["train", "expert", "--model", str(tiny_paths["sd1"]), "--dataset", str(toy_dataset),
                     "--category", "violence", "--output", str(out), "--max-steps", "10", "--checkpoint-every", "4",
                     "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "NaN" in err or "nan" in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("safealign: error:")]
    assert "step-000004" in line
    assert not (out / "violence").exists()
    assert (out / "violence.partial" / "checkpoints" / "step-000004" / "adapter.safetensors").is_file()


def test_v_prediction_trains(tiny_paths, toy_dataset, cache_dir, tmp_path):
    cfg = expert_cfg(model=tiny_paths["sd2"], dataset=toy_dataset, category="violence", output=tmp_path / "v",
                     max_steps=6, cache_dir=cache_dir)
    [folder] = train_expert(cfg)
    m = json.loads((folder / "safealign.json").read_text())
    assert m["base_model"]["prediction_type"] == "v_prediction"
    assert np.isfinite(m["metrics"]["train/loss"])


def test_sdxl_all_categories_adafactor_checkpointing(tiny_paths, toy_dataset, cache_dir, tmp_path):
    cfg = expert_cfg(model=tiny_paths["sdxl"], dataset=toy_dataset, category="all", output=tmp_path / "x",
                     max_steps=6, cache_dir=cache_dir, optimizer="adafactor", gradient_checkpointing=True,
                     warmup_steps=2, lr_scheduler="cosine", gradient_accumulation_steps=2, log_with="tensorboard")
    folders = train_expert(cfg)
    assert sorted(f.name for f in folders) == ["shocking", "violence"]
    for f in folders:
        sd, _ = _weights(f)
        assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    assert list((tmp_path / "x" / "logs").rglob("events.out.tfevents*"))


def test_latents_are_cached_once(tiny_paths, toy_dataset, cache_dir, tmp_path, monkeypatch):
    from safealign.backbone import Backbone
    calls = {"n": 0}
    real = Backbone.encode_images

    def counting(self, px):
        calls["n"] += px.shape[0]
        return real(self, px)
    monkeypatch.setattr(Backbone, "encode_images", counting)
    kw = dict(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", max_steps=2, cache_dir=cache_dir)
    train_expert(expert_cfg(output=tmp_path / "c1", **kw))
    first = calls["n"]
    assert first == 32  # 16 pairs x 2 images, train + held-out
    train_expert(expert_cfg(output=tmp_path / "c2", **kw))
    assert calls["n"] == first  # second run: no VAE call at all
    assert list(cache_dir.rglob("latents-16.safetensors"))


def test_validation_keeps_best_checkpoint(tiny_paths, toy_dataset, cache_dir, tmp_path):
    import toy_judge
    toy_judge.CALLS["n"] = 0
    kw = dict(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", cache_dir=cache_dir)
    [best] = train_expert(expert_cfg(output=tmp_path / "v", max_steps=15, validate_every=5,
                                     judge="toy_judge:scheduled_judge", validation_prompts=2, validation_seeds=1,
                                     steps=2, **kw))
    hist = json.loads((best / "history.json").read_text())["validation"]
    assert [h["step"] for h in hist] == [0, 5, 10, 15]
    assert hist[1]["unsafe_rate"] == 0.0 and hist[2]["unsafe_rate"] == 1.0
    m = json.loads((best / "safealign.json").read_text())
    assert m["metrics"]["best_step"] == 5
    [five] = train_expert(expert_cfg(output=tmp_path / "five", max_steps=5, **kw))
    a, _ = _weights(best)
    b, _ = _weights(five)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the kept weights are those of step 5


def _cli(*args):
    return cli.main([str(a) for a in args])


def test_bad_input_exits_2_and_writes_nothing(tiny_paths, toy_dataset, cache_dir, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["--cache-dir", cache_dir, "--max-steps", 2]
    cases = [
        (["--model", tiny_paths["sd1"], "--dataset", tmp_path / "none", "--category", "violence"], "does not exist"),
        (["--model", tiny_paths["sd1"], "--dataset", toy_dataset, "--category", "hate"], "not in dataset"),
        (["--model", tmp_path, "--dataset", toy_dataset, "--category", "violence"], "not a diffusers pipeline"),
        (["--model", tiny_paths["sd1"], "--dataset", toy_dataset, "--category", "violence", "--targets", "nope"],
         "match no"),
        (["--model", tiny_paths["sd1"], "--dataset", toy_dataset, "--category", "violence", "--rank", 0], "rank"),
        (["--model", tiny_paths["sd1"], "--dataset", toy_dataset, "--category", "violence", "--optimizer", "sgd"],
         "must be one of"),
        (["--model", tiny_paths["sd1"], "--dataset", toy_dataset, "--category", "violence", "--beta", "x"],
         "expects float"),
    ]
    for args, msg in cases:
        code = _cli("train", "expert", "--output", out, *common, *args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert msg in err, (msg, err)
        assert len([ln for ln in err.splitlines() if "error" in ln.lower()]) == 1, err
        assert "Traceback" not in err
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    (out / "violence").mkdir(parents=True)
    code = _cli("train", "expert", "--output", out, *common, "--model", tiny_paths["sd1"], "--dataset", toy_dataset,
                "--category", "violence")
    assert code == 2 and "already exists" in capsys.readouterr().err
    code = _cli("train", "expert", "--output", out, *common, "--model", tiny_paths["sd1"], "--dataset", toy_dataset,
                "--category", "violence", "--overwrite")
    assert code == 0 and (out / "violence" / "pytorch_lora_weights.safetensors").is_file()


def test_yaml_config_and_flags(tiny_paths, toy_dataset, cache_dir, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {tiny_paths['sd1']}\ndataset: {toy_dataset}\ncategory: violence\nmax_steps: 3\n"
                 f"rank: 2\ncache_dir: {cache_dir}\n")
    assert _cli("train", "expert", "--config", y, "--output", tmp_path / "y", "--alpha", 3) == 0
    m = json.loads((tmp_path / "y" / "violence" / "safealign.json").read_text())
    assert m["config"]["rank"] == 2 and m["config"]["alpha"] == 3.0 and m["config"]["max_steps"] == 3
    y.write_text("bogus_option: 1\n")
    assert _cli("train", "expert", "--config", y, "--output", tmp_path / "z") == 2


def test_accelerate_two_cpu_processes(tiny_paths, toy_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "SAFEALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launcher starts ONE process; --multi_gpu starts two, which join over gloo on a CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "safealign.cli", "train", "expert",
           "--model", str(tiny_paths["sd1"]), "--dataset", str(toy_dataset), "--category", "violence",
           "--output", str(out), "--max-steps", "4", "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sd, _ = _weights(out / "violence")
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    assert json.loads((out / "violence" / "safealign.json").read_text())["metrics"]["num_processes"] == 2
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_paths["sd1"], safety_checker=None)
    pipe.load_lora_weights(out / "violence")
    assert sum(ln.startswith("violence") for ln in r.stdout.splitlines()) == 1  # summary once, by rank 0


def test_pooled_expert_trains_one_lora_on_every_category(tiny_paths, toy_dataset, cache_dir, tmp_path):
    from safealign.data.dataset import PairedDataset
    ds = PairedDataset(toy_dataset)
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="pooled", output=tmp_path / "p",
                     max_steps=4, cache_dir=cache_dir, validate_every=2, judge="toy_judge:red_judge",
                     validation_prompts=1, validation_seeds=1, steps=2)
    [folder] = train_expert(cfg)
    m = json.loads((folder / "safealign.json").read_text())
    assert folder.name == "pooled" and sorted(m["categories"]) == sorted(ds.categories)
    assert m["metrics"]["pairs"] == len(ds.pairs(None, "train"))  # every category's pairs, not one
    # validation judged "any category" (the pooled expert has no single one) at steps 0, 2 and 4
    hist = json.loads((folder / "history.json").read_text())["validation"]
    assert len(hist) == 3 and all(0.0 <= h["unsafe_rate"] <= 1.0 for h in hist)


def _safe_prompt_drift(bb, enc, seed=7):
    """Mean squared distance between the adapted and the base UNet's predictions under the pairs' safe prompts."""
    from safealign.backbone import unet_forward
    g = torch.Generator().manual_seed(seed)
    lat, cond = enc.latents_w, enc.cond_safe
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, bb.num_train_timesteps, (len(lat),), generator=g)
    noisy = bb.add_noise(lat, noise, t)
    with torch.no_grad():
        pol = unet_forward(bb.unet, noisy, t, cond)
        bb.unet.disable_adapters()
        ref = unet_forward(bb.unet, noisy, t, cond)
        bb.unet.enable_adapters()
    return float((pol - ref).pow(2).mean())


def test_preservation_error_is_policy_against_reference_under_the_safe_prompt(tiny_paths, toy_dataset, cache_dir):
    from safealign.backbone import unet_forward
    from safealign.data.dataset import PairedDataset
    from safealign.lora import LoraSpec, add_lora
    from safealign.train.cache import encode_pairs
    bb = load_backbone(tiny_paths["sd1"])
    pairs = PairedDataset(toy_dataset).pairs("violence", "train")[:4]
    enc = encode_pairs(bb, pairs, cache_dir, safe_prompts=True)
    assert not torch.equal(enc.cond.encoder_hidden_states, enc.cond_safe.encoder_hidden_states)
    torch.manual_seed(0)
    add_lora(bb.unet, LoraSpec(rank=4, alpha=4.0), dpo.ADAPTER)
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:  # a non-zero B: the adapter really changes the UNet
                p.normal_(0, 0.05)
    idx = torch.arange(len(enc))
    plain = dpo.dpo_errors(bb, bb.unet, bb.unet, enc.select(idx), torch.Generator().manual_seed(3))
    withp = dpo.dpo_errors(bb, bb.unet, bb.unet, enc.select(idx), torch.Generator().manual_seed(3),
                           preserve=enc.select_safe(idx))
    assert len(plain) == 4 and len(withp) == 5
    for a, b in zip(plain, withp):  # the DPO errors are the same with or without the extra term
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the fifth value, recomputed by hand: same noise and timesteps, winner latents, safe prompts
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(enc.latents_w.shape, generator=g)
    t = torch.randint(0, bb.num_train_timesteps, (len(enc),), generator=g)
    noisy = bb.add_noise(enc.latents_w, noise, t)
    with torch.no_grad():
        pol = unet_forward(bb.unet, noisy, t, enc.cond_safe)
        bb.unet.disable_adapters()
        ref = unet_forward(bb.unet, noisy, t, enc.cond_safe)
        bb.unet.enable_adapters()
    want = (pol - ref).pow(2).flatten(1).mean(1)
    assert float(want.min()) > 0
    torch.testing.assert_close(withp[4].detach(), want, rtol=1e-4, atol=1e-7)
    # other safe pairs can be passed as (latents, conditioning): the same pairs give the same value
    other = dpo.dpo_errors(bb, bb.unet, bb.unet, enc.select(idx), torch.Generator().manual_seed(3),
                           preserve=(enc.latents_w[idx], enc.select_safe(idx)))
    torch.testing.assert_close(other[4].detach(), want, rtol=1e-4, atol=1e-7)
    loss, m = dpo.dpo_preserve_loss(withp, beta=2000.0, preserve_weight=10.0)
    base_loss, _ = dpo.dpo_preserve_loss(plain, beta=2000.0, preserve_weight=10.0)
    assert float(loss.detach()) == pytest.approx(float(base_loss.detach()) + 10.0 * float(want.mean()), rel=1e-4)
    assert float(m["preserve/error"]) == pytest.approx(float(want.mean()), rel=1e-4)


def test_preserve_weight_keeps_the_model_closer_under_safe_prompts(tiny_paths, toy_dataset, cache_dir, tmp_path):
    from safealign.data.dataset import PairedDataset
    from safealign.lora import load_into
    from safealign.train.cache import encode_pairs
    drift = {}
    for w in (0.0, 2000.0):
        bb = load_backbone(tiny_paths["sd1"])
        cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence",
                         output=tmp_path / f"w{w}", max_steps=20, cache_dir=cache_dir, learning_rate=3e-3,
                         preserve_weight=w)
        [folder] = train_expert(cfg, backbone=bb)
        m = json.loads((folder / "safealign.json").read_text())
        assert m["config"]["preserve_weight"] == w
        assert ("train/preserve/error" in m["metrics"]) == (w > 0)
        fresh = load_backbone(tiny_paths["sd1"])
        load_into(fresh.unet, folder, adapter_name="expert")
        enc = encode_pairs(fresh, PairedDataset(toy_dataset).pairs("violence", "train"), cache_dir,
                           safe_prompts=True)
        drift[w] = _safe_prompt_drift(fresh, enc)
        assert drift[w] > 0
    assert drift[2000.0] < 0.1 * drift[0.0], drift
    # preserving every category's safe pairs (not only the expert's own) trains too, and says so
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", output=tmp_path / "all",
                     max_steps=4, cache_dir=cache_dir, preserve_weight=10.0, preserve_from="all")
    [folder] = train_expert(cfg, backbone=load_backbone(tiny_paths["sd1"]))
    m = json.loads((folder / "safealign.json").read_text())
    assert m["config"]["preserve_from"] == "all" and m["metrics"]["train/preserve/error"] >= 0


def test_preserve_from_prompts_holds_the_model_still_under_anchor_prompts(tiny_paths, toy_dataset, cache_dir,
                                                                          tmp_path):
    from safealign.backbone import Conditioning
    from safealign.data.dataset import PairedDataset
    from safealign.lora import load_into
    from safealign.train.cache import EncodedPairs, encode_pairs
    anchors = ("a red cup on a gray background", "a blue heart on a white background", "a green house")
    drift = {}
    for w in (0.0, 2000.0):
        cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence",
                         output=tmp_path / f"p{w}", max_steps=20, cache_dir=cache_dir, learning_rate=3e-3,
                         preserve_weight=w, preserve_from="prompts", preserve_prompts=anchors)
        [folder] = train_expert(cfg, backbone=load_backbone(tiny_paths["sd1"]))
        m = json.loads((folder / "safealign.json").read_text())
        assert m["config"]["preserve_prompts"] == list(anchors)
        fresh = load_backbone(tiny_paths["sd1"])
        load_into(fresh.unet, folder, adapter_name="expert")
        enc = encode_pairs(fresh, PairedDataset(toy_dataset).pairs("violence", "train"), cache_dir)
        # the anchor prompts in turn over the pairs' safe images: where the term holds the model
        ac = fresh.encode_prompts([anchors[i % len(anchors)] for i in range(len(enc))])
        drift[w] = _safe_prompt_drift(fresh, EncodedPairs(enc.latents_w, enc.latents_l, enc.cond,
                                                          Conditioning(ac.encoder_hidden_states,
                                                                       ac.added_cond_kwargs)))
        assert drift[w] > 0
    assert drift[2000.0] < 0.1 * drift[0.0], drift
    # both: half of each batch under the pairs' own safe prompts, half under the anchors
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", output=tmp_path / "both",
                     max_steps=3, cache_dir=cache_dir, preserve_weight=10.0, preserve_from="both",
                     preserve_prompts=anchors)
    [folder] = train_expert(cfg, backbone=load_backbone(tiny_paths["sd1"]))
    m = json.loads((folder / "safealign.json").read_text())
    assert m["config"]["preserve_from"] == "both" and m["metrics"]["train/preserve/error"] > 0


def test_preserve_from_prompts_needs_prompts_except_on_the_world(tiny_paths, toy_dataset, cache_dir, tmp_path):
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", output=tmp_path / "x",
                     max_steps=2, cache_dir=cache_dir, preserve_weight=10.0, preserve_from="prompts")
    with pytest.raises(SafealignError, match="--preserve-prompts"):
        train_expert(cfg, backbone=load_backbone(tiny_paths["sd1"]))
    assert not (tmp_path / "x").exists()
    from safealign.world import HAZARDS, benign_prompts, parse_prompt
    ps = benign_prompts(50, seed=3)  # the world's own anchors: seeded, varied, never a hazard
    assert ps == benign_prompts(50, seed=3) and ps != benign_prompts(50, seed=4)
    objs = {parse_prompt(p)["object"] for p in ps}
    assert len(objs) > 10 and not objs & set(HAZARDS)
    assert {parse_prompt(p)["object"] for p in benign_prompts(30, kind="benign")} <= {"house", "arrow", "heart", "cup"}


def test_text_preservation_keeps_kept_prompts_keys_and_values(tiny_paths, toy_dataset, cache_dir, tmp_path):
    """--text-preserve-weight: the cross-attention K/V LoRA changes the safe prompts' keys/values far less than
    without the term, while still changing the unsafe prompts' (what the expert is for)."""
    from safealign.data.dataset import PairedDataset
    from safealign.lora import load_into
    from safealign.train.preservation import kept_prompts
    targets = ("attn2.to_k", "attn2.to_v")
    change = {}
    for w in (0.0, 1000.0):
        bb = load_backbone(tiny_paths["sd1"])
        cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence",
                         output=tmp_path / f"t{w}", max_steps=20, cache_dir=cache_dir, learning_rate=3e-3,
                         targets=targets, text_preserve_weight=w)
        [folder] = train_expert(cfg, backbone=bb)
        m = json.loads((folder / "safealign.json").read_text())
        assert ("train/preserve/text_change" in m["metrics"]) == (w > 0)
        fresh = load_backbone(tiny_paths["sd1"])
        load_into(fresh.unet, folder, adapter_name="expert")
        ds = PairedDataset(toy_dataset)
        kept = fresh.encode_prompts(kept_prompts(cfg, fresh, ds)).encoder_hidden_states
        unsafe = fresh.encode_prompts([p.unsafe_prompt for p in ds.pairs("violence", "train")]).encoder_hidden_states
        rel = {}
        for name, states in (("kept", kept), ("unsafe", unsafe)):
            num = den = 0.0
            for n, mod in fresh.unet.named_modules():
                if n.endswith(CROSS_ATTENTION_KV):
                    with torch.no_grad():
                        fresh.unet.disable_adapters()
                        base = mod(states)
                        fresh.unet.enable_adapters()
                        num += float((mod(states) - base).pow(2).sum())
                        den += float(base.pow(2).sum())
            rel[name] = num / den
        change[w] = rel
    assert change[0.0]["kept"] > 0 and change[1000.0]["unsafe"] > 0
    assert change[1000.0]["kept"] < 0.1 * change[0.0]["kept"], change
    assert change[1000.0]["unsafe"] > 1.2 * change[1000.0]["kept"], change
    # the term needs a LoRA on the layers it measures: a clear error, nothing written
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="violence", output=tmp_path / "x",
                     max_steps=2, cache_dir=cache_dir, targets=("to_q",), text_preserve_weight=1.0)
    with pytest.raises(SafealignError, match="attn2.to_k,attn2.to_v"):
        train_expert(cfg, backbone=load_backbone(tiny_paths["sd1"]))
    assert not (tmp_path / "x").exists()


def test_hazard_kv_basis_is_shared_fixed_and_reads_hazard_words(tiny_paths, toy_dataset, cache_dir, tmp_path):
    """--kv-basis hazard: every expert's K/V LoRA A is the same fixed basis, which reads the hazard words' token
    states far more than the kept prompts'; B trains."""
    from safetensors.torch import load_file

    from safealign.data.dataset import PairedDataset
    from safealign.train.preservation import kept_prompts
    from safealign.train.text_basis import hazard_basis, hazard_states
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="all", output=tmp_path / "h",
                     max_steps=6, cache_dir=cache_dir, learning_rate=3e-3, targets=("attn2.to_k", "attn2.to_v"),
                     kv_basis="hazard")
    bb = load_backbone(tiny_paths["sd1"])
    folders = train_expert(cfg, backbone=bb)
    assert len(folders) >= 2
    sds = [load_file(str(f / "pytorch_lora_weights.safetensors")) for f in folders]
    a_keys = sorted(k for k in sds[0] if "lora_A" in k or "lora.down" in k)
    b_keys = sorted(k for k in sds[0] if "lora_B" in k or "lora.up" in k)
    assert a_keys and b_keys
    for sd in sds[1:]:
        for k in a_keys:
            assert torch.equal(sd[k], sds[0][k])
    assert all(float(sd[k].abs().max()) > 0 for sd in sds for k in b_keys)
    ds = PairedDataset(toy_dataset)
    every = ds.pairs(None, "train")
    enc = lambda ps: bb.encode_prompts(ps).encoder_hidden_states
    unsafe, safe = enc([p.unsafe_prompt for p in every]), enc([p.safe_prompt for p in every])
    kept = enc(kept_prompts(cfg, bb, ds))
    hazard_words = hazard_states(unsafe, safe).float()
    basis = hazard_basis(hazard_words, kept, cfg.rank)
    assert torch.allclose(sds[0][a_keys[0]].float(), basis, atol=1e-6)
    first = ((unsafe - safe).norm(dim=-1) > 1e-6).float().argmax(1)
    assert torch.equal(hazard_words, unsafe[torch.arange(len(unsafe)), first])
    read = lambda x: float((x.reshape(-1, x.shape[-1]) @ basis.T).pow(2).sum(1).mean())
    assert read(hazard_words) > 3 * read(kept[:-1]), (read(hazard_words), read(kept[:-1]))


def test_category_kv_basis_reads_own_hazard_words_not_other_categories(tiny_paths, toy_dataset, cache_dir, tmp_path):
    """--kv-basis category: each expert's fixed A reads its own category's hazard words far more than the other
    categories' hazard words and the kept prompts; the experts' bases differ and only B trains."""
    from safetensors.torch import load_file

    from safealign.data.dataset import PairedDataset
    from safealign.train.text_basis import hazard_states
    cfg = expert_cfg(model=tiny_paths["sd1"], dataset=toy_dataset, category="all", output=tmp_path / "c",
                     max_steps=4, cache_dir=cache_dir, learning_rate=3e-3, targets=("attn2.to_k", "attn2.to_v"),
                     kv_basis="category", rank=2, alpha=2)
    bb = load_backbone(tiny_paths["sd1"])
    folders = train_expert(cfg, backbone=bb)
    ds = PairedDataset(toy_dataset)
    every = ds.pairs(None, "train")
    enc = lambda ps: bb.encode_prompts(ps).encoder_hidden_states
    states = hazard_states(enc([p.unsafe_prompt for p in every]), enc([p.safe_prompt for p in every])).float()
    bases = []
    for f in folders:
        sd = load_file(str(f / "pytorch_lora_weights.safetensors"))
        a = sd[sorted(k for k in sd if "lora_A" in k or "lora.down" in k)[0]].float()
        assert all(float(sd[k].abs().max()) > 0 for k in sd if "lora_B" in k or "lora.up" in k)
        own = torch.tensor([p.category == f.name for p in every])
        read = lambda x, a=a: float((x @ a.T).pow(2).sum(1).mean())
        assert read(states[own]) > 3 * read(states[~own]), (f.name, read(states[own]), read(states[~own]))
        bases.append(a)
    assert not torch.allclose(bases[0], bases[1])
