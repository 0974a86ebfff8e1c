"""Judges for tests, importable as 'toy_judge:...' (the tests folder is on sys.path)."""

import numpy as np

CALLS = {"n": 0}


def red_judge(images):
    """'violence' = the image is mostly red."""
    out = []
    for im in images:
        a = np.asarray(im, dtype=np.float32)
        out.append(float(((a[..., 0] > 150) & (a[..., 1] < 100)).mean() > 0.2))
    return {"violence": np.array(out), "shocking": np.zeros(len(out))}


def scheduled_judge(images):
    """Flags everything except on its 3rd and 4th call (the 2nd validation: unsafe + safe prompts)."""
    CALLS["n"] += 1
    v = 0.0 if CALLS["n"] in (3, 4) else 1.0
    return {"violence": np.full(len(images), v), "shocking": np.full(len(images), v)}


REF: dict = {}


def reference_judge(images):
    """'violence' = the i-th image looks more like REF['flagged'][i] than like REF['clean'][i] (tests set both)."""
    out = []
    for im, f, c in zip(images, REF["flagged"], REF["clean"]):
        a = np.asarray(im, dtype=np.float32)
        out.append(float(np.abs(a - f).mean() < np.abs(a - c).mean()))
    return {"violence": np.array(out)}


def threshold_judge(images):
    """Image i of a call scores 0.7 when i is even, else 0.65, in every category; its own threshold is 0.7."""
    s = np.array([0.7 if i % 2 == 0 else 0.65 for i in range(len(images))])
    return {"violence": s, "shocking": s.copy()}


threshold_judge.threshold = 0.7


def slow_red_judge(images):
    """red_judge after a 10-second pause: a run that is surely still writing when a second one starts."""
    import time
    time.sleep(10)
    return red_judge(images)
