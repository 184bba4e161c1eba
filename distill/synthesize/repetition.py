"""Which synthesized responses are repetitive: two rules behind one interface, chosen by name.

    rule = repetition_rule("public")                     # the default
    rule = repetition_rule("ngram", ngram=20, threshold=0.3)
    verdict = rule(text)  # RepetitionVerdict(rule, score, repetitive, measures)

`public` is the rule of the public CoDIT code (github.com/Tatsuya736482/contrastive_decoding_public,
`src/repetition_detector.py`, `check_repetition` -> `duplicate_fraction` + `apply_v2`), reproduced
exactly (see `public_measures` for the definitions). `ngram` is distill's own earlier rule
(`repetition_fraction`): the share of characters inside a character n-gram seen before.

What the public code does with its flag: `src/annotation.py` (the LLM-as-a-judge scoring used for
its Best-of-N baseline) writes `repetition_flag = check_repetition(response)` next to each judge
score, and nothing in that repository reads it back: no script drops flagged rows, and the
repository ships no training code. So it sets no train-time policy; ours is `distill train
--repetitive drop|keep` (`distill.train.data`).

Each verdict has one number, `score`, written into a row as `repetition`:
- public: the largest ratio of a measured value to its threshold, max(f2 / 0.16, f3 / 0.18,
  f4 / 0.20, c100 / 10), so 1.0 is the flag line whichever branch is nearest to it; 0.0 for texts
  the rule does not judge (under 100 characters after stripping). It is floored (not rounded) to 4
  decimals, so `repetitive == (score >= 1)` holds exactly for a judged text.
- ngram: the repeated-character fraction itself, rounded to 4 decimals (as rows always had it);
  flagged when above `threshold`.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from distill import DistillError
# The public rule's constants, from src/repetition_detector.py of the public CoDIT code:
PUBLIC_MIN_CHARS = 100  # check_repetition: `if len(text.strip()) < 100: return False`
PUBLIC_TOP_NGRAM_FRACTION = {2: 0.16, 3: 0.18, 4: 0.20}  # apply_v2: top_{n}gram_character_fraction >= ...
PUBLIC_LONG_NGRAM = 100  # duplicate_fraction: "top_100gram_character_frequency"
PUBLIC_LONG_NGRAM_REPEATS = 10  # apply_v2: top_100gram_character_frequency >= 10

RULES = ("public", "ngram")
DEFAULT_RULE = "public"


@dataclass(frozen=True)
class RepetitionVerdict:
    rule: str  # "public" | "ngram"
    score: float  # the row's `repetition` (see the module docstring for its meaning per rule)
    repetitive: bool
    measures: dict = field(default_factory=dict)  # the values the rule compared with its thresholds
    reasons: tuple = ()  # the measures that crossed their threshold (empty when not flagged)


# ---------------------------------------------------------------------------------------------
# The public CoDIT rule
# ---------------------------------------------------------------------------------------------

def _char_ngrams(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(len(text) - n + 1)]  # the public `ngram(s, n)`


def public_measures(text: str) -> dict:
    """The public `duplicate_fraction(text)`, same keys and values.

    - `top_{n}gram_character_fraction` (n = 2, 3, 4): over all OVERLAPPING character n-grams of
      the text as given (whitespace and newlines are characters like any other; nothing is
      stripped, lowercased or normalised), the count of the most frequent one divided by the number
      of n-grams, len(text) - n + 1. It is a share of n-gram positions, not count * n / len(text)
      (which would count overlapping occurrences' characters twice). 0.0 when the text is shorter
      than n.
    - `top_100gram_character_frequency`: how many times the most frequent overlapping character
      100-gram occurs (a count, not a fraction; characters, not words); 0 for texts under 100.
    """
    r = {}
    for n in PUBLIC_TOP_NGRAM_FRACTION:
        grams = _char_ngrams(text, n)
        top = collections.Counter(grams).most_common(1)[0][1] if grams else 0
        r[f"top_{n}gram_character_fraction"] = top / len(grams) if grams else 0.0
    grams = _char_ngrams(text, PUBLIC_LONG_NGRAM)
    r[f"top_{PUBLIC_LONG_NGRAM}gram_character_frequency"] = (
        collections.Counter(grams).most_common(1)[0][1] if grams else 0)
    return r


def public_violations(measures: dict) -> list[str]:
    """The public `apply_v2` as the list of measures at or over their threshold (`>=`).

    Of the three share branches only the 2-gram one can decide a text of 100+ characters: every
    occurrence of a 3-gram (4-gram) starts an occurrence of its first 2-gram (3-gram), so
    f3 <= f2 * (L - 1) / (L - 2), and f3 >= 0.18 with f2 < 0.16 would need L < 10. The 3- and
    4-gram branches are kept anyway, as the public code has them.
    """
    out = [f"top_{n}gram_character_fraction" for n, t in PUBLIC_TOP_NGRAM_FRACTION.items()
           if measures[f"top_{n}gram_character_fraction"] >= t]
    key = f"top_{PUBLIC_LONG_NGRAM}gram_character_frequency"
    if measures[key] >= PUBLIC_LONG_NGRAM_REPEATS:
        out.append(key)
    return out


def public_repetition(text: str) -> RepetitionVerdict:
    """The public `check_repetition(text)` as a verdict.

    Not judged (never flagged, score 0.0) when `len(text.strip()) < 100`; the length test strips
    the text, the measures (`public_measures`) do not, exactly as in the public code. Otherwise
    flagged when any of: top 2-gram fraction >= 0.16, top 3-gram fraction >= 0.18, top 4-gram
    fraction >= 0.20, top 100-gram count >= 10 (`>=`, as `apply_v2`). The flag comes from these
    comparisons themselves, not from the score.

    No deliberate deviation from the public code. The one difference is upstream of the rule: the
    public code checks the response text its vLLM run wrote, distill the decoded response with
    special tokens skipped and outer whitespace stripped (`distill.synthesize.run`); since the length
    test strips anyway, that changes only the n-gram counts of leading/trailing whitespace.
    """
    m = public_measures(text)
    if len(text.strip()) < PUBLIC_MIN_CHARS:
        return RepetitionVerdict("public", 0.0, False, m)
    reasons = public_violations(m)
    ratios = [m[f"top_{n}gram_character_fraction"] / t for n, t in PUBLIC_TOP_NGRAM_FRACTION.items()]
    ratios.append(m[f"top_{PUBLIC_LONG_NGRAM}gram_character_frequency"] / PUBLIC_LONG_NGRAM_REPEATS)
    score = math.floor(max(ratios) * 1e4 + 1e-6) / 1e4  # (+1e-6: 0.29 * 1e4 is 2899.9999999999995)
    # x >= t gives x / t >= 1 in floating point too; a value a hair below t could still divide to 1.0
    score = max(score, 1.0) if reasons else min(score, 0.9999)
    return RepetitionVerdict("public", score, bool(reasons), m, tuple(reasons))


# ---------------------------------------------------------------------------------------------
# Ours: repeated-character fraction
# ---------------------------------------------------------------------------------------------

def repetition_fraction(text: str, n: int = 20) -> float:
    """Fraction of characters covered by a character n-gram that already occurred earlier.

    About 0 for ordinary prose; near 1 for a response stuck in a loop ("the the the ...").
    """
    if len(text) <= n:
        return 0.0
    seen: set[str] = set()
    covered = bytearray(len(text))
    for i in range(len(text) - n + 1):
        gram = text[i:i + n]
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(covered) / len(text)


def ngram_repetition(text: str, ngram: int = 20, threshold: float = 0.3) -> RepetitionVerdict:
    """distill's own rule: flagged when more than `threshold` of the characters repeat."""
    frac = repetition_fraction(text, ngram)
    flagged = frac > threshold
    return RepetitionVerdict("ngram", round(frac, 4), flagged, {"repeated_character_fraction": frac},
                             ("repeated_character_fraction",) if flagged else ())


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepetitionRule:
    """A rule by name; `ngram` and `threshold` are the `ngram` rule's settings (unused by `public`)."""

    name: str = DEFAULT_RULE
    ngram: int = 20
    threshold: float = 0.3

    def __post_init__(self):
        if self.name not in RULES:
            raise DistillError(f"repetition rule must be one of {', '.join(RULES)}, got {self.name!r}")
        if not 0.0 <= self.threshold <= 1.0 or self.ngram < 1:
            raise DistillError("need 0 <= repetition_threshold <= 1 and repetition_ngram >= 1")

    def __call__(self, text: str) -> RepetitionVerdict:
        if self.name == "public":
            return public_repetition(text)
        return ngram_repetition(text, self.ngram, self.threshold)

    def describe(self) -> str:
        """What a flagged row is, in one sentence for a dataset card."""
        if self.name == "public":
            fr = ", ".join(f"{n}-gram >= {t:.2f}" for n, t in PUBLIC_TOP_NGRAM_FRACTION.items())
            return (f"the public CoDIT rule (`src/repetition_detector.py` of the public code): a response of at "
                    f"least {PUBLIC_MIN_CHARS} characters whose most frequent character n-gram takes at least a "
                    f"share of all its overlapping n-grams ({fr}), or whose most frequent character "
                    f"{PUBLIC_LONG_NGRAM}-gram occurs at least {PUBLIC_LONG_NGRAM_REPEATS} times; `repetition` is "
                    f"the largest measured value / threshold (>= 1 when flagged)")
        return (f"distill's n-gram rule: more than {self.threshold:.0%} of a response's characters lie inside "
                f"a repeated {self.ngram}-character n-gram; `repetition` is that fraction")


def repetition_rule(name: str = DEFAULT_RULE, ngram: int = 20, threshold: float = 0.3) -> RepetitionRule:
    return RepetitionRule(name, ngram, threshold)


__all__ = ["RULES", "DEFAULT_RULE", "RepetitionVerdict", "RepetitionRule", "repetition_rule", "public_measures",
           "public_violations", "public_repetition", "repetition_fraction", "ngram_repetition", "PUBLIC_MIN_CHARS",
           "PUBLIC_TOP_NGRAM_FRACTION", "PUBLIC_LONG_NGRAM", "PUBLIC_LONG_NGRAM_REPEATS"]
