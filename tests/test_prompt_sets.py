"""distill.synthesize.prompt_sets: the chat-data layouts users hold, read into prompt rows with counted drops."""

import json
import logging

import pytest

from distill import DistillError
from distill.synthesize.prompt_sets import describe_stats, load_prompt_set

U, A, S = "user", "assistant", "system"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


LMSYS = [  # conversation_id + conversation, as LMSYS-Chat-1M; WildChat's turns carry extra keys
    {"conversation_id": "c-a", "model": "vicuna", "conversation": chat((U, "What is 2+2?"), (A, "4"),
                                                                        (U, "And 3+3?"), (A, "6"))},
    {"conversation_id": "c-b", "conversation": [{"role": "user", "content": "Name a colour", "language": "English",
                                                 "toxic": False, "timestamp": None},
                                                {"role": "assistant", "content": "Blue", "language": "English"}]},
]


def test_conversation_layout_first_and_all_turns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "lmsys.jsonl", LMSYS)
    with caplog.at_level(logging.INFO, logger="distill.synthesize.prompt_sets"):
        first = load_prompt_set(path)
    assert first.stats["layout"] == "conversation"
    assert [r.getMessage() for r in caplog.records].count(
        f"prompts {path}: conversation layout (detected from the first row's fields "
        f"['conversation', 'conversation_id', 'model'])") == 1  # logged once, not per row
    assert [r["id"] for r in first.rows] == ["c-a", "c-b"]  # conversation_id kept
    assert first.rows[0] == {"id": "c-a", "instruction": "What is 2+2?", "messages": chat((U, "What is 2+2?")),
                             "source_index": 0}
    assert first.rows[1]["messages"] == chat((U, "Name a colour"))  # WildChat's extra turn keys dropped
    every = load_prompt_set(path, turns="all")
    # ends at the last user turn: its answer is the one to regenerate
    assert every.rows[0]["messages"] == chat((U, "What is 2+2?"), (A, "4"), (U, "And 3+3?"))
    assert every.rows[0]["instruction"] == "And 3+3?"
    assert every.rows[1]["messages"] == chat((U, "Name a colour"))


def test_system_turns_before_the_user_turn_are_kept(tmp_path):
    rows = [{"id": "s", "messages": chat((S, "Be brief."), (U, "hi"), (A, "hello"), (S, "Be formal."), (U, "bye"))}]
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    assert load_prompt_set(path).rows[0]["messages"] == chat((S, "Be brief."), (U, "hi"))
    assert load_prompt_set(path, turns="all").rows[0]["messages"] == rows[0]["messages"]


def test_sharegpt_layout_maps_speakers(tmp_path):
    rows = [{"id": "g1", "conversations": [{"from": "system", "value": "You help."}, {"from": "human", "value": "Q1"},
                                           {"from": "gpt", "value": "A1"}, {"from": "user", "value": "Q2"},
                                           {"from": "chatgpt", "value": "A2"}]},
            {"id": "g2", "conversations": [{"from": "human", "value": "Q3"}, {"from": "bard", "value": "A3"}]}]
    ps = load_prompt_set(write_jsonl(tmp_path / "sharegpt.jsonl", rows), turns="all")
    assert ps.stats["layout"] == "sharegpt"
    assert ps.rows[0]["messages"] == chat((S, "You help."), (U, "Q1"), (A, "A1"), (U, "Q2"))
    assert [r["instruction"] for r in ps.rows] == ["Q2", "Q3"]
    assert load_prompt_set(tmp_path / "sharegpt.jsonl").rows[0]["messages"] == chat((S, "You help."), (U, "Q1"))


def test_alpaca_layout_joins_instruction_and_input(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "Name a prime.", "input": "", "output": "7"},
            {"instruction": "Say hi.", "input": "   ", "output": "hi"}]
    path = tmp_path / "alpaca_data.json"  # Alpaca ships one JSON array, not JSON lines
    path.write_text(json.dumps(rows, indent=1))
    ps = load_prompt_set(path)
    assert ps.stats["layout"] == "alpaca"
    assert [r["instruction"] for r in ps.rows] == ["Translate to French.\n\nGood morning", "Name a prime.", "Say hi."]
    assert [r["id"] for r in ps.rows] == ["0", "1", "2"]  # no id field: the row index
    assert ps.rows[0]["messages"] == chat((U, "Translate to French.\n\nGood morning"))


def test_our_rows_and_a_forced_layout(tmp_path):
    rows = [{"id": 7, "instruction": "plain"}, {"id": 8, "messages": chat((U, "a"), (A, "b"), (U, "c"))}]
    path = write_jsonl(tmp_path / "ours.jsonl", rows)
    ps = load_prompt_set(path, turns="all")
    assert ps.stats["layout"] == "instruction"  # from the first row; both of our shapes read alike
    assert [(r["id"], r["instruction"]) for r in ps.rows] == [("7", "plain"), ("8", "c")]
    # an Alpaca-looking file whose `input` is not a prompt part: the layout option overrides detection
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "input": "y"}])
    assert load_prompt_set(alp).rows[0]["instruction"] == "x\n\ny"
    assert load_prompt_set(alp, layout="instruction").rows[0]["instruction"] == "x"


