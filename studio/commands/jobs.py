"""``python -m studio jobs``: the training jobs of a data dir, from any process.

``jobs`` (or ``jobs list``) lists the newest jobs, ``jobs show JOB`` prints one with how it ended and
how to resume it, ``jobs cancel JOB`` stops one — queued, running here or in the web studio, or left
``running`` by a process that died. A job may be named by the first characters of its id.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from studio.config import StudioConfig

COLUMNS = ("job", "name", "status", "step", "loss", "created", "result")


def _runner(args: argparse.Namespace) -> Any:
    """A job runner on the data dir's jobs table that never trains (it only reads and cancels)."""
    from studio.jobs import JobRunner

    return JobRunner(StudioConfig(data_dir=Path(args.data_dir)), registrar=None)


def _when(value: datetime | None) -> str:
    """A stored UTC time in local time, to the minute."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value is not None else ""


def job_json(st: Any) -> dict[str, Any]:
    """One job as JSON-ready values (times in ISO 8601, UTC)."""
    return {
        "id": st.id,
        "name": st.name,
        "status": st.status,
        "phase": st.phase,
        "step": st.step,
        "total_steps": st.total,
        "loss": st.loss,
        "device": st.device,
        "model": st.model,
        "out_path": st.out_path,
        "adapter_id": st.adapter_id,
        "reason": st.reason,
        "created_at": st.created_at.isoformat() if st.created_at else None,
        "started_at": st.started_at.isoformat() if st.started_at else None,
        "finished_at": st.finished_at.isoformat() if st.finished_at else None,
    }


def result_text(st: Any) -> str:
    """What a job left: its catalog id, its file, or why it stopped."""
    if st.status == "done":
        return f"catalog {st.adapter_id}" if st.adapter_id else st.out_path
    return st.reason or ""


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns under a header; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    """Print the newest jobs, one line each (or one JSON line each)."""
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    jobs = _runner(args).jobs(limit=args.limit, status=args.status)
    if args.json:
        for st in jobs:
            print(json.dumps(job_json(st), ensure_ascii=False))
        return 0
    if not jobs:
        print("no training jobs" + (f" with status {args.status}" if args.status else ""), file=sys.stderr)
        return 0
    rows = [list(COLUMNS)]
    for st in jobs:
        loss = f"{st.loss:.4f}" if st.loss is not None else ""
        step = f"{st.step}/{st.total}"
        rows.append([st.id[:8], st.name, st.status, step, loss, _when(st.created_at), result_text(st)])
    print(table(rows))
    return 0


def _find(runner: Any, ref: str) -> str:
    try:
        return runner.find(ref)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def cmd_show(args: argparse.Namespace) -> int:
    """Print one job in full; a cancelled or failed one with the command that resumes it."""
    from studio.commands.train import resume_command

    runner = _runner(args)
    st = runner.status(_find(runner, args.job))
    if args.json:
        print(json.dumps(job_json(st), ensure_ascii=False, indent=1))
        return 0
    for key, value in job_json(st).items():
        if value not in (None, ""):
            print(f"{key}: {value}")
    if st.status in ("cancelled", "failed"):
        print(f"resume with: {resume_command(st.id, Path(args.data_dir))}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a queued job, or ask a running one (here or in another process) to stop at its next step."""
    runner = _runner(args)
    job_id = _find(runner, args.job)
    before = runner.status(job_id)
    if before.finished:
        raise ValueError(f"job {job_id[:8]} ({before.name}) is already {before.status}")
    st = runner.cancel(job_id)
    if st.status == "running":
        print(f"job {job_id[:8]} ({st.name}) will stop at its next step; its checkpoint is kept")
    else:
        print(f"job {job_id[:8]} ({st.name}) {st.status}: {st.reason}")
    return 0


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Add the ``jobs`` command and its ``list``, ``show`` and ``cancel`` actions."""
    from studio.jobs_db import STATUSES

    p = sub.add_parser(
        "jobs",
        parents=[parent],
        help="list, show or cancel training jobs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    def add_list_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--status", choices=STATUSES, help="only jobs with this status")
        q.add_argument("--limit", type=int, default=50, help="how many of the newest jobs (default 50)")
        q.add_argument("--json", action="store_true", help="one JSON object per line")

    add_list_options(p)
    p.set_defaults(func=cmd_list)
    # ``--data-dir`` after the action too, without its default undoing one given before the action
    here = argparse.ArgumentParser(add_help=False)
    here.add_argument("--data-dir", default=argparse.SUPPRESS, help="as before the action")
    lst = actions.add_parser("list", parents=[here], help="the newest jobs (the default action)")
    add_list_options(lst)
    lst.set_defaults(func=cmd_list)
    show = actions.add_parser("show", parents=[here], help="one job in full")
    show.add_argument("job", help="job id or its first characters")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    cancel = actions.add_parser("cancel", parents=[here], help="cancel a queued or running job")
    cancel.add_argument("job", help="job id or its first characters")
    cancel.set_defaults(func=cmd_cancel)
