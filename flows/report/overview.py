"""The report's sections about the run itself: what ran and how (summary, gates,
stages), on what data, what it stored (checkpoints) and with which settings (config).
A section is a function ``(ReportData) -> list[Block]``; an empty list leaves it out."""

from __future__ import annotations

import json

from flows.report import fmt
from flows.report.blocks import (
    Block,
    Bullets,
    Code,
    Heading,
    Para,
    Table,
    bold,
    code,
    join,
    text,
    with_code_spans,
)
from flows.report.data import ReportData, run_ref
from tasks.catalog.rundata import split_key


def summary(d: ReportData) -> list[Block]:
    """Profile, base model, status, timing, code revision and where the inputs came from."""
    r, cfg = d.run, d.config
    took = None
    if not fmt.is_missing(r.get("ended_at")) and not fmt.is_missing(r.get("started_at")):
        took = (r["ended_at"] - r["started_at"]).total_seconds()
    base = (cfg.get("load_gpt2") or {}).get("base_model")
    items = [
        join("profile ", bold(str(r.get("profile") or fmt.MISSING)))
        + (join(", finetuning base ", bold(str(base))) if base else ()),
        join(
            "status ",
            bold(str(r.get("status") or fmt.MISSING)),
            f", started {fmt.timestamp(r.get('started_at'))}",
            f", took {fmt.duration(took)}" if took is not None else "",
        ),
    ]
    if r.get("git_rev"):
        items.append(join("code ", code(str(r["git_rev"]))))
    mirror = (cfg.get("download") or {}).get("mirror")
    items.append(
        join("inputs from the mirror ", code(str(mirror)))
        if mirror
        else text("inputs from the web")
    )
    return [Bullets(tuple(items))]


def stages_section(d: ReportData) -> list[Block]:
    """Each stage's status and time; where a cached result came from; why a stage was
    skipped or failed."""
    if d.stages.empty:
        return []
    rows, notes = [], []
    for s in d.stages.to_dict("records"):
        status = str(s["status"])
        producer = str(d.outputs(s["stage"]).get("producer_run_id") or d.run_id)
        if s.get("cache_hit") and producer != d.run_id:
            note = join("reused from run ", run_ref(producer))
        elif s.get("cache_hit"):
            note = text("nothing new to do")
        elif status in ("skipped", "failed"):
            note = text("see below")
        else:
            note = text("")
        rows.append((s["stage"], status, fmt.duration(s.get("seconds")), note))
        if status in ("skipped", "failed") and not fmt.is_missing(s.get("message")):
            notes.append(
                Para(join(bold(f"{s['stage']} {status}:"), " ", with_code_spans(str(s["message"]))))
            )
    return [
        Heading("Stages"),
        Table(("stage", "status", "time", "note"), tuple(rows), "llrl"),
        *notes,
    ]


def data_section(d: ReportData) -> list[Block]:
    """Sizes of the pretraining corpus and of the spam and instruction splits."""
    out = d.outputs("tokenize")
    rows = []
    for c in sorted(out.get("corpus") or [], key=lambda c: split_key(c.get("split", ""))):
        rows.append(
            (
                "pretraining text",
                c.get("split", ""),
                f"{fmt.plural(c.get('chars'), 'character')}, "
                f"{fmt.plural(c.get('tokens'), 'token')}, {fmt.plural(c.get('windows'), 'window')}",
            )
        )
    for key, what in (("spam_counts", "spam messages"), ("instruct_counts", "instructions")):
        for split, n in sorted((out.get(key) or {}).items(), key=lambda kv: split_key(kv[0])):
            rows.append((what, split, fmt.count(n)))
    if not rows:
        return []
    return [Heading("Data"), Table(("data", "split", "size"), tuple(rows))]


def gates_section(d: ReportData) -> list[Block]:
    """Regression gates of this run (the ``gates`` table)."""
    if "gates" not in d.relations:
        return []
    from tasks.records.gate_results import GATES_QUERY

    df = d.cat.query_df(GATES_QUERY, [d.run_id])
    if df.empty:
        return [Heading("Gates"), Para(text("No gates were evaluated for this run."))]
    rows = []
    for r in df.to_dict("records"):
        passed = r.get("passed")
        verdict = fmt.MISSING if fmt.is_missing(passed) else ("passed" if passed else "FAILED")
        if r.get("verdict") == "not enough data":  # passed, on too few examples
            verdict = "not enough data"
        ref = r.get("compared_to_run")
        scope = r.get("scope")
        gate = str(r.get("gate")) + (f" ({scope})" if not fmt.is_missing(scope) else "")
        rows.append(
            (
                gate,
                join(bold(verdict)) if verdict == "FAILED" else verdict,
                fmt.number(r.get("value")),
                fmt.number(r.get("threshold")),
                run_ref(str(ref)) if not fmt.is_missing(ref) else fmt.MISSING,
                with_code_spans(str(r["message"])) if not fmt.is_missing(r.get("message")) else "",
            )
        )
    n_failed = sum(1 for r in rows if r[1] not in ("passed", "not enough data", fmt.MISSING))
    thin = sum(1 for r in rows if r[1] == "not enough data")
    head = f"{len(rows) - n_failed} of {len(rows)} gates passed." + (
        f" {thin} of them on too few examples for a verdict (not enough data)." if thin else ""
    )
    return [
        Heading("Gates"),
        Para(text(head)),
        Table(("gate", "result", "value", "threshold", "compared to", "message"), tuple(rows)),
    ]


def checkpoints_section(d: ReportData) -> list[Block]:
    """The checkpoint folders the run's stages stored, with sizes and digests."""
    rows = []
    for stage in ("pretrain", "load_gpt2", "finetune_spam", "finetune_instruct"):
        if d.stage(stage) is None:
            continue
        df = d.cat.query_df(
            "SELECT path, any_value(bytes) AS bytes, any_value(sha256) AS sha256 "
            "FROM checkpoints WHERE run_id = ? AND stage = ? GROUP BY path ORDER BY path",
            [d.of(stage), stage],
        )
        for r in df.to_dict("records"):
            sha = r.get("sha256")
            rows.append(
                (
                    stage,
                    code(str(r["path"])),
                    fmt.size(r.get("bytes")),
                    code(str(sha)[:12]) if not fmt.is_missing(sha) else fmt.MISSING,
                )
            )
    if not rows:
        return []
    return [
        Heading("Checkpoints"),
        Para(
            text(
                "Checkpoint folders (safetensors + config + manifest) on the machine that ran "
                "the stages; they are files there, not web links. Load one with "
            )
            + code("gptflow generate --checkpoint FOLDER")
            + text(" or ")
            + code("gptflow classify --checkpoint FOLDER")
            + text(".")
        ),
        Table(("stage", "folder", "size", "sha256"), tuple(rows), "llrl"),
    ]


def config_section(d: ReportData) -> list[Block]:
    """The run's whole config as JSON."""
    if not d.config:
        return []
    return [Heading("Config"), Code(json.dumps(d.config, indent=1, sort_keys=False), "json")]


__all__ = [
    "checkpoints_section",
    "config_section",
    "data_section",
    "gates_section",
    "stages_section",
    "summary",
]
