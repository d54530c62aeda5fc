"""An lmforge run as an lm-evaluation-harness 0.4 model, in-process (no server): loglikelihood through the shared-prefix
scorer (requests with one context share one pass), loglikelihood_rolling in lm-eval's disjoint windows, and greedy
generate_until.

Use: `lm_eval.simple_evaluate(model=LmforgeLM("runs/speedrun"), tasks=[...])`, or from the shell
`python -m lmforge.eval.lm_eval_model --model lmforge --model_args run=runs/speedrun --tasks hellaswag` (lm-eval finds
no plugins by itself, so this registers the name "lmforge" and then runs lm-eval's own command line).
"""

from __future__ import annotations

import sys

from lm_eval import utils
from lm_eval.api.model import TemplateLM

from lmforge.checkpoint import load_run
from lmforge.eval.prefix import PrefixScorer
from lmforge.sampling import generate_tokens, stream_text


class LmforgeLM(TemplateLM):
    """`add_bos_token` as lm-eval's hf model on our transformers export, whose tokenizer puts the BOS before every
    text: on by default, so scores equal HFLM's item by item."""

    def __init__(self, run: str = "", batch_size: int | str = 8, add_bos_token: bool = True, max_gen_toks: int = 256,
                 model=None, tokenizer=None, **kwargs):  # fmt: skip
        super().__init__()
        self.model, self.tok = (model, tokenizer) if model is not None else load_run(run)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.add_bos_token, self.max_gen_toks = bool(add_bos_token), int(max_gen_toks)
        self.max_length = self.model.cfg.max_seq_len
        self.scorer = PrefixScorer(self.model)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # HFLM's choice when the tokenizer has a BOS

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Requests with the same context tokens are scored as one item; each request is cut on the left to the
        model's context as lm-eval cuts it (the last max_length + 1 tokens)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        conts = []
        for n, (_, context, continuation) in enumerate(requests):
            keep = self.max_length + 1 - len(continuation)
            assert keep >= 1, "a continuation longer than the context"
            context = tuple(context[-keep:])
            groups.setdefault(context, []).append(n)
            conts.append(list(continuation)[-self.max_length :])
        items = [(list(ctx), [conts[n] for n in members]) for ctx, members in groups.items()]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        members = list(groups.values())
        for start in range(0, len(items), self.batch_size):
            scores = self.scorer.score(items[start : start + self.batch_size])
            for group, group_scores in zip(members[start : start + self.batch_size], scores, strict=True):
                for n, score in zip(group, group_scores, strict=True):
                    out[n] = score
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (r.args for r in requests):
            windows = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1),
            )
            pairs = [(list(ctx), [list(cont)]) for ctx, cont in windows]
            scores = [s for i in range(0, len(pairs), self.batch_size)
                      for s in self.scorer.score(pairs[i : i + self.batch_size])]  # fmt: skip
            out.append(sum(s[0][0] for s in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy, as lm-eval's tasks ask; the context keeps its last max_length - max_gen_toks tokens."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            stream = generate_tokens(self.model, ids, max_new, stop_ids={self.tok.eos_id})
            out.append("".join(stream_text(stream, self.tok, until)))
        return out


def register() -> None:
    """Make `--model lmforge` known to lm-eval in this process."""
    from lm_eval.api.registry import register_model

    register_model("lmforge")(LmforgeLM)


if __name__ == "__main__":
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()
