"""`SynthesizeConfig`: every option of `distill synthesize` and the recipe's `synthesis:` / `prompts:`
sections (distill.config), with its checks; importing it loads no model code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional, Union

from distill import DistillError
from distill.config import opt
from distill.decoding import CODIT_ALPHA
from distill.evaluate.judge import judge_option, judge_settings
from distill.synthesize.prompt_sets import LAYOUTS

PROMPT_LAYOUTS = ("auto",) + LAYOUTS
# The prompt selection: recorded, not a resume key (rows are keyed by prompt id and their text is checked)
SELECTION_KEYS = ("limit", "sample", "prompt_layout", "prompt_turns", "max_prompt_chars", "dedupe", "long_prompts")

# Settings that change the rows; a resumed run must match them (batch size, device do not).
RESUME_KEYS = ("expert", "amateur", "prompts", "method", "alpha", "beta", "temperature", "top_p",
               "max_new_tokens", "seed", "chat_template", "chat_template_kwargs", "token_logprobs", "repetition_rule",
               "repetition_ngram", "repetition_threshold")
BEST_OF_N_KEYS = ("n", "judge", "judge_template")  # change best-of-n's rows too


@dataclass(kw_only=True)
class SynthesizeConfig:
    """One synthesis run: the `distill synthesize` options, the recipe's `synthesis:` section and
    its `prompts:` keys. The defaults are the public CoDIT code's settings."""

    expert: str = opt(help="post-trained (chat) model: local HF directory or HF-cache id")
    prompts: str = opt(help="prompts: .jsonl, .json, .parquet, a datasets directory or a cached hub dataset; rows in "
                            "any layout of --prompt-layout")
    out: str = opt(help="output dataset directory; rerun the same command to resume an interrupted run")
    amateur: Optional[str] = opt(None, "the expert's pre-trained base model (same tokenizer); not needed for "
                                       "--method direct")
    method: Literal["codit", "direct", "best-of-n"] = opt(
        "codit", "codit: contrastive decoding; direct: sampling from the expert alone (beta=0; the amateur is never "
                 "loaded); best-of-n: --n direct samples per prompt, the one --judge scores best is kept")
    alpha: Optional[float] = opt(None, "plausibility: only tokens with p_expert >= alpha * max p_expert are candidates "
                                       f"(None: {CODIT_ALPHA} for codit, 0 for direct, i.e. plain sampling)")
    beta: float = opt(1.0, "weight of the amateur's log-probability subtracted from the expert's")
    temperature: float = opt(1.0, "sampling temperature on the contrastive scores; 0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling mass (1.0 = off)")
    max_new_tokens: int = opt(4096, "longest response in tokens (the max_tokens of the public CoDIT scripts but "
                                    "run_Qwen3-8B.sh, which uses 2048)")
    batch_size: Union[int, str] = opt(
        "auto", "rows decoded together; finished rows are refilled from the queue. auto: on a GPU with the paged KV "
                "cache, up to 256 rows, admitted while its free blocks hold their tokens; elsewhere 32")
    seed: int = opt(0, "run seed; each row samples with a seed derived from (seed, id)")
    # Which prompts (distill.synthesize.prompt_sets): the layout, the turns kept, the counted drops
    # (empty, over max_prompt_chars, duplicate text), then the first `limit` or a seeded `sample`.
    limit: Optional[int] = opt(None, "only the first N prompts (after the drops below)")
    sample: Optional[int] = opt(None, "N prompts drawn with --seed, kept in source order")
    prompt_layout: Literal[PROMPT_LAYOUTS] = opt(
        "auto", "layout of the prompt rows: instruction, messages, conversation (LMSYS-Chat-1M, WildChat), sharegpt "
                "(conversations with from/value), alpaca (instruction + input); auto detects it from the first row")
    prompt_turns: Literal["first", "all"] = opt(
        "first", "first: the first user turn (with any system turn before it), as the public CoDIT code; all: every "
                 "turn up to the last user turn")
    max_prompt_chars: Optional[int] = opt(16000, "drop prompts longer than this many characters, counted in the card")
    dedupe: bool = opt(True, "keep only the first of prompts whose normalised text repeats (--no-dedupe keeps all)")
    long_prompts: Literal["drop", "error"] = opt(
        "drop", "a prompt whose rendered tokens + --max-new-tokens exceed the models' positions "
                "(max_position_embeddings): drop it, counted in the card, or stop with an error")
    device: Optional[str] = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = opt(
        "auto", "model dtype; auto = bfloat16 on cuda (float16 where bf16 is not native), float32 on cpu")
    engine: Literal["auto", "eager", "fast"] = opt(
        "auto", "auto: the fast engine (paged KV cache, CUDA graphs on a GPU) for Llama, Mistral, Qwen2/3, "
                "Gemma-3 and Olmo-2/3, else the eager Hugging Face engine (the card records which ran)")
    cuda_graphs: bool = opt(True, "fast engine: replay the decode step as CUDA graphs (--no-cuda-graphs: a fallback "
                                  "if graph capture misbehaves on your setup)")
    compile_layers: Optional[bool] = opt(None, "fast engine: torch.compile the per-layer work around attention "
                                               "(None: on a GPU only)")
    decode_attention: Literal["auto", "sdpa", "flex"] = opt(
        "auto", "fast engine: flex (FlexAttention: each row reads only its own live cache blocks) or sdpa (every "
                "row reads up to the longest row); auto = flex on a GPU, with sdpa where flex does not compile")
    concurrent_models: Optional[bool] = opt(None, "fast engine: step the amateur on a second CUDA stream so the two "
                                                  "models' kernels overlap inside the CUDA graph (None: on a GPU only)")
    kv_cache: Literal["paged", "static"] = opt(
        "paged", "fast engine: paged hands out KV cache blocks as rows grow and frees them as rows finish (the batch "
                 "is bounded by the tokens rows hold; rows wait, or the longest is recomputed later, when blocks run "
                 "out); static keeps prompt + max_new_tokens columns per row")
    kv_block_size: int = opt(128, "fast engine, paged cache: tokens per cache block")
    kv_blocks: Optional[int] = opt(None, "fast engine, paged cache: blocks in the pool (all models); default: what "
                                         "free GPU memory holds beside the models, on CPU room for every row")
    repetition_rule: Literal["public", "ngram"] = opt(
        "public", "which rows are marked repetitive: public = the public CoDIT code's rule (a response of 100+ "
                  "characters whose top character 2/3/4-gram is >= 0.16/0.18/0.20 of its n-grams, or whose top "
                  "character 100-gram occurs 10+ times); ngram = distill's own rule, set by the two options below")
    repetition_ngram: int = opt(20, "--repetition-rule ngram: n of the character n-grams")
    repetition_threshold: float = opt(0.3, "--repetition-rule ngram: flag a response as repetitive when more than "
                                           "this fraction of its characters lie in a repeated character n-gram")
    chat_template: Optional[str] = opt(None, "chat template (a .jinja file or the template text) for an expert whose "
                                             "tokenizer has none; both models get the prompt it renders",
                                       metavar="FILE_OR_TEXT")
    chat_template_kwargs: Optional[str] = opt(
        None, "a JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}' (a template that reads "
              "enable_thinking, as Qwen3's does, gets false unless set here, as the public CoDIT code runs it); "
              "recorded in provenance", metavar="JSON")
    token_logprobs: bool = opt(False, "store each chosen token's log_softmax(score) in the row's token_logprobs (as "
                                      "the public code's 'score' field), for analysis")
    # best-of-n (distill.synthesize.best_of_n): N direct samples, judged 1..10 (distill.evaluate.judge)
    n: int = opt(4, "best-of-n: samples per prompt")
    judge: str = judge_option("judge")  # the judge's settings, as `distill evaluate`'s
    judge_url: Optional[str] = judge_option("judge_url")
    judge_template: Optional[str] = judge_option("judge_template")
    judge_concurrency: int = judge_option("judge_concurrency")
    judge_timeout: float = judge_option("judge_timeout")
    judge_retries: int = judge_option("judge_retries")
    judge_max_new_tokens: int = judge_option("judge_max_new_tokens")
    overwrite: bool = opt(False, "replace an output made with different settings")
    trust_remote_code: bool = opt(False, "allow model code from the model directory")
    progress: bool = opt(True, "show a progress bar (--no-progress: none)")

    def __post_init__(self):
        self.device, self.dtype = self.device or "auto", self.dtype or "auto"  # null in a recipe: auto
        if self.method not in ("codit", "direct", "best-of-n"):
            raise DistillError(f"method must be codit, direct or best-of-n, got {self.method!r}")
        if self.alpha is None:
            self.alpha = CODIT_ALPHA if self.method == "codit" else 0.0
        if self.method != "codit":
            self.beta, self.amateur = 0.0, None
        if self.method == "best-of-n":
            from distill.io.validate import at_least

            at_least(1, n=self.n, judge_concurrency=self.judge_concurrency)
            if not self.judge_timeout > 0:
                raise DistillError(f"judge_timeout must be > 0, got {self.judge_timeout}")
        if self.method == "codit" and not self.amateur:
            raise DistillError("method codit needs --amateur (the expert's base model); or use --method direct")
        # Every value checked before anything is written: a run that fails here leaves nothing behind.
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise DistillError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        from distill.synthesize.repetition import repetition_rule

        repetition_rule(self.repetition_rule, self.repetition_ngram, self.repetition_threshold)  # raises if bad
        from distill.synthesize.fit import LONG_PROMPT_POLICIES

        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise DistillError(f"long_prompts must be drop or error, got {self.long_prompts!r}")
        from distill.decoding.engine import DecodingConfig
        from distill.decoding.pair import template_kwargs

        if isinstance(self.chat_template_kwargs, dict):  # recipes give a mapping; settings keep one JSON form
            self.chat_template_kwargs = json.dumps(self.chat_template_kwargs, sort_keys=True)
        template_kwargs(_NoTemplate, self.chat_template_kwargs)  # not JSON: an error now, before anything loads
        DecodingConfig(alpha=self.alpha, beta=self.beta, temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, engine=self.engine,
                       decode_attention=self.decode_attention, kv_cache=self.kv_cache,
                       kv_block_size=self.kv_block_size, kv_blocks=self.kv_blocks).validate()

    def settings(self) -> dict:
        # The prompt selection is recorded but not a resume key: rows are keyed by prompt id and their
        # text is checked, so another selection keeps what it shares with the old one.
        keys = RESUME_KEYS + (BEST_OF_N_KEYS if self.method == "best-of-n" else ())
        return {k: getattr(self, k) for k in keys} | {k: getattr(self, k) for k in SELECTION_KEYS}

    def rows(self) -> int:
        """batch_size as a number: "auto" is resolved by the engine; here (best-of-n groups, syncs) 32."""
        return self.batch_size if isinstance(self.batch_size, int) else 32

    def judge_settings(self):
        return judge_settings(self, batch_size=self.rows())


class _NoTemplate:
    chat_template = None