def test_datasets_directories(tmp_path):
    import datasets

    datasets.Dataset.from_list(LMSYS).save_to_disk(str(tmp_path / "saved"))
    ps = load_prompt_set(tmp_path / "saved", turns="all")
    assert ps.stats["layout"] == "conversation" and [r["id"] for r in ps.rows] == ["c-a", "c-b"]
    assert ps.rows[0]["messages"] == chat((U, "What is 2+2?"), (A, "4"), (U, "And 3+3?"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "q"}]}])}
                         ).save_to_disk(str(tmp_path / "dict"))
    assert load_prompt_set(tmp_path / "dict").rows[0]["messages"] == chat((U, "q"))
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/p.jsonl\n---\n"
    (tmp_path / "carded" / "data").mkdir(parents=True)
    (tmp_path / "carded" / "README.md").write_text(card)
    write_jsonl(tmp_path / "carded" / "data" / "p.jsonl", [{"instruction": "Sum", "input": "1 2"}])
    assert load_prompt_set(tmp_path / "carded").rows[0]["instruction"] == "Sum\n\n1 2"


def test_hub_name_from_the_local_cache_and_a_missing_one(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snap = tmp_path / "hub" / "datasets--acme--chats" / "snapshots" / "abc123"
    (snap / "data").mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    write_jsonl(snap / "data" / "train.jsonl", LMSYS)  # what `hf download acme/chats --repo-type dataset` leaves
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline is forced for the look-up regardless
    ps = load_prompt_set("acme/chats")
    assert [r["instruction"] for r in ps.rows] == ["What is 2+2?", "Name a colour"]
    assert ps.stats["source"] == "acme/chats" and constants.HF_HUB_OFFLINE is False  # restored afterwards
    with pytest.raises(DistillError, match=r"prompts acme/absent: .*no copy of the Hugging Face dataset 'acme/absent'"
                                           r".*`hf download acme/absent --repo-type dataset`.*save_to_disk"):
        load_prompt_set("acme/absent")
    with pytest.raises(DistillError, match=r"prompts .*nope.jsonl does not exist"):
        load_prompt_set(tmp_path / "nope.jsonl")


def test_drops_and_dedup_are_counted(tmp_path):
    rows = [{"instruction": "Hello   World"},
            {"instruction": "  "},                                      # empty
            {"instruction": "hello world\n"},                           # duplicate after normalising
            {"instruction": "x" * 101},                                 # too long
            {"messages": chat((A, "only an answer"))},                  # no user turn: empty
            {"messages": None, "instruction": None},                    # null fields: empty
            {"instruction": "second"}]
    ps = load_prompt_set(write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_chars=100)
    assert [(r["id"], r["instruction"], r["source_index"]) for r in ps.rows] == [("0", "Hello   World", 0),
                                                                                 ("6", "second", 6)]
    assert ps.stats == {"source": str(tmp_path / "p.jsonl"), "layout": "instruction", "turns": "first",
                        "max_prompt_chars": 100, "dedupe": True, "rows_read": 7, "dropped_empty": 3, "dropped_too_long": 1,
                        "dropped_duplicate": 1, "eligible": 2, "limited": None, "sampled": None, "seed": None,
                        "kept": 2}
    text = describe_stats(ps.stats)
    assert "2 prompts from" in text and "Of the 7 rows read, 3 were dropped as empty, 1 as longer than 100 " \
        "characters and 1 as duplicates" in text
    # "all" turns: the whole conversation counts toward the length and the dedup key
    conv = [{"conversation": chat((U, "a"), (A, "b"), (U, "c"))}, {"conversation": chat((U, "A"), (A, "z"), (U, "d"))}]
    path = write_jsonl(tmp_path / "c.jsonl", conv)
    assert load_prompt_set(path).stats["dropped_duplicate"] == 1
    assert load_prompt_set(path, turns="all").stats["dropped_duplicate"] == 0
    assert [r["instruction"] for r in load_prompt_set(path, dedupe=False).rows] == ["a", "A"]
    assert load_prompt_set(path, max_prompt_chars=2).stats["kept"] == 1  # "a" alone is short enough
    with pytest.raises(DistillError, match=r"none of its 2 rows is usable \(0 empty, 2 too long, 0 duplicates\)"):
        load_prompt_set(path, turns="all", max_prompt_chars=2)  # "a", "b", "c" together are not


def test_limit_and_seeded_sample(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"id": f"r{i}", "instruction": f"prompt {i}"} for i in range(50)]
                       + [{"id": "dup", "instruction": "PROMPT 0"}])
    lim = load_prompt_set(path, limit=3)
    assert [r["id"] for r in lim.rows] == ["r0", "r1", "r2"]
    assert lim.stats["limited"] == 3 and lim.stats["rows_read"] == 3 and lim.stats["kept"] == 3  # stopped early
    a, b, c = (load_prompt_set(path, sample=5, seed=s) for s in (1, 1, 2))
    assert [r["id"] for r in a.rows] == [r["id"] for r in b.rows]  # same seed, same rows
    assert [r["id"] for r in a.rows] != [r["id"] for r in c.rows]
    idx = [r["source_index"] for r in a.rows]
    assert len(idx) == 5 and idx == sorted(idx)  # source order kept
    assert a.stats["sampled"] == 5 and a.stats["eligible"] == 50 and a.stats["dropped_duplicate"] == 1
    assert "5 of the 50 usable rows were drawn at random (`random.Random(1)`)" in describe_stats(a.stats)
    assert load_prompt_set(path, sample=500).stats["kept"] == 50  # more than there are: all of them
    for bad in (dict(limit=0), dict(limit=-2), dict(sample=0)):
        name, value = next(iter(bad.items()))
        with pytest.raises(DistillError, match=rf"many.jsonl: {name} must be >= 1 \(got {value}\)"):
            load_prompt_set(path, **bad)
    with pytest.raises(DistillError, match="pass limit or sample, not both"):
        load_prompt_set(path, limit=2, sample=2)


