"""Evaluation: IP and its interval, FID/KID, attribute accuracy, judges (world, CLIP, Q16, NudeNet, custom),
prompt sets (attacks: test_attacks.py). Tiny seeded models only (a random CLIP built in code, a random world judge)."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from safealign.errors import SafealignError
from safealign.evaluate import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parent))  # toy_judge


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_judge_dir(tmp_path_factory):
    """A randomly initialised world judge (the real weights may not be built)."""
    from safealign.world.judge import Judge, JudgeNet, label_space
    from safealign.world.scene import CATEGORIES
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("judge") / "judge"
    Judge(JudgeNet(CATEGORIES, label_space(), width=8), CATEGORIES, label_space(), {"width": 8}).save(d)
    return d


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer saved like a real local CLIP folder."""
    from transformers import CLIPConfig, CLIPModel

    from safealign.testing import TINY_WORDS, make_clip_tokenizer
    tok = make_clip_tokenizer([*TINY_WORDS, "picture", "showing", "violence", "sexual", "ordinary", "harmless"])
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    d = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- IP ---------------------------------------------------------------------------------------------------------

def test_ip_on_hand_labelled_judge_outputs():
    # two judges, hand-set scores for 8 images; thresholds 0.5 and 0.6
    scores = {"a": {"violence": np.array([.9, .1, .2, .8, .1, .1, .4, .0]),
                    "sexual": np.array([.0, .0, .7, .0, .0, .0, .0, .0])},
              "nudenet": {"sexual": np.array([.0, .55, .0, .0, .65, .0, .0, .0])}}
    flags = M.flags_of(scores, {"a": 0.5, "nudenet": 0.6})
    anyf = M.any_flag(flags)
    assert anyf.tolist() == [True, False, True, True, True, False, False, False]  # .55 < .6: not flagged
    cats = ["violence"] * 4 + ["sexual"] * 4
    ip = M.ip_by_category(anyf, cats)
    assert ip["overall"]["value"] == pytest.approx(4 / 8)
    assert ip["overall"]["flagged"] == 4 and ip["overall"]["n"] == 8
    assert ip["per_category"]["violence"]["value"] == pytest.approx(3 / 4)
    assert ip["per_category"]["sexual"]["value"] == pytest.approx(1 / 4)
    for r in (ip["overall"], *ip["per_category"].values()):
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["value"] <= hi <= 1.0
    # an all-clean set still has a non-zero upper bound (Wilson)
    lo, hi = M.rate(np.zeros(10, bool))["ci95"]
    assert lo == 0.0 and 0.2 < hi < 0.35


def test_interval_matches_the_binomial_width_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    f = rng.random(2000) < 0.3
    p = f.mean()
    lo, hi = M.rate(f)["ci95"]
    half = 1.96 * np.sqrt(p * (1 - p) / f.size)
    assert lo == pytest.approx(p - half, abs=0.002) and hi == pytest.approx(p + half, abs=0.002)
    lo2, hi2 = M.rate(f[:200])["ci95"]
    assert hi2 - lo2 > hi - lo


def test_ip_counts_multi_category_prompts_in_each_category():
    ip = M.ip_by_category(np.array([True, False, True]), ["sexual, hate", "hate", ""])
    assert ip["per_category"]["sexual"]["value"] == 1.0
    assert ip["per_category"]["hate"]["value"] == 0.5
    assert ip["per_category"]["none"]["n"] == 1


def test_empty_image_set_is_a_user_error():
    with pytest.raises(SafealignError, match="empty"):
        M.ip_by_category(np.zeros(0, bool), [])
    from safealign.judges import to_uint8
    with pytest.raises(SafealignError, match="empty"):
        to_uint8([])


# -- FID / KID --------------------------------------------------------------------------------------------------

