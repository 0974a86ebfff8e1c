"""Hostile input, part 1: names that try to become paths, files that live outside their artifact, folders
safealign did not write, full or read-only disks, two writers on one output, resuming a stopped run."""

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from PIL import Image

from safealign import artifacts
from safealign.cli import main as cli
from safealign.data.dataset import PairedDataset
from safealign.data.prompts import read_prompts
from safealign.data.taxonomy import load_taxonomy, normalise_category
from safealign.errors import SafealignError
from safealign.names import contained, path_component, slug

BAD_NAMES = ["../x", "../../x", "/tmp/abs", ".", "..", "a/b", "a\\b", "x\x00y", "tab\there", "", "C:evil",
             "violence.partial"]


def _run(*args):
    return cli([str(a) for a in args])


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("safealign: error:"), err
    assert "Traceback" not in err


# -- names ------------------------------------------------------------------------------------------------------

def test_category_spellings_are_one_category():
    for spelling in (" Violence ", "VIOLENCE", "violence", "Violence\n", "ｖｉｏｌｅｎｃｅ"):  # last: full-width
        assert normalise_category(spelling) == "violence"
    assert normalise_category("Illegal Activity") == normalise_category("illegal_activity") == "illegal-activity"
    assert normalise_category("Harrasment") == "harassment"
    for bad in (None, "", "   ", float("nan")):
        with pytest.raises(SafealignError, match="missing|empty"):
            normalise_category(bad)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_that_are_paths_are_refused(bad):
    with pytest.raises(SafealignError, match="cannot be used as a file or folder name|empty"):
        path_component(bad, "category")
    if bad == "tab\there":  # white space in a category is spelled '-'
        assert normalise_category(bad) == "tab-here"
    elif bad.strip():
        with pytest.raises(SafealignError):
            normalise_category(bad)
    s = slug(bad)  # a derived file name never fails and is always one plain name
    assert s and "/" not in s and "\\" not in s and not s.startswith(".") and path_component(s) == s


# -- dataset tables, prompts files, taxonomies: refused before anything is written ----------------------------

def _dataset_with(toy_dataset, dst, **edits):
    shutil.copytree(toy_dataset, dst)
    df = pd.read_parquet(dst / "pairs.parquet")
    for col, fn in edits.items():
        df[col] = fn(df)
    df.to_parquet(dst / "pairs.parquet", index=False)
    return dst


@pytest.mark.parametrize("bad", ["../../escaped", "/tmp/escaped-abs", ".", "a/b"])
def test_dataset_category_that_is_a_path_is_refused(toy_dataset, tmp_path, bad):
    ds = _dataset_with(toy_dataset, tmp_path / "ds",
                       category=lambda df: df["category"].where(df["category"] != "violence", bad))
    with pytest.raises(SafealignError, match="cannot be used as a file or folder name"):
        PairedDataset(ds)


def test_dataset_category_spellings_are_normalised(toy_dataset, tmp_path):
    ds = _dataset_with(toy_dataset, tmp_path / "ds",
                       category=lambda df: df["category"].map({"violence": " Violence ", "shocking": "SHOCKING"}))
    d = PairedDataset(ds)
    assert d.categories == ["shocking", "violence"]
    assert len(d.pairs(" VIOLENCE", "train")) == len(PairedDataset(toy_dataset).pairs("violence", "train")) > 0