def test_bad_inputs(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "hi"}])
    with pytest.raises(DistillError, match=r"good.jsonl: unknown layout 'chatml'; use auto or one of instruction, "):
        load_prompt_set(good, layout="chatml")
    with pytest.raises(DistillError, match=r"turns must be 'first' or 'all'"):
        load_prompt_set(good, turns="last")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"id": 1, "prompt": "hi", "reply": "yo"}])
    with pytest.raises(DistillError, match=r"odd.jsonl row 0 has neither an 'instruction' .*fields found: "
                                           r"\['id', 'prompt', 'reply'\]\); the layouts accepted are instruction .*"
                                           r"sharegpt .*alpaca"):
        load_prompt_set(odd)
    listy = write_jsonl(tmp_path / "listy.jsonl", [{"instruction": "a"}, ["not", "an", "object"]])
    with pytest.raises(DistillError, match=r"listy.jsonl row 1 is a list, not a JSON object"):
        load_prompt_set(listy)
    no_content = write_jsonl(tmp_path / "nc.jsonl", [{"conversation": [{"role": "user"}]}])
    with pytest.raises(DistillError, match=r"nc.jsonl row 0: turn 0 of 'conversation' has no 'content' string"):
        load_prompt_set(no_content)
    no_value = write_jsonl(tmp_path / "nv.jsonl", [{"conversations": [{"from": "human", "value": None}]}])
    with pytest.raises(DistillError, match=r"nv.jsonl row 0: turn 0 of 'conversations' has no 'value' string"):
        load_prompt_set(no_value)
    role = write_jsonl(tmp_path / "role.jsonl", [{"conversations": [{"from": "narrator", "value": "x"}]}])
    with pytest.raises(DistillError, match=r"role.jsonl row 0: turn 0 of 'conversations' has from 'narrator'"):
        load_prompt_set(role)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"conversation_id": "k", "conversation": chat((U, "a"))},
                                                   {"conversation_id": "k", "conversation": chat((U, "b"))}])
    with pytest.raises(DistillError, match=r"twice.jsonl: id 'k' appears twice; ids must be unique"):
        load_prompt_set(twice)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DistillError, match="empty.jsonl has no rows"):
        load_prompt_set(empty)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"instruction": ""}, {"instruction": " "}])
    with pytest.raises(DistillError, match=r"blank.jsonl: none of its 2 rows is usable \(2 empty, 0 too long"):
        load_prompt_set(blank)


def test_load_prompts_keeps_its_shape(tmp_path):
    from distill.synthesize.records import load_prompts

    path = write_jsonl(tmp_path / "lmsys.jsonl", LMSYS)
    rows = load_prompts(path)
    assert [r["id"] for r in rows] == ["c-a", "c-b"]
    assert rows[0]["messages"] == chat((U, "What is 2+2?"), (A, "4"), (U, "And 3+3?"))  # every turn, as before
    assert [r["id"] for r in load_prompts(path, limit=1)] == ["c-a"]
    repeated = write_jsonl(tmp_path / "rep.jsonl", [{"instruction": "same " * 5000}] * 2)
    assert len(load_prompts(repeated)) == 2  # long and repeated prompts kept, as before
    with pytest.raises(DistillError, match="limit must be >= 1"):  # once silently all rows
        load_prompts(path, limit=0)
