"""Finding and loading models: a local directory or the Hugging Face cache, never a download.

Safe by default: safetensors only (`use_safetensors=True`, so a pickle checkpoint is refused
rather than unpickled) and `trust_remote_code` only when the caller asks for it.
"""

from __future__ import annotations

from pathlib import Path

from distill import DistillError
from distill.io.dtypes import default_dtype, torch_dtype  # noqa: F401 - kept importable here
from distill.io.paths import resolve_model  # noqa: F401 - the one place models are found; kept importable here


def load_causal_lm(ref, dtype=None, device=None, trust_remote_code: bool = False, what: str = "model"):
    """Load a causal LM from a local directory or the HF cache, safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.io.validate import check_model_dir

    # config.json parses and every shard's header is complete (the check chat-vector makes), so a
    # broken checkpoint is one line naming its file, never a traceback from deep inside transformers.
    path = check_model_dir(ref, what).path
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype if dtype is not None else torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise _load_error(exc, what, path) from None
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(ref, trust_remote_code: bool = False, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    path = resolve_model(ref, what)
    _check_config(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own types for a damaged tokenizer.json
        if isinstance(exc, DistillError):
            raise
        raise _load_error(exc, what, path) from None


def _check_config(path: Path) -> None:
    """config.json, where present, is a JSON object (transformers reads it for the tokenizer too)."""
    import json

    config = path / "config.json"
    if not config.exists():
        return
    try:
        value = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistillError(f"{config} is not valid JSON ({exc}); repair or replace it") from None
    if not isinstance(value, dict):
        raise DistillError(f"{config} is not a JSON object of model settings; repair or replace it")


def _load_error(exc: BaseException, what: str, path: Path) -> Exception:
    """A failure inside transformers as one line naming the directory (storage errors pass through)."""
    from distill.io.validate import storage_error

    if storage_error(exc) is not None:
        return exc
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return DistillError(f"cannot load {what} from {path}: {first}; check its files (config.json, the "
                        f"tokenizer and *.safetensors) or copy the model again")


def stop_token_ids(tokenizer, model=None, generation_config=None) -> list[int]:
    """Token ids that end an assistant turn, by one rule for synthesis, evaluation and training:
    the tokenizer's eos, the chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`: see `end_of_turn_token`) and the eos ids of the generation config (the
    model's, or one given without loading the model: Llama-3.1-Instruct lists three there)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids.append(eot)
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))  # in order, without repeats


_SENTINEL = "DISTILLSENTINEL"


def end_of_turn_token(tokenizer, chat_template: str | None = None, **template_kwargs) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a one-turn conversation with a sentinel answer and reading the first token
    after it, so it holds for any template (ChatML, Llama-3, Gemma, Mistral's `</s>`) without a
    list of names. Only an added/special token counts: text such as a newline is not a stop.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **template_kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses this shape has no readable end-of-turn
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    tail = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return int(ids[0]) if ids and ids[0] in special else None
