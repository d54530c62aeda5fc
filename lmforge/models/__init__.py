"""Model families, built from shared layers; `build_model` makes one from a ModelConfig."""

from lmforge.models.attention import Attention, Cache
from lmforge.models.config import PRESETS, ModelConfig
from lmforge.models.decoder import Decoder, build_model
from lmforge.models.kv_cache import KVCache

__all__ = ["PRESETS", "Attention", "Cache", "Decoder", "KVCache", "ModelConfig", "build_model"]
