"""Real base/instruct pairs: what must match (one token -> id map, output rows), what may differ
(eos, stop ids, templates, added tokens) and how it is resolved, on stand-ins of each published family."""

import json
import shutil

import pytest
import torch

from distill import DistillError
from distill.cli import main
from distill.decoding.pair import check_pair, render_prompt
from family_models import FAST_FAMILIES
from family_pairs import PAIR_FAMILIES, make_pair, write_prompts
from tiny import make_model, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# the stop set each family's instruct model needs (the expert's eos, end-of-turn, generation-config eos)
STOPS = {
    "qwen2.5": {"<|im_end|>", "<|endoftext|>"},
    "qwen3": {"<|im_end|>", "<|endoftext|>"},
    "qwen3-moe": {"<|im_end|>", "<|endoftext|>"},
    "llama3.1": {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"},
    "gemma3": {"<eos>", "<end_of_turn>"},
    "olmo3": {"<|im_end|>", "<|endoftext|>"},
    "mistral": {"</s>"},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    write_prompts(d / "prompts.jsonl")
    return d


def rows(out):
    return [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_pair_check_resolves_the_differences_from_the_expert(root, family):
    expert, amateur = make_pair(family, root)
    tok, check = check_pair(str(expert), str(amateur))
    assert set(check.stop_tokens) == STOPS[family]
    assert check.vocab_size == len(tok)
    ids = render_prompt(tok, [{"role": "user", "content": "hi"}], check.chat_template_kwargs)
    if tok.bos_token_id is not None and family != "olmo3":  # the template writes bos: exactly once
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer alone would have added a second
        assert "written once by the template" in check.bos
    else:
        assert tok.bos_token_id not in ids and check.bos.startswith("none")
    text = " | ".join(check.differences)
    if family in ("qwen2.5", "qwen3", "llama3.1", "olmo3"):  # base and instruct end text differently
        assert "eos token: expert" in text
    if family in ("llama3.1", "gemma3", "olmo3", "mistral"):
        assert "the amateur has no chat template" in text
    if family == "olmo3":
        assert "added tokens only in the expert" in text
    if family.startswith("qwen3"):  # thinking off, as the public code runs Qwen3
        assert check.chat_template_kwargs == {"enable_thinking": False}
        assert tok.decode(ids).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_each_pair_synthesizes_with_codit_and_a_resumed_run_equals_an_uninterrupted_one(root, family, tmp_path):
    expert, amateur = make_pair(family, root)
    engine = "fast" if family in FAST_FAMILIES else "eager"
    args = ["synthesize", "--expert", str(expert), "--amateur", str(amateur), "--prompts", str(root / "prompts.jsonl"),
            "--max-new-tokens", "12", "--batch-size", "2", "--engine", engine, "--no-progress"]
    full = tmp_path / "full"
    assert main(args + ["--out", str(full)]) == 0
    done = rows(full)
    assert [r["id"] for r in done] == [f"p{i}" for i in range(6)]
    assert all(r["engine"] == engine for r in done)
    card = (full / "README.md").read_text()
    assert f"| decoding engine | {engine}: 6 rows |" in card
    prov = json.loads((full / "provenance.json").read_text())
    assert set(prov["pair"]["stop_tokens"]) == STOPS[family]
    for d in prov["pair"]["differences"]:  # every difference found is in the card
        assert d in card
    # a crash after three rows: the torn shard resumes to the same dataset
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "data")
    shard = next((part / "shards").glob("*.jsonl"))
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:3]) + lines[3][:20])
    assert main(args + ["--out", str(part)]) == 0
    assert rows(part) == done


