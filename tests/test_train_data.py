"""Data side of `distill train`, no DeepSpeed: templates, assistant masks, packing, bad input."""

import json
import random
from itertools import pairwise

import pytest
import torch

from distill import DistillError
from distill.train import data as td
from distill.io.models import stop_token_ids
from distill.train.run import TrainConfig, load_deepspeed_config, train
from tiny import CHAT_TEMPLATE, make_model, make_tokenizer

QA = [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "the lazy dog"}]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chatml_added_to_base_tokenizer_and_mask_is_exact_token_by_token():
    tok = make_tokenizer(chat_template=None)
    n = len(tok)
    assert td.ensure_chat_template(tok) is True
    assert len(tok) == n + 2 and tok.chat_template == td.CHATML_TEMPLATE
    ids, labels = td.tokenize_chat(tok, QA)
    # Built from pieces: the generation block is "the lazy dog<|im_end|>", nothing else is learnt.
    prompt = _ids(tok, "<|im_start|>user\nthe quick brown fox<|im_end|>\n<|im_start|>assistant\n")
    answer = _ids(tok, "the lazy dog") + [tok.convert_tokens_to_ids("<|im_end|>")]
    tail = _ids(tok, "\n")
    assert ids == prompt + answer + tail
    assert labels == [-100] * len(prompt) + answer + [-100] * len(tail)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == [tok.eos_token_id, im_end]
    # synthesis and evaluation stop alike: the model's generation config adds its own eos ids
    model = make_model(arch="qwen2", vocab_size=len(tok))
    model.generation_config.eos_token_id = [im_end, 7, tok.eos_token_id]
    assert stop_token_ids(tok, model) == [tok.eos_token_id, im_end, 7]


def test_template_without_generation_tags_masks_every_assistant_turn_by_prefix():
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE)  # "<s>[INST] q [/INST] a</s>", no {% generation %}
    assert td.ensure_chat_template(tok) is False
    chat = QA + [{"role": "user", "content": "the capital"}, {"role": "assistant", "content": "a city"}]
    ids, labels = td.tokenize_chat(tok, chat)
    eos = tok.eos_token_id
    p1 = _ids(tok, "<s>[INST] the quick brown fox [/INST]")
    a1 = _ids(tok, " the lazy dog") + [eos]
    p2 = _ids(tok, "[INST] the capital [/INST]")
    a2 = _ids(tok, " a city") + [eos]
    assert ids == p1 + a1 + p2 + a2
    assert labels == [-100] * len(p1) + a1 + [-100] * len(p2) + a2


def _rows_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_length_policy_and_repetitive_rows_are_counted(tmp_path):
    rows = [{"instruction": "the quick brown fox", "response": "the lazy dog", "repetitive": False},
            {"instruction": "the quick brown fox", "response": "the lazy dog " * 30, "repetitive": False},
            {"instruction": "x", "response": "y", "repetitive": True},
            {"instruction": "x", "response": ""}]
    data = _rows_file(tmp_path / "d.jsonl", rows)
    tok = make_tokenizer(chat_template=None)
    td.ensure_chat_template(tok)
    for policy, kept in (("drop", 1), ("truncate", 2)):
        stats = td.DataStats()
        chats = td.read_chats(data, keep_repetitive=False, stats=stats)
        ds = td.tokenize_dataset(chats, tok, 40, policy, stats)
        assert (stats.rows_read, stats.dropped_repetitive, stats.dropped_empty) == (4, 1, 1)
        assert len(ds) == kept and max(len(x) for x in ds["input_ids"]) <= 40
        assert (stats.dropped_too_long, stats.truncated) == ((1, 0) if policy == "drop" else (0, 1))
    assert len(td.read_chats(data, keep_repetitive=True, stats=td.DataStats())) == 3


def test_length_boundary_truncated_labels_and_rows_without_assistant_tokens(tmp_path):
    tok = make_tokenizer(chat_template=None)
    td.ensure_chat_template(tok)
    fits = QA
    n = len(td.tokenize_chat(tok, fits)[0])  # max_length is exactly this row's length: it fits
    long_answer = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "the lazy dog " * 20}]
    long_prompt = [{"role": "user", "content": "the quick brown fox " * 5}, {"role": "assistant", "content": "done"}]
    cut = td.tokenize_chat(tok, long_prompt)[1][:n]
    assert len(cut) == n and set(cut) == {-100}  # its assistant tokens all lie past the cut
    no_answer = [{"role": "user", "content": "the capital"}]
    empty_answer = [{"role": "user", "content": "the capital"}, {"role": "assistant", "content": ""}]
    rows = [{"messages": m} for m in (fits, long_answer, long_prompt, no_answer, empty_answer)]
    data = _rows_file(tmp_path / "chats.jsonl", rows)
    for policy in ("drop", "truncate"):
        stats = td.DataStats()
        chats = td.read_chats(data, keep_repetitive=False, stats=stats)
        assert stats.dropped_empty == 2  # no assistant turn, or an empty one: nothing to learn
        ds = td.tokenize_dataset(chats, tok, n, policy, stats)
        assert all(len(x) == len(y) for x, y in zip(ds["input_ids"], ds["labels"]))  # labels cut with the ids
        if policy == "drop":
            assert (len(ds), stats.dropped_too_long, stats.truncated, stats.dropped_no_assistant_tokens) == (1, 2, 0, 0)
        else:
            # the long answer is cut to its first n tokens; the long prompt loses every assistant
            # token to the cut, so it is dropped and counted
            assert (len(ds), stats.dropped_too_long, stats.truncated, stats.dropped_no_assistant_tokens) == (2, 0, 2, 1)
            ids, labels = td.tokenize_chat(tok, long_answer)
            assert (ds[1]["input_ids"], ds[1]["labels"]) == (ids[:n], labels[:n])
        # the row of exactly max_length is neither dropped nor truncated
        assert (ds[0]["input_ids"], ds[0]["labels"]) == tuple(td.tokenize_chat(tok, fits))
        assert stats.examples == len(ds) and stats.tokens == sum(len(x) for x in ds["input_ids"])


