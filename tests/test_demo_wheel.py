"""The demo runs from an installed wheel: its run configs are package data, found without the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_demo_from_installed_wheel(tmp_path):
    # build from a copy of the sources, so that the checkout gets no build/ or egg-info folders
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = wheels.glob("safealign-*.whl")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    # run outside the checkout, with only the installed copy importable
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    # `safealign run NAME` finds the packaged configs too
    r = _run(["-c", "import safealign\nfrom safealign.pipeline import load_run_config, packaged_configs\n"
                    "print(safealign.__file__)\nprint(sorted(packaged_configs()), load_run_config('world').model)"],
             work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    where, names = r.stdout.strip().splitlines()
    assert Path(where).resolve().is_relative_to(site.resolve())
    assert names == "['sd15', 'sdxl', 'world'] world"

    r = _run(["-m", "safealign.demo", "--help"], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--config" in r.stdout

    r = _run(["-m", "safealign.demo", "--print-config"], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    first, text = r.stdout.split("\n", 1)
    assert Path(first.removeprefix("# ")).resolve() == (site / "safealign" / "configs" / "world.yaml").resolve()
    assert text == (ROOT / "src" / "safealign" / "configs" / "world.yaml").read_text()
