"""The confirmation every destructive verb asks for (destroy, shred, revoke, retire), as cryptsetup does.

``--yes`` confirms. Without it the question is asked on the terminal, and only ``y`` or ``yes`` goes on;
when standard input is not a terminal (a script, a pipe, ``</dev/null``) the verb refuses with
``confirmation_required`` rather than read an answer a script did not mean to give. Nothing is changed
on a refusal. Kept free of typer so the ``volume`` group can use it without the start-up cost.
"""

from __future__ import annotations

import sys

from keysteward.errors import BadRequest

YES = ("y", "yes")


def confirm(question: str, *, yes: bool) -> None:
    """Return when the operator confirmed ``question``; raise (nothing done) otherwise."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise BadRequest(
            f"{question.rstrip('?')}: not confirmed (standard input is not a terminal); pass --yes to confirm",
            code="confirmation_required",
        )
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if answer.strip().lower() not in YES:
        raise BadRequest("not confirmed: nothing was changed", code="not_confirmed")
