"""`EvaluateConfig`: every option of `distill evaluate` and the recipe's `evaluate:` section
(distill.config); importing it loads no model code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from distill import DistillError
from distill.config import opt
from distill.evaluate.judge import judge_option

SUITES = ("if", "knowledge", "ppl")  # the default suites
ALL_SUITES = SUITES + ("judge",)  # judge: opt in (a judged benchmark, distill.evaluate.judge)


@dataclass(kw_only=True)
class EvaluateConfig:
    """One model scored: the `distill evaluate` options and the recipe's `evaluate:` section."""

    model: str = opt(help="model directory (or a hub id already in the local HF cache)")
    zoo: Optional[str] = opt(None, "directory of the world's layout (prompts/eval.jsonl, knowledge/questions.jsonl, "
                                   "text/heldout.jsonl), e.g. the output of `distill zoo build`; none runs lm-eval only")
    suites: list[str] = opt(factory=lambda: list(SUITES), aliases=("--suite",),
                            help=f"suites to run, of {', '.join(SUITES)} (space- or comma-separated)")
    out: Optional[str] = opt(None, "scores JSON path (default: <model>/scores.json, or scores/<org>--<name>.json for "
                                   "a hub id from the Hugging Face cache; responses go beside it)")
    batch_size: int = opt(32, "rows per forward pass")
    max_new_tokens: int = opt(256, "longest response generated for an instruction")
    limit: Optional[int] = opt(None, "use only the first N rows of each file (a quick look)")
    device: Optional[str] = opt(None, "torch device (default: cuda if available, else cpu)")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = opt(
        None, "model dtype (default: bfloat16 on cuda, float32 on cpu)")
    family: Optional[Literal["source", "target"]] = opt(
        None, "whose facts count as the model's own (default: recognised from the zoo's tokenizers)")
    max_length: int = opt(1024, "held-out texts are truncated to this many tokens")
    prompts: Optional[str] = opt(None, "instruction file instead of <zoo>/prompts/eval.jsonl")
    questions: Optional[str] = opt(None, "knowledge file instead of <zoo>/knowledge/questions.jsonl")
    heldout: Optional[str] = opt(None, "held-out text file instead of <zoo>/text/heldout.jsonl")
    lm_eval_tasks: list[str] = opt(factory=list, aliases=("--lm-eval",), metavar="TASKS",
                                   help="lm-evaluation-harness tasks to run too (space- or comma-separated; needs "
                                        "`pip install 'distill[lmeval]'` and the tasks' data in the local HF "
                                        "datasets cache)")
    save_responses: bool = opt(True, "write the *.responses.jsonl file beside the scores (--no-responses: do not)")
    # --suite judge (distill.evaluate.judge): the model answers a benchmark, a judge scores the answers
    judge: str = judge_option("judge")
    judge_benchmark: Optional[str] = opt(
        None, "alpaca_eval, wildbench, mt_bench (from the local HF cache), or a JSONL/parquet/datasets path of "
              "prompts (default: <zoo>/prompts/eval.jsonl)")
    judge_mode: Optional[Literal["absolute", "pairwise", "mt-bench"]] = opt(
        None, "absolute 1..10, pairwise against a reference (win rate and length-controlled win rate), or "
              "mt-bench (two turns); default: the benchmark's own")
    judge_reference: Optional[str] = opt(None, "reference responses for pairwise mode: a JSONL of {id, response} "
                                               "rows (default: the benchmark's own)")
    judge_url: Optional[str] = judge_option("judge_url")
    judge_template: Optional[str] = judge_option("judge_template")
    judge_concurrency: int = judge_option("judge_concurrency")
    judge_timeout: float = judge_option("judge_timeout")
    judge_retries: int = judge_option("judge_retries")
    judge_max_new_tokens: int = judge_option("judge_max_new_tokens")
    judge_cache: Optional[str] = opt(None, "append-only file of judgments, so a rerun asks nothing twice (default: "
                                           "beside the scores, <scores>.judgments.jsonl)")

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "") -> None:
        """Value checks that need no file, before anything loads (recipes run them when they load)."""
        from distill.io.validate import at_least

        at_least(1, where, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                 max_length=self.max_length, limit=self.limit)
        bad = [s for s in self.suites if s not in ALL_SUITES]
        if bad:
            raise DistillError(f"{where}unknown suite(s) {bad}; choose from {', '.join(ALL_SUITES)}")
        at_least(1, where, judge_concurrency=self.judge_concurrency, judge_max_new_tokens=self.judge_max_new_tokens)
        at_least(0, where, judge_retries=self.judge_retries)
        from distill.io.validate import finite

        finite(where, judge_timeout=self.judge_timeout)
        if not self.judge_timeout > 0:
            raise DistillError(f"{where}judge_timeout must be > 0, got {self.judge_timeout}")