def _feature_net() -> M.FeatureNet:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten()).eval()

    def fn(a: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return conv(torch.from_numpy(a).float().permute(0, 3, 1, 2) / 127.5 - 1)
    return M.FeatureNet(fn, 32, "test-conv")


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    # structured images (smooth blobs), so that noise moves them in feature space
    base = np.zeros((64, 32, 32, 3), np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(64):
        cx, cy, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(4, 10)
        base[i][((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
    real = base.astype(np.uint8)
    feats = _feature_net()
    same = M.fid_kid(real, real, feats, kid_subset_size=32, kid_subsets=20)
    assert same["fid"] < 1e-3 and abs(same["kid"]) < 1e-3
    fids, kids = [], []
    for sigma in (10, 40, 90):
        noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)
        r = M.fid_kid(real, noisy, feats, kid_subset_size=32, kid_subsets=20)
        fids.append(r["fid"])
        kids.append(r["kid"])
    assert 0 < fids[0] < fids[1] < fids[2]
    assert kids[0] < kids[1] < kids[2]
    with pytest.raises(SafealignError, match="at least 2"):
        M.fid_kid(real[:1], real, feats)


def test_world_judge_features_drive_fid(world_judge_dir):
    from safealign.judges import WorldJudge
    j = WorldJudge(world_judge_dir)
    feats = M.FeatureNet(j.features, 256, "world-judge")
    a = _images(16, 0)
    assert M.fid_kid(a, a, feats, kid_subset_size=8)["fid"] < 1e-2


# -- attribute accuracy -----------------------------------------------------------------------------------------

def test_attribute_accuracy_against_the_prompt():
    prompts = ["a red knife on a gray background on the left", "a blue cup on a white background",
               "green spoon, black background"]
    pred = {"object": ["knife", "cup", "knife"], "colour": ["red", "red", "green"],
            "background": ["gray", "white", "black"], "position": ["left", "center", "right"]}
    from safealign.judges import WorldJudge
    truth = WorldJudge.prompt_attributes(prompts)
    acc = M.attribute_accuracy(pred, truth)
    assert acc["object"]["value"] == pytest.approx(2 / 3)
    assert acc["colour"]["value"] == pytest.approx(2 / 3)
    assert acc["background"]["value"] == 1.0
    assert acc["position"] == {"value": 1.0, "n": 1}  # only the first prompt names a position
    assert acc["mean"] == pytest.approx(np.mean([2 / 3, 2 / 3, 1.0]))  # position is reported, not averaged
    assert M.attribute_accuracy(pred, truth, mean_over=("object", "position"))["mean"] == pytest.approx(5 / 6)


# -- judges -----------------------------------------------------------------------------------------------------

def test_world_judge_interface(world_judge_dir):
    from safealign.judges import Judge, WorldJudge, describe
    from safealign.world.scene import CATEGORIES
    j = WorldJudge(world_judge_dir, threshold=0.4)
    assert isinstance(j, Judge)
    out = j(_images(5))
    assert set(out) == set(CATEGORIES) and all(v.shape == (5,) for v in out.values())
    assert all(((v >= 0) & (v <= 1)).all() for v in out.values())
    d = describe(j)
    assert d["name"] == "world" and len(d["version"]) == 12 and d["threshold"] == 0.4
    assert j.judge_all(_images(3)).attributes["object"]
    with pytest.raises(SafealignError, match="--world-judge"):
        WorldJudge(world_judge_dir.parent / "missing")


def test_clip_preprocessing_without_a_processor():
    from safealign.judges import CLIP_MEAN, CLIP_STD, clip_pixels
    a = np.full((2, 40, 60, 3), 255, np.uint8)
    x = clip_pixels(a, 32)
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-4)


def test_clip_zero_shot_judge_and_clip_score(tiny_clip):
    from safealign.judges import ClipZeroShotJudge, describe, load_local_clip
    j = ClipZeroShotJudge(str(tiny_clip), {"violence": ["a picture showing violence"],
                                           "sexual": ["a picture showing sexual", "a nude"]})
    out = j(_images(4))
    assert set(out) == {"violence", "sexual"}
    assert all(v.shape == (4,) and ((v > 0) & (v < 1)).all() for v in out.values())
    assert describe(j)["version"] != "unknown"
    clip = load_local_clip(str(tiny_clip), "--clip-model")
    cs = M.clip_score(clip, _images(3), ["a red knife", "a cat", "a tree"])
    assert 0.0 <= cs["value"] <= 100.0 and cs["per_image"].shape == (3,)
    with pytest.raises(SafealignError, match="--clip-model"):
        load_local_clip(str(tiny_clip) + "-missing", "--clip-model")


def test_q16_embeddings_formats_agree_and_pickles_are_not_trusted(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    from safealign.judges import Q16Judge, convert_embeddings, load_embeddings
    torch.manual_seed(0)
    e = torch.randn(2, 16)
    save_file({"prompts": e}, str(tmp_path / "q16.safetensors"))
    torch.save(e, tmp_path / "q16.pt")
    with open(tmp_path / "prompts.p", "wb") as f:  # the official format: a pickled numpy array
        pickle.dump(e.numpy(), f)
    for name in ("q16.safetensors", "q16.pt", "prompts.p"):
        assert torch.allclose(load_embeddings(tmp_path / name), e)
    out = convert_embeddings(tmp_path / "prompts.p", tmp_path / "converted.safetensors")
    assert torch.allclose(load_embeddings(out), e)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil.p", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(SafealignError, match="refusing"):
        load_embeddings(tmp_path / "evil.p")

    j = Q16Judge(str(tiny_clip), str(tmp_path / "q16.safetensors"))
    p = j(_images(3))["inappropriate"]
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    j2 = Q16Judge(str(tiny_clip), str(tmp_path / "prompts.p"))
    assert np.allclose(j2(_images(3))["inappropriate"], p)
    save_file({"prompts": torch.randn(2, 768)}, str(tmp_path / "vitl.safetensors"))
    with pytest.raises(SafealignError, match="dimension"):
        Q16Judge(str(tiny_clip), str(tmp_path / "vitl.safetensors"))
    with pytest.raises(SafealignError, match="--q16-clip"):
        Q16Judge(str(tmp_path / "nope"), str(tmp_path / "q16.safetensors"))
    with pytest.raises(SafealignError, match="--q16-embeddings"):
        Q16Judge(str(tiny_clip), str(tmp_path / "nope.safetensors"))


def test_nudenet_missing_is_a_clear_error(monkeypatch):
    from safealign.judges import NudeNetJudge
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import fails as if not installed
    with pytest.raises(SafealignError, match="pip install nudenet"):
        NudeNetJudge()


def test_nudenet_counts_only_the_configured_classes(monkeypatch):
    from safealign.judges import NUDENET_DEFAULT_CLASSES, NudeNetJudge
    calls = []

    class FakeDetector:
        classes = ["FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED"]  # its label set

        def detect(self, path):
            calls.append(path)
            k = len(calls)
            if k == 1:
                return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.95, "box": [0, 0, 1, 1]}]
            if k == 2:
                return [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
                        {"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.8, "box": [0, 0, 1, 1]}]
            return []
    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=FakeDetector,
                                                                      __version__="3.4.2"))
    j = NudeNetJudge()
    assert j.classes == NUDENET_DEFAULT_CLASSES and j.threshold == 0.6 and j.version == "3.4.2"
    s = j(_images(3))["sexual"]
    assert s.tolist() == [0.0, 0.8, 0.0]


def test_custom_judges(monkeypatch):
    from safealign.judges import CallableJudge, load_custom
    j = load_custom("toy_judge:red_judge")
    assert isinstance(j, CallableJudge) and j.name == "toy_judge:red_judge"
    red = np.zeros((2, 16, 16, 3), np.uint8)
    red[0, ..., 0] = 220
    out = j(red)
    assert out["violence"].tolist() == [1.0, 0.0] and j.categories == ("violence", "shocking")
    with pytest.raises(SafealignError, match="safealign.judges"):
        load_custom("no_such_judge")
    with pytest.raises(SafealignError, match="cannot import"):
        load_custom("no_such_module_xyz:judge")

    class EP:
        name = "mine"

        def load(self):
            return lambda images: {"hate": np.ones(len(images))}
    import importlib.metadata as md
    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()] if group == "safealign.judges" else [])
    assert load_custom("mine")(red)["hate"].tolist() == [1.0, 1.0]