def test_train_refuses_path_categories_before_writing(toy_dataset, tiny_paths, tmp_path, capsys):
    out = tmp_path / "experts"
    bad_ds = _dataset_with(toy_dataset, tmp_path / "bad",
                           category=lambda df: df["category"].where(df["category"] != "violence", "../../escaped"))
    common = ["--model", tiny_paths["sd1"], "--output", out, "--max-steps", 1, "--cache-dir", tmp_path / "c"]
    for args in (["--dataset", bad_ds, "--category", "all"],
                 ["--dataset", toy_dataset, "--category", "../x"],
                 ["--dataset", toy_dataset, "--category", str(tmp_path / "abs")],
                 ["--dataset", toy_dataset, "--category", "."]):
        assert _run("train", "expert", *common, *args) == 2, args
        _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_prompts_and_taxonomies_refuse_path_categories(tmp_path, capsys):
    good = {"pair_id": ["p-1"], "category": ["violence"], "concept": ["knife"], "unsafe_prompt": ["a knife"],
            "safe_prompt": ["a spoon"], "seed": [1], "split": ["train"]}
    pd.DataFrame({**good, "category": [" Violence "]}).to_parquet(tmp_path / "ok.parquet")
    assert read_prompts(tmp_path / "ok.parquet")["category"].tolist() == ["violence"]
    pd.DataFrame({**good, "category": ["../../x"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SafealignError, match="cannot be used as a file or folder name"):
        read_prompts(tmp_path / "bad.parquet")
    tax = tmp_path / "tax.yaml"
    tax.write_text(textwrap.dedent("""\
        categories:
          /etc/evil: {knife: spoon}
        """))
    with pytest.raises(SafealignError, match="cannot be used as a file or folder name"):
        load_taxonomy(str(tax))
    out = tmp_path / "prompts.parquet"
    assert _run("data", "prompts", "--model", "world", "--taxonomy", tax, "--output", out) == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "ok.parquet",
                                                                               "tax.yaml"]


# -- reading outside the dataset -------------------------------------------------------------------------------

def test_symlinked_image_or_images_folder_outside_is_refused(toy_dataset, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16)).save(secret)
    ds = _dataset_with(toy_dataset, tmp_path / "ds")
    victim = ds / pd.read_parquet(ds / "pairs.parquet")["unsafe_image"].iloc[0]
    victim.unlink()
    victim.symlink_to(secret)
    with pytest.raises(SafealignError, match="leads outside"):
        PairedDataset(ds)
    victim.unlink()
    victim.symlink_to(ds / "SHA256SUMS")  # a link that stays inside is fine (and then fails as a bad image)
    PairedDataset(ds)

    ds2 = _dataset_with(toy_dataset, tmp_path / "ds2")
    shutil.move(ds2 / "images", tmp_path / "elsewhere")
    (ds2 / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(SafealignError, match="leads outside"):
        PairedDataset(ds2)
    assert contained(ds / "images", ds) == ds / "images"


def _copro(root, link_target=None):
    (root / "images").mkdir(parents=True)
    rows = [("a man with a knife", "u_1.png", "violence"), ("a man with a flower", "s_1.png", "violence"),
            ("an angry mob", "u_2.png", "Hate"), ("a happy crowd", "s_2.png", "Hate")]
    with open(root / "CoProv2_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image", "category"])
        w.writerows(rows)
    for i, (_, name, _) in enumerate(rows):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "images" / name)
    if link_target is not None:
        (root / "images" / "u_2.png").unlink()
        (root / "images" / "u_2.png").symlink_to(link_target)
    return root


def test_coprov2_import_refuses_a_symlink_out_and_path_categories(tmp_path, capsys):
    outside = tmp_path / "system-file.png"
    Image.new("RGB", (8, 8)).save(outside)
    src = _copro(tmp_path / "copro", link_target=outside)
    out = tmp_path / "ds"
    assert _run("data", "import-coprov2", "--source", src, "--output", out) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "leads outside" in err and not out.exists()

    src2 = _copro(tmp_path / "copro2")
    rows = (src2 / "CoProv2_train.csv").read_text().replace("Hate", "../../etc")
    (src2 / "CoProv2_train.csv").write_text(rows)
    assert _run("data", "import-coprov2", "--source", src2, "--output", out) == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists()


# -- --overwrite deletes only what safealign wrote --------------------------------------------------------------

