"""`distill train` end to end with DeepSpeed on CPU: a tiny Qwen2 target whose tokenizer has no
chat template, ZeRO-2 and ZeRO-3, one process in-process and two ranks through the launcher.

DeepSpeed's CPU accelerator compiles a small comm op with g++ on first use (about 90 s, cached
under ~/.cache/torch_extensions); after that a run costs seconds.
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from distill import DistillError
from distill.train.run import TrainConfig, train
from tiny import make_model, make_tokenizer

ANSWER = "the lazy dog done"
INSTRUCTIONS = ["the quick brown fox", "write the response in lowercase", "the capital of the made up country",
                "please repeat the request", "answer in json with a list"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base target (no chat template, vocab exactly the tokenizer's so ChatML forces a resize)
    and a dataset whose answer is always the same, so a few steps memorise it."""
    root = tmp_path_factory.mktemp("train")
    tok = make_tokenizer(chat_template=None)
    make_model(root / "target", arch="qwen2", vocab_size=len(tok), tokenizer=tok, hidden=32, layers=2)
    data = root / "data"
    data.mkdir()
    rows = [{"id": str(i), "instruction": f"{INSTRUCTIONS[i % 5]} {i}", "response": ANSWER,
             "repetitive": i % 10 == 9} for i in range(40)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "provenance.json").write_text('{"method": "codit", "alpha": 0.01}\n')
    return root


def _config(world, out, **kw):
    base = dict(model=str(world / "target"), data=str(world / "data" / "train.jsonl"), out=str(out),
                max_steps=24, lr=1e-2, batch_size=8, max_length=64, logging_steps=4, eval_steps=8,
                eval_fraction=0.1, warmup_ratio=0.0, lr_scheduler="constant", save_steps=100)
    base.update(kw)
    return TrainConfig(**base)


class LogitsAtEnd(TrainerCallback):
    """Logits of the in-memory model after training (ZeRO-3 gathers via its forward hooks)."""

    def __init__(self, ids):
        self.ids, self.logits = ids, None

    def on_train_end(self, args, state, control, model=None, **kw):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.ids, use_cache=False).logits.clone()


def _losses(out):
    rows = [line.split(",") for line in (out / "loss.csv").read_text().splitlines()[1:]]
    return [float(r[2]) for r in rows if r[2]], [float(r[3]) for r in rows if r[3]]


def _check_reload(out, captured):
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        logits = model(input_ids=captured.ids, use_cache=False).logits
    torch.testing.assert_close(logits, captured.logits, atol=0, rtol=0)
    return model


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_single_process_learns_saves_and_reloads_identically(world, stage):
    out = world / f"model-{stage}"
    probe = LogitsAtEnd(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    steps = 24 if stage == "zero2" else 8
    # ZeRO-2 with the fused loss, as the GPU benchmark runs it: the loss goes through DeepSpeed's engine
    train(_config(world, out, deepspeed=stage, max_steps=steps, packing=stage == "zero3", fused_loss=stage == "zero2"),
          callbacks=[probe])

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "loss.csv", "loss.png",
            "train_config.json", "train_summary.json", "data_provenance.json"} <= names
    assert "training_args.bin" not in names and not (world / f"model-{stage}.checkpoints").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == steps and summary["data"]["dropped_repetitive"] == 4
    train_loss, eval_loss = _losses(out)
    assert train_loss[-1] < train_loss[0] - 0.5 and eval_loss and eval_loss[-1] < train_loss[0]
    model = _check_reload(out, probe)
    assert model.config.use_cache  # switched off for training only
    if stage != "zero2":
        return
    # The ChatML template and its tokens survived, and the model answers in that format.
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") in \
        model.generation_config.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "the quick brown fox 99"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    text = tok.decode(gen[0, prompt["input_ids"].shape[1]:])
    assert text == ANSWER + "<|im_end|>", text


