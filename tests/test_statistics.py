"""Statistics a safety researcher can trust: Wilson intervals, the exact McNemar test, Newcombe's paired interval,
Holm's correction, prompt files evaluated whole (or a seeded sample), evaluation seeds apart from dataset seeds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from safealign.errors import SafealignError
from safealign.evaluate import metrics as M
from safealign.evaluate import statistics as S
from safealign.evaluate.config import EvaluateConfig
from safealign.evaluate.prompts import load_prompts, read_dataset


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# -- one rate ---------------------------------------------------------------------------------------------------

def test_wilson_interval_is_not_degenerate_at_zero_and_n():
    lo, hi = S.wilson(0, 16)
    assert lo == 0.0 and round(hi, 2) == 0.19
    lo, hi = S.wilson(16, 16)
    assert round(lo, 2) == 0.81 and hi == 1.0
    for k, n in ((3, 10), (7, 40), (1, 2)):
        assert S.wilson(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)
    # Clopper-Pearson is wider than Wilson at the boundary; an empty sample has no interval
    assert S.wilson(0, 16, method="beta")[1] > S.wilson(0, 16)[1]
    assert all(math.isnan(x) for x in S.wilson(0, 0))
    with pytest.raises(ValueError):
        S.wilson(1, 2, method="bootstrap")


def test_rate_keeps_value_n_and_flagged_and_carries_the_wilson_interval():
    f = np.zeros(16, bool)
    r = M.rate(f)
    assert (r["value"], r["n"], r["flagged"]) == (0.0, 16, 0)
    assert r["ci95"][0] == 0.0 and round(r["ci95"][1], 2) == 0.19
    f[:5] = True
    r = M.rate(f)
    assert (r["value"], r["n"], r["flagged"]) == (5 / 16, 16, 5)
    assert r["ci95"] == pytest.approx(list(_wilson_by_hand(5, 16)))
    assert not hasattr(M, "bootstrap_ci")


# -- two models on the same images ------------------------------------------------------------------------------

def _pairs(n00: int, n01: int, n10: int, n11: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([0] * n00 + [0] * n01 + [1] * n10 + [1] * n11, bool)
    b = np.array([0] * n00 + [1] * n01 + [0] * n10 + [1] * n11, bool)
    return a, b


def test_mcnemar_exact_on_a_hand_built_table():
    a, b = _pairs(5, 1, 9, 5)  # b01 = 1 (b only), b10 = 9 (a only)
    r = S.paired_comparison(a, b)
    expected = min(1.0, 2 * sum(math.comb(10, k) for k in range(2)) / 2 ** 10)  # two-sided binomial, 10 discordant
    assert r["p_value"] == pytest.approx(expected, abs=1e-12) and round(r["p_value"], 4) == 0.0215
    assert r["discordant"] == [1, 9] and r["n"] == 20
    assert r["delta"] == pytest.approx((1 + 5) / 20 - (9 + 5) / 20)


def test_newcombe_interval_matches_the_formula_and_contains_the_difference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = _pairs(*rng.integers(0, 12, 4))
        if a.size == 0:
            continue
        r = S.paired_comparison(a, b)
        lo, hi = r["ci95"]
        assert -1.0 <= lo <= r["delta"] <= hi <= 1.0
    # Newcombe (1998) method 10 written out with hand-computed Wilson limits
    n00, n01, n10, n11 = 3, 12, 2, 30
    n = n00 + n01 + n10 + n11
    p1, p2 = (n01 + n11) / n, (n10 + n11) / n
    (l1, u1), (l2, u2) = _wilson_by_hand(n01 + n11, n), _wilson_by_hand(n10 + n11, n)
    cross = n11 * n00 - n01 * n10
    phi = (cross - n / 2) / math.sqrt((n10 + n11) * (n00 + n01) * (n01 + n11) * (n00 + n10))
    d = p1 - p2
    want = (d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    assert S.paired_comparison(*_pairs(n00, n01, n10, n11))["ci95"] == pytest.approx(list(want), abs=1e-12)
    # identical models: no change, no evidence of one
    a = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    r = S.paired_comparison(a, a.copy())
    assert r["delta"] == 0.0 and r["p_value"] == 1.0 and r["discordant"] == [0, 0]
    assert r["ci95"][0] < 0 < r["ci95"][1]
    with pytest.raises(ValueError):
        S.paired_comparison(a, a[:-1])


def test_holm_on_a_hand_list():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, max(., 3*0.03), max(., 2*0.04), max(., 1*0.5)
    assert S.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert S.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert S.holm([]) == []


def test_paired_by_category_holm_corrects_across_categories():
    a, b = _pairs(0, 0, 10, 0)  # ten images flagged only under a
    cats = ["violence"] * 10
    a2, b2 = _pairs(5, 0, 0, 5)  # no change
    r = M.paired_by_category(np.r_[a, a2], np.r_[b, b2], cats + ["hate"] * 10)
    v, h = r["per_category"]["violence"], r["per_category"]["hate"]
    assert v["p_value"] == pytest.approx(2 / 2 ** 10) and v["p_holm"] == pytest.approx(2 * v["p_value"])
    assert h["p_value"] == 1.0 and h["p_holm"] == 1.0
    assert r["overall"]["delta"] == pytest.approx(-10 / 20)


def test_models_are_compared_with_the_base_and_with_aligned():
    from safealign.evaluate.evaluator import comparisons
    table = pd.DataFrame({"set": ["unsafe"] * 4 + ["safe"] * 2, "category": ["violence", "hate"] * 3})
    flags = {"base": np.array([1, 1, 1, 1, 0, 0], bool), "aligned": np.array([0, 0, 0, 0, 0, 0], bool),
             "tuned": np.array([1, 0, 0, 0, 0, 1], bool)}
    out = comparisons(flags, table)
    assert set(out) == {"aligned", "tuned"} and set(out["aligned"]) == {"vs_base"}
    assert set(out["tuned"]) == {"vs_base", "vs_aligned"}
    assert out["aligned"]["vs_base"]["unsafe"]["overall"]["delta"] == -1.0
    assert out["tuned"]["vs_aligned"]["unsafe"]["overall"]["delta"] == 0.25
    assert out["tuned"]["vs_aligned"]["safe"]["overall"]["discordant"] == [1, 0]
    assert set(out["tuned"]["vs_base"]["unsafe"]["per_category"]) == {"violence", "hate"}
    with pytest.raises(SafealignError, match="same prompts and seeds"):
        comparisons({**flags, "tuned": flags["tuned"][:5]}, table)


# -- prompt files and seeds -------------------------------------------------------------------------------------

def _i2p(path, n: int = 500):
    cats = ["sexual,hate", "violence", "hate", "shocking,violence", "self-harm"]
    pd.DataFrame({"prompt": [f"prompt {i}" for i in range(n)], "categories": [cats[i % 5] for i in range(n)],
                  "sd_seed": np.arange(n) * 7 + 1, "hard": [i % 2 for i in range(n)]}).to_csv(path, index=False)
    return path


def test_an_i2p_file_is_evaluated_whole_or_as_a_seeded_sample(tmp_path):
    f = _i2p(tmp_path / "i2p.csv")
    whole = load_prompts(EvaluateConfig(output="x", prompts=str(f), per_category=2))
    assert len(whole) == 500 and whole.table["prompt"].tolist() == [f"prompt {i}" for i in range(500)]
    assert whole.describe()["per_category"]["hate"] == 200  # multi-label: 'sexual,hate' counts in hate
    a = load_prompts(EvaluateConfig(output="x", prompts=str(f), limit=50, seed=3))
    b = load_prompts(EvaluateConfig(output="x", prompts=str(f), limit=50, seed=3))
    c = load_prompts(EvaluateConfig(output="x", prompts=str(f), limit=50, seed=4))
    assert len(a) == 50 and a.table.equals(b.table) and not a.table.equals(c.table)
    idx = [int(p.split()[1]) for p in a.table["prompt"]]
    assert idx == sorted(idx) and len(set(idx)) == 50
    assert a.table["seed"].tolist() == [i * 7 + 1 for i in idx]  # a row keeps its own seed
    d = a.describe()
    assert d["limited_to"] == 50 and d["of"] == 500
    # a category filter keeps every multi-label cell that names the category
    h = load_prompts(EvaluateConfig(output="x", prompts=str(f), categories=("hate",)))
    assert len(h) == 200 and set(h.table["category"]) == {"sexual,hate", "hate"}
    with pytest.raises(SafealignError, match="--limit"):
        EvaluateConfig(output="x", limit=-1)


def test_dataset_evaluation_seeds_are_new_draws(toy_dataset):
    from safealign.data.dataset import PairedDataset
    dataset_seeds = {int(p.seed) for p in PairedDataset(toy_dataset).pairs()}
    ps = read_dataset(toy_dataset, "test")
    t = ps.table
    assert len(t) and not set(t["seed"].astype(int)) & dataset_seeds
    by_pair = t.groupby("pair")["seed"].nunique()
    assert (by_pair == 1).all()  # the unsafe prompt and its safe twin share the (new) seed
    assert t["seed"].nunique() == len(by_pair)
    assert "evaluate" in ps.describe()["seeds"]
    assert read_dataset(toy_dataset, "test").table.equals(t)  # derived, so stable
    # a seeded sample of a dataset draws whole pairs
    s = load_prompts(EvaluateConfig(output="x", prompts=str(toy_dataset), limit=3))
    assert s.table["pair"].nunique() == 3 and len(s) == 6 and s.describe()["of"] == len(by_pair)


def test_the_bootstrap_option_is_accepted_ignored_and_deprecated():
    from safealign.configuration import from_dict
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = from_dict(EvaluateConfig, {"output": "x", "bootstrap": 100})
    assert any("bootstrap" in str(x.message) and issubclass(x.category, DeprecationWarning) for x in w)
    assert not hasattr(cfg, "bootstrap")
