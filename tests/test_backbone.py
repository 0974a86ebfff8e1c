import json

import pytest
import torch

from safealign.backbone import load_backbone, resolve_model
from safealign.errors import SafealignError


def test_family_detection(tiny_paths):
    fams = {f: load_backbone(p) for f, p in tiny_paths.items()}
    assert {f: b.family for f, b in fams.items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    assert fams["sd2"].prediction_type == "v_prediction"
    assert fams["sd1"].prediction_type == "epsilon"


def test_sdxl_conditioning_has_pooled_and_time_ids(tiny_paths):
    b = load_backbone(tiny_paths["sdxl"])
    c = b.encode_prompts(["a red skull", "a cat"])
    te1, te2 = b.pipe.text_encoder.config.hidden_size, b.pipe.text_encoder_2.config.hidden_size
    assert c.encoder_hidden_states.shape[-1] == te1 + te2  # both encoders, concatenated
    assert c.added_cond_kwargs["text_embeds"].shape == (2, b.pipe.text_encoder_2.config.projection_dim)
    r = b.resolution
    assert c.added_cond_kwargs["time_ids"][0].tolist() == [r, r, 0, 0, r, r]
    assert not torch.allclose(c.encoder_hidden_states[0], c.encoder_hidden_states[1])
    # the pipeline itself computes the same embeddings
    pe, _, pooled, _ = b.pipe.encode_prompt(["a red skull"], do_classifier_free_guidance=False)
    assert torch.allclose(pe[0], c.encoder_hidden_states[0], atol=1e-5)
    assert torch.allclose(pooled[0], c.added_cond_kwargs["text_embeds"][0], atol=1e-5)


def test_sd1_conditioning_matches_pipeline(tiny_paths):
    b = load_backbone(tiny_paths["sd1"])
    pe, _ = b.pipe.encode_prompt(["a green knife"], "cpu", 1, False)
    assert torch.allclose(b.encode_prompts(["a green knife"]).encoder_hidden_states, pe, atol=1e-6)


def test_targets_epsilon_and_v(tiny_paths):
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    eps = load_backbone(tiny_paths["sd1"])
    assert torch.equal(eps.target(x, n, t), n)
    v = load_backbone(tiny_paths["sd2"])
    a = v.noise_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(v.target(x, n, t), a * n - s * x, atol=1e-6)


def test_vae_encoding_is_deterministic(tiny_paths):
    b = load_backbone(tiny_paths["sd1"])
    px = torch.rand(2, 3, b.resolution, b.resolution) * 2 - 1
    z1, z2 = b.encode_images(px), b.encode_images(px)
    assert torch.equal(z1, z2) and z1.shape[1] == 4


def test_not_a_pipeline(tmp_path, tiny_paths):
    with pytest.raises(SafealignError, match="not a diffusers pipeline"):
        load_backbone(tmp_path)
    with pytest.raises(SafealignError, match="does not exist"):
        resolve_model(tmp_path / "missing" / "x")
    with pytest.raises(SafealignError, match="not in the local Hugging Face cache"):
        load_backbone("someone/not-cached-model-xyz")
    d = tmp_path / "other"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(SafealignError, match="FluxPipeline"):
        load_backbone(d)


def test_fingerprint_stable_and_distinct(tiny_paths):
    a, b = load_backbone(tiny_paths["sd1"]), load_backbone(tiny_paths["sd1"])
    assert a.fingerprint() == b.fingerprint() != load_backbone(tiny_paths["sd2"]).fingerprint()


def test_fingerprint_ignores_attached_adapters(tiny_paths):
    from safealign.lora import LoraSpec, add_lora
    b = load_backbone(tiny_paths["sd1"])
    before = b.fingerprint()
    add_lora(b.unet, LoraSpec())
    assert b.fingerprint() == before