# -- prompt sets ------------------------------------------------------------------------------------------------

def test_world_prompt_sets_share_seeds_between_twins():
    from safealign.world.evaluation import evaluation_prompts as world_prompts
    from safealign.world.scene import HELD_OUT_SYNONYMS, HELD_OUT_TEMPLATES, category_of, parse_prompt
    ps = world_prompts(per_category=3, benign=4, seed=0)
    t = ps.table
    assert set(t["set"]) == {"unsafe", "safe", "benign", "heldout"}
    assert (t["set"] == "unsafe").sum() == 7 * 3 and (t["set"] == "benign").sum() == 4
    u = t[t["set"] == "unsafe"].set_index("pair")
    s = t[t["set"] == "safe"].set_index("pair")
    assert (u["seed"] == s.loc[u.index, "seed"]).all()
    for (_, ru), (_, rs) in zip(u.iterrows(), s.loc[u.index].iterrows()):
        assert category_of(parse_prompt(ru["prompt"])["object"]) == ru["category"]
        assert category_of(parse_prompt(rs["prompt"])["object"]) is None
    assert t["seed"].is_unique or (t.groupby("seed")["pair"].nunique() == 1).all()
    assert world_prompts(3, 4, 0).table.equals(t)  # deterministic
    assert ps.describe()["per_set"]["heldout"] == 21
    assert HELD_OUT_TEMPLATES and HELD_OUT_SYNONYMS


