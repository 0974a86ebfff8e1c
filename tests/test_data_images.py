"""`safealign data images`: same-seed pairs, batch/process invariance, resume after a crash, judge filter."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from safealign.cli import main as cli
from safealign.data.config import ImagesConfig, PromptsConfig
from safealign.data.dataset import PairedDataset
from safealign.data.images import generate_images, read_done
from safealign.data.prompts import make_prompts
from safealign.errors import SafealignError


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts") / "p.parquet"
    make_prompts(PromptsConfig(output=str(out), model="world", categories=("violence", "shocking"),
                               pairs_per_concept=2, test_fraction=0.25))
    return out  # 12 pairs


@pytest.fixture(scope="module")
def backbone(tiny_paths):
    from safealign.backbone import load_backbone
    return load_backbone(tiny_paths["sd1"])


def _cfg(prompts, model, out, **kw):
    base = dict(prompts=str(prompts), model=str(model), output=str(out), steps=2, batch_size=2)
    base.update(kw)
    return ImagesConfig(**base)


def _pixels(folder):
    ds = PairedDataset(folder)
    return {p.pair_id: (np.asarray(Image.open(p.unsafe_image)), np.asarray(Image.open(p.safe_image)))
            for p in ds.pairs()}


def _parity(im) -> float:
    import hashlib
    return 1.0 if hashlib.md5(np.asarray(im).tobytes()).digest()[0] % 2 == 0 else 0.0


def parity_judge(images):
    """Flags an unsafe image (first half of a call) when its pixels hash even, never a safe one: a decision that
    depends on the image only, as a real judge's does."""
    k = len(images) // 2
    s = np.array([_parity(im) for im in images[:k]] + [0.0] * (len(images) - k))
    return {"violence": s, "shocking": s}


def test_pairs_share_seed_and_dataset_is_whole(prompts_file, tiny_paths, backbone, tmp_path):
    out = tmp_path / "ds"
    final, stats = generate_images(_cfg(prompts_file, tiny_paths["sd1"], out), backbone=backbone)
    assert final == out and not (tmp_path / "ds.partial").exists()
    ds = PairedDataset(out)
    assert len(ds) == 12 and ds.categories == ["shocking", "violence"]
    assert set(ds.table["split"]) == {"train", "test"}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        [f"{p}_{s}.png" for p in ds.table["pair_id"] for s in "us"])
    m = json.loads((out / "safealign.json").read_text())
    assert m["kind"] == "dataset" and m["counts"]["per_category"] == {"shocking": 6, "violence": 6}
    assert m["sampler"]["steps"] == 2 and m["base_model"]["family"] == "sd1"
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 24 and m["checksums"]["images"] == 24
    # same seed for both prompts of a pair: with one prompt for both sides the two images are identical
    from safealign.data.images import render_pairs
    settings = m["sampler"]
    u, s = render_pairs(backbone.pipe, ["a red knife"], ["a red knife"], [7], settings)
    assert np.array_equal(np.asarray(u[0]), np.asarray(s[0]))
    # and images do not depend on batching
    p0 = ds.pairs()[0]
    u1, _ = render_pairs(backbone.pipe, [p0.unsafe_prompt], [p0.safe_prompt], [p0.seed], settings)
    assert np.array_equal(np.asarray(u1[0]), np.asarray(Image.open(p0.unsafe_image)))


