"""Hostile values: strict configs, verified LoRA files and weights (safetensors only, checksums, finite), images
read as what they show, prompt and seed checks, the LLM client's total deadline."""

from __future__ import annotations

import http.server
import json
import shutil
import socketserver
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from safealign import cli
from safealign.configuration import from_dict
from safealign.errors import SafealignError
from safealign.lora import LoraSpec, add_lora, load_lora, lora_state_dict, save_lora
from safealign.merge.config import MergeConfig
from safealign.sampling import SamplingOptions
from safealign.train.config import ExpertConfig, FinetuneConfig
from safealign.validate import check_prompt, check_seed

FT = {"output": "o", "data": "d"}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# -- config values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("max_steps", True, "--max-steps expects int"),  # YAML's true is not 1 step
    ("max_steps", 2.7, "write 2 or 3"),  # not silently cut to 2
    ("max_steps", "2.5", "expects int"),
    ("max_steps", None, "cannot be null"),
    ("learning_rate", float("nan"), "NaN"),
    ("learning_rate", "inf", "NaN and infinity"),
    ("learning_rate", yaml.safe_load("x: .nan")["x"], "NaN and infinity"),
    ("learning_rate", False, "expects float"),
    ("seed", float("nan"), "--seed"),
    ("seed", -1, "--seed"),
    ("overwrite", 1, "expects bool"),
    ("targets", {"a": 1}, "expects a list"),
    ("output", "o\x00x", "control character"),
    ("mixed_precision", False, "quote it"),  # YAML's `no` is a boolean
    ("alpha", 0, "--alpha must be > 0"),
    ("alpha", -4, "--alpha must be > 0"),
    ("resolution", 7, "multiple of 8"),
    ("resolution", 4, "multiple of 8"),
    ("lora_dropout", 1.0, "--lora-dropout"),
])
def test_config_values_are_strict(key, value, message):
    with pytest.raises(SafealignError) as e:
        from_dict(FinetuneConfig, {**FT, key: value}, source="c.yaml")
    assert message in _one_line(e)


def test_config_values_that_are_right_are_kept_exactly():
    cfg = from_dict(FinetuneConfig, {**FT, "max_steps": 3.0, "learning_rate": "1e-4", "seed": "7", "rank": "8",
                                     "overwrite": "yes", "targets": "to_q, to_v", "resolution": 16})
    assert (cfg.max_steps, cfg.learning_rate, cfg.seed, cfg.rank) == (3, 1e-4, 7, 8)
    assert type(cfg.max_steps) is int and cfg.overwrite is True and cfg.targets == ("to_q", "to_v")
    ex = from_dict(ExpertConfig, {"output": "o", "dataset": "d", "category": "all", "steps": None, "guidance": 0})
    assert ex.steps is None and ex.guidance == 0.0  # Optional fields take null


