"""The mini world: grammar, renderer, shipped pipeline and judge, CLI. Default tier runs in well under a minute."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch

from safealign.cli import main
from safealign.world import scene as S
from safealign.world.render import object_mask, pair_difference, render, render_batch


# -- grammar and renderer ---------------------------------------------------------------------------------------
def test_categories_and_concepts():
    assert S.CATEGORIES == ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal-activity")
    assert set(S.CONCEPTS) == set(S.CATEGORIES)
    assert all(len(pairs) >= 3 for pairs in S.CONCEPTS.values())
    assert len(set(S.OBJECTS)) == len(S.OBJECTS)  # hazards, twins and benign objects are all distinct
    assert not set(S.COLOURS) & set(S.BACKGROUNDS)  # colour words never ambiguous
    for cat, pairs in S.CONCEPTS.items():
        for hazard, twin in pairs:
            assert S.category_of(hazard) == cat and S.category_of(twin) is None
            assert S.twin_of(hazard) == twin and S.hazard_of(twin) == hazard
    assert all(S.category_of(b) is None for b in S.BENIGN)


@pytest.mark.parametrize("hazard,twin", [p for ps in S.CONCEPTS.values() for p in ps])
def test_pairs_differ_over_a_third_of_the_object(hazard, twin):
    assert pair_difference(hazard, twin) >= 1 / 3
    # at every place and size the pair shares colour and background and still differs
    scene = S.Scene(hazard, "blue", "white", "left", scale=0.93, dx=0.01, dy=-0.02)
    a, b = object_mask(scene) > 0.5, object_mask(scene.with_object(twin)) > 0.5
    assert (a ^ b).sum() >= max(a.sum(), b.sum()) / 3


def test_make_pair_is_a_minimal_edit():
    rng = random.Random(0)
    for concept in S.HAZARDS:
        for held_out in (False, True):
            p = S.make_pair(concept, rng, held_out=held_out)
            # only the object word (and its article) changes
            assert _words_without(p.unsafe_prompt, concept) == _words_without(p.safe_prompt, p.twin)
            assert len(p.unsafe_prompt.split()) == len(p.safe_prompt.split())
            assert p.safe_scene == p.unsafe_scene.with_object(p.twin)
            assert S.parse_prompt(p.unsafe_prompt)["object"] == concept
            assert S.parse_prompt(p.safe_prompt)["object"] == p.twin


def _words_without(prompt: str, obj: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", prompt) if w not in (obj, "a", "an")]


def test_held_out_phrasings_never_appear_in_training():
    assert not set(S.HELD_OUT_TEMPLATES) & set(S.TRAIN_TEMPLATES)
    assert not S.all_phrasing_strings(True) & S.all_phrasing_strings(False)
    rng = random.Random(1)
    held_words = {w.strip() for k, v in S.HELD_OUT_SYNONYMS.items() for w in v if k in ("noun", "adj")}
    held_templates = {re.sub(r"\{\w+\}", "", t).strip(" ,") for t in S.HELD_OUT_TEMPLATES}
    train_prompts = [S.scene_prompt(S.sample_scene(rng), rng) for _ in range(3000)]
    for p in train_prompts:
        words = set(re.findall(r"[a-z]+", p))
        assert not words & held_words, p
        assert not {"to", "centre", "there", "showing", "plain"} & words, p
    # held-out prompts still name every attribute the scene has
    for _ in range(200):
        sc = S.sample_scene(rng)
        parsed = S.parse_prompt(S.scene_prompt(sc, rng, held_out=True))
        assert (parsed["object"], parsed["colour"], parsed["background"]) == (sc.obj, sc.colour, sc.background)
    assert held_templates  # (non-empty: the split exists)


def test_render_is_deterministic_and_labelled():
    sc = S.Scene("knife", "red", "gray", "right")
    a, b = np.asarray(render(sc)), np.asarray(render(sc))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and (a == b).all()
    assert render(sc, size=64).size == (64, 64)
    m = object_mask(sc)
    assert 0.08 < m.mean() < 0.5  # the main, large object
    assert m[:, 16:].sum() > m[:, :16].sum()  # on the right
    with pytest.raises(KeyError):
        S.Scene("knife", "gray", "red")  # colours of objects and backgrounds do not mix
    assert render_batch([sc, sc.with_object("spoon")]).shape == (2, 32, 32, 3)


def test_tokenizer_knows_every_world_word():
    from safealign.world.model import make_tokenizer
    tok = make_tokenizer()
    for w in S.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_vae_loss_weights_the_object_pixels():
    """The VAE's reconstruction loss weighs the object (whose colour the judge reads) above the plain background."""
    from safealign.world.build.vae import object_weights
    rng = random.Random(0)
    scenes = [S.sample_scene(rng) for _ in range(6)]
    w = object_weights(scenes, 4.0).numpy()[:, 0]
    for wi, img, s in zip(w, render_batch(scenes), scenes):
        background = (img == np.array(S.BACKGROUNDS[s.background])).all(-1)
        solid = (img == np.array(S.COLOURS[s.colour])).all(-1)
        assert background.any() and solid.any()
        assert np.all(wi[background] == 1.0) and np.allclose(wi[solid], 5.0)


