"""extract_responses: greedy responses of the instruction-finetuned model for the test
split (:func:`gpt.recipes.extract.extract_responses`); ``responses`` rows and the
reference's JSON export. Its outputs say how decoding went (drafted and accepted tokens)
and, with int8 weights, what they cost against fp32 (also in the stage's message)."""

from __future__ import annotations

from typing import Any

from gpt.args import ExtractArgs
from tasks.stages.contract import StageOut, StageOutput, StageRun, logger, measured
from tasks.stages.runner import stage


class ExtractOut(StageOut):
    """The responses, as a JSON export (instruction, input, output, model_response)."""

    responses_json: str
    n: int
    new_tokens: int
    generation_s: float = measured()
    weights: str = "fp32"
    """The weights the responses were decoded with (``fp32`` or the opt-in ``int8``)."""
    decoding: dict[str, Any] = measured(default_factory=dict)
    """Decoding passes, drafted and accepted tokens, acceptance rate (how decoding went,
    not what it produced: the responses are the same either way)."""
    int8_cost: dict[str, Any] | None = None
    """With int8 weights: the share of greedy tokens identical to fp32 on a sample and the
    change of the judge's mean score there (or why it was not measured)."""


@stage("extract_responses")
def extract(
    run: StageRun, args: ExtractArgs, tokenize: StageOutput, finetune_instruct: StageOutput
) -> ExtractOut:
    from gpt.recipes.extract import export_responses_json, extract_responses
    from gpt.recipes.prepare import load_instruct_splits

    test = load_instruct_splits(tokenize.path(tokenize.out.instruct_splits))["test"]
    result = extract_responses(
        finetune_instruct.path(finetune_instruct.out.checkpoint),
        test,
        args,
        device=run.device,
        progress=run.progress,
        judge=run.ctx.judge,
    )
    rows = result.rows
    run.add_rows("responses", rows)
    rel = "responses.json"
    export_responses_json(rows, run.work / rel)
    cost = result.int8_cost
    if cost is not None:
        run.notes.append(cost.summary())
        logger().info("extract_responses: %s", cost.summary())
    return ExtractOut(
        responses_json=rel,
        n=len(rows),
        new_tokens=sum(r["new_tokens"] for r in rows),
        generation_s=round(sum(r["seconds"] for r in rows), 3),
        weights=args.weights,
        decoding=result.decoding,
        int8_cost=cost.to_dict() if cost is not None else None,
    )
