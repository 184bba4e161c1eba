"""The two LLM judges: a local Hugging Face model on distill's decoding engine, and a served
OpenAI-compatible chat-completions endpoint (`vllm serve`, SGLang, TGI) through the `openai` client."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from distill import DistillError
from distill.evaluate.judge.base import TextJudge

log = logging.getLogger(__name__)


@dataclass
class LocalJudge(TextJudge):
    """A judge model from a local directory (or the HF cache), greedy on the decoding engine; a retry
    of an unparseable answer samples (temperature 0.7, a new seed) so it can come out otherwise."""

    model: str = ""
    max_new_tokens: int = 512
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None
    _decoder: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self.name = f"local:{os.path.abspath(self.model) if os.path.isdir(self.model) else self.model}"

    def _load(self):
        import torch

        from distill.decoding.pair import check_pair
        from distill.evaluate.generate import resolve_device_dtype
        from distill.io.models import load_causal_lm

        self._tokenizer, self._pair = check_pair(self.model)
        device, dtype = resolve_device_dtype(self.device, self.dtype)
        self._model = load_causal_lm(self.model, dtype, device, what="judge model")
        self._torch = torch

    def complete(self, chats: list[list[dict]], attempt: int) -> list[str]:
        from distill.decoding.engine import ContrastiveDecoder, DecodingConfig, Request, derive_seed
        from distill.decoding.pair import render_prompt

        if self._decoder is None:
            self._load()
            self._decoder = True
        tok = self._tokenizer
        cfg = DecodingConfig(alpha=0.0, beta=0.0, temperature=0.0 if attempt == 0 else 0.7,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        decoder = ContrastiveDecoder(self._model, None, self._pair.vocab_size, self._pair.stop_ids, cfg,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        requests = [Request(str(i), self._render(render_prompt, chat), derive_seed(attempt, str(i)))
                    for i, chat in enumerate(chats)]
        out = [""] * len(chats)
        for r in decoder.generate(requests):
            tokens = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens
            out[int(r.key)] = tok.decode(tokens, skip_special_tokens=True).strip()
        return out

    def _render(self, render_prompt, chat):
        try:
            return render_prompt(self._tokenizer, chat, self._pair.chat_template_kwargs)
        except Exception:  # noqa: BLE001 - a template without a system role (Gemma's): one user turn
            merged = [{"role": "user", "content": "\n\n".join(m["content"] for m in chat)}]
            return render_prompt(self._tokenizer, merged, self._pair.chat_template_kwargs)

    def close(self) -> None:
        self._model = self._decoder = None


@dataclass
class ServedJudge(TextJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint.

    `concurrency` requests in flight at once; each waits at most `timeout` seconds. A connection
    error, a timeout, a 5xx/429 answer or a body that is not a chat completion is retried up to
    `transport_retries` times with exponential backoff; then the judge stops with an error that
    names the URL and what it answered (the judgments made so far stay in the cache)."""

    model: str = ""
    url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 120.0
    transport_retries: int = 4
    backoff: float = 1.0
    max_tokens: int = 1024
    _client: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self.url = self.url or os.environ.get("DISTILL_JUDGE_URL") or os.environ.get("OPENAI_BASE_URL") or ""
        if not self.url:
            raise DistillError("a served judge needs its endpoint: --judge-url http://HOST:PORT/v1 (or DISTILL_JUDGE_URL), "
                               "e.g. the address of `vllm serve MODEL`")
        if not self.model:
            raise DistillError("a served judge needs the model name the server serves: --judge served:NAME")
        self.name = f"served:{self.model}"

    def _connect(self):
        try:
            import openai
        except ImportError:
            raise DistillError("a served judge uses the openai client: pip install 'distill[judge]' "
                               "(or pip install openai)") from None
        self._openai = openai
        self._client = openai.OpenAI(base_url=self.url, api_key=os.environ.get(self.api_key_env) or "EMPTY",
                                     timeout=self.timeout, max_retries=0)

    def probe(self) -> None:
        """Fail now, before anything is generated, if nothing answers at the URL (any HTTP answer,
        even an error for GET /models, counts as a server being there)."""
        if self._client is None:
            self._connect()
        try:
            self._client.with_options(timeout=min(self.timeout, 10.0)).models.list()
        except self._openai.APIStatusError:
            pass
        except self._openai.APIConnectionError as exc:  # a timeout included
            raise DistillError(f"judge at {self.url}: cannot connect ({exc.__cause__ or exc}); is the server running "
                               f"(e.g. `vllm serve {self.model}`), and is --judge-url right?") from None

    def complete(self, chats: list[list[dict]], attempt: int) -> list[str]:
        if self._client is None:
            self._connect()
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda chat: self._one(chat, attempt), chats))

    def _one(self, chat: list[dict], attempt: int) -> str:
        o = self._openai
        reason = ""
        for k in range(self.transport_retries + 1):
            if k:
                time.sleep(min(self.backoff * 2 ** (k - 1), 30.0))
            try:
                r = self._client.chat.completions.create(model=self.model, messages=chat,
                                                         temperature=0.0 if attempt == 0 else 0.7,
                                                         max_tokens=self.max_tokens)
                return r.choices[0].message.content or ""
            except o.APITimeoutError:
                reason = f"no answer within {self.timeout:g} s (--judge-timeout)"
            except o.APIConnectionError as exc:
                reason = f"cannot connect ({exc.__cause__ or exc}); is the server running (e.g. `vllm serve " \
                         f"{self.model}`), and is --judge-url right?"
            except o.APIStatusError as exc:
                if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                    reason = f"answered HTTP {exc.status_code}"
                else:  # the request itself is wrong: retrying cannot help
                    raise DistillError(f"judge at {self.url} answered HTTP {exc.status_code}: "
                                       f"{_short(exc.message)}; check --judge (the model name it serves) and "
                                       f"the API key in ${self.api_key_env}") from None
            except (ValueError, AttributeError, IndexError, TypeError, o.APIResponseValidationError) as exc:
                reason = f"answered something that is not a chat completion ({type(exc).__name__}: {_short(str(exc))})"
            log.warning("judge at %s: %s (attempt %d of %d)", self.url, reason, k + 1, self.transport_retries + 1)
        raise DistillError(f"judge at {self.url}: {reason}, {self.transport_retries + 1} times; the judgments made so "
                           f"far are cached, rerun to resume")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."
