"""`safealign data prompts | images | import-coprov2`: thin CLI over .prompts, .images and .coprov2."""

from __future__ import annotations

from pathlib import Path

from ..configuration import add_arguments, build
from ..data.config import ImagesConfig, ImportConfig, PromptsConfig


def register(sub) -> None:
    data = sub.add_parser("data", help="paired safety datasets: prompts, images, CoProV2 import")
    dsub = data.add_subparsers(dest="data_command", metavar="WHAT", parser_class=type(data))
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])
    for name, cls, func, help_, desc in (
            ("prompts", PromptsConfig, _prompts, "paired unsafe/safe prompts per concept -> .parquet",
             "Write N unsafe prompts per concept of a taxonomy and a minimal-edit safe counterpart for each "
             "(template, OpenAI-compatible endpoint, or local LM), deduplicated and split without leakage."),
            ("images", ImagesConfig, _images, "render each pair with the same seed -> dataset folder",
             "Render the unsafe and safe prompt of every pair with the same seed and settings (batched, resumable, "
             "distributed with `accelerate launch`), optionally keep only pairs a judge separates."),
            ("import-coprov2", ImportConfig, _import, "the official CoProV2 CSVs -> dataset folder",
             "Import the official CoProV2 CSVs (prompt, image, category; u_/s_ image names) into a dataset folder, "
             "normalising categories and removing test prompts that leak into train.")):
        p = dsub.add_parser(name, help=help_, description=desc)
        p.add_argument("--config", help="YAML file with any of the options below (flags win)")
        add_arguments(p, cls)
        p.set_defaults(func=func)


def _prompts(args) -> int:
    from ..data.prompts import make_prompts
    path, stats = make_prompts(build(PromptsConfig, args))
    print(prompts_summary(path, stats))
    return 0


def _images(args) -> int:
    from accelerate import PartialState

    from ..data.images import generate_images, use_cpu
    final, stats = generate_images(build(ImagesConfig, args))
    if PartialState(cpu=use_cpu()).is_main_process:
        print(images_summary(final, stats))
    return 0


def _import(args) -> int:
    from ..data.coprov2 import import_coprov2
    final, stats = import_coprov2(build(ImportConfig, args))
    print(import_summary(final, stats))
    return 0


def prompts_summary(path: Path, stats: dict) -> str:
    from ..data.prompts import fmt_counts
    lines = [f"prompts: {stats['pairs']} pairs -> {path}  ({stats['seconds']:.1f}s)",
             f"{'category':<18} pairs"]
    lines += [f"{k:<18} {v}" for k, v in stats["per_category"].items()]
    lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in stats["per_split"].items()))
    lines.append("dropped: " + fmt_counts(stats["dropped"]))
    return "\n".join(lines)


def import_summary(final: Path, stats: dict) -> str:
    lines = [f"imported {stats['pairs']} pairs -> {final}",
             "splits: " + ", ".join(f"{k} {v}" for k, v in stats["per_split"].items()),
             f"test prompts leaking into train: {stats['test_prompts_leaking_into_train']} "
             f"({stats['leakage_action']}); duplicates removed: {stats['duplicates_removed']}",
             f"{'category':<18} pairs"]
    lines += [f"{k:<18} {v}" for k, v in stats["per_category"].items()]
    return "\n".join(lines)


def images_summary(final: Path, stats: dict) -> str:
    t = stats["timing"]
    lines = [f"dataset: {stats['pairs']} pairs -> {final}",
             f"rendered {t['pairs_rendered_this_run']} pairs ({t['pairs_resumed']} resumed) on {t['processes']} "
             f"process(es) in {t['seconds_generating']:.1f}s ({t['images_per_second']:.2f} images/s); total "
             f"{t['seconds_total']:.1f}s"]
    jf = stats.get("judge_filter")
    if jf:
        lines.append(f"{'category':<18} {'generated':>9} {'kept':>6} {'fraction':>8}   (judge {jf['judge']}, "
                     f"threshold {jf['threshold']})")
        for cat, v in jf["kept_per_category"].items():
            lines.append(f"{cat:<18} {v['generated']:>9} {v['kept']:>6} {v['fraction']:>8.2f}")
    else:
        lines.append(f"{'category':<18} pairs")
        lines += [f"{k:<18} {v}" for k, v in stats["per_category"].items()]
    return "\n".join(lines)
