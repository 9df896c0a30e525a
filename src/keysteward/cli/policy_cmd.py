"""keysteward policy|approvals: the tenant's Cedar policy set, dry runs, and quorum approvals of releases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, table
from keysteward.errors import BadRequest

policy_app = typer.Typer(help="The tenant's Cedar policy set: who gets which key.", no_args_is_help=True)
approvals_app = typer.Typer(help="Releases waiting for security officers: list, approve, deny.", no_args_is_help=True)
MAX_FILE = 256 * 1024


def _sources(files: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in files:
        if path.is_dir():
            for found in sorted(path.glob("*.cedar")):
                out[found.name] = _read(found)
        else:
            out[path.name] = _read(path)
    if not out:
        raise BadRequest("no .cedar files given", code="policy_files")
    return out


def _read(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_FILE:
            raise BadRequest(f"{path} is over {MAX_FILE} bytes", code="policy_files")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}", code="policy_files") from exc


def _show_decision(d: dict[str, Any]) -> None:
    console.print(f"decision: {d['effect']} ({d['reason']})")
    if d.get("policy_version") is not None:
        console.print(f"policy set version: {d['policy_version']}")
    console.print("decided by: " + (", ".join(d["policies"]) or "no policy (default deny)"))
    if d.get("approval"):
        groups = ", ".join(f"{g['quorum']} of {g['group']}" for g in d["approval"]["groups"])
        console.print(f"needs approval by: {groups}")
    for error in d.get("errors") or []:
        console.print(f"error: {error}")


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help=".cedar files, or directories of them: the whole new set.")],
    as_json: JsonFlag = False,
) -> None:
    """Replace the tenant's policy set (a set that does not compile changes nothing)."""
    emit(
        client(ctx).request("PUT", "/policy", json={"sources": _sources(files)}),
        as_json,
        lambda d: console.print(f"policy set version {d['version']} in force: {', '.join(d['policies'])}"),
    )


@policy_app.command("show")
def policy_show(
    ctx: typer.Context,
    version: Annotated[int | None, typer.Option(help="An earlier version (default: the one in force).")] = None,
    as_json: JsonFlag = False,
) -> None:
    path = "/policy" if version is None else f"/policy/versions/{version}"

    def human(d: dict[str, Any]) -> None:
        console.print(f"# version {d['version']} by {d['created_by']} ({d['digest'][:16]})")
        for name, text in sorted(d["sources"].items()):
            console.print(f"# --- {name}", markup=False)
            console.print(text, markup=False, highlight=False)

    emit(client(ctx).get(path), as_json, human)


@policy_app.command("history")
def policy_history(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(
        client(ctx).get("/policy/versions"),
        as_json,
        lambda rows: table(rows, ["version", "created_by", "created_at", "digest"]),
    )


@policy_app.command("test")
def policy_test(
    ctx: typer.Context,
    request: Annotated[
        Path, typer.Option(help="A request (JSON), or an audit record of a decision (its recorded request is used).")
    ],
    proposed: Annotated[
        list[Path] | None, typer.Option(help="Evaluate this proposed set instead of the one in force.")
    ] = None,
    version: Annotated[int | None, typer.Option(help="Evaluate an earlier version.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Dry run: the decision for a recorded or hand-written request, and the policies that made it."""
    try:
        data = json.loads(request.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read the request {request}: {exc}", code="policy_request_file") from exc
    data = _recorded_request(data)
    body: dict[str, Any] = {"request": data}
    if proposed:
        body["sources"] = _sources(proposed)
    if version is not None:
        body["version"] = version
    emit(client(ctx).post("/policy/test", body), as_json, _show_decision)


def _recorded_request(data: Any) -> Any:
    """An audit record (``details.request`` holds the decision's request as JSON text) or a request."""
    if isinstance(data, dict) and isinstance(data.get("body"), str):
        data = json.loads(data["body"])
    if isinstance(data, dict) and isinstance(data.get("details"), dict) and "request" in data["details"]:
        recorded = data["details"]["request"]
        return json.loads(recorded) if isinstance(recorded, str) else recorded
    return data


@approvals_app.command("list")
def approvals_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="pending, approved, denied, expired or used.")] = "pending",
    as_json: JsonFlag = False,
) -> None:
    def human(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            r["needs"] = ", ".join(f"{g['quorum']} {g['group']}" for g in r["groups"])
            r["approved_by"] = ", ".join(
                v.get("person") or v["approver"] for v in r["votes"] if v["decision"] == "approve"
            )
            r["asked_by"] = r.get("requested_by") or ""
        table(rows, ["id", "state", "requester", "asked_by", "volume_id", "needs", "approved_by", "expires_at"])

    emit(client(ctx).get("/approvals", params={"state": state} if state else None), as_json, human)


def _vote(ctx: typer.Context, verb: str, request_id: str, reason: str, as_json: bool) -> None:
    emit(
        client(ctx).post(f"/approvals/{request_id}/{verb}", {"reason": reason}),
        as_json,
        lambda d: console.print(f"request {d['id']}: {d['state']}"),
    )


@approvals_app.command("approve")
def approvals_approve(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request's id (approvals list).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    as_json: JsonFlag = False,
) -> None:
    _vote(ctx, "approve", request_id, reason, as_json)


@approvals_app.command("deny")
def approvals_deny(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request's id (approvals list).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    as_json: JsonFlag = False,
) -> None:
    _vote(ctx, "deny", request_id, reason, as_json)
