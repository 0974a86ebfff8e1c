"""LoRA adapters: their shape (:mod:`.spec`), their files (:mod:`.io`) and exact factor algebra (:mod:`.algebra`)."""

from .algebra import Factors, cat_factors, delta_weight, lora_modules, to_state_dict
from .io import (
                 METADATA_KEY,
                 WEIGHT_NAME,
                 export_kohya,
                 load_into,
                 load_lora,
                 save_lora,
                 to_kohya,
                 validate_for_model,
                 validate_state_dict,
)
from .spec import DEFAULT_TARGETS, LoraSpec, add_lora, lora_state_dict, target_module_names

__all__ = ["DEFAULT_TARGETS", "Factors", "LoraSpec", "METADATA_KEY", "WEIGHT_NAME", "add_lora", "cat_factors",
           "delta_weight", "export_kohya", "load_into", "load_lora", "lora_modules", "lora_state_dict", "save_lora",
           "target_module_names", "to_kohya", "to_state_dict", "validate_for_model", "validate_state_dict"]
