"""Property-based fuzzing of the readers users feed files to: whatever the input, what reaches the user is a
result or a one-line SafealignError -- never another exception, never a traceback.

Runs derandomized (the same examples every run) so CI does not flake; ~100-150 examples per reader.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from safealign.configuration import from_dict
from safealign.errors import SafealignError
from safealign.train.config import FinetuneConfig

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["1", "2.7", "3.0", "nan", "-inf", "yes", "to_q,to_k",
                                                           "1e3", "", " ", "\x00", "0x10", "1_000"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                             inner, max_size=2),
                      max_leaves=5)


def _user_facing(fn, *args, **kw):
    """Call ``fn``: a result, or a SafealignError whose message is one non-empty line (anything else fails)."""
    try:
        return fn(*args, **kw)
    except SafealignError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return None


# -- config builder -----------------------------------------------------------------------------------------------
FIELDS = ["max_steps", "learning_rate", "alpha", "rank", "seed", "overwrite", "targets", "resolution",
          "mixed_precision", "batch_size", "lora_dropout", "warmup_steps", "log_with", "cache_dir", "bogus_key"]


PLAUSIBLE = {"max_steps": [1, 3.0, "5", 2.7, True, -1], "learning_rate": [1e-4, "3e-4", 0, float("nan"), True],
             "alpha": [4, 0.5, "8", 0, -1], "rank": [4, "8", 2.0, 0], "seed": [0, "7", 2 ** 70, -3, 1.5],
             "overwrite": [True, "no", 1], "targets": ["to_q,to_k", ["to_q"], [], [1]], "resolution": [0, 16, 7, 8.0],
             "mixed_precision": ["no", "bf16", False], "batch_size": [1, 4, 0], "lora_dropout": [0.0, 0.5, 1.0],
             "warmup_steps": [0, 5, -1], "log_with": ["", "tensorboard", None], "cache_dir": ["c", 3, None],
             "bogus_key": [1]}


@st.composite
def config_dicts(draw):
    keys = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=5))
    return {k: draw(st.one_of(st.sampled_from(PLAUSIBLE[k]), values)) for k in keys}


@FUZZ
@given(config_dicts())
def test_fuzz_config_builder(data):
    cfg = _user_facing(from_dict, FinetuneConfig, {"output": "o", "data": "d", **data}, source="c.yaml")
    if cfg is None:
        return
    for name in ("max_steps", "rank", "seed", "resolution", "batch_size", "warmup_steps"):
        v = getattr(cfg, name)
        assert type(v) is int, (name, v)  # never a bool, never a silently cut float
        if name in data and isinstance(data[name], float):
            assert v == data[name]
    for name in ("learning_rate", "alpha", "lora_dropout"):
        assert type(getattr(cfg, name)) is float and math.isfinite(getattr(cfg, name))
    assert cfg.alpha > 0 and cfg.learning_rate > 0 and cfg.max_steps >= 1 and cfg.seed >= 0
    assert all(isinstance(t, str) for t in cfg.targets) and isinstance(cfg.overwrite, bool)


# -- LoRA reader --------------------------------------------------------------------------------------------------
MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attn2.to_k", "a..b", "x",
           "to_out.0", ".lead", "sp ace"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.bool]


@st.composite
def _well_formed(draw):
    """A consistent LoRA (A (r, in), B (out, r), a matching header or none), then at most one thing damaged."""
    tensors, ranks = {}, {}
    for mod in draw(st.lists(st.sampled_from(MODULES[:2] + ["up_blocks.1.attentions.0.proj_in"]), min_size=1,
                             max_size=3, unique=True)):
        r = ranks[mod] = draw(st.integers(1, 4))
        tensors[f"unet.{mod}.lora_A.weight"] = torch.randn(r, draw(st.integers(1, 5)))
        tensors[f"unet.{mod}.lora_B.weight"] = torch.randn(draw(st.integers(1, 5)), r)
    common = max(ranks.values(), key=list(ranks.values()).count)
    md = {"unet.r": common, "unet.lora_alpha": draw(st.floats(0.5, 8)),
          "unet.target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
          "unet.rank_pattern": {m: r for m, r in ranks.items() if r != common}}
    damage = draw(st.sampled_from(["none", "none", "nan", "dtype", "rank", "alpha", "header", "targets"]))
    key = draw(st.sampled_from(sorted(tensors)))
    if damage == "nan":
        tensors[key].view(-1)[0] = float("nan")
    elif damage == "dtype":
        tensors[key] = tensors[key].to(draw(st.sampled_from(DTYPES[3:])))
    elif damage == "rank":
        md["unet.r"] = common + 1
    elif damage == "alpha":
        md["unet.lora_alpha"] = draw(st.sampled_from([0, -1.0, "x", None]))
    elif damage == "header":
        md = draw(st.sampled_from(["{", "[]", "null", '{"unet.lora_alpha": 1}']))
    elif damage == "targets":
        md["unet.target_modules"] = draw(st.sampled_from([[], "to_v", ["("], [1]]))
    header = None if draw(st.booleans()) and damage in ("none", "nan", "dtype") else (
        md if isinstance(md, str) else json.dumps(md))
    return tensors, header


@st.composite
def _random_lora(draw):
    tensors = {}
    for mod in draw(st.lists(st.sampled_from(MODULES), min_size=0, max_size=3, unique=True)):
        for part in draw(st.sampled_from([("A", "B"), ("A", "B"), ("A",), ("B", "C")])):
            shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
            dtype = draw(st.sampled_from(DTYPES[:3] * 3 + DTYPES[3:]))
            t = torch.randn(*shape) if shape else torch.tensor(draw(st.floats(-3, 3)))
            tensors[f"unet.{mod}.lora_{part}.weight"] = t.to(dtype)
    if draw(st.booleans()):
        tensors[draw(st.sampled_from(["unet.x.alpha", "text_encoder.y.lora_A.weight", "unet.z"]))] = torch.ones(2)
    header = draw(st.one_of(
        st.none(),
        st.text(max_size=20),
        st.builds(lambda r, a, t, rp: json.dumps({"unet.r": r, "unet.lora_alpha": a, "unet.target_modules": t,
                                                 "unet.rank_pattern": rp}),
                  st.one_of(st.integers(-1, 6), scalars), st.one_of(st.floats(), scalars),
                  st.one_of(st.lists(st.sampled_from(["to_q", "to_k", "x", "to_out.0", "("]), max_size=3), scalars),
                  st.one_of(st.dictionaries(st.sampled_from(["to_q", "(", "x"]), st.integers(0, 5), max_size=2),
                            scalars)),
        values.map(json.dumps)))
    return tensors, header


lora_files = st.one_of(_well_formed(), _random_lora())


@FUZZ
@given(lora_files)
def test_fuzz_lora_reader(case):
    from safealign.lora import load_lora
    tensors, header = case
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "l.safetensors"
        md = {"format": "pt"} | ({"lora_adapter_metadata": header} if header is not None else {})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata=md)
        out = _user_facing(load_lora, f)
    if out is not None:  # what loads is consistent: floating 2-D/4-D factors of the ranks the spec states
        sd, spec = out
        for k, v in sd.items():
            assert v.is_floating_point() and v.dim() in (2, 4) and torch.isfinite(v).all()
            if ".lora_A." in k:
                assert v.shape[0] == spec.rank_for(k.rsplit(".lora_A.", 1)[0])


# -- taxonomy YAML reader -----------------------------------------------------------------------------------------
names = st.one_of(st.text(max_size=10), st.sampled_from(["violence", "Hate", "../x", "a/b", "", " ", "nan"]))
taxonomies = st.one_of(
    values,
    st.builds(lambda c: {"categories": c}, st.dictionaries(
        names, st.one_of(values, st.dictionaries(names, st.one_of(st.none(), names, values), max_size=3),
                         st.lists(st.one_of(names, st.dictionaries(st.sampled_from(["concept", "counterpart", "x"]),
                                                                   st.one_of(names, values), max_size=2)),
                                  max_size=3)),
        max_size=3)))


@FUZZ
@given(taxonomies, st.booleans())
def test_fuzz_taxonomy_reader(data, raw_text):
    from safealign.data.taxonomy import load_taxonomy
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.yaml"
        f.write_text(str(data) if raw_text else yaml.safe_dump(data, allow_unicode=True))
        tax = _user_facing(load_taxonomy, str(f))
    if tax is not None:
        assert tax.categories and all(isinstance(c, str) and c.strip() for c in tax.categories)
        assert all(c.name.strip() for cs in tax.categories.values() for c in cs)


# -- dataset table reader -----------------------------------------------------------------------------------------
TEXT_CELLS = st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["images/a.png", "../x.png", "/abs.png",
                                                                        "a\x00b", "", "violence", "train"]))
NUM_CELLS = st.one_of(st.floats(allow_nan=True), st.integers(-2 ** 63, 2 ** 63 - 1).map(float))


@st.composite
def pair_tables(draw):
    from safealign.data.dataset import COLUMNS
    n = draw(st.integers(0, 4))
    cols = draw(st.lists(st.sampled_from(COLUMNS), unique=True, min_size=6, max_size=len(COLUMNS)))
    table = {}
    for c in cols:
        if c == "seed" and draw(st.booleans()):
            table[c] = pd.Series(draw(st.lists(NUM_CELLS, min_size=n, max_size=n)), dtype="float64")
        elif c == "seed":
            table[c] = pd.Series(draw(st.lists(st.integers(-5, 2 ** 40), min_size=n, max_size=n)), dtype="int64")
        else:
            table[c] = pd.Series(draw(st.lists(TEXT_CELLS, min_size=n, max_size=n)), dtype="object")
    return pd.DataFrame(table)


@FUZZ
@given(pair_tables())
def test_fuzz_dataset_table_reader(df):
    from safealign.data.dataset import PairedDataset
    with tempfile.TemporaryDirectory() as d:
        df.to_parquet(Path(d) / "pairs.parquet")
        ds = _user_facing(PairedDataset, d)
        pairs = _user_facing(ds.pairs) if ds is not None else None
    for p in pairs or []:
        assert isinstance(p.unsafe_prompt, str) and p.unsafe_prompt.strip() and p.safe_prompt.strip()
        assert isinstance(p.seed, int) and p.seed >= 0


def _loads(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except SafealignError:
        return False


def test_fuzz_strategies_reach_what_loads():
    """The fuzzers are not vacuous: each strategy also makes inputs that pass every check and load."""
    from hypothesis import find

    from safealign.data.taxonomy import load_taxonomy
    from safealign.lora import load_lora

    def lora_ok(case) -> bool:
        tensors, header = case
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "l.safetensors"
            md = {"format": "pt"} | ({"lora_adapter_metadata": header} if header is not None else {})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata=md)
            return _loads(load_lora, f)

    def taxonomy_ok(data) -> bool:
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "t.yaml"
            f.write_text(yaml.safe_dump(data, allow_unicode=True))
            return _loads(load_taxonomy, str(f))
    quick = settings(max_examples=500, deadline=None, derandomize=True, database=None)
    assert find(lora_files, lora_ok, settings=quick)
    assert find(taxonomies, taxonomy_ok, settings=quick)
    assert find(config_dicts(), lambda d: len(d) >= 3 and _loads(from_dict, FinetuneConfig,
                                                                  {"output": "o", "data": "d", **d}), settings=quick)