def test_overwrite_refuses_a_folder_safealign_did_not_write(tmp_path, capsys):
    src = _copro(tmp_path / "copro")
    user = tmp_path / "my-photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    assert _run("data", "import-coprov2", "--source", src, "--output", user, "--overwrite") == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "holds no safealign.json" in err
    assert (user / "holiday.jpg").read_bytes() == b"precious" and sorted(os.listdir(user)) == ["holiday.jpg"]
    # a folder safealign wrote is replaced
    out = tmp_path / "ds"
    assert _run("data", "import-coprov2", "--source", src, "--output", out) == 0
    assert _run("data", "import-coprov2", "--source", src, "--output", out, "--overwrite") == 0
    assert PairedDataset(out).categories == ["hate", "violence"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no temp folder, no lock file


# -- two writers on one output ----------------------------------------------------------------------------------

HOLD = """
import sys, time
from safealign.artifacts import check_output_free
check_output_free(sys.argv[1], False)
print("holding", flush=True)
time.sleep(120)
"""

TRY = """
import sys
from safealign.artifacts import check_output_free
from safealign.errors import SafealignError
try:
    check_output_free(sys.argv[1], False)
except SafealignError as e:
    print(e)
    sys.exit(2)
"""


def test_second_writer_refuses_at_once_and_the_first_completes(tmp_path, capsys):
    src = _copro(tmp_path / "copro")
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert _run("data", "import-coprov2", "--source", src, "--output", out) == 2
        err = capsys.readouterr().err
        _one_error_line(err)
        assert f"being written by another safealign process (pid {holder.pid})" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the other way round: this process is writing; a second process refuses at once, then this one completes
    with artifacts.atomic_dir(out) as tmp:
        (tmp / "x.txt").write_text("mine")
        artifacts.write_manifest(tmp, "dataset")
        second = subprocess.run([sys.executable, "-c", TRY, str(out)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"(pid {os.getpid()})" in second.stdout, second
    assert (out / "x.txt").read_text() == "mine"
    again = subprocess.run([sys.executable, "-c", TRY, str(out) + "-other"], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again  # the lock was released, and it never blocked another output
    assert not (tmp_path / ".ds.lock").exists()


def test_two_evaluate_runs_on_one_output_the_second_refuses_at_once(tiny_paths, tmp_path):
    import time
    out = tmp_path / "report"
    args = [sys.executable, "-m", "safealign.cli", "--no-progress", "evaluate", "--model", str(tiny_paths["sd1"]),
            "--prompts", str(_prompt_csv(tmp_path)), "--judges", "toy_judge:slow_red_judge", "--steps", "2",
            "--fid-features", "none", "--output", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lock = tmp_path / ".report.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 2 and "being written by another safealign process" in second.stderr, second
    assert first.poll() is None or first.returncode == 0  # refused before touching the first run's work
    assert first.wait(timeout=300) == 0, first.communicate()
    assert json.loads((out / "report.json").read_text())["results"]["base"]  # the first completed
    assert not lock.exists()


def _prompt_csv(folder):
    f = folder / "p.csv"
    f.write_text("prompt,category\n" + "".join(f"a red knife {i},violence\n" for i in range(4)))
    return f


# -- filesystem errors: one line, exit 2, nothing left behind ---------------------------------------------------

def test_output_under_a_regular_file(tmp_path, capsys):
    src = _copro(tmp_path / "copro")
    (tmp_path / "afile").write_text("x")
    assert _run("data", "import-coprov2", "--source", src, "--output", tmp_path / "afile" / "ds") == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "is a file, not a folder" in err
    assert _run("world", "sample", "a red knife", "--out", tmp_path / "afile" / "g.png") == 2
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EFBIG, errno.EACCES])
def test_disk_errors_are_one_line_and_leave_no_temp(tmp_path, capsys, monkeypatch, code):
    src = _copro(tmp_path / "copro")
    out = tmp_path / "work" / "ds"
    (tmp_path / "work").mkdir()

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))  # no file name: as a write() on a full disk reports it

    monkeypatch.setattr(os, "replace", fail)
    assert _run("data", "import-coprov2", "--source", src, "--output", out) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert f"cannot write {out}: {os.strerror(code)};" in err
    assert os.listdir(tmp_path / "work") == []  # no temp folder, no half dataset, no lock file
    prompts = tmp_path / "work" / "p.parquet"
    assert _run("data", "prompts", "--model", "world", "--pairs-per-concept", 1, "--output", prompts) == 2
    _one_error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path / "work") == []


