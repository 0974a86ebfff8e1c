import shutil

import pandas as pd
import pytest

from safealign.data.dataset import COLUMNS, PairedDataset
from safealign.errors import SafealignError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit(folder, fn):
    df = pd.read_parquet(folder / "pairs.parquet")
    df = fn(df)
    df.to_parquet(folder / "pairs.parquet", index=False)


def test_reads_valid_dataset(toy_dataset):
    ds = PairedDataset(toy_dataset)
    assert ds.categories == ["shocking", "violence"]
    train = ds.pairs("violence", "train")
    test = ds.pairs("violence", "test")
    assert len(train) == 12 and len(test) == 4
    assert all(p.unsafe_image.is_file() and p.safe_image.is_file() for p in train)
    assert ds.manifest["counts"]["per_category"] == {"shocking": 16, "violence": 16}
    ds.verify_images(train)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(SafealignError, match="does not exist"):
        PairedDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafealignError, match="no pairs.parquet"):
        PairedDataset(tmp_path / "empty")


def test_missing_column(toy_dataset, tmp_path):
    d = _copy(toy_dataset, tmp_path / "d")
    _edit(d, lambda df: df.drop(columns=["safe_prompt"]))
    with pytest.raises(SafealignError, match="lacks column.*safe_prompt"):
        PairedDataset(d)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.png", "images/../../x.png"])
def test_unsafe_paths_refused(toy_dataset, tmp_path, bad):
    d = _copy(toy_dataset, tmp_path / "d")

    def f(df):
        df.loc[0, "unsafe_image"] = bad
        return df
    _edit(d, f)
    with pytest.raises(SafealignError, match="absolute|'..'"):
        PairedDataset(d)


def test_corrupt_image_and_absent_category(toy_dataset, tmp_path):
    d = _copy(toy_dataset, tmp_path / "d")
    ds = PairedDataset(d)
    pairs = ds.pairs("violence", "train")
    pairs[0].unsafe_image.write_bytes(b"\x89PNG garbage")
    with pytest.raises(SafealignError, match="corrupt"):
        ds.verify_images(pairs)
    with pytest.raises(SafealignError, match="not in dataset"):
        ds.pairs("hate")


def test_columns_constant_matches_design():
    assert COLUMNS == ("pair_id", "category", "concept", "unsafe_prompt", "safe_prompt", "seed", "unsafe_image",
                       "safe_image", "split")
