"""The serving engine: continuous batching (Yu et al., 2022, Orca) over a paged KV cache, with chunked prefill,
prefix caching, preemption by recomputation and per-request sampling.

Each `step()` schedules one iteration: running sequences first, in arrival order (one token each, or the next chunk
of a prompt), then waiting ones while free blocks and the token budget allow. All chosen tokens of all sequences
go through the model as one packed batch, so prefill and decode of different requests share a step. When a
running sequence needs a block and none is free, the newest running sequence is preempted: its blocks are freed
and it waits at the front of the queue to be recomputed.

A runner executes each step's packed forward pass, chosen once at start-up (runners.make_runner): the CPU runner's
numpy steps and C kernels (lmforge/cpu) for the models its allowlist admits on the CPU in fp32, else, or with
EngineConfig(backend="torch"), the model's own torch forward pass. With a draft model, a Speculator proposes tokens
through a draft runner of its own (speculative.py). A failure while sampling one sequence ends that sequence alone,
with finish_reason "error".

    engine = Engine(model, tokenizer, EngineConfig())
    outputs = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models import Decoder
from lmforge.sampling import SamplingParams, TextStream, logprob_entry, penalized, sample_next, seeded_generator
from lmforge.serve.adapters import AdapterSet
from lmforge.serve.paged import BlockManager, Chunk, PagedKVStore, block_hashes
from lmforge.serve.runners import make_runner
from lmforge.serve.speculative import Speculator

__all__ = ["Engine", "EngineConfig", "EngineFull", "Output", "SamplingParams", "Sequence"]

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    """Most sequences running at once."""
    kv_blocks: int = 0
    """KV-cache blocks in the pool (0: enough for max_num_seqs full-context sequences, within kv_budget_gib)."""
    kv_budget_gib: float = 2.0
    """With kv_blocks=0, the most memory the default pool takes (but always one full context): SmolLM2's 8,192-token
    context at 64 sequences would otherwise ask for 24 GiB."""
    block_size: int = 4
    """Tokens per KV block. Only a sequence's last block is partly empty, so the waste is about block_size / 2 over
    the mean sequence length. On the CPU small blocks cost nothing (benchmarks/bench_serve.py: blocks of 4 waste ~2%
    against ~8% for vLLM's 16 on sequences of ~100 tokens, at the same or better throughput)."""
    max_batched_tokens: int = 256
    """Token budget of one step; longer prompts are prefilled in chunks of what is left of it."""
    max_waiting: int = 256
    """Most requests queued; beyond it, add() refuses (the server answers 429)."""
    prefix_caching: bool = True
    backend: str = "auto"
    """What runs a step: "auto", the CPU runner (lmforge/cpu) where its allowlist admits the model (on the CPU in
    fp32), else torch; "torch", the packed torch forward pass always."""


@dataclass
class Output:
    """What one step did for one request; the last one has `finished` set."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[dict] = field(default_factory=list)
    """Per new token: {"token": id, "logprob": float, "top": {id: logprob}}."""
    prompt_logprobs: list[dict | None] | None = None
    """With SamplingParams.prompt_logprobs: None for the first prompt token, then an entry like those of logprobs."""
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Sequence:
    def __init__(
        self, request_id: str, prompt: list[int], params: SamplingParams, tokenizer, order: int, adapter: int = 0
    ):
        self.id, self.params, self.order, self.adapter = request_id, params, order, adapter
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.computed = 0  # tokens whose keys and values are in the cache
        self.draft_computed = 0  # the same for a speculative draft model's cache
        self.table: list[int] = []  # block table
        self.hashes: list[int] = []  # prefix hashes of the full blocks registered so far
        self.text = TextStream(tokenizer, params.stop)
        self.generator = seeded_generator(params.seed)
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs else None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Engine:
    """draft: a smaller model sharing the tokenizer, for speculative decoding of spec_tokens tokens a step;
    adapters: LoRA adapters installed into `model` (serve/adapters.py), picked per request by `add(adapter=...)`."""

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        cfg: EngineConfig | None = None,
        draft: Decoder | None = None,
        spec_tokens: int = 4,
        adapters: AdapterSet | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cfg = cfg = cfg or EngineConfig()
        self.context = model.cfg.max_seq_len
        weight = model.lm_head.weight
        self.device, dtype = weight.device, weight.dtype
        per_block = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * cfg.block_size * dtype.itemsize
        one = math.ceil(self.context / cfg.block_size)
        num_blocks = cfg.kv_blocks or max(one, min(cfg.max_num_seqs * one, int(cfg.kv_budget_gib * 2**30 / per_block)))
        self.blocks = BlockManager(num_blocks, cfg.block_size, move=self._move_block)
        self.store = PagedKVStore(model.cfg, num_blocks, cfg.block_size, self.device, dtype)
        self.adapters = adapters
        self.runner = make_runner(
            model, self.store, cfg.backend, adapters
        )  # made here, at start-up, not in a first step
        self.speculator = None
        if draft is not None:
            self.speculator = Speculator(draft, model, spec_tokens, num_blocks, cfg.block_size, cfg.backend)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.eos_ids = {tokenizer.eos_id}
        self.preemptions = 0
        self.steps = 0
        self._order = itertools.count()

    # requests

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, adapter: int = 0) -> None:
        """Queue a request, computed by LoRA adapter `adapter` (0: the base model); LmforgeError if it cannot be
        served (the message says why)."""
        params.validate()
        if adapter and (self.adapters is None or adapter > len(self.adapters.adapters)):
            raise LmforgeError(f"adapter {adapter} is not loaded; load it with --lora NAME=DIR")
        if not prompt:
            raise LmforgeError("the prompt is empty; send at least one token of text")
        if len(prompt) >= self.context:
            raise LmforgeError(
                f"the prompt has {len(prompt)} tokens and the context is {self.context}, which leaves no room to "
                "generate; shorten the prompt"
            )
        longest = min(len(prompt) + params.max_tokens, self.context)
        if math.ceil(longest / self.cfg.block_size) > self.blocks.num_blocks:
            # alone in the pool it must fit, or preempting it for itself would never end
            raise LmforgeError(
                f"prompt plus max_tokens ({longest} tokens) needs more KV blocks than the pool's "
                f"{self.blocks.num_blocks} of {self.cfg.block_size} tokens; lower max_tokens or raise --kv-blocks"
            )
        if len(self.waiting) >= self.cfg.max_waiting:
            raise EngineFull(f"{len(self.waiting)} requests are already waiting; retry later")
        self.waiting.append(Sequence(request_id, prompt, params, self.tokenizer, next(self._order), adapter))

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if it is not here (already finished)."""
        for seq in self.waiting:
            if seq.id == request_id:
                self.waiting.remove(seq)
                self.blocks.release(seq.table)
                return True
        for seq in self.running:
            if seq.id == request_id:
                self._finish(seq)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Output]:
        """Run prompts to completion (offline batch use); one merged Output per prompt, in order."""
        return self.generate_each(prompts, [params] * len(prompts))

    def generate_each(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Output]:
        """Like generate, with sampling parameters per prompt."""
        ids = [f"offline-{next(self._order)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params, strict=True):
            self.add(request_id, prompt, p)
        merged = {i: Output(i, [], "") for i in ids}
        while self.has_work():
            for out in self.step():
                m = merged[out.request_id]
                m.token_ids += out.token_ids
                m.text += out.text
                m.logprobs += out.logprobs
                m.prompt_logprobs = out.prompt_logprobs or m.prompt_logprobs
                m.finished, m.finish_reason = out.finished, out.finish_reason
                m.prompt_tokens, m.completion_tokens = out.prompt_tokens, out.completion_tokens
        return [merged[i] for i in ids]

    # scheduling

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) for this step."""
        budget, plan = self.cfg.max_batched_tokens, []
        self.running.sort(key=lambda s: s.order)  # oldest first: a readmitted sequence keeps its place
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below for an older sequence
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            ahead = self._lookahead(seq) if n == len(seq.tokens) - seq.computed == 1 else 0
            if not self._reserve(seq, n + ahead):
                break  # seq itself was the newest left: every older one is planned
            plan.append((seq, n))
            budget = max(0, budget - n - ahead)
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if self.cfg.prefix_caching and seq.prompt_logprobs is None:
                self._reuse_prefix(seq)
            n = min(len(seq.tokens) - seq.computed, budget)
            if self._blocks_needed(seq, n) > self.blocks.num_free:
                # no blocks held while waiting, or the queue could deadlock on them
                self.blocks.release(seq.table)
                seq.table, seq.hashes, seq.computed = [], [], 0
                break  # wait for running sequences to finish; the queue stays in arrival order
            self.waiting.popleft()
            self._reserve(seq, n)
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan

    def _lookahead(self, seq: Sequence) -> int:
        """Positions a decoding sequence needs beyond its next token: the speculator's drafts."""
        return self.speculator.lookahead(seq, self.context) if self.speculator else 0

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return max(0, math.ceil((seq.computed + n) / self.cfg.block_size) - len(seq.table))

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Give `seq` blocks for n more tokens, preempting newer sequences if needed; False if seq itself went."""
        while self._blocks_needed(seq, n) > self.blocks.num_free:
            victim = self.running[-1]  # the newest; sorted, and every planned sequence is older than seq
            self._preempt(victim)
            if victim is seq:
                return False
        if needed := self._blocks_needed(seq, n):  # most decode steps need none
            expected = -(-min(seq.prompt_len + seq.params.max_tokens, self.context) // self.cfg.block_size)
            for _ in range(needed):
                after = seq.table[-1] if seq.table else None
                seq.table.append(self.blocks.allocate(after, room=expected - len(seq.table)))
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the front and recomputes its tokens when readmitted."""
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.table, seq.hashes, seq.computed, seq.draft_computed = [], [], 0, 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _reuse_prefix(self, seq: Sequence) -> None:
        # at least the last token is computed anew: its logits give the next token
        for h in block_hashes(seq.tokens[: len(seq.tokens) - 1], self.cfg.block_size, seq.adapter):
            block = self.blocks.lookup(h)
            if block is None:
                break
            seq.table.append(block)
            seq.hashes.append(h)
        seq.computed = len(seq.table) * self.cfg.block_size

    # one iteration

    def _next_plan(self) -> list[tuple[Sequence, int]]:
        plan = self.schedule()
        self.steps += bool(plan)
        return plan

    @torch.inference_mode()
    def step(self) -> list[Output]:
        if not (plan := self._next_plan()):
            return []
        spec, drafts, draft_probs = {}, {}, {}
        if self.speculator:  # the draft catches up with every planned sequence and drafts for the decoding ones
            decoding = [seq for seq, n in plan if n == len(seq.tokens) - seq.computed == 1]
            spec = {seq: k for seq in decoding if (k := self._lookahead(seq))}
            drafts, draft_probs = self.speculator.propose(plan, spec)
        chunks = [
            Chunk(
                seq.tokens[seq.computed : seq.computed + n] + drafts.get(seq, []), seq.computed, seq.table, seq.adapter
            )
            for seq, n in plan
        ]
        logits = self.runner.run(chunks, [self._wants_prompt(seq) or seq in spec for seq, _ in plan])
        outputs = []
        for (seq, n), rows in zip(plan, logits, strict=True):
            try:
                if seq in spec:
                    out = self._verified(seq, drafts[seq], draft_probs[seq], rows)
                else:
                    out = self._computed(seq, n, rows)
            except Exception:  # sampling or detokenizing this sequence failed (NaN logits?): it ends alone
                log.exception("request %s failed; the others go on", seq.id)
                out = self._finish(seq, Output(seq.id, [], "", prompt_tokens=seq.prompt_len), "error")
            if out is not None:
                outputs.append(out)
        return outputs

    def _computed(self, seq: Sequence, n: int, logits: Tensor) -> Output | None:
        """n tokens of seq went through the model: sample the next one if they were the last."""
        self._advance(seq, n, logits)
        if seq.computed < len(seq.tokens):
            return None  # a prompt chunk short of the end: nothing to sample yet
        return self._emit(seq, [self._pick(seq, logits[-1])], logits[-1:])

    def _verified(self, seq: Sequence, drafts: list[int], draft_probs: Tensor | None, logits: Tensor) -> Output:
        """The target scored seq's fed token and drafts (logits: their rows): emit the accepted ones and one more."""
        tokens = self.speculator.verify(seq, drafts, draft_probs, logits)
        computed = seq.computed + len(tokens)  # the fed token and the accepted drafts
        out = self._emit(seq, tokens, logits[: len(tokens)])
        if not out.finished:
            self._advance(seq, len(tokens), logits)
            seq.draft_computed = min(seq.draft_computed, computed)
        return out

    def _move_block(self, source: int, target: int) -> None:
        """Copy a cached prefix's keys and values to another block (BlockManager). A speculative draft's cache needs
        no copy: the draft computes every sequence's positions itself, from the first."""
        for pool in (self.store.k, self.store.v):
            pool[:, :, target] = pool[:, :, source]

    def _scrub(self, seq: Sequence) -> None:
        """Zero the blocks only a failed sequence holds and forget their prefixes: its keys may be NaN, and a later
        owner's unwritten slots, though masked, would pass NaN through attention."""
        own = [b for b in seq.table if self.blocks.refs[b] == 1]
        for block in own:
            self.blocks.forget(block)
        if own:
            index = torch.tensor(own, device=self.store.k.device)
            for pool in (self.store.k, self.store.v):
                pool.index_fill_(2, index, 0.0)

    def _wants_prompt(self, seq: Sequence) -> bool:
        return seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len

    def _advance(self, seq: Sequence, n: int, logits: Tensor) -> None:
        """n more tokens of seq are computed: index their full blocks, score prompt tokens if asked."""
        start = seq.computed
        seq.computed += n
        self._register_full_blocks(seq)
        if self._wants_prompt(seq):
            targets = seq.tokens[start + 1 : start + n + 1][: seq.prompt_len - len(seq.prompt_logprobs)]
            lp = torch.log_softmax(logits[: len(targets)], dim=-1)
            seq.prompt_logprobs += [logprob_entry(r, t, seq.params.logprobs) for r, t in zip(lp, targets, strict=True)]

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.cfg.prefix_caching:
            return  # nothing would look the hashes up
        bs = self.cfg.block_size
        for i in range(len(seq.hashes), seq.computed // bs):
            parent = seq.hashes[-1] if seq.hashes else seq.adapter  # as block_hashes starts
            seq.hashes.append(hash((parent, tuple(seq.tokens[i * bs : (i + 1) * bs]))))
            self.blocks.register(seq.table[i], seq.hashes[-1])

    def _pick(self, seq: Sequence, logits: Tensor) -> int:
        p = seq.params
        logits = penalized(logits, seq.tokens, seq.prompt_len, p)
        if not p.greedy:  # NaN logits fail in the draw (torch.multinomial refuses them)
            return int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, seq.generator))
        row = logits.numpy() if logits.device.type == "cpu" else logits
        token = int(row.argmax())  # on the CPU in numpy: ~4 us against ~19 for torch's argmax of one row
        if math.isnan(row[token]):  # argmax stops at the first NaN: a broken model's logits are no greedy pick
            raise FloatingPointError(f"the logits of request {seq.id} are NaN")
        return token

    def _emit(self, seq: Sequence, tokens: list[int], logits: Tensor) -> Output:
        """Append chosen tokens (logits: their rows, (len(tokens), V)) until one of them finishes the request."""
        p = seq.params
        out = Output(seq.id, [], "", prompt_tokens=seq.prompt_len)
        if seq.prompt_logprobs is not None and not seq.output_ids:
            out.prompt_logprobs = seq.prompt_logprobs
        if p.max_tokens == 0:
            return self._finish(seq, out, "length")
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        for i, token in enumerate(tokens):
            if p.logprobs is not None:  # a stop token's too: scoring clients read the last entry as the generated one
                out.logprobs.append(logprob_entry(torch.log_softmax(logits[i], dim=-1), token, p.logprobs))
            if token in self.eos_ids or token in p.stop_token_ids:
                return self._finish(seq, out, "stop")
            seq.tokens.append(token)
            out.token_ids.append(token)
            out.text += seq.text.push(token)
            out.completion_tokens = len(seq.tokens) - seq.prompt_len
            if seq.text.stopped:
                return self._finish(seq, out, "stop")
            if out.completion_tokens >= p.max_tokens or len(seq.tokens) >= self.context:
                out.text += seq.text.flush()
                return self._finish(seq, out, "length")
        return out

    def _finish(self, seq: Sequence, out: Output | None = None, reason: str = "abort") -> Output | None:
        if seq in self.running:
            self.running.remove(seq)
        if reason == "error":
            self._scrub(seq)
        self.blocks.release(seq.table)
        seq.table = []
        if out is not None:
            if reason == "stop" and not seq.text.stopped:
                out.text += seq.text.flush()
            out.finished, out.finish_reason = True, reason
            out.completion_tokens = len(seq.output_ids)
        return out

    # reporting

    @property
    def proposed(self) -> int:
        """Tokens drafted so far (speculative decoding; 0 without a draft)."""
        return self.speculator.proposed if self.speculator else 0

    @property
    def accepted(self) -> int:
        return self.speculator.accepted if self.speculator else 0

    def kv_usage(self) -> dict[str, float]:
        """Blocks used and free, and the internal waste: reserved token slots that hold no token."""
        used = self.blocks.num_blocks - self.blocks.num_free
        reserved = sum(len(s.table) for s in self.running) * self.cfg.block_size
        filled = sum(min(s.computed, len(s.table) * self.cfg.block_size) for s in self.running)
        return {
            "blocks_total": self.blocks.num_blocks,
            "blocks_used": used,
            "blocks_free": self.blocks.num_free,
            "usage": used / self.blocks.num_blocks,
            "waste": (reserved - filled) / reserved if reserved else 0.0,
            "prefix_hit_rate": self.blocks.prefix_hits / max(1, self.blocks.prefix_queries),
        }


class EngineFull(LmforgeError):
    """The queue is full: the caller should retry later (HTTP 429)."""