def test_a_failing_final_rename_keeps_the_previous_artifact(tmp_path, monkeypatch):
    out = tmp_path / "a"
    with artifacts.atomic_dir(out) as tmp:
        artifacts.write_manifest(tmp, "report")
        (tmp / "v").write_text("1")
    real = os.rename

    def rename(a, b):
        if str(b) == str(out) and ".a." in str(a) and not str(a).endswith(".old"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(a))
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError), artifacts.atomic_dir(out, overwrite=True) as tmp:
        artifacts.write_manifest(tmp, "report")
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_single_file_outputs_are_not_replaced_without_overwrite(tmp_path):
    p = tmp_path / "r.json"
    artifacts.write_json_atomic(p, {"a": 1})
    with pytest.raises(SafealignError, match="already exists"):
        with artifacts.atomic_file(p) as tmp:
            tmp.write_text("no")
    with artifacts.atomic_file(p, overwrite=True) as tmp:
        tmp.write_text('{"a": 2}')
    assert json.loads(p.read_text()) == {"a": 2} and sorted(os.listdir(tmp_path)) == ["r.json"]


# -- resume finishes a stopped `train expert --category all`; merge refuses the unfinished folder -------------------

def test_resume_trains_only_the_missing_experts_and_merge_refuses_partial(tiny_paths, toy_dataset, tmp_path,
                                                                          monkeypatch, capsys):
    from safealign.train import dpo
    out, merged = tmp_path / "experts", tmp_path / "merged"
    args = ["train", "expert", "--model", tiny_paths["sd1"], "--dataset", toy_dataset, "--output", out,
            "--category", "all", "--max-steps", 1, "--batch-size", 2, "--checkpoint-every", 0, "--eval-split", "",
            "--cache-dir", tmp_path / "cache"]
    real, trained = dpo._train_one, []

    def killed_at_violence(cfg, bb, acc, ds, category, *rest):
        if category == "violence":
            raise KeyboardInterrupt  # the run is stopped before the second expert
        trained.append(category)
        return real(cfg, bb, acc, ds, category, *rest)

    monkeypatch.setattr(dpo, "_train_one", killed_at_violence)
    assert _run(*args) == 130
    capsys.readouterr()
    assert trained == ["shocking"] and not (out / "violence").exists()
    shocking = (out / "shocking" / "pytorch_lora_weights.safetensors").read_bytes()

    assert _run("merge", "--experts", out, "--method", "cat", "--output", merged) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "violence" in err and "--allow-partial" in err and not merged.exists()
    assert _run("merge", "--experts", out, "--method", "cat", "--output", merged, "--allow-partial") == 0
    m = json.loads((merged / "safealign.json").read_text())
    assert m["categories"] == ["shocking"] and m["partial"] == {"allow_partial": True, "unfinished": ["violence"]}

    assert _run(*args) == 2  # without --resume the finished expert is in the way
    assert "already exists" in capsys.readouterr().err
    assert _run(*args, "--resume", "--beta", 100) == 2  # other options: the finished expert is not silently kept
    assert "other options (beta)" in capsys.readouterr().err
    trained.clear()
    monkeypatch.setattr(dpo, "_train_one", lambda *a: (trained.append(a[4]), real(*a))[1])
    assert _run(*args, "--resume") == 0
    assert trained == ["violence"]
    assert (out / "shocking" / "pytorch_lora_weights.safetensors").read_bytes() == shocking
    assert json.loads((out / "violence" / "safealign.json").read_text())["run_categories"] == ["shocking",
                                                                                              "violence"]
    assert _run("merge", "--experts", out, "--method", "cat", "--output", merged, "--overwrite") == 0
    assert json.loads((merged / "safealign.json").read_text())["categories"] == ["shocking", "violence"]
    assert "partial" not in json.loads((merged / "safealign.json").read_text())


def test_merge_refuses_experts_of_different_families():
    from safealign.lora import LoraSpec
    from safealign.merge.experts import Expert, check_compatible
    spec = LoraSpec(rank=1, alpha=1.0, targets=("to_q",))
    mods = {"m.to_q": (torch.ones(1, 4), torch.ones(4, 1))}
    a = Expert("violence", mods, spec, manifest={"base_model": {"family": "sd1"}})
    b = Expert("hate", mods, spec, manifest={"base_model": {"family": "sdxl"}})
    check_compatible([a, Expert("shocking", mods, spec, manifest={"base_model": {"family": "sd1"}})])
    with pytest.raises(SafealignError, match="different model families"):
        check_compatible([a, b])
