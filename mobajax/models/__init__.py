"""Models: Flax decoders, HF/GGUF conversion, `load_pretrained` and `forward`."""

from mobajax.models.config import ModelConfig, RopeConfig
from mobajax.models.pretrained import Pretrained, forward, load_pretrained, save_pretrained

__all__ = ["ModelConfig", "Pretrained", "RopeConfig", "forward", "load_pretrained", "save_pretrained"]
