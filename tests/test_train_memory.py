"""`--deepspeed auto`: the ZeRO setup DeepSpeed's estimators say fits (distill/train/memory.py)."""

import json

import pytest

from distill import DistillError
from distill.train.memory import choose, parameter_counts

GIB = 2**30


def test_the_cheapest_setup_that_fits_is_chosen():
    # 1 B parameters on one 80 GiB GPU: ZeRO-2's 20 bytes a parameter (~18.6 GiB) fit
    assert choose(10**9, 10**8, 1, 80 * GIB, 512 * GIB)[0] == "zero2_1gpu"
    # 8 B on one GPU: ZeRO-2 (~149 GiB) and ZeRO-3 (~136 GiB) do not fit; offload does, with the host RAM
    name, why = choose(8 * 10**9, 5 * 10**8, 1, 80 * GIB, 512 * GIB)
    assert name == "zero3_offload" and "ZeRO-3 with offload needs" in why
    # the same 8 B on eight GPUs: ZeRO-2's per-GPU share (2 + 18/8 bytes a parameter, ~32 GiB) fits
    assert choose(8 * 10**9, 5 * 10**8, 8, 80 * GIB, 512 * GIB)[0] == "zero2"
    # 8 B on two GPUs with 120 GiB free: ZeRO-2 needs ~82 GiB each, ZeRO-3 ~69 GiB; 0.6 x 120 = 72 GiB
    assert choose(8 * 10**9, 5 * 10**8, 2, 120 * GIB, 512 * GIB)[0] == "zero3"
    assert choose(10**9, 10**8, 1, None, None) == ("zero2", "no CUDA device: ZeRO-2 on the CPU")


def test_a_model_that_fits_nowhere_is_an_error_that_says_what_to_do():
    with pytest.raises(DistillError, match=r"70.00 B-parameter model does not fit 1 GPU.*train.num_gpus"):
        choose(70 * 10**9, 2 * 10**9, 1, 80 * GIB, 64 * GIB)


def test_parameter_counts_read_the_headers(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(100, 8), "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8),
               "model.layers.0.mlp.down_proj.weight": torch.zeros(8, 8), "model.layers.1.mlp.up_proj.weight":
               torch.zeros(8, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert parameter_counts(tmp_path) == (800 + 64 + 64 + 32, 800)


def test_train_with_auto_records_its_choice(tmp_path, micro_zoo):
    from distill.train.config import TrainConfig
    from distill.train.run import train

    out = tmp_path / "m"
    train(TrainConfig(model=str(micro_zoo / "target-base"), data=str(micro_zoo / "prompts" / "sft.jsonl"),
                      out=str(out), deepspeed="auto", max_steps=1, batch_size=2, max_length=128,
                      gradient_checkpointing=False))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["deepspeed"] == "auto" and summary["data"]["extra"]["deepspeed_auto"] == "zero2"
