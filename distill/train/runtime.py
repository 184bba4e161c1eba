"""What `distill train` sets up around the Trainer: DeepSpeed configs, the single-process
distributed environment, precision, the TrainingArguments spellings of this transformers, the
one way checkpoint state is loaded (`weights_only_loads`) and the test-only fault points.

Unpickling rule: while `distill train` trains (and resumes), every `torch.load` in the process
(the Trainer's optimizer.pt, scheduler.pt, rng_state*.pth and DeepSpeed's global_step*/*.pt) runs
with `weights_only=True` and an explicit allow-list (`PICKLE_ALLOW_LIST`): tensors, containers,
numbers, strings and the few DeepSpeed/numpy state classes named there, nothing else; a file that
needs more is refused with a DistillError naming it, its payload never runs. Before that, the
checkpoint's sha256 manifest is verified (`distill.train.outputs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
        text = resources.files("distill.train.configs").joinpath(f"{spec}.json").read_text()
        return json.loads(text)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DistillError(f"DeepSpeed config {spec} is neither one of {', '.join(SHIPPED_DEEPSPEED)} nor a "
                           "JSON file; pass --deepspeed auto|zero2|zero2_1gpu|zero3|zero3_offload|none or a path")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"DeepSpeed config {path} does not parse as JSON ({exc}); fix it or start from "
                           "distill/train/configs/zero2.json") from exc
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


# ----------------------------------------------------------------------------- safe loading

# "module.Name" of every class (besides tensors and plain containers) a checkpoint file may hold:
# DeepSpeed's ZeRO optimizer states (stages 1-3, fp32/bf16/fp16) and the numpy RNG state in the
# Trainer's rng_state*.pth. Each is data-only: rebuilding one calls no code of the file's choosing.
PICKLE_ALLOW_LIST = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
)


def _allowed_globals() -> list:
    """The allow-list as objects, for those of its modules installed here (numpy's dtype classes
    included: a dtype pickles as its class, e.g. numpy.dtypes.UInt32DType)."""
    import importlib

    found = []
    for dotted in PICKLE_ALLOW_LIST:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    try:
        import numpy as np

        found += sorted({type(np.dtype(t)) for t in np.sctypeDict.values()}, key=str)
    except ImportError:
        pass
    return found


@contextlib.contextmanager
def weights_only_loads():
    """Inside: every `torch.load` is `weights_only=True` with `PICKLE_ALLOW_LIST`, whatever its
    caller passed (DeepSpeed passes weights_only=False); a file that needs anything else is
    refused with a DistillError naming it. Also sets TORCH_FORCE_WEIGHTS_ONLY_LOAD for any caller
    that kept a reference to the original function."""
    import pickle

    import torch
    import torch.serialization as ser

    real, real_torch = ser.load, torch.load
    allowed = _allowed_globals()

    def load(f, *args, **kwargs):
        args = args[:1]  # map_location; weights_only uses torch's own restricted unpickler, no pickle_module
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with ser.safe_globals(allowed):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
            needs = f"it needs {needs.group(1)}, which is" if needs else "it holds something that is"
            raise DistillError(f"refusing to unpickle {f}: {needs} neither a tensor nor one of the state classes "
                               "distill allows (PICKLE_ALLOW_LIST in distill/train/runtime.py), so this training run "
                               "did not write it. Delete its checkpoint directory, or rerun with --no-resume to "
                               "start over") from None

    old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    torch.load = ser.load = load
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        torch.load, ser.load = real_torch, real
        if old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old_env


# ----------------------------------------------------------------------------- fault points (tests only)

# Where `DISTILL_FAULT_AT=train.POINT.STEP:1` (or `train.final-model:1`, ...) kills a training
# process with SIGKILL, in the order a run passes them (`distill.io.files.fault_point`, the shared hook):
# after optimizer step N | checkpoint N: the model weights written | DeepSpeed's first state file
# written | the optimizer/DeepSpeed state written | every file but the manifest written | the final
# model complete in its temporary directory | renamed into place, checkpoints not yet removed.
FAULT_POINTS = ("step", "ckpt-model", "ckpt-ds", "ckpt-optim", "ckpt-manifest", "final-model", "final-commit")


def fault_point(name: str, step: int | None = None) -> None:
    """Test hook, inert unless DISTILL_FAULT_AT is set: the point `train.NAME[.STEP]`."""
    from distill.io.files import fault_point as shared

    shared(f"train.{name}" if step is None else f"train.{name}.{step}")


def install_fault_points(trainer) -> None:
    """Wire `fault_point` into a Trainer's checkpoint write (only when DISTILL_FAULT_AT is set)."""
    if not os.environ.get("DISTILL_FAULT_AT") and not os.environ.get("DISTILL_FAULT_TRACE"):
        return
    from transformers import TrainerCallback

    def before(method, name):
        def wrapped(*args, **kwargs):
            fault_point(name, trainer.state.global_step)
            return method(*args, **kwargs)
        return wrapped

    trainer._save_optimizer_and_scheduler = before(trainer._save_optimizer_and_scheduler, "ckpt-model")
    trainer._save_rng_state = before(trainer._save_rng_state, "ckpt-optim")

    class Faults(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            engine = getattr(trainer.model_wrapped, "checkpoint_engine", None)  # DeepSpeed's
            if engine is not None:
                save = engine.save

                def save_then_fault(*a, **kw):
                    save(*a, **kw)
                    fault_point("ckpt-ds", state.global_step)
                engine.save = save_then_fault

        def on_step_end(self, args, state, control, **kwargs):
            fault_point("step", state.global_step)

    trainer.add_callback(Faults())
