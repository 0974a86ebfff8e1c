"""The data of the DPO experts' preservation terms: where the expert must not move the model.

The image-side term holds the expert's prediction at the base model's under safe prompts (the pairs' own, every
category's, or anchor prompts of ordinary content); the text-side term (:mod:`.text_basis`) holds the
cross-attention keys/values of the kept prompts' tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbone import Backbone, Conditioning
from ..data.dataset import PairedDataset
from ..errors import SafealignError
from ..utils import derive_seed
from .cache import EncodedPairs, conditioning_rows, encode_pairs, encode_prompts_cached
from .config import ExpertConfig

#: anchor prompts a model plugin's preservation term uses when --preserve-prompts is not given
PLUGIN_ANCHORS = 64


def preservation_prompts(cfg: ExpertConfig, backbone: Backbone) -> list[str]:
    """The anchor prompts of ``--preserve-from prompts``: the user's, or for a plugin model (the mini world) its
    benign prompts, the ones that are nobody's twin (a seed of their own). The twins are left out: they are what
    DPO moves toward, and holding the model still under every category's twins keeps the experts from learning."""
    if cfg.preserve_prompts:
        return list(cfg.preserve_prompts)
    if backbone.plugin is None:
        raise SafealignError("--preserve-from prompts needs --preserve-prompts (anchor prompts of ordinary content, "
                             "comma separated); only a model plugin (the mini world) has its own anchor prompts")
    return backbone.plugin.benign_prompts(PLUGIN_ANCHORS, derive_seed(cfg.seed, "preservation-anchors"))


def kept_prompts(cfg: ExpertConfig, backbone: Backbone, ds: PairedDataset) -> list[str]:
    """The prompts whose token states the text-side preservation term keeps: every safe prompt of the split (all
    categories: one category's hazard word must not leak into another's twin), the anchor prompts (the user's, or
    a plugin model's benign ones) and, last, the empty prompt (the unconditional branch guidance subtracts)."""
    anchors = list(cfg.preserve_prompts)
    if not anchors and backbone.plugin is not None:
        anchors = preservation_prompts(cfg, backbone)
    return sorted(({p.safe_prompt for p in ds.pairs(None, cfg.split)} | set(anchors)) - {""}) + [""]


class Preservation:
    """Where the image-side term holds the model still, for ``--preserve-from`` (None: the term is off).

    ``keep``: every category's safe pairs (``all``); ``anchors``: the anchor prompts' conditioning
    (``prompts``, ``both``)."""

    def __init__(self, source: str | None, keep: EncodedPairs | None = None, anchors: Conditioning | None = None):
        self.source, self.keep, self.anchors = source, keep, anchors

    @classmethod
    def encode(cls, cfg: ExpertConfig, backbone: Backbone, ds: PairedDataset, cache: Path) -> Preservation:
        source = cfg.preserve_from if cfg.preserve_weight > 0 else None
        keep = anchors = None
        if source == "all":  # every category's safe pairs of the split
            pairs = ds.pairs(None, cfg.split)
            ds.verify_images(pairs)
            keep = encode_pairs(backbone, pairs, cache, cfg.resolution or None, safe_prompts=True)
        if source in ("prompts", "both"):
            anchors = encode_prompts_cached(backbone, preservation_prompts(cfg, backbone), cache)
        return cls(source, keep, anchors)

    def batch(self, enc: EncodedPairs, idx: torch.Tensor, gen: torch.Generator
              ) -> Conditioning | tuple[torch.Tensor, Conditioning] | None:
        """The ``preserve`` argument of :func:`.dpo.dpo_errors` for the batch ``idx`` of ``enc`` (draws from
        ``gen`` for ``all``, ``prompts`` and ``both``)."""
        n = len(idx)
        if self.keep is not None:
            j = torch.randint(0, len(self.keep), (n,), generator=gen)
            return self.keep.latents_w[j], self.keep.select_safe(j)
        if self.anchors is not None:  # the batch's noisy safe images under anchor prompts
            j = torch.randint(0, self.anchors.encoder_hidden_states.shape[0], (n,), generator=gen)
            h = n // 2 if self.source == "both" else 0  # the first h under the pairs' own safe prompts
            preserve = conditioning_rows(self.anchors, j[h:])
            return Conditioning.stack([enc.select_safe(idx[:h]), preserve]) if h else preserve
        if self.source is not None:
            return enc.select_safe(idx)
        return None
