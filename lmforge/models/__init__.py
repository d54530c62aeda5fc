"""Model families, built from shared layers; `build_model` makes one from a ModelConfig."""

from lmforge.models.config import PRESETS, ModelConfig
from lmforge.models.decoder import Decoder, KVCache, build_model

__all__ = ["PRESETS", "Decoder", "KVCache", "ModelConfig", "build_model"]
