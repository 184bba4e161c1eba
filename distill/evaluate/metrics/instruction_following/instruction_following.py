"""Instruction following on verifiable constraints, as a local `evaluate` module.

    import evaluate, json
    m = evaluate.load("<distill>/evaluate/metrics/instruction_following")
    m.compute(predictions=["a response"], references=[json.dumps([{"kind": ..., "kwargs": {...}}])])

References are JSON strings (a list of {"kind", "kwargs"}), because constraint kwargs differ by
kind and `datasets` features need one fixed schema. Checkers: `distill.evaluate.checkers`.
"""

import json

import datasets
import evaluate

from distill.evaluate.metrics import instruction_following

_DESCRIPTION = "IFEval-style strict/loose, prompt-/instruction-level accuracy on distill's constraints."
_KWARGS = "predictions: list of responses; references: list of JSON lists of {kind, kwargs} constraints."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class InstructionFollowing(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        from distill.evaluate.checkers import check_loose, check_strict

        rows = [{"constraints": json.loads(r)} for r in references]
        return instruction_following(predictions, rows, check_strict, check_loose)