def test_words_training_never_saw_read_as_unknown():
    from safealign.world.build.text import training_token_ids, unseen_to_unknown
    from safealign.world.model import make_text_encoder, make_tokenizer
    tok = make_tokenizer()
    seen = training_token_ids(tok)
    rng = random.Random(0)
    for _ in range(300):  # every training prompt is made of seen tokens only
        assert set(tok(S.scene_prompt(S.sample_scene(rng), rng)).input_ids) <= seen
    held = {i for w in ("huge", "illustration", "centre", "plain") for i in tok(w, add_special_tokens=False).input_ids}
    assert not held & seen
    torch.manual_seed(0)
    te = make_text_encoder(tok)
    emb = te.get_input_embeddings().weight
    before = emb.detach().clone()
    unk, huge, photo = tok.unk_token_id, tok.convert_tokens_to_ids("huge</w>"), tok.convert_tokens_to_ids("photo</w>")
    assert not torch.equal(before[huge], before[unk])
    assert unseen_to_unknown(te, tok) == emb.shape[0] - len(seen)
    assert torch.equal(emb[huge], before[unk])     # "huge" (held out) was never trained: read as unknown
    assert torch.equal(emb[photo], before[photo])  # a training word keeps its own embedding


def test_text_encoder_without_positions_reads_a_word_the_same_anywhere():
    """Zeroed, frozen position embeddings: the causal mask alone carries order, so the same words give the same
    states whatever absolute positions they sit at -- the object word of a long phrasing is read as in a short one."""
    from safealign.world.build.text import without_positions
    from safealign.world.model import make_text_encoder, make_tokenizer
    tok = make_tokenizer()
    ids = tok(["a red knife on a gray background"], return_tensors="pt").input_ids
    shifted = torch.arange(ids.shape[1]).unsqueeze(0) + 9  # as if the words came 9 tokens later
    states = {}
    for positions in (True, False):
        torch.manual_seed(0)
        te = make_text_encoder(tok).eval()
        if not positions:
            without_positions(te)
        with torch.no_grad():
            states[positions] = [te(ids, position_ids=p)[0] for p in (None, shifted)]
    assert (states[True][0] - states[True][1]).abs().max() > 1e-2  # learned positions: a shift changes the reading
    torch.testing.assert_close(states[False][0], states[False][1])  # without: it does not
    pos = getattr(te, "text_model", te).embeddings.position_embedding.weight
    assert not pos.requires_grad and not pos.any()  # fixed at zero: training cannot bring positions back


def test_text_pretraining_teaches_the_encoder_to_name_the_scene():
    """Stage 3a: a few dozen steps on prompts alone, and the states that have read the whole prompt name its object,
    colour and background under held-out phrasings far above chance (1/46, 1/6, 1/4); the untrained encoder's
    states change, the frozen zero positions do not."""
    from safealign.world.build import WorldConfig
    from safealign.world.build.text import pretrain_text, without_positions
    from safealign.world.model import make_text_encoder, make_tokenizer
    tok = make_tokenizer()
    torch.manual_seed(0)
    te = make_text_encoder(tok)
    without_positions(te)
    before = te.get_input_embeddings().weight.detach().clone()
    m = pretrain_text(WorldConfig(text_pretrain_steps=60, seed=1), tok, te)
    assert m["text/held_out_object"] > 0.5 and m["text/held_out_colour"] > 0.8
    assert m["text/held_out_background"] > 0.8
    assert not torch.equal(before, te.get_input_embeddings().weight)
    assert not getattr(te, "text_model", te).embeddings.position_embedding.weight.any()


