"""safealign: safety alignment for text-to-image diffusion models.

AlignGuard (Diffusion-DPO safety experts merged with Co-Merge) and Modular LoRA
(task LoRAs trained on the clean base, summed with a frozen safety LoRA).
"""

__version__ = "0.1.0"

from .errors import SafealignError  # noqa: E402

__all__ = ["SafealignError", "__version__"]