def test_killed_midway_then_rerun_has_every_pair_once(prompts_file, tiny_paths, backbone, tmp_path):
    ref = _pixels(generate_images(_cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ref"), backbone=backbone)[0])
    out = tmp_path / "ds"
    cfg = _cfg(prompts_file, tiny_paths["sd1"], out)

    def crash(n):
        if n >= 4:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        generate_images(cfg, backbone=backbone, on_batch=crash)
    work = tmp_path / "ds.partial"
    assert not out.exists() and work.is_dir()
    done = read_done(work)
    assert len(done) == 4
    # what a kill can leave behind: a half-written image of an unfinished pair, a temp file, a torn log line
    df = pd.read_parquet(prompts_file)
    victim = next(p for p in df["pair_id"] if p not in done)
    (work / "images" / f"{victim}_u.png").write_bytes(b"\x89PNG\r\n\x1a\n half")
    damaged = next(iter(done))  # a finished pair whose image was damaged afterwards is rendered again
    (work / "images" / f"{damaged}_s.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    (work / "images" / f".{victim}_s.png.tmp").write_bytes(b"partial")
    with open(work / "done-rank0.jsonl", "a") as f:
        f.write('{"pair_id": "' + victim)
    final, stats = generate_images(cfg, backbone=backbone)
    assert stats["timing"]["pairs_resumed"] == 3 and stats["timing"]["pairs_rendered_this_run"] == 9
    ds = PairedDataset(final)
    assert len(ds) == 12 and not ds.table["pair_id"].duplicated().any()
    assert set(ds.table["pair_id"]) == set(df["pair_id"])
    ds.verify_images(ds.pairs())
    assert sorted(os.listdir(final / "images")) == sorted(f"{p}_{s}.png" for p in df["pair_id"] for s in "us")
    got = _pixels(final)
    assert all(np.array_equal(got[k][0], ref[k][0]) and np.array_equal(got[k][1], ref[k][1]) for k in ref)
    assert not work.exists()


def test_rerun_with_other_settings_needs_restart(prompts_file, tiny_paths, backbone, tmp_path):
    out = tmp_path / "ds"

    def crash(n):
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        generate_images(_cfg(prompts_file, tiny_paths["sd1"], out), backbone=backbone, on_batch=crash)
    with pytest.raises(SafealignError, match="--restart"):
        generate_images(_cfg(prompts_file, tiny_paths["sd1"], out, steps=3), backbone=backbone)
    final, _ = generate_images(_cfg(prompts_file, tiny_paths["sd1"], out, steps=3, restart=True), backbone=backbone)
    assert len(PairedDataset(final)) == 12


def test_judge_filter_keeps_separated_pairs(prompts_file, tiny_paths, backbone, tmp_path):
    ref = _pixels(generate_images(_cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ref"), backbone=backbone)[0])
    expect = [p for p in pd.read_parquet(prompts_file)["pair_id"] if _parity(ref[p][0])]
    assert 0 < len(expect) < 12
    cfg = _cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ds", judge="test_data_images:parity_judge")
    final, stats = generate_images(cfg, backbone=backbone)
    ds = PairedDataset(final)
    assert list(ds.table["pair_id"]) == expect  # file order kept
    assert sorted(os.listdir(final / "images")) == sorted(f"{p}_{s}.png" for p in expect for s in "us")
    jf = json.loads((final / "safealign.json").read_text())["metrics"]["judge_filter"]
    n_v = sum(p.startswith("violence") for p in expect)
    assert jf["kept_per_category"]["violence"] == {"generated": 6, "kept": n_v, "fraction": round(n_v / 6, 4)}
    assert jf["kept"] == len(expect) and jf["generated"] == 12
    assert (ds.table["judge_unsafe"] >= 0.5).all() and (ds.table["judge_safe"] < 0.5).all()


def test_min_kept_fails_then_more_pairs_reuse_every_image(prompts_file, tiny_paths, backbone, tmp_path):
    ref = _pixels(generate_images(_cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ref"), backbone=backbone)[0])
    out = tmp_path / "ds"
    cfg = dict(judge="test_data_images:parity_judge", min_kept_per_category=6)
    with pytest.raises(SafealignError, match="kept fewer than 6 pairs .*are reused"):
        generate_images(_cfg(prompts_file, tiny_paths["sd1"], out, max_pairs_per_category=2, **cfg),
                        backbone=backbone)
    assert not out.exists() and len(read_done(tmp_path / "ds.partial")) == 4
    cfg["min_kept_per_category"] = 1
    final, stats = generate_images(_cfg(prompts_file, tiny_paths["sd1"], out, max_pairs_per_category=6, **cfg),
                                   backbone=backbone)
    assert stats["timing"]["pairs_resumed"] == 4 and stats["timing"]["pairs_rendered_this_run"] == 8
    got = _pixels(final)
    assert got and all(np.array_equal(got[k][0], ref[k][0]) and np.array_equal(got[k][1], ref[k][1]) for k in got)


def test_judge_without_the_category_is_refused(prompts_file, tiny_paths, backbone, tmp_path):
    cfg = _cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ds", judge="x:y")
    with pytest.raises(SafealignError, match="no score for category"):
        generate_images(cfg, backbone=backbone, judge=lambda ims: {"hate": np.zeros(len(ims))})
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_sdxl_pipeline(prompts_file, tiny_paths, tmp_path):
    final, _ = generate_images(_cfg(prompts_file, tiny_paths["sdxl"], tmp_path / "x", max_pairs_per_category=1))
    assert len(PairedDataset(final)) == 2


def _write(df, path):
    df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("dup", "repeats pair_id"), ("category", "unknown category"),
    ("identical", "identical unsafe and safe"), ("column", "lacks column"), ("bad_id", "safe file name"),
    ("exists", "already exists"),
])
def test_bad_input_exits_2_and_writes_nothing(prompts_file, tiny_paths, tmp_path, capsys, case, match):
    df = pd.read_parquet(prompts_file)
    prompts, out, extra = prompts_file, tmp_path / "ds", []
    if case == "missing":
        prompts = tmp_path / "nope.parquet"
    elif case == "dup":
        prompts = _write(pd.concat([df, df.iloc[:1]]), tmp_path / "d.parquet")
    elif case == "category":
        extra = ["--categories", "violence,nonsense"]
    elif case == "identical":
        df.loc[3, "safe_prompt"] = df.loc[3, "unsafe_prompt"].upper() + "!"
        prompts = _write(df, tmp_path / "i.parquet")
    elif case == "column":
        prompts = _write(df.drop(columns=["seed"]), tmp_path / "c.parquet")
    elif case == "bad_id":
        df.loc[0, "pair_id"] = "../evil"
        prompts = _write(df, tmp_path / "b.parquet")
    elif case == "exists":
        out.mkdir()
    rc = cli(["data", "images", "--prompts", str(prompts), "--model", str(tiny_paths["sd1"]), "--output", str(out),
              "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ds.partial").exists()
    assert case == "exists" or not out.exists()


def _run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_give_the_same_dataset_as_one(prompts_file, tiny_paths, tmp_path):
    env = {**os.environ, "SAFEALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    args = ["data", "images", "--prompts", str(prompts_file), "--model", str(tiny_paths["sd1"]), "--steps", "2",
            "--batch-size", "2"]
    one = _run([sys.executable, "-m", "safealign.cli", *args, "--output", str(tmp_path / "one")], env)
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process (CPU multi-process needs MPI there);
    # `--multi_gpu` starts two through torch.distributed.run, and on a machine without GPUs they use gloo on CPU
    two = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "safealign.cli",
                *args, "--output", str(tmp_path / "two")], env)
    assert sum(ln.startswith("dataset:") for ln in two.stdout.splitlines()) == 1  # summary once, by rank 0
    assert "on 2 process(es)" in two.stdout and "on 1 process(es)" in one.stdout
    a, b = PairedDataset(tmp_path / "one"), PairedDataset(tmp_path / "two")
    pd.testing.assert_frame_equal(a.table, b.table)
    assert (tmp_path / "one" / "SHA256SUMS").read_bytes() == (tmp_path / "two" / "SHA256SUMS").read_bytes()
    pa, pb = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert pa.keys() == pb.keys()
    assert all(np.array_equal(pa[k][i], pb[k][i]) for k in pa for i in (0, 1))


def test_target_kept_renders_in_order_until_each_category_is_full(prompts_file, tiny_paths, backbone, tmp_path):
    from safealign.data.images import select_pairs
    ref = _pixels(generate_images(_cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ref"), backbone=backbone)[0])
    order = select_pairs(pd.read_parquet(prompts_file), (), 0)
    expect = {c: [p for p in order.loc[order.category == c, "pair_id"] if _parity(ref[p][0])][:2]
              for c in ("violence", "shocking")}
    assert all(len(v) == 2 for v in expect.values())
    cfg = _cfg(prompts_file, tiny_paths["sd1"], tmp_path / "ds", judge="test_data_images:parity_judge",
               target_kept_per_category=2, batch_size=1)
    final, stats = generate_images(cfg, backbone=backbone)
    ds = PairedDataset(final)
    assert sorted(ds.table["pair_id"]) == sorted(expect["violence"] + expect["shocking"])
    jf = stats["judge_filter"]
    assert jf["target_per_category"] == 2 and all(v["kept"] == 2 for v in jf["kept_per_category"].values())
    needed = {c: list(order.loc[order.category == c, "pair_id"]).index(v[-1]) + 1 for c, v in expect.items()}
    assert {c: v["generated"] for c, v in jf["kept_per_category"].items()} == needed
    assert stats["timing"]["pairs_rendered_this_run"] == sum(needed.values())  # batch 1: nothing beyond
    with pytest.raises(SafealignError, match="kept fewer than 7"):  # 6 pairs per category cannot give 7
        generate_images(_cfg(prompts_file, tiny_paths["sd1"], tmp_path / "x", judge="test_data_images:parity_judge",
                             target_kept_per_category=7), backbone=backbone)
