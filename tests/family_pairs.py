"""Tiny base/instruct pairs of the published families, with tokenizers that differ as the Hub's do.

`make_pair(family, root)` writes `root/<family>-base` and `root/<family>-instruct`: random
stand-ins from `family_models` (the architecture's quirks) and one trained BPE vocabulary shared
by both, wrapped with each checkpoint's own settings, as the Hub ships them:

| family   | base eos / template                   | instruct eos / template / generation-config eos      |
|----------|---------------------------------------|-------------------------------------------------------|
| qwen2.5  | <|endoftext|>, ChatML                 | <|im_end|>, ChatML, [<|im_end|>, <|endoftext|>]        |
| llama3.1 | <|end_of_text|>, none (bos added)     | <|eot_id|>, Llama-3 (writes bos), three eos ids         |
| qwen3    | <|endoftext|>, ChatML                 | <|im_end|>, thinking template, [<|im_end|>, <|endoftext|>] |
| gemma3   | <eos>, none                           | <eos>, Gemma (writes bos), [<eos>, <end_of_turn>]       |
| olmo3    | <|endoftext|>, none                   | <|im_end|>, ChatML; <|im_start|>/<|im_end|> added past the base's vocabulary |
| mistral  | </s>, none                            | </s>, [INST] template (writes bos)                    |
| qwen3-moe| as qwen3                              | as qwen3                                              |
"""

from __future__ import annotations

import json
from pathlib import Path

from family_models import make_family_model
from tiny import CORPUS

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN3 = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n"
         "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
         "{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA3 = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
          "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

# special tokens (in id order, first in the vocabulary), each side's settings, and chat-template tokens
# added to the instruct tokenizer only
SPECS = {
    "qwen2.5": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    base=dict(eos="<|endoftext|>", pad="<|endoftext|>", template=CHATML),
                    instruct=dict(eos="<|im_end|>", pad="<|endoftext|>", template=CHATML,
                                  gen_eos=["<|im_end|>", "<|endoftext|>"])),
    "llama3.1": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eom_id|>", "<|eot_id|>"],
                     base=dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", template=None, add_bos=True,
                               gen_eos=["<|end_of_text|>"]),
                     instruct=dict(bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3, add_bos=True,
                                   gen_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])),
    "qwen3": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                  base=dict(eos="<|endoftext|>", pad="<|endoftext|>", template=CHATML),
                  instruct=dict(eos="<|im_end|>", pad="<|endoftext|>", template=QWEN3,
                                gen_eos=["<|im_end|>", "<|endoftext|>"])),
    "gemma3": dict(specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                   base=dict(bos="<bos>", eos="<eos>", pad="<pad>", template=None, add_bos=True),
                   instruct=dict(bos="<bos>", eos="<eos>", pad="<pad>", template=GEMMA3, add_bos=True,
                                 gen_eos=["<eos>", "<end_of_turn>"])),
    "olmo3": dict(specials=["<|endoftext|>", "<|pad|>"],
                  base=dict(eos="<|endoftext|>", pad="<|pad|>", template=None),
                  instruct=dict(eos="<|im_end|>", pad="<|pad|>", template=CHATML, added=["<|im_start|>", "<|im_end|>"],
                                gen_eos=["<|im_end|>", "<|endoftext|>"])),
    "mistral": dict(specials=["<unk>", "<s>", "</s>"],
                    base=dict(bos="<s>", eos="</s>", unk="<unk>", template=None, add_bos=True),
                    instruct=dict(bos="<s>", eos="</s>", unk="<unk>", template=MISTRAL, add_bos=True)),
}
SPECS["qwen3-moe"] = SPECS["qwen3"]
PAIR_FAMILIES = tuple(SPECS)


def train_vocab(specials: list[str], vocab_size: int = 160):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def wrap(raw, side: dict):
    """One checkpoint's tokenizer over the shared vocabulary: its bos/eos/pad, template and added tokens."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = copy.deepcopy(raw)
    if side.get("add_bos"):  # as Llama/Gemma/Mistral tokenizers do: tokenizer(text) prepends bos
        raw.post_processor = processors.TemplateProcessing(single=f"{side['bos']} $A", pair=f"{side['bos']} $A $B",
                                                           special_tokens=[(side["bos"], raw.token_to_id(side["bos"]))])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=side.get("bos"), eos_token=side.get("eos"),
                                  pad_token=side.get("pad"), unk_token=side.get("unk"))
    if side.get("added"):
        tok.add_special_tokens({"additional_special_tokens": side["added"]})
    if side.get("template"):
        tok.chat_template = side["template"]
    return tok


def make_pair(family: str, root: Path, vocab_size: int = 160) -> tuple[Path, Path]:
    """(instruct dir, base dir) of `family`, written under `root` (reused if already there)."""
    spec = SPECS[family]
    expert, amateur = root / f"{family}-instruct", root / f"{family}-base"
    if (expert / "config.json").exists() and (amateur / "config.json").exists():
        return expert, amateur
    raw = train_vocab(spec["specials"], vocab_size)
    toks = {"base": wrap(raw, spec["base"]), "instruct": wrap(raw, spec["instruct"])}
    rows = max(len(t) for t in toks.values())
    if family == "olmo3":
        rows += 8  # Olmo's output rows are padded past its tokenizer, covering the instruct model's added tokens
    for side, path, seed in (("instruct", expert, 1), ("base", amateur, 0)):
        tok = toks[side]
        make_family_model(family, path, vocab_size=rows, seed=seed, tokenizer=tok,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        gen_eos = [tok.convert_tokens_to_ids(t) for t in spec[side].get("gen_eos", [])]
        gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": gen_eos or tok.eos_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen))
    return expert, amateur


def write_prompts(path: Path, n: int = 6) -> Path:
    """n distinct prompts (the synthesis stage deduplicates by text)."""
    words = ["fox", "dog", "river", "city", "json", "list", "word", "answer"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "instruction": f"the quick brown {words[i % len(words)]} {i}"}) + "\n")
    return path
