"""Pass-through to lm-evaluation-harness (`lm_eval.simple_evaluate`) for real checkpoints.

An optional extra: `pip install 'distill[lmeval]'`. Nothing is downloaded by distill; the
harness needs its tasks' datasets in the local Hugging Face cache (HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill import DistillError
def run_lm_eval(model_dir: Path, tasks: list[str], device: str, dtype: str, batch_size: int,
                limit: int | None) -> dict:
    try:
        import lm_eval
    except ImportError:
        raise DistillError("--lm-eval needs lm-evaluation-harness: pip install 'distill[lmeval]' "
                           "(then make sure the tasks' datasets are in the local Hugging Face cache)") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # fail fast instead of trying the network
    try:
        result = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype={dtype},trust_remote_code=False",
            tasks=tasks, batch_size=batch_size, device=device, limit=limit)
    except Exception as exc:  # noqa: BLE001 - the harness raises many kinds; all mean "could not run"
        raise DistillError(
            f"lm-evaluation-harness could not run {tasks} on {model_dir}: {type(exc).__name__}: {exc}. "
            f"Task names must exist in lm_eval (`lm_eval ls tasks`) and their datasets must already be in the "
            f"Hugging Face datasets cache ({os.environ.get('HF_DATASETS_CACHE', '~/.cache/huggingface/datasets')}); "
            f"distill never downloads them") from exc
    if result is None:  # non-zero ranks of a distributed run get None
        return {}
    keep = {k: result.get(k) for k in ("results", "versions", "n-shot", "config") if k in result}
    return json.loads(json.dumps(keep, default=str))  # numpy scalars, dtypes -> JSON
