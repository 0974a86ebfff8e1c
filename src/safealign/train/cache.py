"""Latents and text embeddings computed once and kept on disk, keyed by model and content checksum.

Training re-uses the same images and prompts thousands of times; encoding them every step (what the official
Diffusion-DPO release does) costs a VAE encoder and one or two text encoders per step. Here each image is
encoded once per (model fingerprint, resolution) and each prompt once per model, and stored in safetensors files
under ``<cache_dir>/<fingerprint>/``. Entries are keyed by the SHA-256 of the image file or the prompt text, so
datasets that share images share entries, and an edited image is re-encoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..backbone import Backbone, Conditioning
from ..data.dataset import Pair, load_image, to_tensor
from ..utils import logger, progress, sha256_file, sha256_text


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAFEALIGN_CACHE", Path.home() / ".cache" / "safealign"))


@dataclass
class EncodedPairs:
    """Everything a DPO step needs, on CPU: winner (safe) and loser (unsafe) latents, unsafe-prompt conditioning,
    and (for the preservation term) the safe prompts' conditioning."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    cond: Conditioning
    cond_safe: Conditioning | None = None

    def __len__(self) -> int:
        return self.latents_w.shape[0]

    def select(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        return self.latents_w[idx], self.latents_l[idx], conditioning_rows(self.cond, idx)

    def select_safe(self, idx: torch.Tensor) -> Conditioning:
        """The safe prompts' conditioning of rows ``idx`` (encode with ``safe_prompts=True``)."""
        if self.cond_safe is None:
            raise ValueError("these pairs were encoded without their safe prompts (encode_pairs(safe_prompts=True))")
        return conditioning_rows(self.cond_safe, idx)


def conditioning_rows(c: Conditioning, idx: torch.Tensor) -> Conditioning:
    return Conditioning(c.encoder_hidden_states[idx],
                        {k: v[idx] for k, v in c.added_cond_kwargs.items()} if c.added_cond_kwargs else None)


def with_empty_prompts(cond: Conditioning, empty: Conditioning, fraction: float, gen: torch.Generator
                       ) -> tuple[Conditioning, torch.Tensor]:
    """Each row of ``cond`` replaced by ``empty`` (the cached conditioning of the prompt "", one row) with
    probability ``fraction``, drawn from ``gen``: the official release's ``--proportion_empty_prompts`` without
    re-encoding anything. Returns the conditioning and the boolean mask of replaced rows."""
    n = cond.encoder_hidden_states.shape[0]
    mask = torch.rand(n, generator=gen) < fraction
    if not bool(mask.any()):
        return cond, mask

    def swap(rows: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = mask.to(rows.device).view(-1, *([1] * (rows.dim() - 1)))
        return torch.where(m, e.to(rows.device, rows.dtype).expand_as(rows), rows)

    added = cond.added_cond_kwargs
    if added:
        added = {k: swap(v, empty.added_cond_kwargs[k]) for k, v in added.items()}
    return Conditioning(swap(cond.encoder_hidden_states, empty.encoder_hidden_states), added), mask


class _Store:
    """One safetensors file of key -> tensor, loaded whole, rewritten atomically when entries are added."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, torch.Tensor] = load_file(str(path)) if path.is_file() else {}
        self.dirty = False

    def put(self, key: str, value: torch.Tensor) -> None:
        self.data[key] = value.detach().to("cpu").contiguous()
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        save_file(self.data, str(tmp))
        os.replace(tmp, self.path)
        self.dirty = False


def encode_images_cached(backbone: Backbone, paths: list[Path], resolution: int, cache_dir: Path,
                         batch_size: int = 16, use_cache: bool = True) -> torch.Tensor:
    """Latents for ``paths`` (N,C,h,w), encoding only files whose checksum is not cached yet."""
    keys = [f"{sha256_file(p)}" for p in paths]
    store = _Store(cache_dir / backbone.fingerprint() / f"latents-{resolution}.safetensors") if use_cache else None
    todo = sorted({k: p for k, p in zip(keys, paths) if store is None or k not in store.data}.items())
    fresh: dict[str, torch.Tensor] = {}
    if todo:
        logger.info("encoding %d images with the VAE (cached for next time)", len(todo))
    for i in progress(range(0, len(todo), batch_size), desc="encode images", total=-(-len(todo) // batch_size)):
        chunk = todo[i:i + batch_size]
        px = torch.stack([to_tensor(load_image(p, resolution)) for _, p in chunk])
        lat = backbone.encode_images(px).float().cpu()
        for (k, _), z in zip(chunk, lat):
            fresh[k] = z
            if store is not None:
                store.put(k, z)
    if store is not None:
        store.flush()
    src = store.data if store is not None else fresh
    return torch.stack([src[k] for k in keys]).float()


def encode_prompts_cached(backbone: Backbone, prompts: list[str], cache_dir: Path, batch_size: int = 64,
                          use_cache: bool = True) -> Conditioning:
    """Conditioning for ``prompts`` (stacked in order), encoding only prompts not cached yet."""
    store = _Store(cache_dir / backbone.fingerprint() / f"text-{backbone.resolution}.safetensors") if use_cache \
        else None
    keys = [sha256_text(p) for p in prompts]
    uniq = sorted({k: p for k, p in zip(keys, prompts)}.items())
    have = set() if store is None else {k.split("/")[0] for k in store.data}
    todo = [(k, p) for k, p in uniq if k not in have]
    fresh: dict[str, torch.Tensor] = {}
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        cond = backbone.encode_prompts([p for _, p in chunk])
        for j, (k, _) in enumerate(chunk):
            for name, t in cond.tensors().items():
                fresh[f"{k}/{name}"] = t[j].float().cpu()
                if store is not None:
                    store.put(f"{k}/{name}", t[j])
    if store is not None:
        store.flush()
    src = store.data if store is not None else fresh
    names = sorted({k.split("/", 1)[1] for k in src if k.startswith(keys[0] + "/")})
    return Conditioning.from_tensors({n: torch.stack([src[f"{k}/{n}"] for k in keys]).float() for n in names})


def encode_pairs(backbone: Backbone, pairs: list[Pair], cache_dir: Path | None, resolution: int | None = None,
                 use_cache: bool = True, safe_prompts: bool = False) -> EncodedPairs:
    """Winner = safe image, loser = unsafe image, both under the unsafe prompt (AlignGuard's preference);
    ``safe_prompts``: also the safe prompts' conditioning (the preservation term's)."""
    res = resolution or backbone.resolution
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    lat = encode_images_cached(backbone, [p.safe_image for p in pairs] + [p.unsafe_image for p in pairs], res,
                               cache_dir, use_cache=use_cache)
    n = len(pairs)
    cond = encode_prompts_cached(backbone, [p.unsafe_prompt for p in pairs], cache_dir, use_cache=use_cache)
    cond_safe = (encode_prompts_cached(backbone, [p.safe_prompt for p in pairs], cache_dir, use_cache=use_cache)
                 if safe_prompts else None)
    return EncodedPairs(lat[:n], lat[n:], at_resolution(cond, res),
                        at_resolution(cond_safe, res) if cond_safe is not None else None)


def at_resolution(cond: Conditioning, resolution: int) -> Conditioning:
    """SDXL's size conditioning (``time_ids``: original size, crop, target size) for images of ``resolution``
    pixels, as the official release sets it (the cached entries carry the model's native size)."""
    added = cond.added_cond_kwargs
    if not added or "time_ids" not in added:
        return cond
    t = added["time_ids"]
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=t.dtype).expand_as(t)
    return Conditioning(cond.encoder_hidden_states, {**added, "time_ids": ids.clone()})
