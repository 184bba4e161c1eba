"""`distill synthesize` end to end on tiny models: dataset, resume, ranks, errors, repetition filter."""

import json
import shutil

import pytest

from distill import DistillError
from distill.cli import main
from distill.synthesize.records import repetition_fraction
from distill.synthesize.run import SynthesizeConfig, synthesize
from tiny import make_model, make_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    tok = make_tokenizer()
    make_model(d / "post", seed=0, tokenizer=tok)
    make_model(d / "base", seed=1, tokenizer=tok)
    make_tokenizer(d / "other-tok", vocab_size=120)
    make_model(d / "other", seed=2, tokenizer=make_tokenizer(vocab_size=120))
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(7):
            row = {"id": f"q{i}", "instruction": "the quick brown fox " * (i % 3 + 1) + str(i)}
            if i == 5:  # a chat-format row
                row = {"id": "q5", "messages": [{"role": "user", "content": "answer in json"}]}
            f.write(json.dumps(row) + "\n")
    return d


def cfg(zoo, out, **kw):
    base = dict(expert=str(zoo / "post"), amateur=str(zoo / "base"), prompts=str(zoo / "prompts.jsonl"),
                out=str(out), max_new_tokens=10, batch_size=3, seed=5, progress=False)
    return SynthesizeConfig(**(base | kw))


