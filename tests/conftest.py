"""Tiny seeded components built once per session (diffusers' get_dummy_components idea)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("SAFEALIGN_NO_PROGRESS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Saved tiny pipelines: {'sd1': path, 'sd2': path (v-prediction), 'sdxl': path}."""
    from safealign.testing import build_tiny_pipeline
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for fam in ("sd1", "sd2", "sdxl"):
        p = root / fam
        build_tiny_pipeline(fam, seed=0).save_pretrained(p)
        out[fam] = p
    return out


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    from safealign.testing import make_toy_dataset
    return make_toy_dataset(tmp_path_factory.mktemp("data") / "toy", pairs_per_category=16, size=16)


@pytest.fixture()
def cache_dir(tmp_path):
    return tmp_path / "cache"


def expert_cfg(**kw):
    """An ExpertConfig with fast defaults for tests."""
    from safealign.train.config import ExpertConfig
    base = dict(max_steps=20, beta=2000.0, learning_rate=1e-3, batch_size=4, checkpoint_every=0, seed=0,
                log_every=5)
    base.update(kw)
    return ExpertConfig(**{k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in base.items()})


def captioned_folder(folder, dataset, n: int, caption) -> Path:
    """A captioned image folder (``metadata.jsonl``) from the first ``n`` safe images of a toy dataset;
    ``caption(i)`` names image i."""
    d = Path(folder)
    d.mkdir()
    lines = []
    for i, f in enumerate(sorted((Path(dataset) / "images").glob("*_s.png"))[:n]):
        shutil.copy(f, d / f.name)
        lines.append(json.dumps({"file_name": f.name, "text": caption(i)}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return d
