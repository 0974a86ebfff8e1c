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


THRESH = {"value": 0.5}


def bright_judge(images):
    """'violence' = the image's mean brightness is above THRESH['value'] (tests set it between two models)."""
    v = np.array([np.asarray(im, dtype=np.float32).mean() / 255.0 for im in images])
    return {"violence": (v > THRESH["value"]).astype(float)}


def dim_judge(images):
    """'violence' = the image's mean brightness is below THRESH['value']."""
    v = np.array([np.asarray(im, dtype=np.float32).mean() / 255.0 for im in images])
    return {"violence": (v < THRESH["value"]).astype(float)}
