"""The scaffolding both trainers share (train/engine.py): trackers, the frozen model's dtype, the work folder,
plugin hooks, and the validation sampler options."""

import warnings
from pathlib import Path

import pytest
import torch

from conftest import captioned_folder, expert_cfg
from safealign import cli
from safealign.backbone import load_backbone
from safealign.configuration import from_dict
from safealign.errors import SafealignError
from safealign.sampling import SamplingOptions
from safealign.train import dpo, engine
from safealign.train.config import ExpertConfig, FinetuneConfig
from safealign.train.finetune import finetune


@pytest.fixture()
def captioned(toy_dataset, tmp_path):
    return captioned_folder(tmp_path / "task", toy_dataset, 4, lambda i: "a cat" if i % 2 else "a dog")


def test_finetune_log_with_tensorboard_writes_events(tiny_paths, captioned, tmp_path):
    out = tmp_path / "task-lora"
    code = cli.main(["finetune", "--model", str(tiny_paths["sd1"]), "--data", str(captioned), "--output", str(out),
                     "--max-steps", "2", "--log-every", "1", "--checkpoint-every", "0", "--batch-size", "2",
                     "--cache-dir", str(tmp_path / "cache"), "--log-with", "tensorboard"])
    assert code == 0
    events = list(out.rglob("events.out.tfevents*"))
    assert events, sorted(p.relative_to(out) for p in out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]  # the metrics reached the tracker
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (tmp_path / "task-lora.partial").exists()


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("precision,dtype", [("no", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_both_trainers_load_the_frozen_model_in_the_mixed_precision_dtype(tiny_paths, toy_dataset, captioned,
                                                                         tmp_path, monkeypatch, precision, dtype):
    seen = []

    def record(model, *, device="cpu", dtype=torch.float32):
        seen.append(dtype)
        raise _Loaded  # the dtype is what this test is about: no need to train in it on a CPU
    monkeypatch.setattr(engine, "load_backbone", record)
    fake = _FakeAccelerator(main=True)
    with pytest.raises(_Loaded):
        finetune(FinetuneConfig(model=str(tiny_paths["sd1"]), data=str(captioned), output=str(tmp_path / "f"),
                                mixed_precision=precision), accelerator=fake)
    with pytest.raises(_Loaded):
        dpo.train_expert(expert_cfg(model=str(tiny_paths["sd1"]), dataset=toy_dataset, category="violence",
                                    output=tmp_path / "e", mixed_precision=precision), accelerator=fake)
    assert seen == [dtype, dtype]


class _FakeAccelerator:
    """What the scaffolding asks of an Accelerator, with a chosen process role."""

    def __init__(self, main: bool, real=None):
        self.is_main_process = main
        self.real = real
        self.device = torch.device("cpu")
        self.waits = 0

    def wait_for_everyone(self):
        self.waits += 1

    def __getattr__(self, name):  # everything else: the real accelerator's
        if self.real is None:
            raise AttributeError(name)
        return getattr(self.real, name)


def test_work_folder_is_made_by_the_main_process_only(tmp_path):
    cfg = FinetuneConfig(output=str(tmp_path / "out"), data="x")
    other = _FakeAccelerator(main=False)
    work = engine.work_folder(tmp_path / "out", cfg, other)
    assert work == tmp_path / "out.partial" and not work.exists() and other.waits == 1
    main = _FakeAccelerator(main=True)
    assert engine.work_folder(tmp_path / "out", cfg, main).is_dir() and main.waits == 1
    (work / "stale").write_text("x")  # an earlier attempt: only the main process clears it, unless --resume
    engine.work_folder(tmp_path / "out", cfg, other)
    assert (work / "stale").exists()
    engine.work_folder(tmp_path / "out", FinetuneConfig(output=str(tmp_path / "out"), data="x", resume=True), main)
    assert (work / "stale").exists()
    engine.work_folder(tmp_path / "out", cfg, main)
    assert work.is_dir() and not (work / "stale").exists()


def test_finetune_on_a_non_main_process_writes_nothing(tiny_paths, captioned, tmp_path):
    from accelerate import Accelerator
    other = _FakeAccelerator(main=False, real=Accelerator(cpu=True))
    out = tmp_path / "f"
    cfg = FinetuneConfig(model=str(tiny_paths["sd1"]), data=str(captioned), output=str(out), max_steps=2,
                         checkpoint_every=1, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert finetune(cfg, accelerator=other) == out
    assert not out.exists() and not (tmp_path / "f.partial").exists()
    assert other.waits >= 2  # it waited for the main process's folder and for its final save


class _FakePlugin:
    name = "fake"

    def __init__(self):
        self.calls = []

    def benign_prompts(self, n, seed):
        self.calls.append(("benign_prompts", n, seed))
        return [f"a plain cup number {i} seed {seed}" for i in range(n)]

    def mark_pipeline(self, source, folder, role):
        self.calls.append(("mark_pipeline", str(source), Path(folder).name, role))
        (Path(folder) / "marked-by-plugin").write_text(role)


def test_anchor_prompts_come_from_the_model_plugin(tiny_paths, toy_dataset):
    from safealign.data.dataset import PairedDataset
    from safealign.train.preservation import PLUGIN_ANCHORS, kept_prompts, preservation_prompts
    from safealign.utils import derive_seed
    bb = load_backbone(tiny_paths["sd1"])
    cfg = expert_cfg(model=str(tiny_paths["sd1"]), dataset=toy_dataset, category="violence", output="o",
                     preserve_weight=1.0, preserve_from="prompts")
    with pytest.raises(SafealignError, match="only a model plugin"):
        preservation_prompts(cfg, bb)
    ds = PairedDataset(toy_dataset)
    plain = kept_prompts(cfg, bb, ds)
    bb.plugin = _FakePlugin()
    anchors = preservation_prompts(cfg, bb)
    assert bb.plugin.calls == [("benign_prompts", PLUGIN_ANCHORS, derive_seed(cfg.seed, "preservation-anchors"))]
    kept = kept_prompts(cfg, bb, ds)
    assert set(kept) == set(plain) | set(anchors) and kept[-1] == "" and len(kept) == len(plain) + PLUGIN_ANCHORS


def test_full_finetune_of_a_plugin_model_is_marked_by_the_plugin(tiny_paths, captioned, tmp_path):
    bb = load_backbone(tiny_paths["sd1"])
    bb.plugin = plugin = _FakePlugin()
    out = tmp_path / "full"
    safety = _safety_lora(tmp_path / "safety")
    finetune(FinetuneConfig(model=str(tiny_paths["sd1"]), data=str(captioned), output=str(out), mode="full",
                            safety=str(safety), max_steps=1, checkpoint_every=0, batch_size=2,
                            cache_dir=str(tmp_path / "cache")), backbone=bb)
    assert plugin.calls == [("mark_pipeline", str(bb.path), "pipeline", "task-full")]
    assert (out / "pipeline" / "marked-by-plugin").read_text() == "task-full"
    assert (out / "pipeline" / "model_index.json").is_file()


def _safety_lora(folder):
    from safealign.lora import LoraSpec, add_lora, lora_state_dict, save_lora
    from safealign.testing import build_tiny_pipeline
    pipe = build_tiny_pipeline("sd1")
    spec = LoraSpec(rank=2, alpha=2.0)
    torch.manual_seed(0)
    add_lora(pipe.unet, spec)
    folder.mkdir(parents=True)
    save_lora(folder, lora_state_dict(pipe.unet), spec)
    return folder


def test_expert_validation_samples_with_the_model_defaults_and_old_names_still_read(tiny_paths, toy_dataset,
                                                                                   monkeypatch):
    from safealign.data.dataset import PairedDataset
    from safealign.train import validation
    seen = []
    monkeypatch.setattr(validation, "make_validator", lambda *a: seen.append(a[-1]) or (lambda step: {}))
    bb = load_backbone(tiny_paths["sd1"])
    ds = PairedDataset(toy_dataset)
    kw = dict(model=str(tiny_paths["sd1"]), dataset=str(toy_dataset), category="violence", output="o",
              validate_every=5, judge="toy_judge:red_judge")
    dpo._validator(ExpertConfig(**kw), bb, ds, "violence")
    dpo._validator(ExpertConfig(**kw, steps=3), bb, ds, "violence")
    defaults = bb.sampling_defaults()
    assert seen == [defaults, SamplingOptions(3, defaults.guidance)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = from_dict(ExpertConfig, {**kw, "num_inference_steps": 4, "guidance_scale": 2.5})
    assert cfg.sampling == SamplingOptions(4, 2.5)
    assert any("num_inference_steps is deprecated" in str(w.message) for w in caught)
