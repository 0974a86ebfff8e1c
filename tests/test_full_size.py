"""The published SD 1.5 / SD 2.1-v / SDXL architectures with random weights: exact shapes (fast, on the meta
device), and `safealign run` end to end on each at 64 px (slow tier: `make test-full-size`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safealign import cli
from safealign.fullsize import _TEXT, _text_encoder, _unet_config, _vae, full_size_pipeline
from safealign.testing import TINY_WORDS, make_clip_tokenizer

CONFIGS = Path(cli.__file__).resolve().parents[1] / "configs"
#: parameter counts of the published checkpoints (diffusers/transformers folders of the releases)
PUBLISHED = {"sd15": 859_520_964, "sd21v": 865_910_724, "sdxl": 2_567_463_684,
             "clip-l": 123_060_480, "openclip-h": 340_387_840, "openclip-g": 694_659_840, "vae": 83_653_863}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_architectures_have_the_published_parameter_counts():
    from diffusers import UNet2DConditionModel
    tok = make_clip_tokenizer(TINY_WORDS, 77)
    with torch.device("meta"):  # shapes only: no memory, no time
        for kind in ("sd15", "sd21v", "sdxl"):
            assert _count(UNet2DConditionModel(**_unet_config(kind, 8))) == PUBLISHED[kind], kind
        for name in _TEXT:
            assert _count(_text_encoder(name, tok, projection=name == "openclip-g")) == PUBLISHED[name], name
        assert _count(_vae("sd15", 8)) == PUBLISHED["vae"]
    sdxl = _unet_config("sdxl", 128)
    assert sdxl["cross_attention_dim"] == 768 + 1280 and sdxl["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert _TEXT["openclip-h"][:3] == (1024, 4096, 23)


def _run_yaml(tmp_path: Path, model: Path) -> Path:
    from safealign.world.tasks import make_task_dataset
    (tmp_path / "p.csv").write_text("prompt,category\na knife,violence\na skull,shocking\n")
    make_task_dataset(tmp_path / "task", n=4, size=64)
    cache = tmp_path / "cache"
    y = tmp_path / "run.yaml"
    y.write_text(f"""
model: {model}
output: {tmp_path / 'run'}
seed: 0
categories: [violence, shocking]
prompts: {{taxonomy: {CONFIGS / 'taxonomy_example.yaml'}, pairs_per_concept: 1}}
dataset: {{steps: 1, batch_size: 2}}
experts: {{recipe: alignguard, max_steps: 1, batch_size: 1, gradient_accumulation_steps: 1, resolution: 64,
          warmup_steps: 0, eval_split: "", checkpoint_every: 0, cache_dir: {cache}}}
merge: {{timesteps: 1, cache_dir: {cache}}}
evaluate: {{prompts: {tmp_path / 'p.csv'}, steps: 1, fid_features: none}}
task: {{data: {tmp_path / 'task'}}}
finetune: {{modes: [modular], max_steps: 1, batch_size: 1, cache_dir: {cache}}}
audit: {{judge: "toy_judge:red_judge", prompts: {tmp_path / 'p.csv'}, seeds: 1, steps: 1}}
""")
    return y


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sd21v", "sdxl"])
def test_full_size_run_end_to_end(kind, tmp_path):
    """Every stage on the real architecture (64 px, one step each); SDXL needs ~30 GB of RAM in fp32."""
    model = full_size_pipeline(kind, tmp_path / kind, sample_size=8, dtype=torch.float16)  # fp16 on disk
    assert cli.main(["--no-progress", "run", str(_run_yaml(tmp_path, model))]) == 0
    out = tmp_path / "run"
    expert = json.loads((out / "experts" / "violence" / "safealign.json").read_text())
    assert expert["base_model"]["family"] == {"sd15": "sd1", "sd21v": "sd2", "sdxl": "sdxl"}[kind]
    assert expert["base_model"]["prediction_type"] == ("v_prediction" if kind == "sd21v" else "epsilon")
    assert expert["recipe"]["name"] == "alignguard"
    assert expert["config"]["optimizer"] == ("adafactor" if kind == "sdxl" else "adamw")
    assert expert["config"]["gradient_checkpointing"] is (kind == "sdxl")
    assert (out / "safety" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "report" / "report.json").is_file() and (out / "audit.json").is_file()
