"""LLM-as-a-judge evaluation: one interface (`base.Judge`), three backends, one cache.

    rule               the verifiable-constraint judge (prompts with `constraints`, as the world's)
    served:NAME        an OpenAI-compatible endpoint serving NAME (--judge-url, or DISTILL_JUDGE_URL)
    local:PATH | PATH  a Hugging Face model directory on distill's decoding engine

`templates` (versioned prompts and parsers), `cache` (append-only, resumable), `scores` (means,
win rates raw and length-controlled, bootstrap intervals), `benchmarks` (AlpacaEval, WildBench,
MT-Bench or a file), `suite` (`distill evaluate --suite judge`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distill import DistillError
from distill.config import opt

# The judge's settings, defined once for every config that has them (evaluate's, synthesize's).
_OPTIONS = {
    "judge": ("rule", "the judge: rule (the prompts' verifiable constraints, as the embedded world's), served:NAME "
                      "(an OpenAI-compatible endpoint serving NAME, at --judge-url) or local:MODEL_DIR"),
    "judge_url": (None, "base URL of a served judge, e.g. http://localhost:8000/v1 (default: $DISTILL_JUDGE_URL or "
                        "$OPENAI_BASE_URL)"),
    "judge_template": (None, "a JSON file of judge templates replacing distill's (distill.evaluate.judge.templates); "
                             "each keeps its placeholders"),
    "judge_concurrency": (8, "served judge: requests in flight at once"),
    "judge_timeout": (120.0, "served judge: seconds to wait for one answer"),
    "judge_retries": (2, "times an unparseable judgment is asked again (then it is counted as unjudged)"),
    "judge_max_new_tokens": (512, "longest judge answer in tokens"),
}


def judge_option(name: str):
    """The config field of judge setting `name`: its one default and help."""
    default, help = _OPTIONS[name]
    return opt(default, help)


def judge_settings(cfg, **more) -> "JudgeSettings":
    """The JudgeSettings of a config that has the judge_* fields."""
    return JudgeSettings(spec=cfg.judge, url=cfg.judge_url, template=cfg.judge_template,
                         concurrency=cfg.judge_concurrency, timeout=cfg.judge_timeout, retries=cfg.judge_retries,
                         max_new_tokens=cfg.judge_max_new_tokens, **more)


@dataclass
class JudgeSettings:
    """How to build a judge (the `judge_*` options of evaluate and synthesize)."""

    spec: str = "rule"
    url: str | None = None
    template: str | None = None
    concurrency: int = 8
    timeout: float = 120.0
    retries: int = 2
    max_new_tokens: int = 512
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None


def make_judge(s: JudgeSettings, rows=()):
    """The judge `s.spec` names; `rows`: prompt rows, whose `constraints` the rule judge reads."""
    from distill.evaluate.judge.backends import LocalJudge, ServedJudge
    from distill.evaluate.judge.rule import RuleJudge

    spec = s.spec or ""
    if spec == "rule":
        judge = RuleJudge(rows)
        if not judge.constraints:
            raise DistillError("the rule judge needs prompts with verifiable 'constraints' (as the embedded world's "
                               "prompts have); for other prompts use --judge served:NAME or --judge local:MODEL_DIR")
        return judge
    if spec.startswith("served:"):
        return ServedJudge(model=spec[len("served:"):], url=s.url or "", retries=s.retries, template_file=s.template,
                           concurrency=s.concurrency, timeout=s.timeout, max_tokens=s.max_new_tokens)
    path = spec[len("local:"):] if spec.startswith("local:") else spec
    if spec.startswith("local:") or os.path.isdir(path) or "/" in path:
        from distill.io.paths import resolve_model

        resolve_model(path, "judge model")  # a clear error now, before anything is generated
        return LocalJudge(model=path, retries=s.retries, template_file=s.template, max_new_tokens=s.max_new_tokens,
                          batch_size=s.batch_size, device=s.device, dtype=s.dtype)
    raise DistillError(f"unknown judge {spec!r}: use rule, served:MODEL_NAME (with --judge-url) or local:MODEL_DIR")
