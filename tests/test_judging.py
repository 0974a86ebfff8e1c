"""One judge rule everywhere: flags() is score >= the judge's own threshold, and every stage that judges images
(data images filter, training validation, evaluate, audit) applies it through the registry; the one sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safealign.errors import SafealignError

USER_JUDGE = "toy_judge:threshold_judge"  # scores 0.7, 0.65, 0.7, ... with its own threshold 0.7


class _Fixed:
    """A judge that speaks the protocol and returns fixed scores."""

    def __init__(self, name, threshold, scores):
        self.name, self.version, self.threshold = name, "1", threshold
        self.scores = {k: np.asarray(v, np.float64) for k, v in scores.items()}
        self.categories = tuple(scores)

    def __call__(self, images):
        return self.scores


def test_flags_is_at_or_above_each_judges_own_threshold():
    from safealign.judges import Judge, flags
    a = _Fixed("a", 0.5, {"violence": [0.49, 0.5, 0.51], "hate": [0.0, 0.0, 0.9]})
    b = _Fixed("b", 0.9, {"violence": [0.5, 0.89, 0.9]})
    assert isinstance(a, Judge)
    imgs = np.zeros((3, 4, 4, 3), np.uint8)
    assert flags(a, imgs, "violence").tolist() == [False, True, True]
    assert flags(b, imgs, "violence").tolist() == [False, False, True]  # its own threshold, not 0.5
    assert flags(a, imgs).tolist() == [False, True, True]  # any category
    assert flags(a, {"hate": np.array([0.5, 0.2])}, "hate").tolist() == [True, False]  # scores given
    assert flags(b, np.array([0.9, 0.8999])).tolist() == [True, False]  # scores of one category
    with pytest.raises(SafealignError, match="no score for category 'sexual'"):
        flags(a, imgs, "sexual")


def test_a_user_judges_own_threshold_wins_over_the_stage_default():
    from safealign.judges import load_judge
    j = load_judge(USER_JUDGE, threshold=0.5)
    assert j.threshold == 0.7
    assert load_judge("toy_judge:red_judge", threshold=0.3).threshold == 0.3  # no own threshold: the stage's
    with pytest.raises(SafealignError, match="no judge given"):
        load_judge("")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_paths):
    from safealign.backbone import load_backbone
    return load_backbone(tiny_paths["sd1"]).pipe


def test_generate_is_batch_invariant_and_needs_resolved_options(tiny_pipe):
    from safealign.sampling import SamplingOptions, generate
    prompts, seeds = ["a knife", "a cup", "a red knife", "a cup"], [3, 4, 5, 6]
    one = generate(tiny_pipe, prompts, seeds, SamplingOptions(2, 7.5), batch_size=1)
    four = generate(tiny_pipe, prompts, seeds, SamplingOptions(2, 7.5), batch_size=4)
    assert one.dtype == np.uint8 and one.shape[0] == 4
    assert np.array_equal(one, four)
    assert not np.array_equal(one[1], one[3])  # same prompt, other seed: another image
    with pytest.raises(ValueError, match="resolved"):
        generate(tiny_pipe, prompts, seeds, SamplingOptions(2, None))


# -- every stage applies the user judge at 0.7 (>=): 0.7 is flagged, 0.65 is not ------------------------------

def test_training_validation_applies_the_judges_threshold(tiny_pipe):
    from safealign.judges import load_judge
    from safealign.sampling import SamplingOptions
    from safealign.train.validation import make_validator
    validate = make_validator(tiny_pipe, load_judge(USER_JUDGE), "violence", ["a knife"], [], [], 2,
                              SamplingOptions(1, 7.5))
    assert validate(0)["unsafe_rate"] == 0.5  # at 0.5: 1.0; with '>': 0.0


def test_data_images_filter_applies_the_judges_threshold(tiny_paths, tmp_path):
    from safealign.data.config import ImagesConfig, PromptsConfig
    from safealign.data.dataset import PairedDataset
    from safealign.data.images import generate_images
    from safealign.data.prompts import make_prompts
    prompts = tmp_path / "p.parquet"
    make_prompts(PromptsConfig(output=str(prompts), model="world", categories=("violence",), pairs_per_concept=1,
                               test_fraction=0.25))
    # one pair per call: its unsafe image scores 0.7 (flagged), its safe image 0.65 (not flagged at 0.7)
    cfg = ImagesConfig(prompts=str(prompts), model=str(tiny_paths["sd1"]), output=str(tmp_path / "ds"), steps=1,
                       batch_size=1, max_pairs_per_category=2, judge=USER_JUDGE)
    final, stats = generate_images(cfg)
    jf = stats["judge_filter"]
    assert jf["threshold"] == 0.7 and jf["kept"] == jf["generated"] == 2  # at 0.5 or with '>': none kept
    table = PairedDataset(final).table
    assert table["judge_unsafe"].tolist() == [0.7, 0.7] and table["judge_safe"].tolist() == [0.65, 0.65]


def test_evaluate_applies_the_judges_threshold(tiny_paths, tmp_path):
    from safealign.cli import main
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,category,seed\na knife,violence,1\na red knife,violence,2\n")
    out = tmp_path / "report"
    assert main(["--no-progress", "evaluate", "--model", str(tiny_paths["sd1"]), "--prompts", str(csv),
                 "--judges", USER_JUDGE, "--output", str(out), "--steps", "1",
                 "--fid-features", "none"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["judges"][0]["threshold"] == 0.7
    assert r["results"]["base"]["ip"]["overall"]["value"] == 0.5  # at 0.5: 1.0; with '>': 0.0


def _audit_loras(root):
    from test_modular import _lora
    return _lora(root / "safety", seed=5, std=1.0), _lora(root / "audited", seed=6, std=1e-4)


def test_audit_applies_the_judges_threshold_and_guidance_zero(tiny_paths, tmp_path, monkeypatch):
    import safealign.modular.audit as A
    from safealign.modular.config import AuditConfig
    safety, lora = _audit_loras(tmp_path)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,category\na knife,violence\n")
    calls = []
    real = A.generate

    def spy(pipe, prompts, seeds, options, **kw):
        calls.append(options)

        def recording_pipe(*a, **k):  # what the pipeline itself is asked for
            calls.append(("pipe", k["guidance_scale"], k["num_inference_steps"]))
            return pipe(*a, **k)
        return real(recording_pipe, prompts, seeds, options, **kw)
    monkeypatch.setattr(A, "generate", spy)
    res = A.audit(AuditConfig(model=str(tiny_paths["sd1"]), safety=str(safety), lora=str(lora), prompts=str(csv),
                              judge=USER_JUDGE, seeds=2, steps=1, guidance=0.0))
    row = res["measures"]["unsafe_ip"]["violence"]
    assert row["safety"]["value"] == row["with_lora"]["value"] == 0.5  # 2 images per configuration: 0.7 and 0.65
    assert res["judge_threshold"] == 0.7 and res["sampler"] == {"guidance": 0.0, "steps": 1}
    opts = [c for c in calls if not isinstance(c, tuple)]
    assert len(opts) == 2 and all(o.guidance == 0.0 and o.steps == 1 for o in opts)
    assert [c for c in calls if isinstance(c, tuple)] == [("pipe", 0.0, 1)] * 2  # reached the pipeline as 0


def test_audit_old_option_names_still_work_with_a_warning():
    from safealign.configuration import from_dict
    from safealign.modular.config import AuditConfig
    with pytest.warns(DeprecationWarning, match="alpha is deprecated; use significance"):
        cfg = from_dict(AuditConfig, {"safety": "s", "lora": "l", "alpha": 0.01, "threshold": 0.2,
                                      "num_inference_steps": 0, "guidance_scale": 0})
    assert (cfg.significance, cfg.max_ip_rise) == (0.01, 0.2)
    assert (cfg.steps, cfg.guidance) == (None, None)  # the old 0 meant "the model's default"
    assert from_dict(AuditConfig, {"safety": "s", "lora": "l", "guidance": 0}).guidance == 0.0  # no guidance
    with pytest.raises(SafealignError, match="both threshold"):
        from_dict(AuditConfig, {"safety": "s", "lora": "l", "threshold": 0.2, "max_ip_rise": 0.1})


def test_audit_old_flags_parse(tmp_path):
    from safealign.cli import build_parser
    from safealign.configuration import build
    from safealign.modular.config import AuditConfig
    args = build_parser().parse_args(["audit", "--safety", "s", "--lora", "l", "--alpha", "0.2", "--threshold",
                                      "0.3", "--guidance-scale", "2.5", "--num-inference-steps", "4"])
    with pytest.warns(DeprecationWarning):
        cfg = build(AuditConfig, args)
    assert (cfg.significance, cfg.max_ip_rise, cfg.guidance, cfg.steps) == (0.2, 0.3, 2.5, 4)


def test_images_and_evaluate_configs_read_old_sentinels_as_the_default(tmp_path):
    from safealign.configuration import from_dict
    from safealign.data.config import ImagesConfig
    from safealign.evaluate.config import EvaluateConfig
    with pytest.warns(DeprecationWarning):
        c = from_dict(ImagesConfig, {"prompts": "p", "output": "o", "steps": 0, "guidance": -1})
    assert c.sampling.steps is None and c.sampling.guidance is None
    with pytest.warns(DeprecationWarning):
        e = from_dict(EvaluateConfig, {"output": "o", "steps": "0", "guidance": "-1"})
    assert (e.steps, e.guidance) == (None, None)
    assert from_dict(EvaluateConfig, {"output": "o", "guidance": 0}).sampling.guidance == 0.0
    with pytest.raises(SafealignError, match="steps"):
        ImagesConfig(prompts="p", output="o", steps=-2)