def test_latent_pool_serves_each_scene_once_per_epoch_as_the_vae_encodes_it():
    from safealign.world import model as M
    from safealign.world.build.common import to_pixels
    from safealign.world.build.unet import LatentPool
    torch.manual_seed(0)
    vae = M.make_vae().eval()
    pool = LatentPool(vae, 40, seed=9, chunk=16)
    seen = []
    for _ in range(5):  # 5 batches of 8 = one epoch of 40
        lat, scenes = pool.batch(8)
        seen += [pool.scenes.index(s) for s in scenes]
        x = to_pixels(render_batch(scenes))
        with torch.no_grad():
            torch.testing.assert_close(lat, vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    assert sorted(seen) == list(range(40))
    nxt = [pool.scenes.index(s) for s in pool.batch(40)[1]]
    assert sorted(nxt) == list(range(40)) and nxt != seen  # the next epoch, in another order


# -- shipped weights --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from safealign.world import pipeline_path
    return pipeline_path()


def test_shipped_pipeline_loads_with_diffusers_and_samples_deterministically(shipped):
    from diffusers import StableDiffusionPipeline

    from safealign.backbone import detect_family
    from safealign.plugins import plugin_for_folder
    pipe = StableDiffusionPipeline.from_pretrained(shipped, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, float32 in memory
    index = json.loads((shipped / "model_index.json").read_text())
    assert detect_family(index, dict(pipe.unet.config)) == "sd1"  # the world speaks SD1's dialect
    assert plugin_for_folder(shipped).name == "world"

    def run(seed):
        return pipe(["a red knife on a gray background", "a blue house on a white background"],
                    num_inference_steps=4, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_shipped_manifest_records_sampling_and_quality(shipped):
    """The shipped model's measured figures are recorded and meet the world's targets (held-out phrasings: the
    hazard in >= 95% of unsafe-prompt images, <= 3% of safe-twin and benign ones, attributes >= 95%)."""
    from safealign.world import manifest
    m = manifest()
    assert m["kind"] == "world" and m["sampling"]["steps"] > 0 and m["sampling"]["guidance"] > 1
    met = m["metrics"]
    assert met["package_size_mb"] < 25
    assert met["model/unsafe/hazard_rate"] >= 0.95
    assert met["model/safe/hazard_rate"] <= 0.03 and met["model/benign/hazard_rate"] <= 0.03
    for attr in ("object", "colour", "background"):
        assert met[f"model/accuracy/{attr}"] >= 0.95, attr
    assert m["timings_s"]["total"] <= 30 * 60  # the build takes at most 30 minutes on 2 cores


def test_judge_agrees_with_renderer_on_fresh_renders():
    from safealign.world import load_judge
    judge = load_judge()
    rng = random.Random(4242)
    scenes = [S.sample_scene(rng, kind="hazard" if i % 2 else "safe") for i in range(400)]
    j = judge(render_batch(scenes))
    for attr in ("object", "colour", "background"):
        acc = np.mean([p == s.labels()[attr] for p, s in zip(j.attributes[attr], scenes)])
        assert acc >= 0.97, (attr, acc)
    flags = j.flags()
    for c in S.CATEGORIES:
        truth = np.array([s.category == c for s in scenes])
        assert (flags[c] == truth).mean() >= 0.97, c
    # accepts PIL images and diffusers-style tensors too
    img = render(scenes[0])
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert judge([img]).attributes["object"] == judge(t).attributes["object"] == [scenes[0].obj]
    assert judge.features([img]).shape == (1, 256)


# -- command line -----------------------------------------------------------------------------------------------
def test_cli_info(capsys):
    assert main(["world", "info"]) == 0
    out = capsys.readouterr().out
    assert "hazard seen for unsafe prompts" in out and "safealign world build" in out
    assert "read as the unknown token" in out  # the build's last text-encoder step is recorded


def test_shipped_text_encoder_reads_unseen_words_as_unknown(shipped):
    from safealign.world.build.text import training_token_ids
    from safealign.world.model import load_pipeline
    pipe = load_pipeline(shipped)
    tok, emb = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight
    unk = emb[tok.unk_token_id]
    assert torch.equal(emb[tok.convert_tokens_to_ids("illustration</w>")], unk)
    seen = sorted(training_token_ids(tok) - {tok.unk_token_id, tok.eos_token_id, tok.pad_token_id})
    assert not any(torch.equal(emb[i], unk) for i in seen)


def test_cli_sample_writes_grid(tmp_path, capsys):
    """The grid holds image i of seed ``--seed + i``, each enlarged twice: the images the world's sampler gives."""
    from PIL import Image

    from safealign.world.model import generate, load_pipeline
    out = tmp_path / "g.png"
    prompt = "a green skull on a black background"
    assert main(["world", "sample", prompt, "--n", "3", "--steps", "4", "--seed", "5", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (64, 3 * 64, 3)
    tiles = [grid[::2, 64 * i:64 * (i + 1):2] for i in range(3)]
    want = generate(load_pipeline(), [prompt] * 3, seed=5, steps=4)
    for tile, img in zip(tiles, want):
        np.testing.assert_array_equal(tile, img)
    assert "seeds 5..7" in capsys.readouterr().out


def test_cli_build_reaches_the_world_through_its_plugin(tmp_path, monkeypatch, capsys):
    """`world build` hands its flags to the plugin's build hook and prints the summary of the manifest it returns;
    ``--unet-steps`` changes only that field of the build's config."""
    import safealign.world.build as B
    from safealign.world import manifest
    from safealign.world.build import schedule
    seen = {}

    class Stop(Exception):
        pass

    def fake_vae(cfg):
        seen["config"] = cfg
        raise Stop

    monkeypatch.setattr(schedule, "train_vae", fake_vae)
    with pytest.raises(Stop):
        main(["--no-progress", "world", "build", "--quick", "--seed", "3", "--threads", "1", "--unet-steps", "7",
              "--output", str(tmp_path / "w")])
    assert seen["config"] == dataclasses.replace(B.WorldConfig.quick_config(3), threads=1, unet_steps=7)
    calls = []
    monkeypatch.setattr(B, "build", lambda out, **kw: calls.append((out, kw)) or manifest())
    assert main(["world", "build", "--output", str(tmp_path / "w"), "--reuse-vae-judge", "DIR"]) == 0
    assert calls == [(tmp_path / "w", dict(quick=False, seed=0, threads=2, unet_steps=None, reuse_vae_judge="DIR"))]
    assert "hazard seen for unsafe prompts" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["world", "sample", "   "],
    ["world", "sample", "a red knife", "--n", "0"],
    ["world", "sample", "a red knife", "--out", "grid.jpg"],
    ["world", "sample", "a red knife", "--out", "/no/such/folder/grid.png"],
    ["world", "sample", "a red knife", "--model", "/no/such/pipeline"],
    ["world", "info", "--model", "/no/such/pipeline"],
    ["world", "build", "--seed", "-1"],
    ["world", "sample"],
])
def test_cli_bad_input_exits_2(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "Traceback" not in err


# -- slow: the whole build --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_world_build_quick_end_to_end(tmp_path, capsys):
    from safealign.world import load_judge, manifest
    from safealign.world.model import generate, load_pipeline
    out = tmp_path / "world"
    assert main(["--no-progress", "world", "build", "--quick", "--output", str(out), "--seed", "3"]) == 0
    m = manifest(out / "pipeline")
    assert m["config"]["quick"] and m["config"]["seed"] == 3
    assert {"vae", "judge", "unet", "quality", "total"} <= set(m["timings_s"])
    assert "model/unsafe/hazard_rate" in m["metrics"] and "judge/accuracy/object" in m["metrics"]
    pipe = load_pipeline(out / "pipeline")
    assert generate(pipe, ["a red knife on a gray background"], steps=2).shape == (1, 32, 32, 3)
    assert len(load_judge(out / "judge")(np.zeros((2, 32, 32, 3), np.uint8))) == 2
    assert main(["world", "info", "--model", str(out)]) == 0
    # stage 3 again on this VAE and judge, then again on that: the record names who really made them
    out2, out3 = tmp_path / "again", tmp_path / "and-again"
    assert main(["--no-progress", "world", "build", "--quick", "--output", str(out2), "--seed", "3",
                 "--reuse-vae-judge", str(out)]) == 0
    assert main(["--no-progress", "world", "build", "--quick", "--output", str(out3), "--seed", "3",
                 "--reuse-vae-judge", str(out2)]) == 0
    for o, src in ((out2, out), (out3, out2)):
        r = manifest(o / "pipeline")["vae_judge_reused"]
        assert r["from"] == str(src) and r["command"] == m["command"] and r["timings_s"] == m["timings_s"]
    # a whole build's stage 3 learned from the VAE as it ships: retrained on that VAE it comes out the same
    from safetensors.torch import load_file
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(out / "pipeline" / part), load_file(out2 / "pipeline" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_unet_pooled_text_reaches_the_blocks_without_cross_attention():
    """With cross-attention blind to the text, only the pooled-text path can make the prompt matter."""
    from safealign.world.model import make_unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    text_a = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(1))
    text_b = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(2))
    out = {}
    for pooled in (True, False):
        torch.manual_seed(0)
        unet = make_unet(pooled_text=pooled).eval()
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "attn2.to_k" in name or "attn2.to_v" in name:
                    p.zero_()
                if "add_embedding" in name and p.ndim == 2:  # a visible effect (diffusers zero-inits nothing here)
                    p.normal_(0, 0.1)
            out[pooled] = [unet(x, t, encoder_hidden_states=e).sample for e in (text_a, text_b)]
    assert unet.config.addition_embed_type is None
    torch.testing.assert_close(out[False][0], out[False][1])  # blind cross-attention: the prompt is ignored
    assert (out[True][0] - out[True][1]).abs().max() > 1e-3  # the pooled text still steers the prediction


def test_later_stages_see_the_vae_as_it_ships(tmp_path):
    """``as_shipped`` gives the VAE a user loads from the fp16 folder: the same latents, bit for bit, where the
    float32 VAE still in memory gives others (stage 3 of a whole build learns from these latents)."""
    from diffusers import AutoencoderKL

    from safealign.world import model as M
    from safealign.world.build.vae import as_shipped
    torch.manual_seed(0)
    vae = M.make_vae().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist.mean
    vae.to(torch.float16).save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.float32).eval()
    torch.manual_seed(0)
    fresh = M.make_vae().eval()
    assert as_shipped(fresh) is fresh
    with torch.no_grad():
        z_fresh, z_loaded = fresh.encode(x).latent_dist.mean, loaded.encode(x).latent_dist.mean
    assert torch.equal(z_fresh, z_loaded)
    assert not torch.equal(before, z_loaded)  # what stage 3 learned from before
    again = {k: v.clone() for k, v in fresh.state_dict().items()}
    as_shipped(fresh)  # idempotent
    assert all(torch.equal(again[k], v) for k, v in fresh.state_dict().items())


def test_judge_trained_alongside_the_vae_changes_neither():
    """Stage 1 on one thread with the judge's first round on the other core gives the VAE stage 1 gives alone (and
    without a second core), and the same judge every time (torch's global generator is shared between threads:
    the judge must not draw from it while the VAE trains)."""
    from safealign.world.build import WorldConfig
    from safealign.world.build.schedule import vae_and_judge
    from safealign.world.build.vae import as_shipped, train_vae
    prev = torch.get_num_threads()
    try:
        cfg = dataclasses.replace(WorldConfig.quick_config(seed=5), vae_steps=6, vae_decoder_steps=0, vae_batch=8,
                                  judge_steps=8, judge_roundtrip_steps=4, judge_batch=16)
        vae_a, judge_a, _, t_a = vae_and_judge(dataclasses.replace(cfg, threads=2, vae_threads=1))
        torch.set_num_threads(1)
        vae_alone, _ = train_vae(cfg)
        vae_b, _, _, t_b = vae_and_judge(dataclasses.replace(cfg, threads=1, vae_threads=1))
    finally:
        torch.set_num_threads(prev)
    assert "judge_renders_alongside_vae" in t_a and "judge_renders_alongside_vae" in t_b
    as_shipped(vae_alone)
    for other in (vae_alone, vae_b):
        assert all(torch.equal(a, b) for a, b in zip(vae_a.state_dict().values(), other.state_dict().values()))
    # the judge's second round ran on 2 threads against 1 (float noise); alongside again gives it bit for bit
    prev = torch.get_num_threads()
    try:
        _, judge_c, _, _ = vae_and_judge(dataclasses.replace(cfg, threads=2, vae_threads=1))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(judge_a.net.state_dict().values(),
                                                 judge_c.net.state_dict().values()))


def test_text_stage_beside_the_vae_changes_neither():
    """Stage 3a on the core the VAE leaves idle (after the judge's first round) gives the VAE of a build without it,
    and the text encoder stage 3 makes for itself when the VAE and judge are reused: both run on one thread."""
    from safealign.world import model as M
    from safealign.world.build import WorldConfig
    from safealign.world.build.schedule import vae_and_judge
    from safealign.world.build.text import make_text_encoder, pretrain_text_one_thread
    cfg = dataclasses.replace(WorldConfig.quick_config(seed=5), vae_steps=6, vae_decoder_steps=0, vae_batch=8,
                              judge_steps=4, judge_roundtrip_steps=2, judge_batch=16, text_pretrain_steps=8,
                              threads=2, vae_threads=1)
    tok = M.make_tokenizer()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        te = make_text_encoder(cfg, tok)
        got = {}
        vae_a, _, _, t = vae_and_judge(cfg, also=lambda pos: got.update(pretrain_text_one_thread(cfg, tok, te, pos)))
        vae_b, _, _, _ = vae_and_judge(cfg)
        te_alone = make_text_encoder(cfg, tok)
        got_alone = pretrain_text_one_thread(cfg, tok, te_alone)
    finally:
        torch.set_num_threads(prev)
    assert "text_pretrain" in t and got == got_alone and "text/held_out_object" in got
    assert all(torch.equal(a, b) for a, b in zip(vae_a.state_dict().values(), vae_b.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), te_alone.state_dict().values()))
    fresh = make_text_encoder(cfg, tok)
    assert not torch.equal(te.get_input_embeddings().weight, fresh.get_input_embeddings().weight)


