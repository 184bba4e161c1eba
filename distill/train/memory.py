"""`--deepspeed auto`: the ZeRO setup chosen from the model's size and the GPUs' memory.

DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_...`) give
the bytes the model states need per GPU and in host RAM. The policy, cheapest first:

1. ZeRO-2 where its per-GPU model states fit in `FIT` of each GPU's memory (the rest is left
   for activations): `zero2_1gpu` on one GPU, `zero2` on several. The GPU's total memory, not
   its free memory, so that every rank of a launch makes the same choice;
2. else ZeRO-3, whose per-GPU share shrinks with the GPU count;
3. else ZeRO-3 with parameters and optimizer states in host RAM (`zero3_offload`), where the
   host has the RAM the estimator asks for; if not even that fits, an error that says so.

Without CUDA (the CPU runs of tests and the embedded world) it is `zero2`, which trains there.
"""

from __future__ import annotations

import logging
import os
import re

from distill import DistillError

log = logging.getLogger("distill.train")
FIT = 0.6  # the share of a GPU's memory the model states may take
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def parameter_counts(model_dir) -> tuple[int, int]:
    """(total, largest layer) parameters, from the safetensors headers alone."""
    from distill.io.checkpoints import Checkpoint

    ckpt = Checkpoint.open(model_dir, what="target model")
    total, groups = 0, {}
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        total += n
        m = _LAYER.search(info.name)
        key = f"layer {m.group(1)}" if m else info.name  # a tensor outside the layers is a module of its own
        groups[key] = groups.get(key, 0) + n
    return total, max(groups.values(), default=0)


def choose(total: int, largest: int, gpus: int, gpu_mem: int | None, host_free: int | None) -> tuple[str, str]:
    """(shipped config name, why) for a model of `total` parameters on `gpus` GPUs with
    `gpu_mem` bytes each (None: no CUDA) and `host_free` bytes of host RAM."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    if gpu_mem is None:
        return "zero2", "no CUDA device: ZeRO-2 on the CPU"
    budget = FIT * gpu_mem
    _, z2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    if z2 <= budget:
        name = "zero2_1gpu" if gpus == 1 else "zero2"
        return name, (f"ZeRO-2 model states {gib(z2)} per GPU fit in {FIT:.0%} of the {gib(gpu_mem)} "
                      f"on each of {gpus} GPU(s)")
    _, z3, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, cpu_offload=False,
                                                  cpu_offload_params=False)
    if z3 <= budget:
        return "zero3", (f"ZeRO-2 needs {gib(z2)} per GPU, more than {FIT:.0%} of {gib(gpu_mem)}; "
                         f"ZeRO-3 needs {gib(z3)} on each of {gpus} GPU(s)")
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, cpu_offload=True,
                                                     cpu_offload_params=True)
    if gpu <= budget and (host_free is None or cpu <= host_free):
        return "zero3_offload", (f"neither ZeRO-2 ({gib(z2)}) nor ZeRO-3 ({gib(z3)} per GPU) fits in {FIT:.0%} of "
                                 f"{gib(gpu_mem)}; ZeRO-3 with offload needs {gib(gpu)} per GPU and "
                                 f"{gib(cpu)} of host RAM")
    raise DistillError(f"a {total / 1e9:.2f} B-parameter model does not fit {gpus} GPU(s) with {gib(gpu_mem)} "
                       f"even with ZeRO-3 offload ({gib(gpu)} per GPU, {gib(cpu)} host RAM"
                       + (f", {gib(host_free)} available" if host_free is not None else "") +
                       "); use more GPUs (train.num_gpus) or a smaller target")


def _host_free() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_auto(model_dir) -> str:
    """The shipped config `--deepspeed auto` stands for on this machine, logged with its reason."""
    import torch

    gpus = max(1, int(os.environ.get("WORLD_SIZE", "1"))) if torch.cuda.is_available() else 1
    gpu_mem = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    total, largest = parameter_counts(model_dir)
    name, why = choose(total, largest, gpus, gpu_mem, _host_free())
    log.info("--deepspeed auto: %s (%.2f B parameters; %s)", name, total / 1e9, why)
    return name
