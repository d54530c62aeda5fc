"""Loss masks: the tokens trained are exactly the assistant turns (content and end-of-turn token), and the labels equal
TRL's SFTTrainer's (assistant_only_loss on messages, completion_only_loss on prompt/completion pairs) on the same
conversations and tokenizer, loaded by transformers from our saved tokenizer folder."""

from pathlib import Path

import pytest

from lmforge.finetune.formats import load_conversations
from lmforge.finetune.template import IGNORE, encode_example, marked, shifted

FIXTURES = Path(__file__).parent.parent / "fixtures"

# The run's template (tokenizer/bpe.py CHAT_TEMPLATE) with TRL's `{% generation %}` around what an assistant turn adds:
# transformers derives its assistant mask from these tags, independently of our prefix renders.
GENERATION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{%- generation -%}{{- message['content'] ~ '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def conversations():
    alpaca = load_conversations(FIXTURES / "alpaca_20.json", "alpaca")[0][:6]
    hh = load_conversations(FIXTURES / "hh_rlhf_harmless_20.jsonl", "hh_rlhf")[0][:6]
    system = [{"role": "system", "content": "Answer in one word."}, *alpaca[0]]
    return [*alpaca, *hh, system]


def test_trained_tokens_are_each_assistant_turn_and_its_end(tiny_tokenizer, conversations):
    end = tiny_tokenizer.token_id("<|end|>")
    for conv in conversations:
        ids, trained = encode_example(tiny_tokenizer, conv)
        spans, i = [], 0
        while i < len(ids):
            if trained[i]:
                j = i
                while j < len(ids) and trained[j]:
                    j += 1
                spans.append(ids[i:j])
                i = j
            i += 1
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert [tiny_tokenizer.decode(s) for s in spans] == [a + "<|end|>" for a in answers]
        assert all(s[-1] == end for s in spans)
        x, y = shifted(ids, trained)
        assert len(x) == len(y) == len(ids) - 1 and sum(t != IGNORE for t in y) == sum(trained)
    shown = marked(tiny_tokenizer, *encode_example(tiny_tokenizer, conversations[0]))
    assert shown.endswith(f"<|assistant|>[[{conversations[0][1]['content']}<|end|>]]")


def test_labels_equal_trl_sft_trainer(tiny_tokenizer, conversations, tmp_path):
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from lmforge.interop.hf import to_transformers
    from lmforge.models import ModelConfig, build_model

    tiny_tokenizer.save(tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf_tok.apply_chat_template(conversations[-1], tokenize=False) == tiny_tokenizer.render_chat(
        conversations[-1]
    )
    hf_tok.chat_template = GENERATION_TEMPLATE
    assert hf_tok.apply_chat_template(conversations[-1], tokenize=False) == tiny_tokenizer.render_chat(
        conversations[-1]
    )
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = to_transformers(build_model(cfg, seed=0), tiny_tokenizer)

    def trl_labels(rows, **options):
        args = trl.SFTConfig(
            output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True, bf16=False, **options
        )
        data = datasets.Dataset.from_list(rows)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok)
        return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]

    ours = []
    for conv in conversations:
        ids, trained = encode_example(tiny_tokenizer, conv, bos=False)  # the saved template has no BOS
        ours.append((ids, [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]))
    assert trl_labels([{"messages": c} for c in conversations], assistant_only_loss=True) == ours
    # prompt/completion pairs: TRL trains what prompt + completion adds to the prompt with the generation prompt, so
    # ours for the whole conversation with only the last assistant turn trained
    last_only = []
    for (ids, labels), conv in zip(ours, conversations, strict=True):
        start = len(tiny_tokenizer.encode_chat(conv[:-1], add_generation_prompt=True))
        last_only.append((ids, [IGNORE] * start + labels[start:]))
    pairs = [{"prompt": c[:-1], "completion": c[-1:]} for c in conversations]
    assert trl_labels(pairs, completion_only_loss=True) == last_only


class ForeignChat:
    """A transformers tokenizer with a foreign chat template behind the two methods the masks use (encode_chat and
    token_id): what lmforge's Tokenizer offers for any template once it reads them."""

    def __init__(self, hf_tok, template: str):
        self.hf_tok, self.template = hf_tok, template

    def encode_chat(self, messages, add_generation_prompt=False, bos=False):
        out = self.hf_tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, chat_template=self.template, return_dict=True
        )
        return out["input_ids"]

    def token_id(self, token):
        return self.hf_tok.convert_tokens_to_ids(token)


def test_masks_follow_a_foreign_template_as_trl_does(tiny_tokenizer, conversations, tmp_path):
    """ChatML (TRL's Qwen2.5 template and its training variant with {% generation %}): the same labels as TRL but for
    the newline that opens each answer, which TRL's variant trains and ours leaves to the generation prompt (the
    prompt an answer is generated after ends with it)."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from lmforge.interop.hf import to_transformers
    from lmforge.models import ModelConfig, build_model

    templates = Path(trl.__file__).parent / "chat_templates"
    tiny_tokenizer.save(tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf_tok.chat_template = (templates / "qwen2_5_training.jinja").read_text()
    chatml = ForeignChat(hf_tok, (templates / "qwen2_5.jinja").read_text())
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = to_transformers(build_model(cfg, seed=0), tiny_tokenizer)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True, bf16=False,
        assistant_only_loss=True,
    )  # fmt: skip
    data = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok)
    newline = hf_tok.encode("\n", add_special_tokens=False)
    opening = chatml.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert newline == opening[-1:] and hf_tok.decode(opening).endswith("<|im_start|>assistant\n")
    for row, conv in zip(trainer.train_dataset, conversations, strict=True):
        ids, trained = encode_example(chatml, conv, bos=False)
        assert row["input_ids"] == ids
        ours = [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]
        differ = [k for k, (a, b) in enumerate(zip(ours, row["labels"], strict=True)) if a != b]
        answers = sum(m["role"] == "assistant" for m in conv)
        assert len(differ) == answers and all(ours[k] == IGNORE and ids[k] == newline[0] for k in differ)
        assert all(hf_tok.decode(ids[: k + 1]).endswith("<|im_start|>assistant\n") for k in differ)
