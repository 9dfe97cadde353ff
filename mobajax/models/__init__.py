"""Models: Flax decoders, HF/GGUF conversion, `load_pretrained` and `forward`."""

from mobajax.models.config import MobaConfig, ModelConfig, RopeConfig
from mobajax.models.pretrained import (
    Pretrained,
    forward,
    load_pretrained,
    save_pretrained,
    with_moba,
)

__all__ = [
    "MobaConfig", "ModelConfig", "Pretrained", "RopeConfig", "forward", "load_pretrained", "save_pretrained",
    "with_moba",
]
