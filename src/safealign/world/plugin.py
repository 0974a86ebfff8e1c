"""The mini world as a model plugin (:mod:`safealign.plugins`): the only door from the core into this package."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path


class WorldPlugin:
    name = "world"
    default_judge = "world"

    def pipeline_path(self) -> Path:
        from . import pipeline_path
        return pipeline_path()

    def sampling_defaults(self, path: str | Path) -> tuple[int, float]:
        from .model import sampling_defaults
        d = sampling_defaults(path)
        return d["steps"], d["guidance"]

    def taxonomy(self):
        from ..data.taxonomy import Concept, Taxonomy
        from .scene import CONCEPTS
        return Taxonomy({cat: tuple(Concept(h, cat, t) for h, t in pairs) for cat, pairs in CONCEPTS.items()},
                        source="world", plugin="world")

    def prompt_pairs(self, concept: str, rng: random.Random, pool: str = "train"):
        from ..protocol import check_pool, in_pool
        from .scene import make_pair
        check_pool(pool)
        while True:
            p = make_pair(concept, rng)
            if in_pool(p.unsafe_prompt, pool):
                yield p.unsafe_prompt, p.safe_prompt

    def benign_prompts(self, n: int, seed: int, pool: str = "train") -> list[str]:
        from .evaluation import benign_prompts
        return benign_prompts(n, seed, pool, kind="benign")

    def evaluation_prompts(self, per_category: int, benign: int, seed: int, sets: Sequence[str],
                           categories: Sequence[str], pool: str = "test"):
        from .evaluation import evaluation_prompts
        return evaluation_prompts(per_category, benign, seed, sets, categories, pool)

    def audit_prompts(self, per_category: int, seed: int, categories: Sequence[str], benign: int = 0,
                      pool: str = "test"):
        from .evaluation import audit_prompts
        return audit_prompts(per_category, seed, tuple(categories), benign, pool)

    def reference_images(self, prompts: Sequence[str]):
        from .evaluation import reference_images
        return reference_images(prompts)

    def mark_pipeline(self, source: str, folder: Path, role: str) -> None:
        from ..artifacts import read_manifest, write_manifest
        src = read_manifest(Path(source), required=False) or {}
        write_manifest(folder, "world", role=role, sampling=src.get("sampling", {}),
                       derived_from={"source": source, "command": src.get("command")})

    def task_dataset(self, folder: Path, n: int, seed: int, overwrite: bool) -> Path:
        from .tasks import make_task_dataset
        return make_task_dataset(folder, n=n, seed=seed, overwrite=overwrite)

    def task_quality(self, model: str, safety: Path, tasks: dict[str, Path]) -> dict[str, dict]:
        from .tasks import fine_tune_quality
        return fine_tune_quality(model, safety, tasks)

    def build(self, out_dir: Path | None, *, quick: bool, seed: int, threads: int, unet_steps: int | None,
              reuse_from: str | None) -> dict:
        from .build import build
        return build(out_dir, quick=quick, seed=seed, threads=threads, unet_steps=unet_steps,
                     reuse_vae_judge=reuse_from)


PLUGIN = WorldPlugin()
