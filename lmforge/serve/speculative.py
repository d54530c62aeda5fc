"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small draft model proposes k tokens, the
target model scores all of them in one forward pass, and modified rejection sampling keeps the output distribution
exactly the target's: draft token x is accepted with probability min(1, p(x) / q(x)); at the first rejection the
token is drawn from max(0, p - q) renormalised; if all k are accepted a bonus token is drawn from p. Greedy requests
accept exactly the drafts the target would have picked.

The engine holds a Speculator, which holds the draft's runner over its own paged KV pool, indexed by the same block
tables as the target's. Requests with repetition, presence or frequency penalties decode one token at a time: their
distribution depends on the tokens being drafted.

Run: lmforge serve RUN --draft SMALL_RUN [--spec-tokens 4]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models import Decoder
from lmforge.sampling import sampling_probs
from lmforge.serve.paged import Chunk, PagedKVStore
from lmforge.serve.runners import make_runner

if TYPE_CHECKING:
    from lmforge.serve.engine import Sequence


class Speculator:
    """Drafts k tokens per decoding sequence with `draft` and verifies them against the target's logits."""

    def __init__(self, draft: Decoder, target: Decoder, k: int, num_blocks: int, block_size: int, backend: str):
        if draft.cfg.vocab_size != target.cfg.vocab_size:
            raise LmforgeError(
                f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                f"({target.cfg.vocab_size}); use a draft trained with the same tokenizer"
            )
        if draft.cfg.max_seq_len < target.cfg.max_seq_len:
            raise LmforgeError(
                f"the draft's context ({draft.cfg.max_seq_len}) is shorter than the target's "
                f"({target.cfg.max_seq_len}); use a draft with at least the target's context"
            )
        if k < 1:
            raise LmforgeError(f"--spec-tokens {k} must be >= 1")
        self.draft, self.k = draft.eval(), k
        weight = draft.lm_head.weight
        # the draft computes every sequence's positions itself, from the first: a cached prefix's blocks need no copy
        self.store = PagedKVStore(draft.cfg, num_blocks, block_size, weight.device, weight.dtype)
        self.runner = make_runner(draft, self.store, backend)
        self.proposed = 0
        self.accepted = 0

    def lookahead(self, seq: Sequence, context: int) -> int:
        """How many tokens to draft for a decoding sequence (0: decode it one token at a time)."""
        p = seq.params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            return 0
        room = min(context - len(seq.tokens), p.max_tokens - len(seq.output_ids) - 1)
        return max(0, min(self.k, room))

    def propose(self, plan: list[tuple[Sequence, int]], spec: dict[Sequence, int]) -> tuple[dict, dict]:
        """The draft catches up with every planned sequence, then drafts spec[seq] tokens for the decoding ones.

        Returns (drafted tokens, their draft distributions (k, V)) per speculating sequence."""
        chunks = []
        for seq, n in plan:
            end = seq.computed + n
            chunks.append(Chunk(seq.tokens[seq.draft_computed : end], seq.draft_computed, seq.table))
            seq.draft_computed = end
        logits = self.runner.run(chunks, [False] * len(plan))
        last = {seq: row[-1] for (seq, _), row in zip(plan, logits, strict=True) if seq in spec}
        drafts: dict[Sequence, list[int]] = {seq: [] for seq in spec}
        probs: dict[Sequence, list[Tensor]] = {seq: [] for seq in spec}
        stopped = set()
        while last:
            for seq, row in last.items():
                p = seq.params
                q = sampling_probs(row[None], p.temperature, p.top_k, p.top_p)[0]  # (V,)
                try:
                    drafts[seq].append(int(torch.multinomial(q, 1, generator=seq.generator)))
                except RuntimeError:  # NaN draft logits: the target alone picks this sequence's next token
                    stopped.add(seq)
                    continue
                probs[seq].append(q)
            going = [seq for seq in last if len(drafts[seq]) < spec[seq] and seq not in stopped]
            if not going:
                break
            chunks = [Chunk([drafts[seq][-1]], seq.draft_computed, seq.table) for seq in going]
            for seq in going:
                seq.draft_computed += 1
            rows = self.runner.run(chunks, [False] * len(going))
            last = {seq: row[-1] for seq, row in zip(going, rows, strict=True)}
        self.proposed += sum(len(d) for d in drafts.values())
        return drafts, {seq: torch.stack(q) if q else None for seq, q in probs.items()}

    def verify(self, seq: Sequence, drafts: list[int], q: Tensor | None, logits: Tensor) -> list[int]:
        """The tokens to emit: the accepted drafts, then one drawn from the target (a correction or the bonus)."""
        p = seq.params
        target = sampling_probs(logits, p.temperature, p.top_k, p.top_p)  # (k + 1, V)
        for i, token in enumerate(drafts):
            ratio = target[i, token] / q[i, token]
            if torch.rand((), generator=seq.generator) < ratio:  # always true when p >= q, as for greedy agreement
                continue
            residual = (target[i] - q[i]).clamp(min=0)
            self.accepted += i
            return [*drafts[:i], int(torch.multinomial(residual / residual.sum(), 1, generator=seq.generator))]
        self.accepted += len(drafts)
        return [*drafts, int(torch.multinomial(target[len(drafts)], 1, generator=seq.generator))]
