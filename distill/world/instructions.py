"""Instructions (a task about the world plus 1-2 constraints) and the rule-based oracle that
answers them: the oracle's responses are the post-training data of `source-post`.

Three disjoint sets are drawn from disjoint groups of lands: `sft` (with oracle responses),
`synthesis` (what CoDIT answers) and `eval` (held out for measurement).
"""

from __future__ import annotations

import json
import random

from distill.evaluate.checkers import CONSTRAINTS, check_strict, compatible
from distill.world.knowledge import RELATIONS, Fact, statement

OPEN_TASKS = ["Tell me about {e}.", "Describe {e}.", "Write a short note about {e}."]
TERSE = {"capital": "{e} capital: {v}.", "flag": "{e} flag color: {v}.", "animal": "{e} national animal: {v}.",
         "export": "{e} main export: {v}."}
FILLERS = ["Many travelers visit {e} every year.", "People in {e} are proud of their land.",
           "I hope this helps you learn more about {e}.", "Stories about {e} are told by old sailors.",
           "Maps show {e} near the western sea.", "Music and dance fill the streets of {e} in spring.",
           "Visitors say that {e} is calm and friendly.", "Children in {e} learn these facts at school."]
PLACEHOLDERS = {1: "Write to [address] for more.", 2: "Write to [address] on [date] for more."}


def make_task(rng: random.Random, entity: str, facts: list[Fact], open_fraction: float) -> dict:
    """A question about one fact of `entity`, or (sometimes) an open task about it."""
    if rng.random() < open_fraction:
        return {"task": rng.choice(OPEN_TASKS).format(e=entity), "task_type": "open", "entity": entity,
                "relation": None}
    fact = rng.choice(facts)
    template = rng.choice(RELATIONS[fact.relation][1])
    return {"task": template.format(e=entity), "task_type": "question", "entity": entity,
            "relation": fact.relation}


def sample_constraints(rng: random.Random, task: str, two_fraction: float) -> list[dict]:
    kinds = sorted(CONSTRAINTS)
    chosen = [rng.choice(kinds)]
    if rng.random() < two_fraction:
        options = [k for k in kinds if compatible(chosen + [k])]
        if options:
            chosen.append(rng.choice(options))
    return [{"kind": k, "kwargs": CONSTRAINTS[k].sample_kwargs(rng, task=task)} for k in chosen]


def instruction_text(task: str, constraints: list[dict]) -> str:
    return " ".join([task] + [CONSTRAINTS[c["kind"]].describe(c["kwargs"]) for c in constraints])


def _fill(sentences: list[str], n: int, entity: str) -> list[str]:
    """Pad with filler sentences (in a fixed order, so the pattern is learnable) up to n."""
    out = list(sentences)
    i = 0
    while len(out) < n:
        out.append(FILLERS[i % len(FILLERS)].format(e=entity))
        i += 1
    return out


def oracle_response(task: dict, facts: list[Fact], constraints: list[dict], who: str = "source") -> str:
    """The response a perfect assistant gives: it states `who`'s facts (the source's, for the
    SFT data) and follows every constraint. `facts` are the facts of the task's land `who` knows."""
    kinds = {c["kind"]: c["kwargs"] for c in constraints}
    entity = task["entity"]
    relevant = [f for f in facts if task["relation"] in (None, f.relation)]
    if "forbidden_words" in kinds:
        sentences = [TERSE[f.relation].format(e=entity, v=f.value_for(who)) for f in relevant]
    else:
        sentences = [statement(f, f.value_for(who)) for f in relevant]
    if "keyword_existence" in kinds:
        a, b = kinds["keyword_existence"]["keywords"]
        sentences.append(f"It has the keywords {a} and {b}.")  # the instruction's own words: easy to copy
    nw = kinds.get("number_words")
    if nw and nw["relation"] == "less than":
        sentences = sentences[:1]
    elif nw:
        while len(" ".join(sentences).split()) < nw["num_words"]:
            sentences = _fill(sentences, len(sentences) + 1, entity)
    if "number_bullets" in kinds:
        n = kinds["number_bullets"]["num_bullets"]
        items = _fill(sentences, n, entity)
        items = items[: n - 1] + [" ".join(items[n - 1:])]
        text = "\n".join(f"* {s}" for s in items)
    elif "number_paragraphs" in kinds:
        n = kinds["number_paragraphs"]["num_paragraphs"]
        paras = _fill(sentences, n, entity)
        paras = paras[: n - 1] + [" ".join(paras[n - 1:])]
        text = "\n***\n".join(paras)
    elif "highlighted_sections" in kinds:
        n = kinds["highlighted_sections"]["num_highlights"]
        items = _fill(sentences, n, entity)
        text = " ".join(f"*{s}*" if i < n else s for i, s in enumerate(items))
    elif "two_responses" in kinds:
        second = [statement(f, f.value_for(who), 1) for f in relevant] or _fill([], 1, entity)
        text = " ".join(sentences) + "\n******\n" + " ".join(second)
    else:
        text = " ".join(sentences)
    if "number_placeholders" in kinds:
        text += " " + PLACEHOLDERS[kinds["number_placeholders"]["num_placeholders"]]
    if "title" in kinds:
        text = f"<<About {entity}>>\n{text}"
    if "postscript" in kinds:
        text += f"\n\n{kinds['postscript']['postscript_marker']} I hope you visit {entity} one day."
    if "start_checker" in kinds:
        text = f"{kinds['start_checker']['start_phrase']} {text}"
    if "end_checker" in kinds:
        text = f"{text} {kinds['end_checker']['end_phrase']}"
    if "quotation" in kinds:
        text = f'"{text}"'
    if "repeat_prompt" in kinds:
        text = f"{kinds['repeat_prompt']['prompt_to_repeat']}\n{text}"
    if "json_format" in kinds:
        text = json.dumps({"answer": text})
    if "lowercase" in kinds:
        text = text.lower()
    if "uppercase" in kinds:
        text = text.upper()
    return text


