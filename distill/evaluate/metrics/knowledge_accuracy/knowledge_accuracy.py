"""Cloze knowledge accuracy per split of the world's facts, as a local `evaluate` module.

    m = evaluate.load("<distill>/evaluate/metrics/knowledge_accuracy")
    m.compute(predictions=[continuation, ...], references=[json.dumps(question_row), ...], family="target")

A question row is a line of `knowledge/questions.jsonl` (answer, split, source_answer, target_answer).
"""

import json

import datasets
import evaluate

from distill.evaluate.metrics import knowledge_accuracy

_DESCRIPTION = "Does the greedy continuation of a cloze start with the answer? Per split; conflicts by side."
_KWARGS = "predictions: continuations; references: JSON question rows; family: 'source' | 'target' | None."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class KnowledgeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, family=None):
        return knowledge_accuracy(predictions, [json.loads(r) for r in references], family)
