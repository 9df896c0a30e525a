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
            out.update(split_shown(path.name, _read(path)))
    if not out:
        raise BadRequest("no .cedar files given", code="policy_files")
    return out


FILE_MARK = "// keysteward-policy-file: "
"""``policy show`` starts each file of the set with this Cedar comment; ``policy set`` splits on it again."""


def split_shown(name: str, text: str) -> dict[str, str]:
    """A file as ``policy show`` printed it (one set, its files marked) back into its files; any other file
    is itself. Lines before the first mark (the version header) are comments and dropped."""
    if FILE_MARK not in text:
        return {name: text}
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines(keepends=True):
        if line.startswith(FILE_MARK):
            marked = line[len(FILE_MARK) :].strip()
            if not marked or marked in files:
                raise BadRequest(
                    f"{name}: a file mark names no file, or one twice: {marked[:64]!r}", code="policy_files"
                )
            current = files[marked] = []
        elif current is not None:
            current.append(line)
    return {marked: "".join(lines) for marked, lines in files.items()}


def _read(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_FILE:
            raise BadRequest(f"{path} is over {MAX_FILE} bytes", code="policy_files")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}", code="policy_files") from exc


DECISION_EXIT = {"permit": 0, "deny": 2, "approval": 3}
"""``policy test`` exits 0 on permit, 2 on deny, 3 when approval is needed, 1 on an error: a CI gate."""


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
        console.print(f"// version {d['version']} by {d['created_by']} ({d['digest'][:16]})", markup=False)
        for name, text in sorted(d["sources"].items()):
            console.print(f"{FILE_MARK}{name}", markup=False, highlight=False)
            console.print(text, markup=False, highlight=False, end="" if text.endswith("\n") else "\n")

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
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="A proposed set to evaluate instead of the one in force: .cedar files or directories, "
            "as policy set takes them.",
            show_default=False,
        ),
    ] = None,
    proposed: Annotated[
        bool, typer.Option("--proposed", help="Evaluate the FILES given (policy test --proposed a.cedar b.cedar).")
    ] = False,
    version: Annotated[int | None, typer.Option(help="Evaluate an earlier version.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Dry run: the decision for a recorded or hand-written request, and the policies that made it."""
    if proposed and not files:
        raise typer.BadParameter("give the proposed set's .cedar files (or directories)", param_hint="'--proposed'")

    try:
        data = json.loads(request.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read the request {request}: {exc}", code="policy_request_file") from exc
    data = _recorded_request(data)
    body: dict[str, Any] = {"request": data}
    if files:
        body["sources"] = _sources(files)
    if version is not None:
        body["version"] = version
    decided = client(ctx).post("/policy/test", body)
    emit(decided, as_json, _show_decision)
    raise SystemExit(DECISION_EXIT.get(str(decided.get("effect")), 1))


def _recorded_request(data: Any) -> Any:
    """An audit record (``details.request`` holds the decision's request as JSON text) or a request."""
    if isinstance(data, dict) and isinstance(data.get("body"), str):
        data = json.loads(data["body"])
    if isinstance(data, dict) and isinstance(data.get("details"), dict) and "request" in data["details"]:
        recorded = data["details"]["request"]
        return json.loads(recorded) if isinstance(recorded, str) else recorded
    return data


RequestIdArg = Annotated[
    str, typer.Argument(help="The request's id (approvals list), or 8 or more of its first characters.")
]


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
            resource = (r.get("request") or {}).get("resource") or {}
            r["volume"] = resource.get("name") or r["volume_id"]
        table(rows, ["id", "state", "requester", "asked_by", "volume", "needs", "approved_by", "expires_at"])

    emit(client(ctx).get("/approvals", params={"state": state} if state else None), as_json, human)


def _vote(ctx: typer.Context, verb: str, request_id: str, reason: str, as_json: bool) -> None:
    api = client(ctx)
    full = _request_id(api, request_id)
    emit(api.post(f"/approvals/{full}/{verb}", {"reason": reason}), as_json, _show_vote)


def _show_vote(d: dict[str, Any]) -> None:
    counts = ", ".join(f"{p['approved']} of {p['quorum']} {p['group']}" for p in d.get("progress") or [])
    console.print(f"request {d['id']}: {d['state']}" + (f" ({counts})" if counts else ""), markup=False)


def _request_id(api: Any, given: str) -> str:
    """A whole request id, or the one pending request whose id starts with ``given`` (at least 8 characters)."""
    if len(given) >= 36 or len(given) < 8:
        return given
    pending = api.get("/approvals", params={"state": "pending"})
    found = [r["id"] for r in pending if str(r["id"]).startswith(given.lower())]
    if len(found) != 1:
        what = "no pending request" if not found else f"{len(found)} pending requests"
        raise BadRequest(f"{what} with an id starting {given!r}: give more of it", code="approval_id_ambiguous")
    return str(found[0])


@approvals_app.command("approve")
def approvals_approve(
    ctx: typer.Context,
    request_id: Annotated[
        str, typer.Argument(help="The request's id (approvals list), or 8+ of its first characters.")
    ],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    as_json: JsonFlag = False,
) -> None:
    _vote(ctx, "approve", request_id, reason, as_json)


@approvals_app.command("deny")
def approvals_deny(
    ctx: typer.Context,
    request_id: Annotated[
        str, typer.Argument(help="The request's id (approvals list), or 8+ of its first characters.")
    ],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    as_json: JsonFlag = False,
) -> None:
    _vote(ctx, "deny", request_id, reason, as_json)
