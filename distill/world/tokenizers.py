"""The two families' tokenizers, trained with `tokenizers` on the world's text.

source family: SentencePiece-style BPE (Metaspace, like Mistral's), `<s>`/`</s>`, and a
`[INST] ... [/INST]` chat template that the base and the post model share.
target family: byte-level BPE (like Qwen2's) with another vocabulary, `<|endoftext|>` and
no chat template: it is a base model, and the train stage adds one.
"""

from __future__ import annotations

from pathlib import Path

SOURCE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ system if loop.first else '' }}{{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
SOURCE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]
TARGET_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_source_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SOURCE_SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # Like Mistral's tokenizer: plain encoding adds BOS (chat templates write it themselves).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["[INST]", "[/INST]"], clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = SOURCE_CHAT_TEMPLATE
    return fast


def train_target_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TARGET_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def save(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