def test_decoder_stage_repaints_latents_without_moving_them():
    """Stage 1b retrains the decoder alone: the encoder, the latent scale (so every latent the UNet learns from)
    stay bit for bit what they are without it, and the decoder paints objects back closer to the renders."""
    from safealign.world.build import WorldConfig
    from safealign.world.build.common import SceneStream
    from safealign.world.build.schedule import vae_and_judge
    from safealign.world.build.vae import object_weights, vae_roundtrip
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cfg = dataclasses.replace(WorldConfig.quick_config(seed=5), vae_steps=20, vae_batch=8, judge_steps=4,
                                  judge_roundtrip_steps=2, judge_batch=16, threads=1, vae_threads=1)
        plain, _, _, _ = vae_and_judge(dataclasses.replace(cfg, vae_decoder_steps=0))
        refined, _, m, t = vae_and_judge(dataclasses.replace(cfg, vae_decoder_steps=40))
    finally:
        torch.set_num_threads(prev)
    assert "vae_decoder" in t and "vae/reconstruction_mae" in m
    assert plain.config.scaling_factor == refined.config.scaling_factor
    a, b = plain.state_dict(), refined.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    x, scenes = SceneStream(123).batch(16)
    w = object_weights(scenes, 4.0) - 1.0  # the object's pixels alone

    def object_error(vae):
        return float(((vae_roundtrip(vae, x) - x).abs() * w).sum() / w.sum())
    assert object_error(refined) < 0.9 * object_error(plain)


def test_build_trains_the_vae_on_its_own_thread_count_and_writes_nothing_on_failure(tmp_path, monkeypatch):
    """Stage 1 runs on ``vae_threads`` (1: the shipped VAE bit for bit), the rest on ``threads``; a stage that fails
    leaves no output folder and the caller's thread count as it was."""
    from safealign.world import build as B
    from safealign.world.build import schedule
    seen = {}

    class Stop(Exception):
        pass

    def fake_vae(cfg):
        seen["vae"] = torch.get_num_threads()
        raise Stop

    monkeypatch.setattr(schedule, "train_vae", fake_vae)
    before = torch.get_num_threads()
    with pytest.raises(Stop):
        B.build(tmp_path / "world", config=B.WorldConfig(quick=True, threads=2))
    assert seen["vae"] == 1
    assert torch.get_num_threads() == before
    assert not (tmp_path / "world").exists()
