"""The planner: the published formulas reproduce the papers' figures, its invariants hold, its CLI answers, and its
stage-0 fp32 prediction equals the bytes a real model and AdamW hold after one step."""

import json
import math

import pytest
import torch

from lmforge import cli
from lmforge.config import from_dict
from lmforge.models import ModelConfig, build_model
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizers
from lmforge.train.plan import (
    CHECKPOINTING,
    GB,
    Cluster,
    Layout,
    Workload,
    activation_bytes_per_layer,
    bubble_fraction,
    estimate,
    layouts,
    model_state_bytes,
    plan,
)

LLAMA_7B = from_dict(ModelConfig, {"preset": "llama-7b"})


@pytest.mark.parametrize(
    "preset, expected",
    [("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-70b", 68_976_648_192)],  # HF model cards
)
def test_llama2_presets_have_the_published_parameter_counts(preset, expected):
    cfg = from_dict(ModelConfig, {"preset": preset})
    assert cfg.num_params() == expected
    assert cfg.vocab_size == 32000 and cfg.max_seq_len == 4096


def test_zero_paper_figure_1_for_7_5b_params_on_64_gpus():
    # ZeRO paper, figure 1: 120 GB -> 31.4 GB (P_os) -> 16.6 GB (P_os+g) -> 1.9 GB (P_os+g+p)
    per_stage = [sum(model_state_bytes(7.5e9, 64, zero)) / GB for zero in range(4)]
    assert [round(x, 1) for x in per_stage] == [120.0, 31.4, 16.6, 1.9]
    assert model_state_bytes(7.5e9, 64, 0) == (2 * 7.5e9, 2 * 7.5e9, 12 * 7.5e9)  # 2Ψ + 2Ψ + KΨ, K = 12
    assert model_state_bytes(10, 1, 0, "fp32") == (40, 40, 80)  # 4Ψ + 4Ψ + 8Ψ


