"""`safealign data prompts | images | import-coprov2`: thin CLI over .prompts, .images and .coprov2."""

from __future__ import annotations

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
    from ..data.prompts import make_prompts, prompts_summary
    path, stats = make_prompts(build(PromptsConfig, args))
    print(prompts_summary(path, stats))
    return 0


def _images(args) -> int:
    from accelerate import PartialState

    from ..data.images import generate_images, images_summary, use_cpu
    final, stats = generate_images(build(ImagesConfig, args))
    if PartialState(cpu=use_cpu()).is_main_process:
        print(images_summary(final, stats))
    return 0


def _import(args) -> int:
    from ..data.coprov2 import import_coprov2, import_summary
    final, stats = import_coprov2(build(ImportConfig, args))
    print(import_summary(final, stats))
    return 0
