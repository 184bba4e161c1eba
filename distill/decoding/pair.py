"""What an expert/amateur pair must share for contrastive decoding, and how the rest is resolved.

Real base/instruct pairs differ in many tokenizer settings: Qwen2.5's base ends text with
`<|endoftext|>` and its instruct model turns with `<|im_end|>`; Llama-3.1-Instruct lists three
stop ids in its generation config; many bases ship no chat template. Only two things are
required, because the step subtracts the amateur's log-probabilities from the expert's id by id:

1. **one token -> id map** for the real vocabulary: every token both tokenizers know has the same
   id, and no id means one token to the expert and another to the amateur. Added (special)
   tokens that only one side has are allowed where the other side leaves their ids unused
   (a chat token added in post-training): the amateur then scores them with its own rows.
2. **output rows covering it**: both models' `vocab_size` (padded rows are fine) is at least
   the expert's real vocabulary size; padded rows are never scored.

Everything else may differ and is resolved by one stated rule, always from the expert:
- stop set = the expert's eos, its chat template's end-of-turn token and its generation
  config's eos ids (`distill.io.models.stop_token_ids`);
- both models get the expert's rendered prompt (its chat template, or `--chat-template`, with
  `chat_template_kwargs`; a template that reads `enable_thinking` gets it False unless told
  otherwise, as the public CoDIT code runs Qwen3);
- bos as the expert's template writes it, never twice: the rendered text is tokenized without
  adding specials (the public code's vLLM route adds the tokenizer's bos to a template that
  already wrote one; we do not), and a doubled leading bos is collapsed.
`check_pair` finds the differences before any model loads; the synthesis stage logs them and
writes them into the dataset card and provenance.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill import DistillError
log = logging.getLogger(__name__)


@dataclass
class PairCheck:
    """The outcome of `check_pair`: the rule's resolved values and every difference found."""

    expert: str
    amateur: str | None
    vocab_size: int  # the expert's real vocabulary; scores are computed over ids below it
    stop_ids: list[int]
    stop_tokens: list[str]
    chat_template: str  # where the template came from
    chat_template_kwargs: dict
    bos: str  # how the rendered prompt starts
    differences: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def read_config(model_dir: Path, what: str) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"{what} config {path} is not readable JSON ({exc}); restore the model's "
                           f"config.json (a fresh copy of the checkpoint)") from None


def output_rows(config: dict) -> int | None:
    """The model's output rows (vocab_size), also for multimodal configs that nest it (Gemma-3)."""
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def generation_eos(model_dir: Path) -> list[int]:
    """eos ids of generation_config.json, read without loading the model (absent: none)."""
    path = model_dir / "generation_config.json"
    if not path.exists():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"{path} is not readable JSON ({exc}); fix or delete it") from None
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def real_vocab_size(tokenizer) -> int:
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def check_vocab(expert_tok, amateur_tok, expert_name: str = "expert", amateur_name: str = "amateur") -> list[str]:
    """Requirement 1. Raises where the maps really differ; returns the allowed differences."""
    ve, va = expert_tok.get_vocab(), amateur_tok.get_vocab()
    moved = sorted(t for t in ve.keys() & va.keys() if ve[t] != va[t])
    inv_a = {i: t for t, i in va.items()}
    clash = sorted((i, t, inv_a[i]) for t, i in ve.items() if i in inv_a and inv_a[i] != t)
    added_e = {t.content for t in getattr(expert_tok, "added_tokens_decoder", {}).values()}
    added_a = {t.content for t in getattr(amateur_tok, "added_tokens_decoder", {}).values()}
    only_e, only_a = sorted(ve.keys() - va.keys()), sorted(va.keys() - ve.keys())
    plain_e, plain_a = [t for t in only_e if t not in added_e], [t for t in only_a if t not in added_a]
    if moved or clash or plain_e or plain_a:
        parts = []
        if moved:
            parts.append(f"{len(moved)} token(s) with different ids (first: {moved[0]!r}: {ve[moved[0]]} in the "
                         f"expert, {va[moved[0]]} in the amateur)")
        if clash:
            i, te, ta = clash[0]
            parts.append(f"{len(clash)} id(s) naming different tokens (first: id {i} is {te!r} in the expert, "
                         f"{ta!r} in the amateur)")
        if plain_e:
            parts.append(f"{len(plain_e)} vocabulary token(s) only in the expert (first: {plain_e[0]!r})")
        if plain_a:
            parts.append(f"{len(plain_a)} vocabulary token(s) only in the amateur (first: {plain_a[0]!r})")
        raise DistillError(
            f"the token -> id maps of {_tok_file(expert_name)} ({len(ve)} tokens) and {_tok_file(amateur_name)} "
            f"({len(va)} tokens) differ: {'; '.join(parts)}. Contrastive decoding subtracts the amateur's "
            f"log-probabilities id by id, so it needs the post-trained model and ITS OWN base model, which "
            f"share one vocabulary")
    diffs = []
    if only_e:
        diffs.append(f"added tokens only in the expert (the amateur scores their ids with its own rows): {only_e[:8]}")
    if only_a:
        diffs.append(f"added tokens only in the amateur (ids the expert does not use): {only_a[:8]}")
    return diffs


