"""Memory scheduling for weights that do not fit in device memory (BMInf, Han et al., 2022): the first blocks stay
resident on the device; the others live in host memory and each is copied in just before it runs and dropped right
after, so at most one streamed block occupies device memory at a time.

The cost is one host-to-device copy of every streamed block's weights per forward pass, whatever the batch size:
PCIe 4.0 x16 moves ~25 GB/s, so a 7B fp16 model (13.5 GB) fully streamed costs ~0.5 s per step. Batching many
sequences per step (the engine's continuous batching) is what amortises it. On a CPU-only machine the device is host
memory too, so streaming only adds a copy; it exists there to test the mechanism.

    streamer = stream_layers(model, resident_layers=8)   # layers 8.. stream from host memory
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.models import Decoder


class LayerStreamer:
    def __init__(self, model: Decoder, resident_layers: int):
        n_layers = len(model.layers)
        if not 0 <= resident_layers <= n_layers:
            raise LmforgeError(f"resident layers {resident_layers} must be in [0, {n_layers}] (the model's layers)")
        self.device = model.lm_head.weight.device
        pin = self.device.type == "cuda"
        self.host: dict[int, dict[str, torch.Tensor]] = {}
        self.streamed_bytes = 0  # host-to-device bytes so far
        for i, block in enumerate(model.layers):
            if i < resident_layers:
                continue
            host = {}
            for name, p in block.named_parameters():
                t = p.detach().to("cpu", copy=True)
                host[name] = t.pin_memory() if pin else t
                p.data = torch.empty(0, device=self.device, dtype=p.dtype)  # frees the device copy
            self.host[i] = host
            block.register_forward_pre_hook(self._bring(i, block))
            block.register_forward_hook(self._drop(block))

    @property
    def bytes_per_pass(self) -> int:
        return sum(t.numel() * t.element_size() for host in self.host.values() for t in host.values())

    def _bring(self, index: int, block: nn.Module):
        def hook(module, args):
            for name, p in block.named_parameters():
                src = self.host[index][name]
                p.data = src.to(self.device, non_blocking=True, copy=True)
                self.streamed_bytes += src.numel() * src.element_size()

        return hook

    def _drop(self, block: nn.Module):
        def hook(module, args, output):
            for p in block.parameters():
                p.data = torch.empty(0, device=self.device, dtype=p.dtype)

        return hook


def stream_layers(model: Decoder, resident_layers: int) -> LayerStreamer:
    """Keep blocks [0, resident_layers) on the device; stream the rest from host memory at every forward pass."""
    return LayerStreamer(model, resident_layers)
