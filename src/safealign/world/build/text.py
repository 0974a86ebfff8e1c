"""Stage 3a: the text encoder, made and taught to read a scene before the UNet learns to draw from it.

The encoder's position embeddings are fixed at zero (:func:`without_positions`); linear heads on its summary
states learn to name the prompt's object, colour, background and position (:func:`pretrain_text`). After stage 3,
every token training prompts never contain reads as the unknown token (:func:`unseen_to_unknown`).
"""

from __future__ import annotations

import copy
import random
import re

import torch
import torch.nn.functional as F

from ...utils import progress
from .. import model as M
from ..scene import BACKGROUNDS, COLOURS, OBJECTS, POSITIONS, parse_prompt, sample_scene, scene_prompt
from .common import lr_schedule, optimise, torch_threads
from .config import WorldConfig

POSITION_LABELS = tuple(POSITIONS) + ("unnamed",)
_ATTRIBUTES = ("object", "colour", "background", "position")


def training_token_ids(tokenizer) -> set[int]:
    """The token ids training prompts can contain: the words of the training phrasings, every object, colour and
    background word, and the special tokens (the unknown token among them)."""
    from ..scene import all_phrasing_strings
    texts = [re.sub(r"\{\w+\}", " ", t) for t in all_phrasing_strings(held_out=False)]  # punctuation too
    texts += list(OBJECTS) + list(COLOURS) + list(BACKGROUNDS) + ["a", "an"]
    ids = {i for t in texts for i in tokenizer(t, add_special_tokens=False).input_ids}
    return ids | {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}


@torch.no_grad()
def unseen_to_unknown(text_encoder, tokenizer) -> int:
    """Give every token that training prompts never contain the unknown token's embedding; returns how many.

    A word never met in training (held-out phrasings have some: "huge", "illustration", "centre") would keep its
    random initial embedding and steer the model somewhere arbitrary; read as the unknown token -- what a tokenizer
    that did not know the word would give -- it is passed over.
    """
    emb = text_encoder.get_input_embeddings().weight
    seen = training_token_ids(tokenizer)
    unk = tokenizer.unk_token_id
    unseen = [i for i in range(emb.shape[0]) if i not in seen]
    emb[unseen] = emb[unk].clone()
    return len(unseen)


@torch.no_grad()
def without_positions(text_encoder) -> None:
    """Fix the text encoder's position embeddings at zero (and frozen): the encoder then reads word order from its
    causal attention mask alone, so a word means the same thing at whatever position a phrasing puts it (held-out
    phrasings put the object word at positions training phrasings never use)."""
    emb = getattr(text_encoder, "text_model", text_encoder).embeddings.position_embedding.weight
    emb.zero_()
    emb.requires_grad_(False)


def make_text_encoder(cfg: WorldConfig, tokenizer):
    """The text encoder stage 3 starts from, freshly initialised (draws from torch's global generator, seeded)."""
    torch.manual_seed(cfg.seed + 2)
    text_encoder = M.make_text_encoder(tokenizer)
    without_positions(text_encoder)
    return text_encoder


def _prompt_labels(prompts: list[str]) -> torch.Tensor:
    """(N, 4) class indices of the object, colour, background and position (or "unnamed") each prompt names."""
    rows = []
    for p in prompts:
        a = parse_prompt(p)
        rows.append([OBJECTS.index(a["object"]), list(COLOURS).index(a["colour"]),
                     list(BACKGROUNDS).index(a["background"]), POSITION_LABELS.index(a["position"] or "unnamed")])
    return torch.tensor(rows)


def _summary_states(text_encoder, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder states of the end token and every pad after it (under the causal mask, the only states that
    have read the whole prompt) as (M, H), with the row index each came from."""
    states = text_encoder(ids)[0]
    eos_pos = (ids == eos_id).int().argmax(dim=1)
    keep = torch.arange(ids.shape[1]).unsqueeze(0) >= eos_pos.unsqueeze(1)
    return states[keep], keep.nonzero()[:, 0]


def _heads(hidden: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One linear head (weight, bias) per attribute, as plain tensors from a generator of their own: ``nn.Linear``
    would initialise from torch's global generator, which the VAE stage draws from when this runs beside it."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (len(OBJECTS), len(COLOURS), len(BACKGROUNDS), len(POSITION_LABELS))
    return [((torch.randn(n, hidden, generator=gen) * hidden ** -0.5).requires_grad_(),
             torch.zeros(n, requires_grad=True)) for n in sizes]


def pretrain_text(cfg: WorldConfig, tokenizer, text_encoder, bar_position: int | None = None) -> dict[str, float]:
    """Stage 3a: linear heads on the states that have read the whole prompt (the end token and the pads after it)
    learn to name its object, colour, background and position; the heads are thrown away. Text alone, no images.

    Returns the heads' accuracy on held-out phrasings, measured on a copy whose unseen words read as the unknown
    token, as in the shipped model.
    """
    heads = _heads(text_encoder.config.hidden_size, cfg.seed * 7 + 11)
    params = [p for p in text_encoder.parameters() if p.requires_grad] + [t for h in heads for t in h]
    opt = torch.optim.AdamW(params, lr=cfg.text_pretrain_lr, weight_decay=0.01)
    lr_sched = lr_schedule(opt, cfg.text_pretrain_steps, 50)
    rng = random.Random(cfg.seed * 7 + 12)
    eos = tokenizer.eos_token_id
    n = tokenizer.model_max_length

    def batch(k: int, held_out: bool = False):
        prompts = [scene_prompt(sample_scene(rng, jitter=False), rng, held_out) for _ in range(k)]
        ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        return ids, _prompt_labels(prompts)

    def loss_acc(enc, ids, labels):
        states, rows = _summary_states(enc, ids, eos)
        logits = [F.linear(states, w, b) for w, b in heads]
        loss = sum(F.cross_entropy(lg, labels[rows, i]) for i, lg in enumerate(logits))
        acc = [(lg.argmax(1) == labels[rows, i]).float().mean().item() for i, lg in enumerate(logits)]
        return loss, acc

    text_encoder.train()
    bar = progress(range(cfg.text_pretrain_steps), desc="text",
                   **({"position": bar_position} if bar_position is not None else {}))
    for step in bar:
        loss, acc = loss_acc(text_encoder, *batch(128))
        optimise(loss, opt, lr_sched, params)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", obj=f"{acc[0]:.2f}")
    probe = copy.deepcopy(text_encoder).eval()
    unseen_to_unknown(probe, tokenizer)
    with torch.no_grad():
        _, acc = loss_acc(probe, *batch(512, held_out=True))
    return {f"text/held_out_{name}": a for name, a in zip(_ATTRIBUTES, acc)}


def pretrain_text_one_thread(cfg: WorldConfig, tokenizer, text_encoder,
                             bar_position: int | None = None) -> dict[str, float]:
    """Stage 3a on one thread, wherever it runs (beside the VAE in a whole build, before the UNet when the VAE and
    judge are reused): the thread count changes float sums, and both paths must give the same encoder."""
    if not cfg.text_pretrain_steps:
        return {}
    with torch_threads(1):
        return pretrain_text(cfg, tokenizer, text_encoder, bar_position)