def rows(out):
    return [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(zoo):
    out = zoo / "full"
    synthesize(cfg(zoo, out))
    return out


def test_two_outputs_of_one_name_load_their_own_rows_with_datasets(zoo, full_run, tmp_path):
    # `datasets` caches a local directory by its name and card, not its files: without the data
    # checksum in the card, the second `codit` directory loaded the first one's rows.
    import datasets

    other = tmp_path / "b" / "full"
    synthesize(cfg(zoo, other, seed=6, limit=4))
    cache = tmp_path / "hf-cache"
    for out in (full_run, other):
        loaded = datasets.load_dataset(str(out), cache_dir=str(cache))["train"]
        assert [r["response"] for r in loaded] == [r["response"] for r in rows(out)]


def test_dataset_card_and_rows(full_run):
    import datasets

    ds = datasets.load_dataset(str(full_run), split="train")
    assert ds["id"] == [f"q{i}" for i in range(7)]
    r = rows(full_run)[0]
    assert {"instruction", "response", "prompt_tokens", "response_tokens", "finish_reason", "repetitive",
            "method", "alpha", "beta", "temperature", "top_p", "seed", "expert", "amateur"} <= set(r)
    assert r["method"] == "codit" and r["alpha"] == 0.01 and r["beta"] == 1.0
    assert all(0 < x["response_tokens"] <= 10 for x in rows(full_run))
    assert rows(full_run)[5]["instruction"] == "answer in json"
    card = (full_run / "README.md").read_text()
    assert "contrastive decoding" in card and "Repetition filter" in card and "alpha / beta | 0.01 / 1.0" in card
    assert json.loads((full_run / "provenance.json").read_text())["counts"]["rows"] == 7


def test_rows_match_the_decoder_tokens_and_the_repetition_filter(zoo, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import distill.decoding.engine

    # Extra stop ids in generation_config (as Llama-3's <|eot_id|>), here ordinary word pieces, so
    # some rows stop and others run to max_new_tokens, and a kept stop token would show in the text.
    expert = tmp_path / "post-stops"
    shutil.copytree(zoo / "post", expert)
    gen = json.loads((expert / "generation_config.json").read_text())
    stops = [2] + list(range(4, 170, 9))
    (expert / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": stops}))
    results = {}
    real_generate = distill.decoding.engine.ContrastiveDecoder.generate

    def spy(self, requests):
        for result in real_generate(self, requests):
            results[result.key] = result
            yield result

    monkeypatch.setattr(distill.decoding.engine.ContrastiveDecoder, "generate", spy)
    # n = 3 and a threshold of 0.1 split these short responses (the default n = 20 finds no repeats in them)
    out = tmp_path / "stops"
    synthesize(cfg(zoo, out, expert=str(expert), repetition_rule="ngram", repetition_ngram=3,
                   repetition_threshold=0.1))
    tok = AutoTokenizer.from_pretrained(expert)
    data = rows(out)
    assert {r["finish_reason"] for r in data} == {"stop", "length"}
    for r in data:
        tokens = results[r["id"]].tokens
        if r["finish_reason"] == "stop":  # the stop token ends the row and is not part of the response
            assert tokens[-1] in stops
            tokens = tokens[:-1]
        else:  # cut at max_new_tokens: every generated token is in the response
            assert len(tokens) == 10
        assert r["response_tokens"] == len(tokens)
        assert r["response"] == tok.decode(tokens, skip_special_tokens=True).strip(), r
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
        rep = repetition_fraction(r["response"], 3)
        assert r["repetition"] == round(rep, 4) and r["repetitive"] == (rep > 0.1), r
    flagged = sum(r["repetitive"] for r in data)
    assert 0 < flagged < len(data)  # the threshold splits the rows, so both sides are checked
    # The card and provenance count the flagged rows (train drops them by default).
    assert json.loads((out / "provenance.json").read_text())["counts"]["repetitive"] == flagged
    assert f"Repetition filter: {flagged} of {len(data)} rows" in (out / "README.md").read_text()


def test_resume_after_torn_shard_equals_uninterrupted(zoo, full_run, monkeypatch):
    out = zoo / "resumed"
    (out / "shards").mkdir(parents=True)
    shutil.copy(full_run / "provenance.json", out / "provenance.json")
    lines = (full_run / "shards" / "rank-00000.jsonl").read_text().splitlines(keepends=True)
    # a crash after three rows and half of the fourth
    (out / "shards" / "rank-00000.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    synthesize(cfg(zoo, out, batch_size=2))  # another batch size: rows must not depend on it
    assert rows(out) == rows(full_run)
    shard = [json.loads(x) for x in (out / "shards" / "rank-00000.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in shard) == [f"q{i}" for i in range(7)]  # no duplicates, none lost
    shard_bytes = (out / "shards" / "rank-00000.jsonl").read_bytes()
    monkeypatch.setattr("distill.synthesize.run._load", lambda *a: pytest.fail("all done: no model may be loaded"))
    synthesize(cfg(zoo, out))  # all done: nothing to generate, same data
    assert rows(out) == rows(full_run)
    assert (out / "shards" / "rank-00000.jsonl").read_bytes() == shard_bytes  # no row generated twice


def test_resume_compares_the_whole_chat_not_only_the_last_turn(zoo, tmp_path):
    chat = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue"},
            {"role": "user", "content": "and another"}]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"id": "c0", "messages": chat}) + "\n")
    out = tmp_path / "chat-out"
    synthesize(cfg(zoo, out, prompts=str(prompts), prompt_turns="all"))
    assert rows(out)[0]["messages"][:3] == chat
    chat[1]["content"] = "red"  # an earlier turn edited; the instruction answered is the same
    prompts.write_text(json.dumps({"id": "c0", "messages": chat}) + "\n")
    with pytest.raises(DistillError, match=r"prompt .* has changed since \(first: id 'c0'\)"):
        synthesize(cfg(zoo, out, prompts=str(prompts), prompt_turns="all"))


def test_resume_with_edited_prompts_is_refused_then_overwritten(zoo, full_run, tmp_path, monkeypatch):
    out = tmp_path / "edited"
    shutil.copytree(full_run, out)
    lines = (zoo / "prompts.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"id": "q2", "instruction": "an edited prompt"})
    edited = tmp_path / "prompts.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    # The prompts file was edited in place: same path, same settings, so the rows must be compared.
    run = cfg(zoo, out, prompts=str(edited))
    prov = json.loads((out / "provenance.json").read_text())
    prov["settings"]["prompts"] = str(edited)
    (out / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(DistillError, match=r"1 prompt id\(s\) whose prompt .* has changed since \(first: id 'q2'\)"):
        synthesize(run)
    assert rows(out) == rows(full_run)  # nothing lost by the refusal
    run.overwrite = True
    monkeypatch.setenv("WORLD_SIZE", "2")  # ranks start independently: none may delete the others' shards
    with pytest.raises(DistillError, match=r"2 ranks cannot discard it safely in parallel; delete .* first"):
        synthesize(run)
    monkeypatch.delenv("WORLD_SIZE")
    assert rows(out) == rows(full_run)
    synthesize(run)
    new = rows(out)
    assert [r["id"] for r in new] == [f"q{i}" for i in range(7)] and new[2]["instruction"] == "an edited prompt"
    assert [r["response"] for i, r in enumerate(new) if i != 2] == \
        [r["response"] for i, r in enumerate(rows(full_run)) if i != 2]  # per-row seeds: the rest regenerate alike


def test_two_ranks_then_merge_equal_one_rank(zoo, full_run, monkeypatch):
    out = zoo / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    synthesize(cfg(zoo, out))
    assert not (out / "data").exists()  # rank 0 not done yet: no dataset
    assert main(["synthesize", "--merge", str(out)]) == 2  # an incomplete merge is a clear error
    monkeypatch.setenv("RANK", "0")
    synthesize(cfg(zoo, out))  # the last rank to finish merges
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert rows(out) == rows(full_run)
    assert main(["synthesize", "--merge", str(out)]) == 0


def test_direct_never_loads_the_amateur(zoo):
    out = zoo / "direct"
    assert main(["synthesize", "--expert", str(zoo / "post"), "--amateur", str(zoo / "does-not-exist"),
                 "--prompts", str(zoo / "prompts.jsonl"), "--out", str(out), "--method", "direct",
                 "--max-new-tokens", "5", "--limit", "3", "--no-progress"]) == 0
    r = rows(out)
    assert len(r) == 3 and {x["beta"] for x in r} == {0.0} and {x["amateur"] for x in r} == {None}
    assert {x["alpha"] for x in r} == {0.0} and {x["method"] for x in r} == {"direct"}


def test_clear_errors(zoo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    with pytest.raises(DistillError, match=r"bad.jsonl row 0 has neither an 'instruction'"):
        synthesize(cfg(zoo, tmp_path / "o1", prompts=str(bad)))
    twice = tmp_path / "twice.jsonl"  # resume keys on ids: a duplicate would silently lose a prompt
    twice.write_text("".join(json.dumps({"id": i, "instruction": "hi"}) + "\n" for i in ("a", "b", "a")))
    with pytest.raises(DistillError, match=r"twice.jsonl: id 'a' appears twice; ids must be unique"):
        synthesize(cfg(zoo, tmp_path / "o0", prompts=str(twice)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DistillError, match="empty.jsonl has no rows"):
        synthesize(cfg(zoo, tmp_path / "o2", prompts=str(empty)))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DistillError, match="cannot write to"):
        synthesize(cfg(zoo, blocker / "out"))
    with pytest.raises(DistillError, match="token -> id maps of .* differ"):
        synthesize(cfg(zoo, tmp_path / "o3", amateur=str(zoo / "other")))
    assert not (tmp_path / "o3").exists()  # refused before anything was written
    for bad_value, message in ((dict(alpha=2.0), "alpha must be in"), (dict(top_p=0.0), "top_p"),
                               (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                               (dict(dtype="fp8"), "dtype must be")):
        with pytest.raises(DistillError, match=message):
            synthesize(cfg(zoo, tmp_path / "o5", **bad_value))
        assert not (tmp_path / "o5").exists()
    # a stub left by a run that failed before its first row does not block the corrected command
    stub = tmp_path / "o6"
    synthesize(cfg(zoo, stub, limit=2))
    shutil.rmtree(stub / "shards")
    (stub / "shards").mkdir()
    synthesize(cfg(zoo, stub, limit=2, alpha=0.5))
    assert len(rows(stub)) == 2
    with pytest.raises(DistillError, match="other settings"):
        synthesize(cfg(zoo, zoo / "full", alpha=0.5))
    assert main(["synthesize", "--expert", str(zoo / "post"), "--prompts", str(empty), "--out",
                 str(tmp_path / "o4")]) == 2  # codit without an amateur


def test_progress_bar_in_a_log_file_is_not_redrawn_per_prompt(zoo, tmp_path, capfd):
    # Under pytest stderr is not a terminal, as in a batch job's log: the bar must not redraw per row.
    synthesize(cfg(zoo, tmp_path / "logged", progress=True, batch_size=2))
    err = capfd.readouterr().err
    assert err.count("synthesize rank 0:") <= 3, err  # first draw and the final one, not 7 updates
    assert "7/7" in err


def test_repetition_fraction():
    assert repetition_fraction("abc") == 0.0
    prose = "The river city sits below the hills; its market sells fish, bread and copper pots to travellers."
    assert repetition_fraction(prose) < 0.05
    loop = "I will answer. " + "the answer is yes and " * 20
    assert repetition_fraction(loop) > 0.8


def test_prompts_from_a_datasets_directory(tmp_path):
    import datasets

    from distill.synthesize.records import load_prompts

    rows = [{"instruction": "say hi", "messages": None},
            {"instruction": "", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    prompts = load_prompts(tmp_path / "ds")
    assert [p["id"] for p in prompts] == ["0", "1"] and prompts[0]["messages"] == [{"role": "user", "content": "say hi"}]
    # a finished conversation: its last answer is the one to regenerate, the earlier turns are context
    assert prompts[1]["instruction"] == "c" and [m["content"] for m in prompts[1]["messages"]] == ["a", "b", "c"]


def test_prompts_from_card_directories_are_fresh_and_leave_the_hf_cache_alone(tmp_path, monkeypatch):
    # Two directories of one name (each run's data/codit): datasets' cache keys a local directory
    # by its name, and ranks loading one at once once built the same cache files together.
    import datasets

    from distill.synthesize.records import load_prompts

    shared = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", shared)
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/p.jsonl\n---\n"
    for parent, n in (("run-a", 2), ("run-b", 5)):
        d = tmp_path / parent / "codit"
        (d / "data").mkdir(parents=True)
        (d / "README.md").write_text(card)
        (d / "data" / "p.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}"}) + "\n" for i in range(n)))
    assert [p["instruction"] for p in load_prompts(tmp_path / "run-a" / "codit")] == ["q0", "q1"]
    assert len(load_prompts(tmp_path / "run-b" / "codit")) == 5
    assert not shared.exists() or not any(shared.rglob("*.arrow"))


def test_engine_levers_reach_the_decoder_from_the_cli(zoo, monkeypatch):
    import distill.decoding.engine as decoding

    seen = []
    real = decoding.ContrastiveDecoder

    def spy(*args, **kwargs):
        seen.append(args[4])  # the DecodingConfig
        return real(*args, **kwargs)

    monkeypatch.setattr(decoding, "ContrastiveDecoder", spy)  # synthesize imports it when it runs
    common = ["synthesize", "--expert", str(zoo / "post"), "--prompts", str(zoo / "prompts.jsonl"), "--method",
              "direct", "--max-new-tokens", "3", "--limit", "1", "--no-progress"]
    assert main(common + ["--out", str(zoo / "levers-default")]) == 0
    assert main(common + ["--out", str(zoo / "levers-set"), "--compile-layers", "--decode-attention", "sdpa",
                          "--no-concurrent-models"]) == 0
    assert [(c.compile_layers, c.decode_attention, c.concurrent_models) for c in seen] == [
        (None, "auto", None), (True, "sdpa", False)]
    with pytest.raises(SystemExit):  # argparse names the choices
        main(common + ["--out", str(zoo / "levers-bad"), "--decode-attention", "dense"])


def test_a_sharegpt_set_with_drops_and_duplicates_is_counted_in_the_card(zoo, tmp_path):
    convs = [[{"from": "human", "value": "the quick brown fox"}, {"from": "gpt", "value": "ok"}],
             [{"from": "human", "value": "The  quick brown FOX"}],  # a duplicate after normalising
             [{"from": "human", "value": "   "}],  # empty
             [{"from": "human", "value": "the lazy dog " * 50}],  # over --max-prompt-chars
             [{"from": "system", "value": "be brief"}, {"from": "human", "value": "answer in json"}]]
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "conversations": c}) + "\n" for i, c in enumerate(convs)))
    out = tmp_path / "sg"
    assert main(["synthesize", "--expert", str(zoo / "post"), "--amateur", str(zoo / "base"), "--prompts", str(data),
                 "--out", str(out), "--max-new-tokens", "4", "--max-prompt-chars", "200", "--no-progress"]) == 0
    assert [(r["id"], r["messages"][:-1]) for r in rows(out)] == [
        ("s0", [{"role": "user", "content": "the quick brown fox"}]),
        ("s4", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "answer in json"}])]
    card = (out / "README.md").read_text()
    assert "(sharegpt layout)" in card and "Of the 5 rows read, 1 were dropped as empty, 1 as longer than 200" in card
    assert "1 as duplicates of an earlier prompt" in card
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["prompt_set"]["dropped_duplicate"] == 1 and prov["prompt_set"]["kept"] == 2


def test_shard_reader_ignores_a_torn_tail_and_names_a_corrupt_line(tmp_path):
    from distill.io.files import read_jsonl
    from distill.synthesize.records import read_shard

    shard = tmp_path / "rank-00000.jsonl"
    shard.write_text('{"id": "a"}\n\n{"id": "b", "text": "x\u2028y"}\n{"id": "c", "te')
    assert [r["id"] for r in read_shard(shard, repair=False)] == ["a", "b"]
    assert shard.read_text().endswith('"te')  # not repaired
    assert [r["id"] for r in read_shard(shard, repair=True)] == ["a", "b"]
    assert shard.read_text().endswith('"x\u2028y"}\n')  # cut after the last whole line
    assert read_jsonl(shard, limit=1) == [{"id": "a"}]
    shard.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(DistillError, match=r"shard .*rank-00000.jsonl line 2 is corrupt \(.*\); delete that line"):
        read_shard(shard, repair=False)
    with pytest.raises(DistillError, match=r"file .*rank-00000.jsonl line 2 is not valid JSON \(.*\); fix or remove it"):
        read_jsonl(shard)
