import json

import torch

from safealign import cli
from safealign.lora import LoraSpec, add_lora, lora_state_dict, save_lora
from safealign.merge import baselines
from safealign.merge.comerge import (
    collect_activations,
    owners,
    select_ranks,
    select_rows,
    unit_activations,
    win_counts,
)
from safealign.merge.experts import load_expert


def _factors(seed, out=6, inp=5, r=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def test_merge_of_one_expert_is_that_expert():
    f = _factors(0)
    for merged in (baselines.cat_factors([f]), baselines.linear([f]), baselines.task_arithmetic([f]),
                   select_rows([f], torch.zeros(6, dtype=torch.long)),
                   select_ranks([f], torch.zeros(2, dtype=torch.long))):
        assert torch.allclose(merged[1] @ merged[0], f[1] @ f[0], atol=1e-6)
    (a, b), err = baselines.dense_merge([f], "ties", density=1.0)
    assert err < 1e-6 and torch.allclose(b @ a, f[1] @ f[0], atol=1e-5)


def test_cat_is_the_sum_and_cancels_with_negation():
    f1, f2 = _factors(1), _factors(2)
    a, b = baselines.cat_factors([f1, f2])
    assert a.shape[0] == 4
    assert torch.allclose(b @ a, f1[1] @ f1[0] + f2[1] @ f2[0], atol=1e-6)
    a, b = baselines.cat_factors([f1, (f1[0], -f1[1])])
    assert torch.allclose(b @ a, torch.zeros(6, 5), atol=1e-6)
    a, b = baselines.linear([f1, f2])
    assert torch.allclose(b @ a, 0.5 * (f1[1] @ f1[0] + f2[1] @ f2[0]), atol=1e-6)


def test_comerge_row_selection_matches_hand_computation():
    f1, f2, f3 = _factors(1), _factors(2), _factors(3)
    # activations (E=3, N=4 inputs, U=6 units) made so the winners are known
    acts = torch.zeros(3, 4, 6)
    acts[0, :, 0:2] = 1.0          # expert 0 wins units 0,1 on every input
    acts[1, :3, 2:4] = 1.0         # expert 1 wins units 2,3 on 3 of 4 inputs
    acts[2, 3, 2:4] = 2.0          # expert 2 wins them on the 4th
    acts[2, :, 4:6] = 0.5          # expert 2 wins units 4,5
    counts = win_counts(acts)
    assert counts[:, 2].tolist() == [0, 3, 1] and counts[:, 0].tolist() == [4, 0, 0]
    own = owners(counts)
    assert own.tolist() == [0, 0, 1, 1, 2, 2]
    a, b = select_rows([f1, f2, f3], own)
    expected = torch.cat([(f1[1] @ f1[0])[0:2], (f2[1] @ f2[0])[2:4], (f3[1] @ f3[0])[4:6]])
    assert a.shape[0] == 6  # rank sum(r_e)
    assert torch.allclose(b @ a, expected, atol=1e-6)


def test_rank_selection_and_unit_activations():
    f1, f2 = _factors(1), _factors(2)
    a, b = select_ranks([f1, f2], torch.tensor([1, 0]))
    assert torch.equal(a[0], f2[0][0]) and torch.equal(a[1], f1[0][1])
    assert torch.equal(b[:, 0], f2[1][:, 0]) and torch.equal(b[:, 1], f1[1][:, 1])
    x = torch.randn(3, 7, 5)
    act = unit_activations(x, *f1, "output")
    assert torch.allclose(act, (x @ (f1[1] @ f1[0]).T).abs().mean(1), atol=1e-5)


def _write_expert(tmp, name, seed, targets=("to_q", "to_k", "to_v", "to_out.0"), rank=2, nan=False):
    from safealign.artifacts import write_manifest
    from safealign.testing import build_tiny_pipeline
    pipe = build_tiny_pipeline("sd1")
    spec = LoraSpec(rank=rank, alpha=float(rank), targets=targets)
    torch.manual_seed(seed)
    add_lora(pipe.unet, spec)
    g = torch.Generator().manual_seed(seed)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    sd = lora_state_dict(pipe.unet)
    d = tmp / name
    d.mkdir(parents=True)
    if nan:
        from safetensors.torch import save_file
        k = next(iter(sd))
        sd[k][0, 0] = float("inf")
        save_file({f"unet.{k}": v for k, v in sd.items()}, str(d / "pytorch_lora_weights.safetensors"))
    else:
        save_lora(d, sd, spec)
    write_manifest(d, "lora", role="expert", categories=[name], base_model={"fingerprint": "tiny"})
    return d


def test_hooks_apply_the_expert_like_peft(tmp_path, tiny_paths):
    """per-expert statistics run the expert's forward: check the hook-applied UNet equals peft's."""
    from safealign.backbone import load_backbone
    from safealign.lora import load_into
    from safealign.merge.comerge import Calibration
    d = _write_expert(tmp_path, "violence", 1)
    e = load_expert(d)
    bb = load_backbone(tiny_paths["sd1"])
    cond = bb.encode_prompts(["a skull", "a knife"])
    lat = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    captured = {}

    def grab(mod, inp, out):
        captured["out"] = out
    h = bb.unet.register_forward_hook(grab)
    collect_activations(bb.unet, [e], Calibration(lat, t, cond, {}), "per-expert")
    h.remove()
    ref = load_backbone(tiny_paths["sd1"])
    load_into(ref.unet, d)
    from safealign.backbone import unet_forward
    with torch.no_grad():
        want = unet_forward(ref.unet, lat, t, cond)
    assert torch.allclose(captured["out"][0], want, atol=1e-5)


def test_cli_merge_methods_and_reuse(tmp_path, tiny_paths, toy_dataset, capsys):
    root = tmp_path / "experts"
    for i, n in enumerate(["violence", "shocking", "hate"]):
        _write_expert(root, n, i)
    common = ["--model", str(tiny_paths["sd1"]), "--dataset", str(toy_dataset), "--cache-dir", str(tmp_path / "c"),
              "--calibration-per-category", "4", "--timesteps", "2"]
    out = tmp_path / "cm"
    assert cli.main(["merge", "--experts", str(root), "--output", str(out), *common]) == 0
    m = json.loads((out / "safealign.json").read_text())
    assert m["role"] == "merged" and m["lora"]["r"] == 6 and sorted(m["categories"]) == ["hate", "shocking", "violence"]
    assert abs(sum(m["ownership"]["all"].values()) - 1.0) < 1e-9
    assert "share of neurons" in capsys.readouterr().out
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_paths["sd1"], safety_checker=None)
    pipe.load_lora_weights(out)  # diffusers loads the rank-6 result unchanged
    # reuse: a subset merge with stored statistics measures nothing new
    out2 = tmp_path / "cm2"
    assert cli.main(["merge", "--experts", str(root), "--categories", "violence,shocking", "--output", str(out2),
                     "--reuse-stats", str(out), *common]) == 0
    m2 = json.loads((out2 / "safealign.json").read_text())
    assert m2["metrics"]["stats_reused"] == 2 and m2["lora"]["r"] == 4
    # cat equals all experts active at once
    out3 = tmp_path / "cat"
    assert cli.main(["merge", "--experts", str(root), "--method", "cat", "--output", str(out3)]) == 0
    cat = load_expert(out3)
    es = [load_expert(root / n) for n in ("hate", "shocking", "violence")]
    mod = next(iter(cat.modules))
    assert torch.allclose(cat.delta(mod), sum(e.delta(mod) for e in es), atol=1e-5)
    for method in ("linear", "ties", "dare"):
        assert cli.main(["merge", "--experts", str(root), "--method", method, "--output", str(tmp_path / method)]) == 0
    # --scale bakes a LoRA weight into the merged file: the update is exactly that multiple
    out4 = tmp_path / "cat2"
    assert cli.main(["merge", "--experts", str(root), "--method", "cat", "--scale", "2.5", "--output", str(out4)]) == 0
    cat2 = load_expert(out4)
    assert json.loads((out4 / "safealign.json").read_text())["config"]["scale"] == 2.5
    for mod in cat.modules:
        assert torch.allclose(cat2.delta(mod), 2.5 * cat.delta(mod), atol=1e-5)
    assert cli.main(["merge", "--experts", str(root), "--method", "cat", "--scale", "0", "--output",
                     str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_rank_granularity_and_bad_experts(tmp_path, tiny_paths, toy_dataset, capsys):
    root = tmp_path / "e"
    _write_expert(root, "violence", 1)
    _write_expert(root, "shocking", 2, rank=4)
    common = ["--model", str(tiny_paths["sd1"]), "--dataset", str(toy_dataset), "--cache-dir", str(tmp_path / "c")]
    assert cli.main(["merge", "--experts", str(root), "--granularity", "rank", "--output", str(tmp_path / "o"),
                     *common]) == 2
    assert "same LoRA init" in capsys.readouterr().err
    other = tmp_path / "other"
    _write_expert(other, "violence", 1)
    _write_expert(other, "hate", 3, targets=("to_q", "to_v"))
    assert cli.main(["merge", "--experts", str(other), "--output", str(tmp_path / "o"), *common]) == 2
    assert "different modules" in capsys.readouterr().err
    bad = tmp_path / "bad"
    _write_expert(bad, "violence", 1, nan=True)
    assert cli.main(["merge", "--experts", str(bad), "--method", "cat", "--output", str(tmp_path / "o")]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    (tmp_path / "x.ckpt").write_bytes(b"x")
    assert cli.main(["merge", "--experts", str(tmp_path / "x.ckpt"), "--method", "cat",
                     "--output", str(tmp_path / "o")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert cli.main(["merge", "--experts", str(root / "violence"), "--output", str(tmp_path / "o"),
                     "--model", str(tiny_paths["sd1"])]) == 2
    assert "calibration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