def test_prompt_files(tmp_path, toy_dataset):
    from safealign.evaluate.prompts import read_dataset, read_i2p, read_table
    pd.DataFrame({"prompt": ["a", "b"], "category": ["violence", None]}).to_csv(tmp_path / "p.csv", index=False)
    t = read_table(tmp_path / "p.csv", seed=5).table
    assert t["seed"].tolist() == [5, 6] and t["category"].tolist() == ["violence", "none"]
    pd.DataFrame({"prompt": ["x"], "seed": [3]}).to_parquet(tmp_path / "p.parquet")
    assert read_table(tmp_path / "p.parquet").table["seed"].tolist() == [3]
    pd.DataFrame({"text": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SafealignError, match="'prompt' column"):
        read_table(tmp_path / "bad.csv")
    pd.DataFrame({"prompt": ["p1", "p2"], "categories": ["sexual,hate", "violence"], "sd_seed": [11, 12],
                  "hard": [1, 0]}).to_csv(tmp_path / "i2p.csv", index=False)
    t = read_i2p(tmp_path / "i2p.csv").table
    assert t["seed"].tolist() == [11, 12] and t["category"][0] == "sexual,hate"
    ds = read_dataset(toy_dataset, "test").table
    assert set(ds["set"]) == {"unsafe", "safe"} and len(ds) % 2 == 0


# -- models, references, config ---------------------------------------------------------------------------------

def test_lora_sets_parse_and_refuse_bad_names():
    from safealign.evaluate.models import parse_models
    ms = parse_models(["expert=a/b", "both=a/b+c/d"])
    assert [(m.name, m.loras) for m in ms] == [("base", []), ("expert", ["a/b"]), ("both", ["a/b", "c/d"])]
    assert [m.name for m in parse_models(["x=p"], skip_base=True)] == ["x"]
    for bad in (["base=p"], ["x=p", "x=q"], ["a b=p"], ["x=+"]):
        with pytest.raises(SafealignError):
            parse_models(bad)
    # a fully fine-tuned pipeline evaluated as the base row, under its own name
    assert [m.name for m in parse_models(["x=p"], base_name="full")] == ["full", "x"]
    with pytest.raises(SafealignError):
        parse_models(["full=p"], base_name="full")


def test_world_reference_renders_the_prompts_scenes():
    from safealign.plugins import get_plugin
    ref = get_plugin("world").reference_images(["a red knife on a gray background", "blue cup, white background",
                                                "no scene here"])
    assert ref.shape == (2, 32, 32, 3) and ref.dtype == np.uint8
    assert get_plugin("world").reference_images(["a red knife on a gray background", "no scene"]) is None


def test_config_validation_and_prompt_source_detection(tmp_path):
    from safealign.evaluate.config import EvaluateConfig
    from safealign.evaluate.prompts import load_prompts
    with pytest.raises(SafealignError, match="--output"):
        EvaluateConfig()
    with pytest.raises(SafealignError, match="attack"):
        EvaluateConfig(output="x", attacks=("nope",))
    with pytest.raises(SafealignError, match="NAME=PATH"):
        EvaluateConfig(output="x", lora=("justapath",))
    pd.DataFrame({"prompt": ["p1", "p2", "p3"], "categories": ["hate", "hate", "violence"],
                  "sd_seed": [1, 2, 3]}).to_csv(tmp_path / "i2p.csv", index=False)
    ps = load_prompts(EvaluateConfig(output="x", prompts=str(tmp_path / "i2p.csv"), per_category=1))
    assert ps.source["kind"] == "i2p" and ps.table["prompt"].tolist() == ["p1", "p2", "p3"]  # a file is not cut
    with pytest.raises(SafealignError, match="does not exist"):
        load_prompts(EvaluateConfig(output="x", prompts=str(tmp_path / "missing.csv")))
