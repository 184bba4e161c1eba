"""What `distill train` sets up around the Trainer: DeepSpeed configs, the single-process
distributed environment, precision, and the TrainingArguments spellings of this transformers."""

from __future__ import annotations

import json
import os
import socket
from importlib import resources
from pathlib import Path

from distill import DistillError

# zero2_1gpu: zero2 for one GPU, with overlap_comm off (nothing to overlap; with it on, DeepSpeed
# syncs the device after every backward) and no bf16 overflow check (bf16 has fp32's range; the
# check costs two reductions per gradient and a host read-back per step, and skips a step whose
# gradients hold inf or nan). The fastest config measured on one H100 (BENCHMARKS.md).
SHIPPED_DEEPSPEED = ("zero2", "zero2_1gpu", "zero3", "zero3_offload")


def load_deepspeed_config(spec: str | None) -> dict | None:
    """A shipped config name or a JSON file -> dict (None: train without DeepSpeed)."""
    if spec in (None, "", "none"):
        return None
    if spec in SHIPPED_DEEPSPEED:
        text = resources.files("distill.configs").joinpath(f"{spec}.json").read_text()
        return json.loads(text)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DistillError(f"DeepSpeed config {spec} is neither one of {', '.join(SHIPPED_DEEPSPEED)} nor a "
                           "JSON file; pass --deepspeed zero2|zero2_1gpu|zero3|zero3_offload|none or a path")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"DeepSpeed config {path} does not parse as JSON ({exc}); fix it or start from "
                           "distill/configs/zero2.json") from exc
    if not isinstance(cfg, dict):
        raise DistillError(f"DeepSpeed config {path} must be a JSON object")
    # The Trainer fills an "auto" train_batch_size before it knows the world size (it counts 1
    # under a launcher, transformers 5.24), so let DeepSpeed derive it: micro batch x accum x world.
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]
    return cfg


def ensure_distributed_env() -> None:
    """Single process without a launcher: give torch.distributed a world of one, or DeepSpeed
    goes looking for MPI."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def release_deepspeed_shm_callback():
    """A TrainerCallback that unlinks this rank's shared-memory segment of DeepSpeed's CPU backend.

    With all ranks on one host, DeepSpeed's CPU communication maps a 67 MB POSIX shared-memory
    segment per rank (/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>) when the
    engine is made, and never unlinks it: each CPU run of N ranks left N of them in RAM until
    reboot. At train begin the engine exists and a barrier means every rank has mapped its peers'
    segments, so the names are no longer needed; the mappings live until the processes exit, so
    unlinking here also covers a crash or kill -9 later on."""
    from transformers import TrainerCallback

    class ReleaseDeepSpeedShm(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
                return
            name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                    f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
            dist.barrier()  # every rank, segment or not (GPU backends, several hosts), or a peer would hang
            (Path("/dev/shm") / name).unlink(missing_ok=True)

    return ReleaseDeepSpeedShm()


def use_bf16(precision: str) -> bool:
    import torch

    if precision == "auto":
        # Native bf16 only: where torch emulates it (V100, T4) fp32 is the faster choice.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision not in ("bf16", "fp32"):
        raise DistillError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16"


def checkpointing_kwarg(args_cls, enabled: bool) -> dict:
    """Newer transformers renamed gradient_checkpointing to activation_checkpointing and warn on
    the old name (even when False); older ones know only the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def is_zero3(ds_config) -> bool:
    return (ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3