def test_packing_many_examples_fills_bins_without_overflow():
    import datasets

    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(60)]
    # example i is made of token i only (labels -i), so every packed segment names its example
    ds = datasets.Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)],
                                     "labels": [[-i] * n for i, n in enumerate(lengths)]})
    packed = td.pack(ds, max_length=64)
    assert len(packed) < len(lengths)  # it did pack
    seen = []
    for row in packed:
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        assert len(ids) == len(labels) == len(pos) <= 64
        starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in pairwise(starts):
            i = ids[a]
            # one example per segment, whole, with positions 0..len-1
            assert ids[a:b] == [i] * lengths[i] and labels[a:b] == [-i] * lengths[i]
            assert pos[a:b] == list(range(lengths[i]))
            seen.append(i)
    assert sorted(seen) == list(range(len(lengths)))  # every example exactly once


def test_packed_rows_never_attend_across_examples():
    tok = make_tokenizer(chat_template=None)
    td.ensure_chat_template(tok)
    model = make_model(arch="qwen2", vocab_size=len(tok))
    import datasets

    chats = [QA, [{"role": "user", "content": "write the response"}, {"role": "assistant", "content": "done"}]]
    rows = [td.tokenize_chat(tok, c) for c in chats]
    ds = datasets.Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    packed = td.pack(ds, max_length=64)
    assert len(packed) == 1
    batch = td.SFTCollator(tok.pad_token_id)([packed[0]])
    assert "attention_mask" not in batch
    n0, n1 = len(rows[0][0]), len(rows[1][0])
    long_first = n0 >= n1  # first-fit-decreasing puts the longer example first
    order = [0, 1] if long_first else [1, 0]
    assert batch["position_ids"][0, : len(rows[order[0]][0])].tolist() == list(range(len(rows[order[0]][0])))
    with torch.no_grad():
        # use_cache=False as in training: transformers derives the packed mask only without a KV cache
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for i in order:
            alone = model(input_ids=torch.tensor([rows[i][0]])).logits[0]
            torch.testing.assert_close(logits[start: start + len(rows[i][0])], alone, atol=1e-5, rtol=1e-4)
            start += len(rows[i][0])
    # Padding of unpacked rows: mask zero and labels ignored beyond each row.
    plain = td.SFTCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert plain["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (plain["labels"][plain["attention_mask"] == 0] == -100).all()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    tok = make_tokenizer(chat_template=None)
    make_model(path, arch="qwen2", vocab_size=len(tok), tokenizer=tok)
    return path


@pytest.mark.parametrize("content, match", [
    ([{"prompt": "a", "answer": "b"}], "needs `instruction`"),
    ([], "empty"),
    ([{"instruction": "a", "response": "b", "repetitive": True}], "no usable rows"),
])
def test_bad_data_is_a_clear_error(tmp_path, target, content, match):
    data = _rows_file(tmp_path / "d.jsonl", content)
    with pytest.raises(DistillError, match=match) as err:
        train(TrainConfig(model=str(target), data=str(data), out=str(tmp_path / "m")))
    assert str(data) in str(err.value)


def test_bad_paths_and_deepspeed_config_are_clear_errors(tmp_path, target):
    data = _rows_file(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    torn = tmp_path / "torn.jsonl"
    torn.write_text(data.read_text() * 2 + '{"instruction": "a", "resp\n')
    with pytest.raises(DistillError, match=r"torn.jsonl line 3 is not valid JSON"):
        train(TrainConfig(model=str(target), data=str(torn), out=str(tmp_path / "m")))
    with pytest.raises(DistillError, match="target model directory .*nope does not exist"):
        train(TrainConfig(model=str(tmp_path / "nope"), data=str(data), out=str(tmp_path / "m")))
    with pytest.raises(DistillError, match="does not exist"):
        train(TrainConfig(model=str(target), data=str(tmp_path / "none.jsonl"), out=str(tmp_path / "m")))
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}')
    with pytest.raises(DistillError, match="does not parse"):
        train(TrainConfig(model=str(target), data=str(data), out=str(tmp_path / "m"), deepspeed=str(bad)))
    with pytest.raises(DistillError, match="neither one of"):
        load_deepspeed_config("zero9")


@pytest.mark.parametrize("setting, match", [
    (dict(lr=-1.0), "need lr > 0"), (dict(warmup_ratio=5.0), "warmup_ratio is a share"),
    (dict(lr_scheduler="cosinee"), "unknown lr_scheduler 'cosinee'"), (dict(precision="fp8"), "precision must be"),
    (dict(truncation="cut"), "truncation must be"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, target, setting, match):
    data = _rows_file(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(DistillError, match=match):
        train(TrainConfig(model=str(target), data=str(data), out=str(tmp_path / "m"), **setting))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_flex_attention_on_cpu_is_refused_before_the_model_loads(tmp_path, target):
    data = _rows_file(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(DistillError, match="GPU only .*use sdpa"):
        train(TrainConfig(model=str(target), data=str(data), out=str(tmp_path / "m"),
                          attn_implementation="flex_attention"))
    assert not (tmp_path / "m").exists()


def test_shipped_deepspeed_configs_leave_numbers_to_the_trainer():
    for name in ("zero2", "zero2_1gpu", "zero3", "zero3_offload"):
        cfg = load_deepspeed_config(name)
        assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["bf16"]["enabled"] == "auto"
        # zero2/zero3 wrap the Trainer's optimizer; offload needs DeepSpeed's CPU Adam, lr from the Trainer
        assert ("optimizer" in cfg) == (name == "zero3_offload")
    assert load_deepspeed_config("zero3_offload")["optimizer"]["params"]["lr"] == "auto"
    assert load_deepspeed_config("zero3")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert load_deepspeed_config("none") is None
    # zero2_1gpu is zero2 with exactly the two changes the one-GPU benchmark line measured
    # (bench/train_workers.py: -nooverlap-nocheck), nothing else
    expected = load_deepspeed_config("zero2")
    expected["zero_optimization"]["overlap_comm"] = False
    expected["bf16"]["check_grad_overflow"] = False
    assert load_deepspeed_config("zero2_1gpu") == expected


def test_cli_help_explains_every_option():
    from distill.cli import build_parser

    parser = build_parser(["train"])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["train"].format_help()
    for flag in ("--deepspeed", "--packing", "--max-length", "--truncation", "--gradient-checkpointing",
                 "--eval-fraction", "--keep-repetitive", "--overwrite", "--no-resume", "--grad-accum"):
        assert flag in text


def test_two_dataset_directories_with_the_same_name_never_share_a_cache(tmp_path):
    # `datasets` keys a local directory's cache by its name; a run must never get another run's rows.
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n---\n"
    for parent, n in (("run-a", 3), ("run-b", 7)):
        d = tmp_path / parent / "data" / "codit"
        (d / "data").mkdir(parents=True)
        (d / "README.md").write_text(card)
        rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(n)]
        (d / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(td.load_rows(tmp_path / "run-a" / "data" / "codit")) == 3
    assert len(td.load_rows(tmp_path / "run-b" / "data" / "codit")) == 7
    (tmp_path / "run-a" / "data" / "codit" / "data" / "train.jsonl").write_text('{"instruction": "q", "response": "a"}\n')
    assert len(td.load_rows(tmp_path / "run-a" / "data" / "codit")) == 1


def test_a_saved_dataset_is_read_without_writing_into_its_folder(tmp_path):
    # Transforms write their cache files beside their input: a `save_to_disk` folder is copied
    # into the run's private folder first, so two ranks never write into the user's folder together.
    import datasets

    from distill.io.files import scratch_dir

    rows = [{"instruction": f"q{i}", "response": f"a{i}", "repetitive": i == 3} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    with scratch_dir(tmp_path / "out", "data") as scratch:
        chats = td.read_chats(tmp_path / "saved", keep_repetitive=False, stats=td.DataStats(), cache_dir=scratch)
        assert len(chats) == 4
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # the private folder is gone


def test_scratch_dir_removes_only_this_hosts_leftovers_of_dead_processes(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from distill.io.files import scratch_dir

    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid whose process has exited
    leftovers = {name: tmp_path / name for name in (
        f".out.data-{host}-{dead}-abc",          # this host, process gone: removed
        f".out.data-{host}-{os.getpid()}-def",   # this host, process alive: kept
        f".out.data-otherhost-{dead}-ghi",       # another host (shared filesystem): kept
    )}
    for path in leftovers.values():
        path.mkdir()
    with scratch_dir(tmp_path / "out", "data") as scratch:
        assert scratch.exists() and scratch.name.startswith(f".out.data-{host}-{os.getpid()}-")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(list(leftovers)[1:])