def _tok_file(name: str) -> str:
    path = Path(str(name))
    return str(path / "tokenizer.json") if path.is_dir() else str(name)


def resolve_chat_template(tokenizer, model_ref: str, chat_template: str | None) -> str:
    """Install `chat_template` (a file or the template text) or check the tokenizer has one."""
    if chat_template:
        path = Path(chat_template).expanduser()
        text = path.read_text() if path.is_file() else chat_template
        if "{" not in text:
            raise DistillError(f"--chat-template {chat_template!r} is neither a file nor a Jinja template; pass "
                               f"the path of a .jinja file or the template text")
        tokenizer.chat_template = text
        return f"--chat-template {path if path.is_file() else '(inline)'}"
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(f"expert {model_ref} has no chat template (neither chat_template.jinja nor "
                           f"tokenizer_config.json 'chat_template'); the expert must be a post-trained (chat) model, "
                           f"or pass --chat-template FILE with the template its post-training used")
    return "the expert's tokenizer"


def template_kwargs(tokenizer, given: dict | str | None) -> tuple[dict, str]:
    """The kwargs the template is rendered with, and where they came from."""
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except json.JSONDecodeError as exc:
            raise DistillError(f"--chat-template-kwargs {given!r} is not JSON ({exc.msg}); write e.g. "
                               f"'{{\"enable_thinking\": false}}'") from None
    if given is not None and not isinstance(given, dict):
        raise DistillError(f"--chat-template-kwargs must be a JSON object, got {given!r}")
    kwargs = dict(given or {})
    how = "given" if kwargs else "none"
    if "enable_thinking" in (tokenizer.chat_template or "") and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = False  # the public code's Qwen3 runs (ban_reasoning_qwen3=true)
        how = "enable_thinking=false by default (as the public CoDIT code runs Qwen3); override with " \
              "--chat-template-kwargs '{\"enable_thinking\": true}'"
    return kwargs, how


