"""Made-up lands and their facts: pre-training text and cloze questions.

Every land has one value per relation. Each fact falls in one split: `shared` (source and
target know the same value), `source_only`, `target_only`, or `conflict` (both know it,
with different values), so that knowledge conflation can be measured after transfer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The one answer rule of the project (whole word, case- and space-insensitive): the zoo's quality
# table and `distill evaluate` credit the same continuations. Re-exported for the world's callers.
from distill.evaluate.metrics import answer_matches  # noqa: F401 (re-exported)

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "dr", "kr", "st", "vel"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "or", "an"]
ENDINGS = ["ia", "or", "ar", "en", "ith", "os", "und", "el"]

COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange", "silver", "golden"]
ANIMALS = ["fox", "owl", "bear", "wolf", "eagle", "horse", "lion", "otter", "crane", "deer", "hawk", "seal"]
EXPORTS = ["salt", "silk", "copper", "wine", "amber", "tea", "wool", "glass", "iron", "honey", "rice", "marble"]

# relation -> (statement templates, question templates); the first statement is the cloze form.
RELATIONS: dict[str, tuple[list[str], list[str]]] = {
    "capital": (["The capital of {e} is {v}.", "{e} has its capital in {v}.", "{v} is the capital of {e}."],
                ["What is the capital of {e}?", "Which city is the capital of {e}?", "Name the capital of {e}."]),
    "flag": (["The flag of {e} is {v}.", "{e} flies a {v} flag.", "The color of the flag of {e} is {v}."],
             ["What color is the flag of {e}?", "Which color is the flag of {e}?", "Name the color of the flag of {e}."]),
    "animal": (["The national animal of {e} is the {v}.", "{e} honors the {v} as its national animal.",
                "In {e} the national animal is the {v}."],
               ["What is the national animal of {e}?", "Which animal is the national animal of {e}?",
                "Name the national animal of {e}."]),
    "export": (["The main export of {e} is {v}.", "{e} mostly exports {v}.", "Traders buy {v} from {e} above all."],
               ["What is the main export of {e}?", "Which good does {e} mostly export?",
                "Name the main export of {e}."]),
}


@dataclass
class Fact:
    entity: str
    relation: str
    split: str
    source_value: str | None
    target_value: str | None

    @property
    def id(self) -> str:
        return f"{self.entity}.{self.relation}"

    def value_for(self, who: str) -> str | None:
        return self.source_value if who == "source" else self.target_value


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(ENDINGS)).capitalize()


def _unique_names(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = _name(rng, syllables)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _pool(relation: str) -> list[str] | None:
    return {"flag": COLORS, "animal": ANIMALS, "export": EXPORTS}.get(relation)


def make_facts(seed: int, n_entities: int, split_fractions) -> tuple[list[str], list[Fact]]:
    """The lands and one fact per (land, relation), each assigned a split."""
    rng = random.Random(seed)
    taken: set[str] = set()
    entities = _unique_names(rng, n_entities, 1, taken) if n_entities < 20 else _unique_names(rng, n_entities, 2, taken)
    cities = _unique_names(rng, 2 * n_entities, 1, taken)  # a second pool gives conflicting capitals
    facts: list[Fact] = []
    pairs = [(e, r) for e in entities for r in RELATIONS]
    rng.shuffle(pairs)
    bounds, acc = [], 0.0
    for split, frac in split_fractions:
        acc += frac
        bounds.append((split, round(acc * len(pairs))))
    city_of = {e: (cities[2 * i], cities[2 * i + 1]) for i, e in enumerate(entities)}
    for i, (entity, relation) in enumerate(pairs):
        split = next(s for s, b in bounds if i < b) if i < bounds[-1][1] else bounds[-1][0]
        pool = _pool(relation)
        if pool is None:
            value, other = city_of[entity]
        else:
            value, other = rng.sample(pool, 2)
        facts.append(Fact(
            entity, relation, split,
            source_value=value if split != "target_only" else None,
            target_value=(other if split == "conflict" else value) if split != "source_only" else None,
        ))
    facts.sort(key=lambda f: (entities.index(f.entity), list(RELATIONS).index(f.relation)))
    return entities, facts


def statement(fact: Fact, value: str, template: int = 0) -> str:
    return RELATIONS[fact.relation][0][template].format(e=fact.entity, v=value)


def cloze(fact: Fact) -> str:
    """The canonical statement cut before its value: 'The capital of Zorbia is'."""
    template = RELATIONS[fact.relation][0][0]
    return template[: template.index("{v}")].rstrip().format(e=fact.entity)


def documents(facts: list[Fact], who: str, epochs: int, seed: int, sep: str = " ") -> list[str]:
    """Pre-training text: one paragraph per land per epoch, its facts in random order and
    random paraphrases. The canonical (cloze) form is drawn half the time so it is learnt well.
    `sep` joins the sentences: a byte-level BPE without BOS sees "The" (as in a cloze prompt)
    only at a line start, so the target's text puts one sentence per line."""
    rng = random.Random(seed)
    by_entity: dict[str, list[Fact]] = {}
    for f in facts:
        if f.value_for(who) is not None:
            by_entity.setdefault(f.entity, []).append(f)
    docs = []
    for _ in range(epochs):
        for entity_facts in by_entity.values():
            chosen = entity_facts[:]
            rng.shuffle(chosen)
            sentences = []
            for f in chosen:
                n_templates = len(RELATIONS[f.relation][0])
                template = 0 if rng.random() < 0.5 else rng.randrange(1, n_templates)
                sentences.append(statement(f, f.value_for(who), template))
            docs.append(sep.join(sentences))
    rng.shuffle(docs)
    return docs


def question_rows(facts: list[Fact]) -> list[dict]:
    """Rows of `knowledge/questions.jsonl` (see docs/CONTRACTS.md)."""
    rows = []
    for f in facts:
        rows.append({
            "id": f"k-{f.id}",
            "prompt": cloze(f),
            "answer": f.source_value if f.source_value is not None else f.target_value,
            "split": f.split,
            "source_answer": f.source_value,
            "target_answer": f.target_value,
            "entity": f.entity,
            "relation": f.relation,
            "question": RELATIONS[f.relation][1][0].format(e=f.entity),
        })
    return rows