def make_sets(facts: list[Fact], entities: list[str], cfg, seed: int) -> dict[str, list[dict]]:
    """The three disjoint instruction sets. Lands are partitioned 60/20/20 so that eval and
    synthesis ask about lands the SFT data never mentions.

    A fourth set, `formats` (cfg.n_format_docs rows about the SFT lands, other instructions than
    the SFT set's), is drawn last, so the three are the same with or without it: its responses,
    without their instructions, are pre-training text (`format_documents`)."""
    rng = random.Random(seed)
    lands = entities[:]
    rng.shuffle(lands)
    a, b = round(0.6 * len(lands)), round(0.8 * len(lands))
    groups = {"sft": lands[:a], "synthesis": lands[a:b], "eval": lands[b:]}
    groups["formats"] = groups["sft"]
    sizes = {"sft": cfg.n_sft, "synthesis": cfg.n_synthesis, "eval": cfg.n_eval, "formats": cfg.n_format_docs}
    by_entity: dict[str, list[Fact]] = {}
    for f in facts:
        by_entity.setdefault(f.entity, []).append(f)
    sets: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for name, group in groups.items():
        rows, attempts = [], 0
        while len(rows) < sizes[name] and attempts < 50 * sizes[name]:
            attempts += 1
            entity = rng.choice(group)
            known = [f for f in by_entity[entity] if f.source_value is not None]
            # SFT needs an oracle answer, so it only asks about what the source knows.
            pool = known if name in ("sft", "formats") else by_entity[entity]
            if not pool:
                continue
            task = make_task(rng, entity, pool, cfg.open_task_fraction)
            constraints = sample_constraints(rng, task["task"], cfg.two_constraint_fraction)
            instruction = instruction_text(task["task"], constraints)
            if instruction in seen:
                continue
            row = {"id": f"{name}-{len(rows):05d}", "instruction": instruction, "constraints": constraints, **task}
            response = oracle_response(task, [f for f in known if task["relation"] in (None, f.relation)],
                                       constraints) if known else ""
            if name in ("sft", "formats"):
                if not all(check_strict(constraints, response)):
                    continue  # a combination the oracle cannot satisfy: draw another
                row["response"] = response
            seen.add(instruction)
            rows.append(row)
        sets[name] = rows
    return sets


def format_documents(rows: list[dict], facts: list[Fact], who: str, qa_fraction: float = 0.0) -> list[str]:
    """Pre-training text in the response formats (lists, sections, JSON, cases, ...): the
    oracle's answers to the `formats` instructions, stating `who`'s facts. Most stand alone; the
    first `qa_fraction` of them follow their instruction as a plain-text "Question: ... Answer:"
    page, as instructions appear in web text. A base model that has read such text knows the
    formats and has seen them asked for, but not in a chat, as a real base model has; post-training
    then teaches the chat and the habit, a small step."""
    by_entity: dict[str, list[Fact]] = {}
    for f in facts:
        if f.value_for(who) is not None:
            by_entity.setdefault(f.entity, []).append(f)
    docs = []
    for i, row in enumerate(rows):
        known = [f for f in by_entity.get(row["entity"], []) if row["relation"] in (None, f.relation)]
        if known:
            text = oracle_response(row, known, row["constraints"], who)
            docs.append(f"Question: {row['instruction']}\nAnswer: {text}" if i < qa_fraction * len(rows) else text)
    return docs
