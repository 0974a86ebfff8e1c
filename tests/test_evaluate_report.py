"""`safealign evaluate` end to end on a tiny pipeline: base vs LoRA sets (single and composed), report.json,
index.html whose every image exists and decodes (and renders in headless Chromium: slow tier), bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from safealign.cli import main


def _make_lora(backbone, folder: Path, seed: int, family: str | None = None, zero: bool = False) -> Path:
    from safealign.artifacts import write_manifest
    from safealign.lora import LoraSpec, add_lora, lora_state_dict, save_lora
    spec = LoraSpec(rank=2, alpha=2.0)
    add_lora(backbone.unet, spec, adapter_name="tmp")
    sd = lora_state_dict(backbone.unet, "tmp")
    backbone.unet.delete_adapters("tmp")
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.zeros_like(v) if zero and "lora_B" in k else torch.randn(v.shape, generator=g) * 0.3)
          for k, v in sd.items()}
    folder.mkdir(parents=True)
    save_lora(folder, sd, spec)
    base = dict(backbone.identity())
    if family:
        base["family"] = family
    write_manifest(folder, "lora", role="expert", categories=["violence"], base_model=base)
    return folder


@pytest.fixture(scope="module")
def setup(tiny_paths, tmp_path_factory):
    from safealign.backbone import load_backbone
    from safealign.world.judge import Judge, JudgeNet, label_space
    from safealign.world.scene import CATEGORIES
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    Judge(JudgeNet(CATEGORIES, label_space(), width=8), CATEGORIES, label_space(), {"width": 8}).save(root / "judge")
    bb = load_backbone(tiny_paths["sd1"])
    loras = {"a": _make_lora(bb, root / "lora_a", 1), "b": _make_lora(bb, root / "lora_b", 2),
             "noop": _make_lora(bb, root / "lora_noop", 3, zero=True),
             "xl": _make_lora(bb, root / "lora_xl", 4, family="sdxl")}
    return {"root": root, "model": str(tiny_paths["sd1"]), "judge": str(root / "judge"), "loras": loras}


def _args(s, out, *extra):
    return ["--no-progress", "evaluate", "--model", s["model"], "--world-judge", s["judge"], "--output", str(out),
            "--per-category", "2", "--benign", "3", "--categories", "violence,sexual", "--steps", "2", *extra]


@pytest.fixture(scope="module")
def report(setup):
    s = setup
    out = s["root"] / "report"
    rc = main(_args(s, out, "--lora", f"expert={s['loras']['a']}", "--lora",
                    f"composed={s['loras']['a']}+{s['loras']['b']}", "--lora", f"noop={s['loras']['noop']}",
                    "--attacks", "ringabell,unlearndiff", "--attack-prompts", "1", "--unlearndiff-steps", "2",
                    "--ringabell-strengths", "1,3"))
    assert rc == 0
    return out


def test_report_records_everything(report):
    r = json.loads((report / "report.json").read_text())
    assert [m["name"] for m in r["models"]] == ["base", "expert", "composed", "noop"]
    assert len(r["models"][2]["loras"]) == 2 and r["models"][1]["loras"][0]["role"] == "expert"
    j = r["judges"][0]
    assert j["name"] == "world" and j["threshold"] == 0.5 and len(j["version"]) == 12
    assert r["sampler"]["steps"] == 2 and r["sampler"]["scheduler"] and r["sampler"]["guidance"] == 7.5
    scores = pd.read_csv(report / "scores.csv")
    assert r["seeds"]["rows"] == scores["seed"].tolist() and len(scores) == r["prompts"]["n"]
    assert r["prompts"]["per_set"] == {"benign": 3, "heldout": 4, "safe": 4, "unsafe": 4}
    for _name, res in r["results"].items():
        per = res["sets"]["unsafe"]["ip"]["per_category"]
        assert set(per) == {"violence", "sexual"}
        for v in per.values():
            assert 0 <= v["ci95"][0] <= v["value"] <= v["ci95"][1] <= 1
        assert 0 <= res["attribute_accuracy"]["mean"] <= 1
        for a in ("ringabell", "unlearndiff"):
            assert set(res["attacks"][a]["per_category"]) == {"violence", "sexual"}
            assert 0 <= res["attacks"][a]["asr"] <= 1 and 0 <= res["attacks"][a]["clean_rate"] <= 1
    # drift from the base model's images, on the benign prompts: the LoRA that changes nothing has FID 0 (same
    # seeds, same images); without reference images there is no "fid" (the base model is no reference of quality)
    drift = {n: r["results"][n]["drift_vs_base"] for n in ("expert", "noop")}
    assert drift["noop"]["fid"] < 1e-3 and drift["noop"]["n_fake"] == 3
    assert drift["expert"]["kid"] > drift["noop"]["kid"] or drift["expert"]["fid"] > drift["noop"]["fid"]
    assert "fid" not in r["results"]["expert"] and "drift_vs_base" not in r["results"]["base"]
    cols = [c for c in scores.columns if c.startswith("base/world/")]
    assert np.allclose(scores[cols].to_numpy(), scores[[c.replace("base/", "noop/") for c in cols]].to_numpy())
    assert set(r["collateral"]["unsafe"]["delta_vs_base"]["violence"]) == {"expert", "composed", "noop"}
    # paired comparisons against the base: same images, so the LoRA that changes nothing changes no flag
    assert "comparisons" not in r["results"]["base"] and r["statistics"]["paired_test"].startswith("exact McNemar")
    for name in ("expert", "composed", "noop"):
        comp = r["results"][name]["comparisons"]["vs_base"]
        assert set(comp) == set(r["prompts"]["per_set"])
        for s, d in comp.items():
            assert d["overall"]["n"] == r["prompts"]["per_set"][s]
            ip = r["results"][name]["sets"][s]["ip"]["overall"]["value"]
            base_ip = r["results"]["base"]["sets"][s]["ip"]["overall"]["value"]
            assert d["overall"]["delta"] == pytest.approx(ip - base_ip)
            assert 0 <= d["overall"]["p_value"] <= 1 and len(d["overall"]["ci95"]) == 2
            for c in d["per_category"].values():
                assert c["p_value"] <= c["p_holm"] <= 1
    noop = r["results"]["noop"]["comparisons"]["vs_base"]["unsafe"]["overall"]
    assert noop["delta"] == 0 and noop["p_value"] == 1 and noop["discordant"] == [0, 0]
    m = json.loads((report / "safealign.json").read_text())
    assert m["kind"] == "report" and m["judges"] == r["judges"] and "expert" in m["metrics"]


def test_summary_and_html_show_the_paired_comparisons(report):
    from safealign.cli.evaluate import summary
    text = summary(report)
    lines = [ln for ln in text.splitlines() if " vs base: " in ln]
    assert [ln.split()[0] for ln in lines] == ["expert", "composed", "noop"]
    assert "+0.000 [" in lines[2] and "p=1.000" in lines[2]
    html = (report / "index.html").read_text()
    assert "Paired comparisons" in html and html.count("<td>noop</td>") >= 4


def test_the_page_opens_with_the_verdict_table(report):
    from safealign.evaluate.page import VERDICT_COLUMNS, verdict_rows
    from safealign.evaluate.report import headline
    html = (report / "index.html").read_text()
    r = json.loads((report / "report.json").read_text())
    # the verdict comes before everything else, and nothing mixes unsafe, safe and benign prompts in one IP
    assert html.index("<h2>Verdict</h2>") < html.index("<h2>Per category</h2>") < html.index("Images: the same seed")
    rows = verdict_rows(r)
    assert [x[0] for x in rows] == list(r["results"]) and all(len(x) == 1 + len(VERDICT_COLUMNS) for x in rows)
    expert = dict(zip([t for t, _ in VERDICT_COLUMNS], rows[1][1:]))
    unsafe = r["results"]["expert"]["sets"]["unsafe"]["ip"]["overall"]
    assert f"<b>{unsafe['value']:.3f}</b>" in expert["IP, unsafe prompts"] and "vs base" in expert["IP, unsafe prompts"]
    assert all("ip" not in d for d in headline(r).values())  # each set's IP, never one mixed over sets
    assert r["card"]["card_sha256"] and r["pool"] in ("test", "file")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


def test_html_references_only_images_that_exist_and_decode(report):
    p = _Refs()
    p.feed((report / "index.html").read_text())
    r = json.loads((report / "report.json").read_text())
    assert len(p.imgs) == len(r["files"]["charts"]) + len(r["files"]["grids"]) > 10
    for src in p.imgs:
        f = report / src
        assert f.is_file(), src
        with Image.open(f) as im:
            im.load()
            assert im.width > 0 and im.height > 0
    for href in p.links:
        assert (report / href).is_file()
    # side by side: one column per model, same height for every model
    with Image.open(report / "grids" / "unsafe_violence.png") as im:
        assert im.width == 4 * (96 + 4) + 4
    assert (report / "charts" / "heatmap_unsafe.png").is_file() and (report / "charts" / "delta_safe.png").is_file()


@pytest.mark.slow
def test_html_renders_in_headless_chromium_without_a_missing_image(report, tmp_path):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).is_file(), "the slow tier needs Debian's chromium package (apt-get install -y chromium)"
    site = tmp_path / "site"
    shutil.copytree(report, site)
    probe = ("<script>window.addEventListener('load',()=>{const bad=[...document.images].filter("
             "i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.getAttribute('src'));"
             "document.body.setAttribute('data-check', 'images='+document.images.length+' broken='+bad.length);"
             "});</script></body>")
    (site / "check.html").write_text((site / "index.html").read_text().replace("</body>", probe))
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", (site / "check.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    files = json.loads((report / "report.json").read_text())["files"]
    n = len(files["charts"]) + len(files["grids"])
    assert f"images={n} broken=0" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
    shot = tmp_path / "page.png"  # and a screenshot of the page's first screen: the verdict table, not blank
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                    "--hide-scrollbars", "--window-size=1400,900", f"--screenshot={shot}",
                    (site / "index.html").as_uri()], capture_output=True, text=True, timeout=120)
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"))
    assert a.shape == (900, 1400) and (a < 128).mean() > 0.01  # text drawn


def test_fid_against_a_coco_style_reference_folder_on_its_captions(setup, tmp_path):
    ref = tmp_path / "coco"
    ref.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a cup on a table, photo {i}"}))
    (ref / "metadata.jsonl").write_text("\n".join(lines))
    out = tmp_path / "r"
    assert main(_args(setup, out, "--sets", "unsafe", "--reference", str(ref), "--fid-features", "world")) == 0
    r = json.loads((out / "report.json").read_text())
    # the captions became the benign prompts (FID is measured on benign prompts only) and the images the reference
    assert r["prompts"]["per_set"] == {"benign": 4, "unsafe": 4}
    fid = r["results"]["base"]["fid"]
    assert fid["prompts"] == "benign" and fid["n_real"] == fid["n_fake"] == 4 and fid["reference"].startswith("folder")
    assert "note" in fid  # 4 images, far fewer than the feature dimensions: the report says FID is unreliable


def test_config_yaml_and_base_only(setup, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {setup['model']}\nworld_judge: {setup['judge']}\nper_category: 1\nbenign: 2\n"
                   "categories: [violence]\nsteps: 1\nbootstrap: 10\nsets: [unsafe, benign]\n")
    rc = main(["--no-progress", "evaluate", "--config", str(cfg), "--output", str(tmp_path / "r")])
    assert rc == 0
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(r["results"]) == ["base"] and r["prompts"]["n"] == 3 and r["config"]["steps"] == 1
    assert "bootstrap" not in r["config"]  # the deprecated option is accepted and ignored


@pytest.mark.parametrize("case", ["judge_path", "no_prompt_column", "family", "empty_reference", "q16_missing",
                                  "existing_output"])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, case):
    s = setup
    out = tmp_path / "r"
    expect = ""
    if case == "judge_path":
        args = _args(s, out)
        args[args.index("--world-judge") + 1] = str(tmp_path / "nojudge")
        expect = "--world-judge"
    elif case == "no_prompt_column":
        pd.DataFrame({"text": ["a knife"]}).to_csv(tmp_path / "p.csv", index=False)
        args, expect = _args(s, out, "--prompts", str(tmp_path / "p.csv")), "'prompt' column"
    elif case == "family":
        args, expect = _args(s, out, "--lora", f"xl={s['loras']['xl']}"), "made for a sdxl model"
    elif case == "empty_reference":
        (tmp_path / "ref").mkdir()
        args, expect = _args(s, out, "--reference", str(tmp_path / "ref")), "empty"
    elif case == "q16_missing":
        args, expect = _args(s, out, "--judges", "world,q16", "--q16-clip", str(tmp_path),
                             "--q16-embeddings", str(tmp_path / "none.p")), "--q16-embeddings"
    else:
        out.mkdir()
        args, expect = _args(s, out), "--overwrite"
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expect in err and len(err.splitlines()) == 1 and err.startswith("safealign: error:")
    assert case == "existing_output" or not out.exists()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lora NAME=PATH[+PATH]" in out and "--nudenet-classes" in out and "95% intervals" in out
