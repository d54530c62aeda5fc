"""Tensor parallelism (with sequence parallelism) on 2 CPU processes (gloo), and FSDP x TP on 4, train the same
weights as 1 process on the same global batch; checkpoints hold the model's own fused q|k|v and gate|up layout."""

import pytest
import torch

from lmforge.models import ModelConfig
from lmforge.train.tensor_parallel import deinterleave, fused_rows, interleave

# GPT-2's parts: learned positions (split by rows like the embedding), LayerNorm with bias, GELU, tied embeddings
GPT2 = ["model.pos=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true", "model.tie_embeddings=true"]
# ALiBi's per-head slopes follow each rank's heads; activation checkpointing wraps the tensor-parallel blocks; GQA
# leaves each rank 2 query heads and 1 kv head
ALIBI_2D = ["model.pos=alibi", "train.activation_checkpointing=full"]


@pytest.fixture(scope="module")
def trained(runs):
    # tp ranks read the same batch: both runs see 8 windows per micro-batch
    runs.single("gpt2", "train.batch_size=8", *GPT2)
    runs.torchrun("gpt2_tp2", "train.batch_size=8", *GPT2, "parallel.tp=2")
    runs.single("alibi", "train.batch_size=8", *ALIBI_2D)
    # 2 data-parallel x 2 tensor-parallel ranks: FSDP shards the tp shards; 2 x batch 4 = 8 windows
    runs.torchrun("alibi_dp2_tp2", "train.batch_size=4", *ALIBI_2D, "parallel.tp=2", "parallel.zero=3", nproc=4)
    # RoPE, fused SwiGLU, GQA with Muon, which gathers each sharded matrix whole for its orthogonalisation
    runs.single("muon", "train.batch_size=8", "train.optimizer=muon")
    runs.torchrun("muon_tp2", "train.batch_size=8", "train.optimizer=muon", "parallel.tp=2")
    return runs


@pytest.mark.parametrize(("name", "reference"), [("gpt2_tp2", "gpt2"), ("alibi_dp2_tp2", "alibi")])
def test_tensor_parallel_matches_one_process(trained, name, reference):
    trained.assert_same_training(name, reference)


def test_tensor_parallel_resume_continues_exactly(trained):
    copy = trained.crashed_copy("gpt2_tp2", "gpt2_tp2_resumed")
    trained.torchrun(copy, "train.batch_size=8", *GPT2, "parallel.tp=2", resume=True)
    trained.assert_same_weights("gpt2_tp2_resumed", "gpt2_tp2")


def test_tensor_parallel_checkpoint_holds_the_model_row_order_and_resumes_on_one_process(trained):
    """The DCP shards hold q|k|v and gate|up in the model's order (not tp's interleaving): one process reads them."""
    trained.single(trained.crashed_copy("gpt2_tp2", "gpt2_tp2_to_1"), "train.batch_size=8", *GPT2, resume=True)
    trained.assert_same_weights("gpt2_tp2_to_1", "gpt2", rel=1e-5)


def test_tensor_parallel_muon_follows_one_process(trained):
    # Muon runs Newton-Schulz in bfloat16 on the gathered matrix, whose fused rows tp interleaves: the other summation
    # order moves single elements of an update; orthogonalising each shard on its own instead would change it entirely
    loss, reference = trained.metrics("muon_tp2", "loss"), trained.metrics("muon", "loss")
    assert loss == pytest.approx(reference, rel=1e-4)
    assert trained.metrics("muon_tp2", "grad_norm") == pytest.approx(trained.metrics("muon", "grad_norm"), rel=5e-3)


def test_interleave_puts_each_ranks_heads_together_and_inverts():
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2)  # head_dim 8: q 32 rows, k 16, v 16
    sizes = fused_rows(cfg)["attn.qkv.weight"]
    w = torch.arange(64.0)[:, None].expand(64, 3)
    mixed = interleave(w, sizes, 2)
    # rank 0's half: q heads 0-1 (rows 0-15), kv head 0 of k (32-39) and of v (48-55)
    expected0 = torch.cat([torch.arange(0, 16), torch.arange(32, 40), torch.arange(48, 56)]).float()
    assert torch.equal(mixed[:32, 0], expected0)
    assert torch.equal(deinterleave(mixed, sizes, 2), w)
