"""The model: families (LoRA targets, fp16 rules, warm starts), base loading (+ 8/4-bit), the fusion
projection, fast ops, and the LoRA + fusion model."""

from lexlora._exports import lazy_exports

_EXPORTS = {
    "default_target_modules": "families", "default_modules_to_save": "families", "parse_encoder_decoder": "families",
    "load_base_model": "loading", "load_tokenizer": "loading",
    "LexicalFusion": "fusion", "fuse": "fusion", "encoder_input_width": "fusion",
    "use_fast_ops": "fast_ops",
    "LexLoraModel": "lora_model", "build_lora_config": "lora_model", "enable_gradient_checkpointing": "lora_model", "disable_gradient_checkpointing": "lora_model",
    "build_model": "factory", "model_for_run": "factory", "run_spec": "factory",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