def test_qwen3_thinking_follows_chat_template_kwargs_and_is_recorded(root, tmp_path):
    expert, amateur = make_pair("qwen3", root)
    tok, on = check_pair(str(expert), str(amateur), chat_template_kwargs='{"enable_thinking": true}')
    assert on.chat_template_kwargs == {"enable_thinking": True}
    assert "<think>" not in tok.decode(render_prompt(tok, [{"role": "user", "content": "hi"}], on.chat_template_kwargs))
    out = tmp_path / "o"
    assert main(["synthesize", "--expert", str(expert), "--amateur", str(amateur), "--prompts",
                 str(root / "prompts.jsonl"), "--out", str(out), "--max-new-tokens", "4", "--limit", "2",
                 "--chat-template-kwargs", '{"enable_thinking": true}', "--no-progress"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["settings"]["chat_template_kwargs"] == '{"enable_thinking": true}'
    assert prov["pair"]["chat_template_kwargs"] == {"enable_thinking": True}
    assert '"enable_thinking": true' in (out / "README.md").read_text()


def test_token_logprobs_are_the_log_softmax_of_the_chosen_scores(root, tmp_path):
    from transformers import AutoModelForCausalLM

    expert, _ = make_pair("llama3.1", root)
    out = tmp_path / "lp"
    assert main(["synthesize", "--expert", str(expert), "--method", "direct", "--prompts", str(root / "prompts.jsonl"),
                 "--out", str(out), "--max-new-tokens", "5", "--limit", "2", "--temperature", "0",
                 "--token-logprobs", "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(expert).eval()
    tok, check = check_pair(str(expert))
    for r in rows(out):
        generated = len(r["token_logprobs"])
        assert generated == r["response_tokens"] + (r["finish_reason"] == "stop")
        prompt = render_prompt(tok, r["messages"][:-1], check.chat_template_kwargs)
        # direct, alpha 0, greedy: the score is the expert's log-softmax and the chosen token its argmax
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1, :check.vocab_size].float(), -1)
        assert r["token_logprobs"][0] == pytest.approx(float(lp.max()), abs=1e-4)
        # an argmax has at least the uniform share of the mass
        assert all(-torch.log(torch.tensor(float(check.vocab_size))) - 1e-5 <= v <= 0 for v in r["token_logprobs"])


def test_true_mismatches_are_errors_before_any_model_loads(root, tmp_path, monkeypatch):
    expert, amateur = make_pair("qwen2.5", root)
    prompts = str(root / "prompts.jsonl")
    loads = []
    monkeypatch.setattr("distill.io.models.load_causal_lm", lambda *a, **k: loads.append(a) or None)
    # another vocabulary: ids mean other tokens
    other = tmp_path / "other"
    make_model(other, vocab_size=120, tokenizer=make_tokenizer(vocab_size=120))
    with pytest.raises(DistillError, match=r"token -> id maps of .*tokenizer.json .* differ"):
        check_pair(str(expert), str(other))
    # too few output rows for the expert's vocabulary, named by its config.json
    short = tmp_path / "short"
    shutil.copytree(amateur, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(cfg | {"vocab_size": 100}))
    with pytest.raises(DistillError, match=r"short/config.json has vocab_size 100 .* tokens"):
        check_pair(str(expert), str(short))
    # an expert without a chat template, and none given
    plain = tmp_path / "plain"
    shutil.copytree(expert, plain)
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(DistillError, match="has no chat template .* pass --chat-template FILE"):
        check_pair(str(plain), str(amateur))
    template = tmp_path / "chatml.jinja"
    template.write_text(json.loads((expert / "tokenizer_config.json").read_text()).get("chat_template")
                        or (expert / "chat_template.jinja").read_text())
    tok, check = check_pair(str(plain), str(amateur), chat_template=str(template))
    assert check.chat_template == f"--chat-template {template}" and "<|im_end|>" in check.stop_tokens
    # --chat-template-kwargs that is not JSON: refused with the config, nothing written
    for bad in ("{enable_thinking: false}", "[1, 2]"):
        code = main(["synthesize", "--expert", str(expert), "--amateur", str(amateur), "--prompts", prompts,
                     "--out", str(tmp_path / "x"), "--chat-template-kwargs", bad])
        assert code == 2 and not (tmp_path / "x").exists()
    assert loads == []
