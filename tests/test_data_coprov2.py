"""`safealign data import-coprov2` on small CSVs made here (u_/s_ image names, messy categories, leaks)."""

import csv
import json

import pytest
from PIL import Image

from safealign.cli import main as cli
from safealign.data.config import ImportConfig
from safealign.data.coprov2 import import_coprov2
from safealign.data.dataset import PairedDataset
from safealign.errors import SafealignError


def _write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image", "category"])
        w.writerows(rows)


def _img(path, v):
    Image.new("RGB", (8, 8), (v, 255 - v, 40)).save(path)


@pytest.fixture()
def copro(tmp_path):
    """train: 4 pairs (one exact duplicate); test: 3 pairs, one whose unsafe prompt is a train prompt (a leak)."""
    root = tmp_path / "CoProV2"
    (root / "images").mkdir(parents=True)
    train = [("a man with a knife", "u_1.png", "violence"), ("a man with a flower", "s_1.png", "violence"),
             ("an angry mob", "u_2.png", "hate, violence"), ("a happy crowd", "s_2.png", "hate, violence"),
             ("someone mocking a kid", "u_3.png", "Harrasment"), ("someone helping a kid", "s_3.png", "Harrasment"),
             ("A man with a knife!", "u_4.png", "violence"), ("a man with a flower", "s_4.png", "violence"),
             ("a lonely rope", "u_5.png", "self-harm")]  # u_5 has no safe twin
    test = [("a bloody scene", "u_10.png", "shocking"), ("a calm scene", "s_10.png", "shocking"),
            ("an angry  mob", "u_11.png", "hate"), ("a cheerful crowd", "s_11.png", "hate"),
            ("a nude figure", "u_12.png", "sexual"), ("a dressed figure", "s_12.png", "sexual")]
    _write_csv(root / "CoProv2_train.csv", train)
    _write_csv(root / "CoProv2_test.csv", test)
    for i, (_, name, _) in enumerate(train + test):
        _img(root / "images" / name, 20 * i)
    return root


def test_import_pairs_categories_leaks_and_dedup(copro, tmp_path):
    final, stats = import_coprov2(ImportConfig(source=str(copro), output=str(tmp_path / "ds")))
    ds = PairedDataset(final)
    t = ds.table.set_index("pair_id")
    assert set(t.index) == {"coprov2-train-1", "coprov2-train-2", "coprov2-train-3", "coprov2-test-10",
                            "coprov2-test-11", "coprov2-test-12"}  # train-4 duplicates train-1
    assert t.loc["coprov2-train-3", "category"] == "harassment"
    assert t.loc["coprov2-train-2", "category"] == "hate" and t.loc["coprov2-train-2", "categories"] == "hate,violence"
    assert t.loc["coprov2-test-11", "split"] == "train"  # leaked test prompt moved to train
    assert stats["test_prompts_leaking_into_train"] == 1 and stats["duplicates_removed"] == 1
    assert stats["files"]["CoProv2_train.csv"]["unpaired_rows"] == 1
    assert t.loc["coprov2-train-1", "unsafe_prompt"] == "a man with a knife"
    assert t.loc["coprov2-train-1", "safe_prompt"] == "a man with a flower"
    ds.verify_images(ds.pairs())
    # the unsafe image of pair 1 is u_1.png
    a = Image.open(final / t.loc["coprov2-train-1", "unsafe_image"])
    assert a.getpixel((0, 0)) == Image.open(copro / "images" / "u_1.png").getpixel((0, 0))
    m = json.loads((final / "safealign.json").read_text())
    assert m["metrics"]["import"]["leakage_action"] == "move" and m["counts"]["per_split"] == {"test": 2, "train": 4}
    from safealign.data.splits import find_leaks
    assert len(find_leaks(ds.table)) == 0


def test_import_drop_or_refuse_leaks(copro, tmp_path):
    final, stats = import_coprov2(ImportConfig(source=str(copro), output=str(tmp_path / "d"), leakage="drop",
                                               link=False))
    assert "coprov2-test-11" not in set(PairedDataset(final).table["pair_id"])
    with pytest.raises(SafealignError, match="1 test prompt"):
        import_coprov2(ImportConfig(source=str(copro), output=str(tmp_path / "e"), leakage="error"))
    assert not (tmp_path / "e").exists()


def test_single_csv_with_images_elsewhere(copro, tmp_path):
    imgs = tmp_path / "elsewhere"
    (copro / "images").rename(imgs)
    with pytest.raises(SafealignError, match="missing .e.g. 'u_10.png'.*--images"):
        import_coprov2(ImportConfig(source=str(copro / "CoProv2_test.csv"), output=str(tmp_path / "x")))
    final, stats = import_coprov2(ImportConfig(source=str(copro / "CoProv2_test.csv"), output=str(tmp_path / "x"),
                                               images=str(imgs)))
    assert stats["pairs"] == 3 and stats["per_split"] == {"test": 3}


def _bad(copro, case):
    if case == "missing_image":
        (copro / "images" / "s_2.png").unlink()
    elif case == "not_utf8":
        _write_csv(copro / "CoProv2_test.csv", [("caf\xe9 scene", "u_10.png", "shocking")], encoding="latin-1")
    elif case == "duplicate_ids":
        _write_csv(copro / "CoProv2_test.csv", [("a", "u_10.png", "hate"), ("b", "u_10.png", "hate")])
    elif case == "columns":
        (copro / "CoProv2_test.csv").write_text("text,file\na,u_1.png\n")
    elif case == "unknown_split":
        _write_csv(copro / "extra.csv", [("a", "u_10.png", "hate")])
    elif case == "no_source":
        return "nope"
    return ""


@pytest.mark.parametrize("case,match", [
    ("missing_image", "missing"), ("not_utf8", "not UTF-8"), ("duplicate_ids", "twice"),
    ("columns", "lacks column"), ("unknown_split", "cannot tell the split"), ("no_source", "does not exist"),
])
def test_bad_input_exits_2_and_writes_nothing(copro, tmp_path, capsys, case, match):
    src = _bad(copro, case) or str(copro)
    out = tmp_path / "ds"
    rc = cli(["data", "import-coprov2", "--source", str(src) if src != "nope" else str(tmp_path / "nope"),
              "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_cli_summary(copro, tmp_path, capsys):
    assert cli(["data", "import-coprov2", "--source", str(copro), "--output", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "imported 6 pairs" in out and "leaking into train: 1" in out
