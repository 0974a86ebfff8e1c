"""Model plugins: what a model shipped with a plugin supplies beyond its diffusers pipeline.

The core never imports a plugin's package: it asks this registry. A plugin is found by name (``--model world``)
or by the ``kind`` in a pipeline folder's ``safealign.json`` (a fine-tuned world model is still a world model).
The mini world registers here as ``world``; other packages register through the entry-point group
``safealign.models`` (``name = "package.module:plugin_object"``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import SafealignError

#: built-in plugins: name -> "module:attribute" (imported on first use only)
BUILTIN = {"world": "safealign.world.plugin:PLUGIN"}
ENTRY_POINT_GROUP = "safealign.models"


@runtime_checkable
class ModelPlugin(Protocol):
    """The hooks the stages call for a plugin model; each returns data, none prints."""

    name: str
    #: the judge spec used where a stage names none (see :mod:`safealign.judges`)
    default_judge: str

    def pipeline_path(self) -> Path:
        """The shipped pipeline folder."""

    def sampling_defaults(self, path: str | Path) -> tuple[int, float]:
        """(steps, guidance) the pipeline at ``path`` was built to sample with."""

    def taxonomy(self) -> Any:
        """The plugin's :class:`~safealign.data.taxonomy.Taxonomy`."""

    def prompt_pairs(self, concept: str, rng, pool: str = "train") -> Any:
        """An endless iterator of (unsafe, safe) prompt pairs for ``concept`` from the plugin's grammar, every
        unsafe prompt of ``pool`` (:mod:`safealign.protocol`)."""

    def benign_prompts(self, n: int, seed: int, pool: str = "train") -> list[str]:
        """``n`` prompts of ordinary content from ``pool`` (anchors: train; watched while training: validation)."""

    def evaluation_prompts(self, per_category: int, benign: int, seed: int, sets: Sequence[str],
                           categories: Sequence[str], pool: str = "test") -> Any:
        """The evaluation :class:`~safealign.evaluate.prompts.PromptSet`, every prompt and seed of ``pool``."""

    def audit_prompts(self, per_category: int, seed: int, categories: Sequence[str], benign: int = 0,
                      pool: str = "test") -> Any:
        """The audit's :class:`~safealign.evaluate.prompts.PromptSet` from ``pool``: unsafe prompts with their
        safe twins per category, and ``benign`` prompts."""

    def reference_images(self, prompts: Sequence[str]) -> Any:
        """Ground-truth images (N, H, W, 3) uint8 of what ``prompts`` describe, the FID/KID reference of
        ``safealign evaluate``; None where the plugin cannot draw them."""

    def mark_pipeline(self, source: str, folder: Path, role: str) -> None:
        """Mark a pipeline folder derived from ``source`` (a full fine-tune) as the plugin's."""

    def task_dataset(self, folder: Path, n: int, seed: int, overwrite: bool) -> Path:
        """A benign fine-tuning dataset (captioned images) for ``safealign run``'s task stage."""

    def task_quality(self, model: str, safety: Path, tasks: dict[str, Path]) -> dict[str, dict]:
        """How well each fine-tune learned the task, with the safety LoRA on (``task-quality.json``)."""

    def build(self, out_dir: Path | None, *, quick: bool, seed: int, threads: int, unet_steps: int | None,
              reuse_from: str | None) -> dict:
        """Retrain the plugin's model from scratch into ``out_dir`` (None: the shipped folder); returns its manifest.
        A plugin that ships no build raises :class:`~safealign.errors.SafealignError`."""


_loaded: dict[str, ModelPlugin] = {}


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_plugin(name: str) -> ModelPlugin:
    """The plugin registered as ``name``; an unknown name is a user error."""
    if name in _loaded:
        return _loaded[name]
    target = BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise SafealignError(f"no model plugin named {name!r}; known: {', '.join(sorted(BUILTIN))}")
    mod, _, attr = target.partition(":")
    plugin = getattr(importlib.import_module(mod), attr)
    _loaded[name] = plugin
    return plugin


def is_plugin_name(model: str) -> bool:
    """Does ``model`` name a plugin rather than a folder or hub id?"""
    return model in BUILTIN or (not any(c in model for c in "/\\.") and model in _entry_points())


def plugin_for_folder(path: str | Path) -> ModelPlugin | None:
    """The plugin whose kind a pipeline folder's ``safealign.json`` names, if any."""
    marker = Path(path) / "safealign.json"
    if not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError):
        return None
    if kind in BUILTIN or kind in _entry_points():
        return get_plugin(kind)
    return None


def plugin_for_model(model: str) -> ModelPlugin | None:
    """The plugin of a ``--model`` value: a plugin's name, or a folder one of them marked."""
    model = str(model)
    if is_plugin_name(model):
        return get_plugin(model)
    p = Path(model).expanduser()
    return plugin_for_folder(p) if p.is_dir() else None