def render_prompt(tokenizer, messages: list[dict], kwargs: dict | None = None) -> list[int]:
    """The expert's rendered prompt as ids: the template writes bos (or not), never twice."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _bos_rule(tokenizer, kwargs: dict) -> str:
    ids = render_prompt(tokenizer, [{"role": "user", "content": "hi"}], kwargs)
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] == bos:
        return f"written once by the template ({tokenizer.bos_token})"
    return "none (the template writes no bos, and none is added)"


def _settings(tok) -> dict:
    return {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token, "unk": tok.unk_token}


def check_pair(expert: str, amateur: str | None = None, trust_remote_code: bool = False,
               chat_template: str | None = None, chat_template_kwargs: dict | str | None = None):
    """Check a pair before any model loads; returns (the expert's tokenizer, ready to render, and a PairCheck).

    `amateur=None` (direct sampling) checks the expert alone. Raises DistillError on a true
    mismatch (requirements 1-2 above) and on a missing chat template.
    """
    from distill.io.models import load_tokenizer, resolve_model, stop_token_ids

    from distill.io.validate import check_model_dir

    # config.json and every shard's header of both models, the check chat-vector makes: a broken
    # checkpoint is one line naming its file now, not a traceback once the models load.
    e_dir = check_model_dir(expert, "expert").path
    if amateur:
        check_model_dir(amateur, "amateur")
    tok = load_tokenizer(expert, trust_remote_code, what="expert")
    source = resolve_chat_template(tok, expert, chat_template)
    kwargs, kwargs_how = template_kwargs(tok, chat_template_kwargs)
    vocab = real_vocab_size(tok)
    e_cfg, e_eos = read_config(e_dir, "expert"), generation_eos(e_dir)
    diffs = [f"chat template kwargs: {kwargs_how}"] if kwargs else []
    _check_rows(e_cfg, vocab, "expert", e_dir)
    if amateur:
        a_dir = resolve_model(amateur, "amateur")
        a_tok = load_tokenizer(amateur, trust_remote_code, what="amateur")
        diffs += check_vocab(tok, a_tok, str(e_dir), str(a_dir))
        a_cfg = read_config(a_dir, "amateur")
        _check_rows(a_cfg, vocab, "amateur", a_dir)
        diffs += _differences(tok, a_tok, e_cfg, a_cfg, e_eos, generation_eos(a_dir))
    from transformers import GenerationConfig

    stops = stop_token_ids(tok, generation_config=GenerationConfig(eos_token_id=e_eos or None))
    check = PairCheck(expert=str(expert), amateur=str(amateur) if amateur else None, vocab_size=vocab,
                      stop_ids=stops, stop_tokens=tok.convert_ids_to_tokens(stops), chat_template=source,
                      chat_template_kwargs=kwargs, bos=_bos_rule(tok, kwargs), differences=diffs)
    for d in diffs:
        log.info("pair: %s", d)
    log.info("pair: stop set %s (the expert's eos, end-of-turn and generation-config eos); bos %s",
             check.stop_tokens, check.bos)
    return tok, check


def check_embedding_rows(model, vocab_size: int, name: str) -> None:
    """The loaded model's output rows against its tokenizer (the config-level twin: _check_rows)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise DistillError(f"{name} has {rows} output rows but its tokenizer has {vocab_size} tokens; "
                           f"the tokenizer does not belong to this model")


def _check_rows(config: dict, vocab: int, what: str, model_dir: Path) -> None:
    rows = output_rows(config)
    if rows is not None and rows < vocab:
        raise DistillError(f"{what} {model_dir / 'config.json'} has vocab_size {rows} (output rows) but the expert's "
                           f"tokenizer has {vocab} tokens; every id the expert can write needs a row in both models: "
                           f"this tokenizer does not belong to that model")


def _differences(tok, a_tok, e_cfg: dict, a_cfg: dict, e_eos: list[int], a_eos: list[int]) -> list[str]:
    """Settings that may differ; each resolved from the expert, each said."""
    diffs = []
    es, as_ = _settings(tok), _settings(a_tok)
    for k in es:
        if es[k] != as_[k]:
            diffs.append(f"{k} token: expert {es[k]!r}, amateur {as_[k]!r} (the expert's is used)")
    if e_eos != a_eos:
        names = lambda ids: tok.convert_ids_to_tokens(ids)  # noqa: E731 - one shared map: the expert's names
        diffs.append(f"generation-config eos: expert {names(e_eos)}, amateur {names(a_eos)} (the expert's stop the rows)")
    if not getattr(a_tok, "chat_template", None):
        diffs.append("the amateur has no chat template (both models get the expert's rendered prompt)")
    elif a_tok.chat_template != tok.chat_template:
        diffs.append("chat templates differ (both models get the expert's rendered prompt)")
    e_rows, a_rows = output_rows(e_cfg), output_rows(a_cfg)
    if e_rows != a_rows:
        diffs.append(f"output rows: expert {e_rows}, amateur {a_rows} (rows past the vocabulary are never scored)")
    for key in ("model_type", "architectures", "tie_word_embeddings"):
        if e_cfg.get(key) != a_cfg.get(key):
            diffs.append(f"{key}: expert {e_cfg.get(key)!r}, amateur {a_cfg.get(key)!r}")
    return diffs
