"""Structured pruning that shrinks the shapes: whole kv groups of attention heads (a key/value head with its query
heads), MLP neurons (a gate and an up row with their down column) and whole layers, the least important first. With
calibration text, a head's or neuron's importance is the L2 norm of its contribution to the residual stream over the
calibration tokens (as LLM-Pruner and FLAP score groups) and a layer's is 1 - cos(input, output) (ShortGPT's block
influence, Men et al., 2024); without it, the norms of the weights that write those contributions.

    lmforge compress smol method=structured prune.heads=3 prune.neurons=512 prune.layers=4 run.name=smol-narrow
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.compress.calibration import batches
from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.models import Decoder, build_model
from lmforge.run import Run


@torch.no_grad()
def calibrated_importance(model: Decoder, windows: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Per layer: each query head's and each neuron's squared contribution norm, and the block influence."""
    cfg = model.cfg
    D, L = cfg.head_dim, cfg.n_layers
    heads = [torch.zeros(cfg.n_heads) for _ in range(L)]
    neurons = [torch.zeros(cfg.hidden_dim) for _ in range(L)]
    influence, tokens = torch.zeros(L), 0
    hooks = []
    for i, block in enumerate(model.layers):
        proj, down = block.attn.proj.weight.float(), block.mlp.down.weight.float()

        def on_proj(_m, args, _out, i=i, proj=proj) -> None:
            y = args[0].float().reshape(-1, cfg.n_heads, D)  # (rows, H, D)
            for h in range(cfg.n_heads):
                heads[i][h] += (y[:, h] @ proj[:, h * D : (h + 1) * D].T).square().sum()

        def on_down(_m, args, _out, i=i, down=down) -> None:
            a = args[0].float().reshape(-1, cfg.hidden_dim)  # (rows, hidden)
            neurons[i] += a.square().sum(dim=0) * down.square().sum(dim=0)

        def on_block(_m, args, out, i=i) -> None:
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, T)
            influence[i] += (1 - cos).sum()

        hooks += [
            block.attn.proj.register_forward_hook(on_proj),
            block.mlp.down.register_forward_hook(on_down),
            block.register_forward_hook(on_block),
        ]
    try:
        for batch in batches(windows.to(model.embed.weight.device)):
            model.hidden_states(batch)
            tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return heads, neurons, influence / tokens


@torch.no_grad()
def weight_importance(model: Decoder) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The same three without calibration text: ||value rows|| * ||output columns|| of a head, ||up row|| * ||down
    column|| of a neuron, and a layer's output projections' norms."""
    cfg = model.cfg
    D, H, Hkv, hidden = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    heads, neurons, layers = [], [], []
    for block in model.layers:
        proj, down = block.attn.proj.weight.float(), block.mlp.down.weight.float()
        values = block.attn.qkv.weight.float()[(H + Hkv) * D :].reshape(Hkv, -1).norm(dim=1)  # (Hkv,)
        outputs = proj.reshape(-1, H, D).square().sum(dim=(0, 2))  # (H,)
        heads.append(outputs * values.repeat_interleave(H // Hkv).square())
        up = (block.mlp.gate_up if hasattr(block.mlp, "gate_up") else block.mlp.up).weight.float()[-hidden:]
        neurons.append(up.square().sum(dim=1) * down.square().sum(dim=0))
        layers.append(proj.norm() + down.norm())
    return heads, neurons, torch.stack(layers)


def kept(score: Tensor, remove: int) -> Tensor:
    """Indices of the len(score) - remove highest scores, in their original order."""
    return score.topk(len(score) - remove).indices.sort().values


def _rows(weight: Tensor, index: Tensor, dim: int = 0) -> Tensor:
    return weight.index_select(dim, index.to(weight.device)).clone()


@torch.no_grad()
def shrink(model: Decoder, layers: Tensor, groups: list[Tensor], neurons: list[Tensor]) -> Decoder:
    """A new Decoder of the kept layers (in order), each keeping kv groups groups[i] and neurons neurons[i]."""
    cfg = model.cfg
    D, H, Hkv, G, hidden = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.hidden_dim
    n_kv, n_hidden = len(groups[0]), len(neurons[0])
    head_size = 0 if n_kv * G * D == cfg.dim else D
    new_cfg = replace(
        cfg, n_layers=len(layers), n_heads=n_kv * G, n_kv_heads=n_kv, hidden_dim=n_hidden, head_size=head_size
    )
    old = model.state_dict()
    sd = {k: v for k, v in old.items() if not k.startswith("layers.")}
    for new, (i, kv, hid) in enumerate(zip(layers.tolist(), groups, neurons, strict=True)):
        a, b = f"layers.{i}.", f"layers.{new}."
        q = (kv[:, None] * G + torch.arange(G)).flatten()  # the query heads of the kept kv heads
        q_dims = (q[:, None] * D + torch.arange(D)).flatten()
        kv_dims = (kv[:, None] * D + torch.arange(D)).flatten()
        qkv_rows = torch.cat([q_dims, H * D + kv_dims, (H + Hkv) * D + kv_dims])
        mlp_rows = torch.cat([hid, hidden + hid]) if cfg.mlp == "swiglu" else hid
        up = "mlp.gate_up" if cfg.mlp == "swiglu" else "mlp.up"
        for key, value in old.items():
            if not key.startswith(a):
                continue
            name = key.removeprefix(a)
            if name.startswith("attn.qkv."):
                value = _rows(value, qkv_rows)
            elif name == "attn.proj.weight":
                value = _rows(value, q_dims, dim=1)
            elif name.startswith(up + "."):
                value = _rows(value, mlp_rows)
            elif name == "mlp.down.weight":
                value = _rows(value, hid, dim=1)
            sd[b + name] = value
    pruned = build_model(new_cfg, device=model.embed.weight.device)
    pruned.load_state_dict(sd)
    return pruned


def structured(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor | None, run: Run):

    p, mcfg = cfg.prune, model.cfg
    G = mcfg.n_heads // mcfg.n_kv_heads
    heads, neurons, influence = weight_importance(model) if windows is None else calibrated_importance(model, windows)
    layers = kept(influence, p.layers)
    groups = [kept(heads[i].reshape(-1, G).sum(dim=1), p.heads // G) for i in layers.tolist()]
    hidden = [kept(neurons[i], p.neurons) for i in layers.tolist()]
    pruned = shrink(model, layers, groups, hidden)
    removed = {
        "layers": sorted(set(range(mcfg.n_layers)) - set(layers.tolist())),
        "kv_heads": {
            i: sorted(set(range(mcfg.n_kv_heads)) - set(groups[k].tolist())) for k, i in enumerate(layers.tolist())
        },
        "neurons": {
            i: sorted(set(range(mcfg.hidden_dim)) - set(hidden[k].tolist())) for k, i in enumerate(layers.tolist())
        },
    }
    run.write_json("structured_removed.json", removed)  # by the base's indices, for the test and the curious
    summary = {
        "layers_removed": removed["layers"],
        "heads_per_layer": f"{mcfg.n_heads} -> {pruned.cfg.n_heads} ({mcfg.n_kv_heads} -> {pruned.cfg.n_kv_heads} kv)",
        "neurons_per_layer": f"{mcfg.hidden_dim} -> {pruned.cfg.hidden_dim}",
        "params": pruned.num_params(),
        "base_params": model.num_params(),
        "importance": "weights" if windows is None else "calibration",
    }
    return Compressed(pruned, summary)