def test_the_one_gpu_zero2_config_trains_and_reloads(world):
    # zero2_1gpu: overlap_comm off runs DeepSpeed's other gradient path; its bf16 overflow-check
    # switch is parsed here but only acts in bf16 (a GPU run: BENCHMARKS.md)
    out = world / "model-zero2_1gpu"
    probe = LogitsAtEnd(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    train(_config(world, out, deepspeed="zero2_1gpu", max_steps=8, eval_fraction=0.0, logging_steps=1),
          callbacks=[probe])
    train_loss, _ = _losses(out)
    assert train_loss[-1] < train_loss[0] - 0.5
    _check_reload(out, probe)
    assert json.loads((out / "train_config.json").read_text())["deepspeed"] == "zero2_1gpu"


class MatmulDtypes(TrainerCallback):
    """The dtypes a decoder matmul produced during training."""

    def __init__(self):
        self.dtypes = set()

    def on_train_begin(self, args, state, control, model=None, **kw):
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))


def test_data_cache_is_private_to_the_run_and_removed(world, tmp_path, monkeypatch):
    # Two ranks once built the same Arrow cache files in the shared HF datasets cache at once, and
    # one failed on the other's half-moved file. Each run now caches in a folder of its own.
    import datasets

    shared = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", shared)
    out = tmp_path / "model"
    train(_config(world, out, deepspeed="none", max_steps=1, eval_fraction=0.1))
    assert not shared.exists() or not any(shared.rglob("*.arrow"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-datasets-cache") == ["model"]  # no leftovers


@pytest.mark.parametrize("fused", [False, True], ids=["hf-loss", "fused-loss"])
def test_bf16_without_deepspeed_trains_under_autocast(world, fused):
    # The plain Trainer keeps fp32 master weights and relies on accelerate's autocast, which wraps
    # only model.forward: a loss that calls model.model directly once ran every matmul in fp32.
    probe = MatmulDtypes()
    out = world / f"model-bf16-{'fused' if fused else 'hf'}"
    train(_config(world, out, deepspeed="none", precision="bf16", fused_loss=fused, max_steps=2,
                  eval_fraction=0.0), callbacks=[probe])
    assert probe.dtypes == {torch.bfloat16}


def test_training_progress_in_a_log_file_is_not_redrawn_per_step(world, capfd):
    # Under pytest stderr is not a terminal, as in a batch job's log: the Trainer's own bar
    # redrew once per optimizer step there.
    train(_config(world, world / "model-logged", deepspeed="none", max_steps=12, eval_fraction=0.0,
                  logging_steps=100))  # only the first step's loss line, which redraws the bar once
    err = capfd.readouterr().err
    assert "12/12 [" in err
    assert err.count("/12 [") <= 5, err  # first draw, the loss line, the end: not 12 updates
    assert "tokenising" not in err and "Filter" not in err  # datasets' bars, on 40 rows: noise


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Interrupt


def test_interrupted_run_resumes_to_the_same_step_count(world):
    out = world / "model-resume"
    cfg = _config(world, out, max_steps=6, save_steps=2, eval_fraction=0.0, logging_steps=1, fused_loss=True)
    with pytest.raises(Interrupt):
        train(cfg, callbacks=[StopAt(5)])
    assert not out.exists() and (world / "model-resume.checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(DistillError, match=r"other settings \{'lr': \[0.01, 0.02\]\}.*--overwrite"):
        train(dataclasses.replace(cfg, lr=2e-2, logging_steps=2))  # logging cadence may differ; lr may not
    train(cfg)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"].endswith("checkpoint-4")
    steps = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]  # history restored from the checkpoint, then continued

    # Interrupted again, then rerun with other settings and --overwrite: the stale checkpoints go.
    again = dataclasses.replace(cfg, out=str(world / "model-restart"))
    with pytest.raises(Interrupt):
        train(again, callbacks=[StopAt(5)])
    train(dataclasses.replace(again, lr=2e-2, overwrite=True))
    summary = json.loads((world / "model-restart" / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"] is None
    assert not (world / "model-restart.checkpoints").exists()


RANK_PROBE = """
import json, os, sys
from transformers import TrainerCallback
from distill.train.run import TrainConfig, train

class Checksum(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        total = sum(p.double().sum().item() for p in model.parameters())
        with open(os.path.join(sys.argv[3], f"checksum-{os.environ['RANK']}.json"), "w") as f:
            json.dump(total, f)

world, out, _ = sys.argv[1:]
train(TrainConfig(model=world + "/target", data=world + "/data/train.jsonl", out=out, deepspeed="none",
                  fused_loss=True, max_steps=3, lr=1e-2, batch_size=2, max_length=64, eval_fraction=0.0,
                  warmup_ratio=0.0, lr_scheduler="constant", save_steps=100), callbacks=[Checksum()])
"""


@pytest.mark.slow
def test_fused_loss_keeps_ranks_in_sync_without_deepspeed(world, tmp_path):
    # DDP synchronises gradients only when its wrapper's forward runs; the fused loss once called
    # the inner model and each rank drifted off with its own gradients, silently.
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by in-process runs
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(probe), str(world), str(tmp_path / "model"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = [json.loads((tmp_path / f"checksum-{rank}.json").read_text()) for rank in (0, 1)]
    assert sums[0] == sums[1]
    assert json.loads((tmp_path / "model" / "train_summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks_through_the_deepspeed_launcher(world, stage):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    out = world / f"model-2rank-{stage}"
    with socket.socket() as s:  # a free port: a fixed one collides with another suite running beside this one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Both entry points: `-m distill.train` takes the launcher's --local_rank; `distill.cli` needs --no_local_rank.
    entry = ["--module", "distill.train"] if stage == "zero2" else ["--no_local_rank", "--module", "distill.cli", "train"]
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), *entry, "--model", str(world / "target"), "--data", str(world / "data" / "train.jsonl"),
           "--out", str(out), "--deepspeed", stage, "--max-steps", "8", "--lr", "1e-2", "--batch-size", "4",
           "--max-length", "64", "--logging-steps", "2", "--eval-steps", "8", "--eval-fraction", "0.1",
           "--warmup-ratio", "0", "--lr-scheduler", "constant"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by in-process runs
        env.pop(key, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU allreduce maps a 67 MB /dev/shm segment per rank and never unlinks it
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert not leaked, f"shared-memory segments left in RAM: {leaked}"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 8
    train_loss, _ = _losses(out)
    assert train_loss[-1] < train_loss[0]
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.get_input_embeddings().num_embeddings == len(AutoTokenizer.from_pretrained(out))


def test_auto_precision_takes_native_bf16_only(monkeypatch):
    # On a V100 or T4 torch emulates bf16 (slowly) and says it is supported unless asked for native.
    from distill.io.models import default_dtype
    from distill.train.run import use_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not use_bf16("auto") and default_dtype("cuda:0") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert use_bf16("auto") and default_dtype("cuda") == torch.bfloat16
    assert default_dtype("cpu") == torch.float32


def test_compiled_layers_on_packed_rows_compile_once(world):
    # Packed rows differ in width by a few tokens; each new width used to make dynamo compile the
    # layers again (then as dynamic shapes). With --compile-layers, packed batches are all
    # max_length wide: one compile for the whole run.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # layers compiled by an earlier test would make the first compile a "re"compile
    counters.clear()
    out = world / "model-compiled-packed"
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(_config(world, out, deepspeed="zero2", packing=True, compile_layers=True, fused_loss=True,
                      max_steps=6, batch_size=1, eval_fraction=0.0, logging_steps=1))
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did compile (no recompile is no proof alone)
    train_loss, _ = _losses(out)
    assert train_loss[-1] < train_loss[0]
