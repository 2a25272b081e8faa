"""extract_responses: greedy responses of the instruction-finetuned model for the test
split (:func:`gpt.recipes.extract.extract_responses`); ``responses`` rows and the
reference's JSON export."""

from __future__ import annotations

from gpt.args import ExtractArgs
from tasks.stages.contract import StageOut, StageOutput, StageRun, measured
from tasks.stages.runner import stage


class ExtractOut(StageOut):
    """The responses, as a JSON export (instruction, input, output, model_response)."""

    responses_json: str
    n: int
    new_tokens: int
    generation_s: float = measured()


@stage("extract_responses")
def extract(
    run: StageRun, args: ExtractArgs, tokenize: StageOutput, finetune_instruct: StageOutput
) -> ExtractOut:
    from gpt.recipes.extract import export_responses_json, extract_responses
    from gpt.recipes.prepare import load_instruct_splits

    test = load_instruct_splits(tokenize.path(tokenize.out.instruct_splits))["test"]
    rows = extract_responses(
        finetune_instruct.path(finetune_instruct.out.checkpoint),
        test,
        args,
        device=run.device,
        progress=run.progress,
    )
    run.add_rows("responses", rows)
    rel = "responses.json"
    export_responses_json(rows, run.work / rel)
    return ExtractOut(
        responses_json=rel,
        n=len(rows),
        new_tokens=sum(r["new_tokens"] for r in rows),
        generation_s=round(sum(r["seconds"] for r in rows), 3),
    )
