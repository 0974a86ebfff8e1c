
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from safealign.errors import SafealignError
from safealign.lora import (
    LoraSpec,
    add_lora,
    export_kohya,
    load_into,
    load_lora,
    lora_state_dict,
    save_lora,
    validate_for_model,
)
from safealign.testing import build_tiny_pipeline


def _random_b(unet, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    for n, p in unet.named_parameters():
        if "lora_B" in n:  # a LoRA test must start from a non-zero B, or it passes vacuously
            p.data = torch.randn(p.shape, generator=g) * std


def _images(pipe, prompt="a red skull"):
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                output_type="np").images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_saved_lora_reloads_in_diffusers_identically(tmp_path, family):
    pipe = build_tiny_pipeline(family)
    base = _images(pipe)
    spec = LoraSpec(rank=4, alpha=8.0)  # alpha != r: lost without the metadata header
    add_lora(pipe.unet, spec)
    _random_b(pipe.unet)
    mine = _images(pipe)
    assert np.abs(mine - base).max() > 1e-2  # the LoRA changes the picture
    save_lora(tmp_path, lora_state_dict(pipe.unet), spec)
    fresh = build_tiny_pipeline(family)
    fresh.load_lora_weights(tmp_path)
    assert np.abs(_images(fresh) - mine).max() < 1e-5
    # kohya/webui export of the same adapter loads to the same images
    export_kohya(tmp_path, tmp_path / "kohya.safetensors")
    k = build_tiny_pipeline(family)
    k.load_lora_weights(tmp_path / "kohya.safetensors")
    assert np.abs(_images(k) - mine).max() < 1e-5


def test_header_carries_config_and_roundtrips(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    spec = LoraSpec(rank=2, alpha=6.0, targets=("to_q", "to_v"))
    add_lora(pipe.unet, spec)
    _random_b(pipe.unet)
    sd = lora_state_dict(pipe.unet)
    save_lora(tmp_path, sd, spec)
    sd2, spec2 = load_lora(tmp_path)
    assert spec2.rank == 2 and spec2.alpha == 6.0 and set(spec2.targets) == {"to_q", "to_v"}
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    other = build_tiny_pipeline("sd1")
    load_into(other.unet, tmp_path, adapter_name="x")
    assert np.abs(_images(other) - _images(pipe)).max() < 1e-5


def test_missing_header_assumes_alpha_equals_rank(tmp_path, caplog):
    pipe = build_tiny_pipeline("sd1")
    add_lora(pipe.unet, LoraSpec(rank=4, alpha=4.0))
    _random_b(pipe.unet)
    sd = {f"unet.{k}": v for k, v in lora_state_dict(pipe.unet).items()}
    save_file(sd, str(tmp_path / "pytorch_lora_weights.safetensors"))
    _, spec = load_lora(tmp_path)
    assert spec.rank == spec.alpha == 4
    assert "no lora_adapter_metadata" in caplog.text


def test_bad_loras_are_refused(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(SafealignError, match="match no"):
        add_lora(pipe.unet, LoraSpec(targets=("not_a_module",)))
    with pytest.raises(SafealignError, match="rank"):
        LoraSpec(rank=0)
    add_lora(pipe.unet, LoraSpec())
    _random_b(pipe.unet)
    sd = lora_state_dict(pipe.unet)
    bad = dict(sd)
    k = next(k for k in bad if "lora_B" in k)
    bad[k] = bad[k].clone()
    bad[k][0, 0] = float("nan")
    with pytest.raises(SafealignError, match="NaN"):
        save_lora(tmp_path, bad, LoraSpec())
    (tmp_path / "w.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(SafealignError, match="safetensors"):
        load_lora(tmp_path / "w.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SafealignError, match="safetensors"):
        load_lora(tmp_path / "junk.safetensors")
    # a LoRA made for another architecture
    xl = build_tiny_pipeline("sdxl")
    with pytest.raises(SafealignError, match="another"):
        validate_for_model(sd, xl.unet)


def test_kohya_keys_and_alpha(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    spec = LoraSpec(rank=4, alpha=2.0)
    add_lora(pipe.unet, spec)
    save_lora(tmp_path, lora_state_dict(pipe.unet), spec)
    out = export_kohya(tmp_path, tmp_path / "k.safetensors")
    from safetensors.torch import load_file
    k = load_file(str(out))
    alphas = [v.item() for n, v in k.items() if n.endswith(".alpha")]
    assert alphas and all(a == pytest.approx(2.0) for a in alphas)
    assert all(n.startswith("lora_unet_") for n in k)
    assert any(n.endswith(".lora_down.weight") for n in k) and any(n.endswith(".lora_up.weight") for n in k)


def test_lora_cli_info_and_export(tmp_path, capsys):
    from safealign import cli
    pipe = build_tiny_pipeline("sd1")
    spec = LoraSpec(rank=4, alpha=8.0)
    add_lora(pipe.unet, spec)
    _random_b(pipe.unet)
    save_lora(tmp_path, lora_state_dict(pipe.unet), spec)
    assert cli.main(["lora", "info", str(tmp_path)]) == 0
    assert "rank 4, alpha 8 (scale 2)" in capsys.readouterr().out
    dst = tmp_path / "k.safetensors"
    assert cli.main(["lora", "export", str(tmp_path), str(dst)]) == 0 and dst.is_file()
    assert cli.main(["lora", "export", str(tmp_path), str(dst)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["lora", "info", str(tmp_path / "missing")]) == 2