def test_yaml_true_and_fraction_refused_from_a_file(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: true\n")
    code = cli.main(["finetune", "--config", str(y), "--data", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "max-steps expects int" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("steps, guidance", [(-1, None), (0, None), (2.5, None), (float("nan"), None),
                                              (None, float("nan")), (None, -1.0), (True, None)])
def test_steps_and_guidance_refused(steps, guidance):
    with pytest.raises(SafealignError, match="--steps|--guidance"):
        SamplingOptions(steps, guidance)
    with pytest.raises(SafealignError, match="--steps|--guidance"):
        ExpertConfig(output="o", dataset="d", category="all", steps=steps, guidance=guidance)


def test_steps_minus_one_refused_on_the_command_line(tmp_path, capsys):
    code = cli.main(["data", "images", "--prompts", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "d"),
                     "--steps", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps" in err and "Traceback" not in err


def test_generate_refuses_bad_seeds_and_prompts():
    from safealign.sampling import generate

    def pipe(*a, **k):  # never reached: the inputs are refused first
        raise AssertionError("sampled")
    opts = SamplingOptions(2, 1.0)
    for prompts, seeds, message in ((["a cat"], [float("nan")], "seed"), (["a cat"], [-3], "seed"),
                                    (["a cat"], [1.5], "seed"), (["a\x00cat"], [0], "control character"),
                                    ([float("nan")], [0], "missing")):
        with pytest.raises(SafealignError, match=message):
            generate(pipe, prompts, seeds, opts)


def test_prompt_and_seed_validators():
    assert check_prompt("a red knife") == "a red knife"
    assert check_seed(7.0) == 7 and check_seed(np.int64(3)) == 3
    for bad in (None, float("nan"), np.nan, 3, "a\x00b", "a\x1bb", "  "):
        with pytest.raises(SafealignError) as e:
            check_prompt(bad, "row 3 unsafe_prompt")
        assert "row 3 unsafe_prompt" in _one_line(e)
    for bad in (float("nan"), -1, 2.5, True, None, 2 ** 63, "7"):
        with pytest.raises(SafealignError):
            check_seed(bad)


def test_merge_weights_and_ranges():
    cfg = from_dict(MergeConfig, {"output": "o", "experts": "a,b", "weights": "0.5,0.5"})
    assert cfg.weights == (0.5, 0.5) and all(type(w) is float for w in cfg.weights)
    for bad in ("-1,2", "0,0", "nan,1", "x,1"):
        with pytest.raises(SafealignError, match="weights"):
            from_dict(MergeConfig, {"output": "o", "experts": "a,b", "weights": bad})


def _expert(root: Path, name: str, seed: int) -> Path:
    from safealign.artifacts import write_manifest
    from safealign.testing import build_tiny_pipeline
    pipe = build_tiny_pipeline("sd1")
    spec = LoraSpec(rank=2, alpha=2.0)
    add_lora(pipe.unet, spec)
    g = torch.Generator().manual_seed(seed)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    d = root / name
    d.mkdir(parents=True)
    save_lora(d, lora_state_dict(pipe.unet), spec)
    write_manifest(d, "lora", role="expert", categories=[name], base_model={"fingerprint": "tiny"})
    return d


def test_merge_weights_from_the_command_line(tmp_path):
    from safealign.merge.experts import load_expert
    root = tmp_path / "experts"
    a, b = _expert(root, "hate", 1), _expert(root, "violence", 2)
    out = tmp_path / "lin"
    assert cli.main(["merge", "--experts", str(root), "--method", "task_arithmetic", "--weights", "0.5,0.25",
                     "--output", str(out)]) == 0
    assert json.loads((out / "safealign.json").read_text())["config"]["weights"] == [0.5, 0.25]
    merged, ea, eb = load_expert(out), load_expert(a), load_expert(b)
    mod = next(iter(merged.modules))
    assert torch.allclose(merged.delta(mod), 0.5 * ea.delta(mod) + 0.25 * eb.delta(mod), atol=1e-5)
    assert cli.main(["merge", "--experts", str(root), "--method", "linear", "--weights", "0.5,-0.5",
                     "--output", str(tmp_path / "neg")]) == 2
    assert not (tmp_path / "neg").exists()


# -- a run config is checked whole before any stage -------------------------------------------------------------
def test_run_config_bad_values_found_before_any_stage(tmp_path, monkeypatch):
    from safealign.pipeline import packaged_config, run_pipeline
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load(packaged_config("world").read_text())
    base["output"] = "out"
    edits = [
        (lambda c: c["experts"].update(max_steps=2.7), "max-steps"),
        (lambda c: c["merge"].update(weights=[0.5, -1]), "weights"),
        (lambda c: (c["finetune"].update(modes=["full"]), c["audit"].update(seeds=True)), "seeds"),
        (lambda c: c["task"].update(images=0), "images"),
        (lambda c: c.update(categories=["no_such_category"]), "no_such_category"),
        (lambda c: c["task"].update(data=str(tmp_path / "missing")), "does not exist"),
    ]
    for edit, message in edits:
        cfg = json.loads(json.dumps(base))
        edit(cfg)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(SafealignError, match=message):
            run_pipeline(tmp_path / "bad.yaml")
        assert not (tmp_path / "out").exists(), message


# -- LoRA files ---------------------------------------------------------------------------------------------------
def _lora_file(path: Path, tensors: dict, header) -> Path:
    md = {"format": "pt"}
    if header is not None:
        md["lora_adapter_metadata"] = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, str(path), metadata=md)
    return path


MOD = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
HEADER = {f"unet.{k}": v for k, v in LoraSpec(rank=4).metadata().items()}


def _pair(r=4, a_shape=None, b_shape=None, dtype=torch.float32):
    a = torch.randn(*(a_shape or (r, 32))).to(dtype)
    b = torch.randn(*(b_shape or (32, r))).to(dtype)
    return {f"unet.{MOD}.lora_A.weight": a, f"unet.{MOD}.lora_B.weight": b}


@pytest.mark.parametrize("tensors, header, message", [
    (_pair(), "{not json", "not valid JSON"),
    (_pair(), {"unet.lora_alpha": 4}, "no 'r'"),
    (_pair(), {**HEADER, "unet.r": "four"}, "rank"),
    (_pair(), {**HEADER, "unet.lora_alpha": 0}, "alpha"),
    (_pair(r=8), HEADER, "header says rank 4"),
    (_pair(dtype=torch.int32), HEADER, "floating point"),
    (_pair(a_shape=(4,)), HEADER, "1-D"),
    (_pair(a_shape=(4, 32, 3)), HEADER, "3-D"),
    ({f"unet.{MOD}.lora_A.weight": torch.tensor(1.0), f"unet.{MOD}.lora_B.weight": torch.ones(32, 4)}, HEADER,
     "0-D"),
    ({"unet.a..b.lora_A.weight": torch.ones(4, 32), "unet.a..b.lora_B.weight": torch.ones(32, 4)}, HEADER,
     "not a module name"),
    ({f"unet.{MOD}.lora_A.weight": torch.ones(4, 32)}, HEADER, "only one of"),
    (_pair(), {**HEADER, "unet.target_modules": ["to_k"]}, "not in the header's target_modules"),
    (_pair(), {**HEADER, "unet.rank_pattern": {"(": 2}}, "not a valid pattern"),
])
def test_malformed_lora_files_are_one_line_errors(tmp_path, tensors, header, message):
    f = _lora_file(tmp_path / "x.safetensors", tensors, header)
    with pytest.raises(SafealignError) as e:
        load_lora(f)
    assert message in _one_line(e)


def test_lora_info_reports_the_tensors_true_rank(tmp_path, capsys):
    lying = _lora_file(tmp_path / "lying.safetensors", _pair(r=8), HEADER)
    assert cli.main(["lora", "info", str(lying)]) == 2
    assert "header says rank 4" in capsys.readouterr().err
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    mixed = {**_pair(r=2), f"unet.{other}.lora_A.weight": torch.randn(6, 32),
             f"unet.{other}.lora_B.weight": torch.randn(32, 6)}
    f = _lora_file(tmp_path / "mixed.safetensors", mixed, None)  # no header: ranks come from the tensors
    assert cli.main(["lora", "info", str(f)]) == 0
    out = capsys.readouterr().out
    assert "rank 2-6 (per module)" in out and "2 modules" in out
    sd, spec = load_lora(f)
    assert spec.rank_for(MOD) == 2 and spec.rank_for(other) == 6
    assert spec.scale_for(MOD) == spec.scale_for(other) == 1.0  # alpha = rank, as diffusers assumes


# -- pipelines: safetensors only, finite, checksummed -------------------------------------------------------------
@pytest.fixture()
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called: a pickle was about to be read")
    monkeypatch.setattr(torch, "load", refuse)


def test_pickled_only_weights_refused_without_unpickling(tmp_path, tiny_paths, no_unpickling, capsys):
    from safealign.backbone import load_backbone
    model = tmp_path / "m"
    shutil.copytree(tiny_paths["sd1"], model)
    st = model / "unet" / "diffusion_pytorch_model.safetensors"
    st.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(SafealignError) as e:
        load_backbone(model)
    msg = _one_line(e)
    assert "unet/diffusion_pytorch_model.bin" in msg and "safe_serialization=True" in msg
    code = cli.main(["compose", "--model", str(model), "--safety", str(tmp_path / "s"), "--output",
                     str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "c").exists()


def test_non_finite_weight_is_a_one_line_error(tmp_path, tiny_paths):
    from safealign.backbone import load_backbone
    for part, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        model = tmp_path / part
        shutil.copytree(tiny_paths["sd1"], model)
        f = model / part / fname
        sd = load_file(str(f))
        k = sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)[0]
        sd[k].view(-1)[1] = float("nan")
        save_file(sd, str(f), metadata={"format": "pt"})
        with pytest.raises(SafealignError) as e:
            load_backbone(model)
        assert part in _one_line(e) and "NaN" in str(e.value)
    assert load_backbone(tiny_paths["sd1"]).family == "sd1"  # the undamaged original loads


def test_shipped_world_weights_match_their_checksums(tmp_path, monkeypatch):
    from safealign.world import paths
    paths.verify_checksums(paths.WEIGHTS, required=True)  # what ships is what was recorded
    world = tmp_path / "weights"
    shutil.copytree(paths.WEIGHTS, world)
    monkeypatch.setattr(paths, "WEIGHTS", world)
    assert paths.pipeline_path() == world / "pipeline"
    f = world / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit
    f.write_bytes(bytes(data))
    with pytest.raises(SafealignError) as e:
        paths.pipeline_path()
    assert "does not match its sha256" in _one_line(e)
    assert paths.judge_path() == world / "judge"  # the judge's own file is intact
    (world / "checksums.json").unlink()
    with pytest.raises(SafealignError, match="missing"):
        paths.judge_path()


# -- images -------------------------------------------------------------------------------------------------------
def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (no pixel data needed to refuse it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_images_read_as_what_they_show(tmp_path):
    from safealign.data.dataset import load_image, to_tensor
    a16 = np.repeat(np.array([[0, 32896, 65535, 1028]], np.uint16), 8, axis=0).repeat(2, axis=1)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    px = np.asarray(load_image(tmp_path / "g16.png"))
    assert px.shape == (8, 8, 3) and px[0, ::2, 0].tolist() == [0, 128, 255, 4]  # scaled, not clipped to white
    assert (px[..., 0] == px[..., 2]).all()
    t = to_tensor(load_image(tmp_path / "g16.png", size=8))  # what training sees
    assert t[0, 0, 0] == -1.0 and t[0, 0, 4] == 1.0
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red hidden under full transparency ...
    rgba[:4, :, 3] = 255  # ... opaque on the top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    px = np.asarray(load_image(tmp_path / "rgba.png"))
    assert px[0, 0].tolist() == [200, 0, 0] and px[7, 0].tolist() == [255, 255, 255]
    pal = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [10, 20, 30]


def test_oversized_tiny_and_broken_images_refused(tmp_path):
    from safealign.data.dataset import load_image
    cases = [(_png_header_only(tmp_path / "bomb.png", 30000, 30000), "too large|MP"),
             (_png_header_only(tmp_path / "big.png", 8000, 7000), "MP"),
             (_png_header_only(tmp_path / "tiny.png", 4, 4), "at least 8"),
             (tmp_path / "missing.png", "does not exist")]
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    cases.append((tmp_path / "cut.png", "corrupt"))
    for path, message in cases:
        t0 = time.perf_counter()
        with pytest.raises(SafealignError, match=message) as e:
            load_image(path)
        _one_line(e)
        assert time.perf_counter() - t0 < 2  # refused from the header, nothing decoded


# -- the LLM client's deadline ------------------------------------------------------------------------------------
class _Drip(http.server.BaseHTTPRequestHandler):
    mode = "drip"

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"choices": [{"message": {"content": "x" * 200}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.mode == "short":  # promises more than it sends, then hangs up: http.client.IncompleteRead
            self.wfile.write(body[:10])
            self.wfile.flush()
            return
        try:
            for i in range(len(body)):  # one byte every 0.1 s: each read is quick, the whole takes 20 s
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("mode", ["drip", "short"])
def test_llm_client_total_deadline(mode):
    from safealign.data.llm import OpenAIChat
    handler = type("H", (_Drip,), {"mode": mode})
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        chat = OpenAIChat(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", timeout=1.0, max_retries=1,
                          backoff=0.01, sleep=lambda s: None)
        t0 = time.perf_counter()
        with pytest.raises(SafealignError) as e:
            chat([{"role": "user", "content": "hi"}])
        took = time.perf_counter() - t0
        _one_line(e)
        assert took < 2 * 1.0 + 1.0, took  # two tries of at most 1 s each, not 20 s of dripping
        if mode == "drip":
            assert chat.stats["timeouts"] == 2 and "timed out" in str(e.value)
        else:
            assert chat.stats["connection_errors"] == 2
    finally:
        srv.shutdown()
        srv.server_close()