def test_activation_formulas_of_korthikanti_et_al_table_2():
    s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B, tensor parallel 8 (the paper's table 3)
    sbh = s * b * h
    assert activation_bytes_per_layer(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(s, b, h, a, t, sequence_parallel=False) == sbh * (10 + 24 / t + 5 * a * s / h / t)
    assert activation_bytes_per_layer(s, b, h, a, t) == sbh * (34 + 5 * a * s / h) / t
    assert activation_bytes_per_layer(s, b, h, a, t, "selective") == sbh * 34 / t
    assert activation_bytes_per_layer(s, b, h, a, t, "full") == 2 * sbh / t
    # the paper's headline: sequence parallel + selective recomputation cut tensor-parallel activations ~5x
    ratio = activation_bytes_per_layer(s, b, h, a, t, sequence_parallel=False) / activation_bytes_per_layer(
        s, b, h, a, t, "selective"
    )
    assert ratio == pytest.approx((10 + 3 + 10) / 4.25)


def test_bubble_fraction():
    assert bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 8) == 3 / 11
    assert bubble_fraction(4, 1000) < bubble_fraction(4, 10)


def test_step_time_is_flops_over_achieved_peak_when_links_are_infinitely_fast():
    cluster = Cluster(gpus=8, gpu_mem=80 * GB, intra_node_bw=math.inf, inter_node_bw=math.inf, mfu=0.5)
    work = Workload(seq_len=2048, global_batch=64)
    e = estimate(LLAMA_7B, Layout(8, 1, 1, 0, "none"), work, cluster)
    flops = LLAMA_7B.flops_per_token(2048) * 64 * 2048
    assert e.step_s == pytest.approx(flops / (8 * 989e12 * 0.5))
    assert e.mfu == pytest.approx(0.5)
    full = estimate(LLAMA_7B, Layout(8, 1, 1, 0, "full"), work, cluster)
    assert full.step_s == pytest.approx(e.step_s * 4 / 3)  # full recomputation repeats the forward: 8/6 of the work


def test_communication_volumes_follow_the_zero_paper():
    cluster = Cluster(gpus=8, gpu_mem=80 * GB)
    work = Workload(seq_len=2048, global_batch=8)  # one micro-batch per rank
    ddp, zero3 = (estimate(LLAMA_7B, Layout(8, 1, 1, z, "none"), work, cluster) for z in (0, 3))
    psi = LLAMA_7B.num_params()
    assert ddp.comm_dp == pytest.approx(2 * psi * 2 * 7 / 8)  # all-reduce of 2Ψ bytes of bf16 gradients, ring
    assert zero3.comm_dp == pytest.approx(1.5 * ddp.comm_dp)  # 3Ψ: 1.5x data parallel (section 7.2.2)
    assert ddp.comm_tp == ddp.comm_pp == 0
    tp = estimate(LLAMA_7B, Layout(2, 4, 1, 0, "none"), work, cluster)
    # 4 all-reduces of the b x s x h activations per layer and micro-batch (Megatron-LM)
    assert tp.comm_tp == pytest.approx(4 * 32 * 4 * 2 * 3 / 4 * 2048 * 4096 * 2)


def test_more_gpus_never_increase_memory_per_rank_and_checkpointing_reduces_activations():
    work = Workload(seq_len=4096, global_batch=256)
    previous: dict[tuple, float] = {}
    for gpus in (8, 16, 32, 64, 128):
        cluster = Cluster(gpus=gpus, gpu_mem=80 * GB)
        by_layout = {}
        for layout in layouts(LLAMA_7B, work, cluster):
            e = estimate(LLAMA_7B, layout, work, cluster)
            by_layout[(layout.tp, layout.pp, layout.zero, layout.checkpointing)] = e.total
        for key, total in by_layout.items():
            if key in previous:
                assert total <= previous[key], (gpus, key)
        previous.update(by_layout)
        for layout in layouts(LLAMA_7B, work, cluster):
            if layout.checkpointing == "none":
                acts = [
                    estimate(LLAMA_7B, Layout(layout.dp, layout.tp, layout.pp, layout.zero, c), work, cluster)
                    for c in CHECKPOINTING
                ]
                assert acts[0].activations > acts[1].activations > acts[2].activations
                if layout.pp == 1:  # with stages, the fullest stage may change from the first to the last
                    assert acts[0].params == acts[2].params and acts[0].optimizer == acts[2].optimizer


def test_layouts_that_do_not_fit_are_excluded():
    cluster = Cluster(gpus=8, gpu_mem=40 * GB)
    work = Workload(seq_len=4096, global_batch=64)
    fits, too_big = plan(LLAMA_7B, work, cluster)
    assert fits and too_big
    assert len(fits) + len(too_big) == len(layouts(LLAMA_7B, work, cluster))
    assert all(e.total <= 0.9 * 40 * GB for e in fits)
    assert all(e.total > 0.9 * 40 * GB for e in too_big)
    assert [e.step_s for e in fits] == sorted(e.step_s for e in fits)
    # plain data parallelism cannot hold 16 bytes per parameter of a 6.7B model in 40 GB
    assert all(not (e.layout.tp == e.layout.pp == 1 and e.layout.zero == 0) for e in fits)


def test_tensor_parallel_divides_query_and_key_value_heads_and_stays_in_a_node():
    work = Workload(seq_len=128, global_batch=64)
    for n_kv_heads, expected in ((12, {1, 2, 4}), (2, {1, 2})):
        cfg = ModelConfig(dim=96, n_heads=12, n_kv_heads=n_kv_heads, n_layers=4)
        assert {lay.tp for lay in layouts(cfg, work, Cluster(gpus=8, gpu_mem=GB))} == expected
    llama70 = from_dict(ModelConfig, {"preset": "llama-70b"})
    tps = {lay.tp for lay in layouts(llama70, work, Cluster(gpus=64, gpu_mem=80 * GB, gpus_per_node=4))}
    assert tps == {1, 2, 4}
    for lay in layouts(llama70, work, Cluster(gpus=64, gpu_mem=80 * GB)):
        assert lay.dp * lay.tp * lay.pp == 64 and 80 % lay.pp == 0 and 64 % lay.dp == 0


def test_fp32_stage_0_prediction_equals_the_bytes_of_a_real_model_and_adamw():
    cfg = ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32)
    model = build_model(cfg, seed=0)
    (optimizer,) = build_optimizers(model, TrainConfig(optimizer="adamw"))
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    model(x[:, :-1], x[:, 1:]).backward()
    optimizer.step()
    params = list(model.parameters())
    measured = (
        sum(p.numel() * p.element_size() for p in params),
        sum(p.grad.numel() * p.grad.element_size() for p in params),
        # AdamW's two moments; its per-tensor step counters are scalars the formula leaves out
        sum(t.numel() * t.element_size() for p in params for k, t in optimizer.state[p].items() if k != "step"),
    )
    assert measured == model_state_bytes(cfg.num_params(), dp=1, zero=0, dtype="fp32")


def lmforge_plan(capsys, *args: str) -> tuple[int, str, str]:
    """`lmforge plan ARGS` in this process (tests/test_cli.py runs the real console script): exit status, out, err."""
    try:
        cli.main(["plan", *args])
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cli_prints_a_ranked_table_and_json(capsys):
    status, out, err = lmforge_plan(capsys, "--model", "llama-7b", "--gpus", "64", "--gpu-mem", "80GB")
    assert status == 0, err
    assert "llama-7b (6.74B params) on 64 x 80 GB" in out and "step s" in out
    args = ("--model", "llama-13b", "--gpus", "16", "--gpu-mem", "80GiB", "--seq-len", "2048", "--json")
    status, out, err = lmforge_plan(capsys, *args)
    assert status == 0, err
    result = json.loads(out)
    rows = result["layouts"]
    assert result["params"] == 13_015_864_320 and result["workload"]["seq_len"] == 2048 and rows
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert all(r["total"] <= 0.9 * 80 * 2**30 for r in rows)
    assert all(r["layout"]["dp"] * r["layout"]["tp"] * r["layout"]["pp"] == 16 for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "llama-8b", "--gpus", "8", "--gpu-mem", "80GB"], "choose one of gpt2-tiny"),
        (["--model", "llama-70b", "--gpus", "1", "--gpu-mem", "80GB"], "no layout of llama-70b fits 1 x 80 GB"),
        (["--model", "llama-7b", "--gpus", "8", "--gpu-mem", "80XB"], "is not a memory size"),
    ],
)
def test_cli_errors_exit_2_with_one_line(args, message, capsys):
    status, out, err = lmforge_plan(capsys, *args)
    assert status == 2
    assert message in err
    assert out == ""
