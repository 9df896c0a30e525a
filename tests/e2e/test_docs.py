"""The docs run as written: every ```sh / ```bash block of README.md and docs/*.md, in order, per file.

The convention is docs/cli.md, "Docs that run". Each file runs in one bash session (``set -euo
pipefail``) in a scratch directory that looks like a checkout (symlinks to the repository's files, so
``bash scripts/bootstrap.sh`` and ``docs/policies/...`` work; what the doc writes stays in the scratch
directory), with a fresh HOME, no KEYSTEWARD_* variables but those the doc sets, the repository's .venv
on PATH and standard input from /dev/null (a prompt fails instead of hanging). Values earlier steps
print (root token, shares, tenant tokens, URLs) are captured by the doc itself, as a user does in a
shell; the only thing the test fills in is the ports of PORTS, made free ones. Daemons the doc starts
with ``&`` are ended with the whole process group when the file is done.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.guest import guest_cache_dir
from tests.support.doc_blocks import Block, parse

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Blocks fenced as ```sh that the doc test does not run, each by (file, heading) with the reason.
SKIPPED_BLOCKS = {
    # The Quick start is what CI runs (scripts/demo.sh, then scripts/test.sh, which runs this very
    # test): running it here would run the whole suite inside the suite.
    ("README.md", "Quick start"): "what CI runs",
}

# Files with no runnable block, on purpose. Everything they show needs what a test machine has not
# (or is a design note with nothing to run); their blocks are fenced as illustrations.
NOT_RUNNABLE = {
    "docs/access-path.md": "a design note for front-end authors: the order of the access path, no commands",
    "docs/release-protocol.md": "the wire protocol (HTTP requests and JSON) that the agent speaks",
    "docs/agent.md": "runs on a cloud instance with real devices; README.md runs its commands against devcloud",
    "docs/qemu.md": "the QEMU launch and monitor library; its guest build downloads a Debian kernel",
    "docs/proxy.md": "an NBD proxy serving QEMU guests over TLS (tests/e2e/test_proxy.py plays it)",
}

# Ports the docs spell out, made free ones for the run (the machine is shared).
PORTS = {
    "8443": "the key manager's REST listener (server init --listen-port)",
    "5696": "the KMIP listener (KEYSTEWARD_KMIP_LISTEN)",
    "4443": "the XKS listener (KEYSTEWARD_XKS_LISTEN; AWS calls port 443)",
    "8444": "a second key manager (the restored copy of docs/ha.md)",
}

TIMEOUT_SECONDS = {"README.md": 240, "docs/hosts.md": 300}
DEFAULT_TIMEOUT = 120
TAIL_LINES = 40
MARK = "@@doc-block"


def _rel(doc: Path) -> str:
    return str(doc.relative_to(REPO)) if doc.is_relative_to(REPO) else doc.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runnable(doc: Path) -> list[Block]:
    blocks = parse(doc.read_text(), _rel(doc))
    return [b for b in blocks if b.runnable and (_rel(doc), b.heading) not in SKIPPED_BLOCKS]


def _script(blocks: list[Block], ports: dict[str, str]) -> str:
    parts = ["set -euo pipefail"]
    for n, block in enumerate(blocks):
        code = block.code
        for documented, free in ports.items():
            code = re.sub(rf"(?<!\d){documented}(?!\d)", free, code)
        parts.append(f"printf '\\n{MARK} {n}\\n'; printf '\\n{MARK} {n}\\n' >&2")
        parts.append(code)
    parts.append(f"printf '\\n{MARK} done\\n'")
    return "\n".join(parts) + "\n"


def _checkout(work: Path) -> None:
    """A scratch directory that looks like the checkout: what the doc writes stays here."""
    work.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (work / entry.name).symlink_to(entry)


def _split(output: str) -> dict[str, str]:
    """The output of each block, by its number."""
    parts: dict[str, str] = {}
    current = "prelude"
    for line in output.splitlines():
        if line.startswith(MARK + " "):
            current = line[len(MARK) + 1 :]
            parts.setdefault(current, "")
            continue
        parts[current] = parts.get(current, "") + line + "\n"
    return parts


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies waiting for init to reap them do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the doc's shell and every daemon it started (they share its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(proc.pid):
                return
            time.sleep(0.05)


def _report(doc: Path, blocks: list[Block], out: str, err: str, why: str) -> str:
    outs, errs = _split(out), _split(err)
    started = [k for k in outs if k.isdigit()]
    failing = started[-1] if started else None
    lines = [f"{_rel(doc)}: {why}"]
    if failing is not None:
        block = blocks[int(failing)]
        lines += [f"--- the block at {_rel(doc)}:{block.line} (under '{block.heading}'):", block.code.rstrip()]
        for label, part in (("stdout", outs.get(failing, "")), ("stderr", errs.get(failing, ""))):
            tail = part.splitlines()[-TAIL_LINES:]
            lines += [f"--- its {label}, last {TAIL_LINES} lines:", *tail]
    else:
        lines += ["--- stderr:", *err.splitlines()[-TAIL_LINES:]]
    return "\n".join(lines)


def run_doc(doc: Path, tmp_path: Path) -> None:
    blocks = _runnable(doc)
    work, home = tmp_path / "work", tmp_path / "home"
    _checkout(work)
    home.mkdir()
    ports = {documented: str(_free_port()) for documented in PORTS}
    (tmp_path / "doc.sh").write_text(_script(blocks, ports))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env["KEYSTEWARD_GUEST_CACHE"] = str(guest_cache_dir())  # docs/hosts.md's guest: built once per machine
    env.update(HOME=str(home), PATH=f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", LANG="C.UTF-8")
    env.pop("VIRTUAL_ENV", None)
    out_file, err_file = tmp_path / "doc.out", tmp_path / "doc.err"
    timeout = TIMEOUT_SECONDS.get(_rel(doc), DEFAULT_TIMEOUT)
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(
            ["bash", str(tmp_path / "doc.sh")],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        why = ""
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                why = f"exit status {rc}"
        except subprocess.TimeoutExpired:
            why = f"not done after {timeout} s"
        finally:
            _kill_group(proc)
            proc.wait()
    if why:
        pytest.fail(_report(doc, blocks, out_file.read_text(), err_file.read_text(), why), pytrace=False)
    assert f"{MARK} done" in out_file.read_text()


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_doc_runs_as_written(doc: Path, tmp_path: Path) -> None:
    blocks = _runnable(doc)
    if _rel(doc) in NOT_RUNNABLE:
        assert not blocks, f"{_rel(doc)} has runnable blocks now: take it off NOT_RUNNABLE"
        return
    assert blocks, f"{_rel(doc)} has no ```sh block: make its walkthrough runnable, or list it in NOT_RUNNABLE"
    run_doc(doc, tmp_path)


def test_lists_name_real_files_and_blocks() -> None:
    for name in NOT_RUNNABLE:
        assert (REPO / name).is_file(), name
    for name, heading in SKIPPED_BLOCKS:
        found = [b for b in parse((REPO / name).read_text(), name) if b.heading == heading and b.runnable]
        assert len(found) == 1, (name, heading, found)


def test_quick_start_is_the_two_lines_ci_runs() -> None:
    blocks = [b for b in parse((REPO / "README.md").read_text(), "README.md") if b.heading == "Quick start"]
    assert [b.code for b in blocks] == ["bash scripts/demo.sh\nbash scripts/test.sh\n"]


def test_readme_walks_the_whole_bound_volume_path() -> None:
    code = "".join(b.code for b in _runnable(REPO / "README.md"))
    for step in (
        "keysteward server init --seal shamir",
        "keysteward server unseal",
        "keysteward tenant create",
        "keysteward key create volumes",
        "keysteward devcloud init",
        "keysteward devcloud serve",
        "keysteward devcloud instance create",
        "keysteward devcloud certificate",
        "keysteward provider add",
        "KEYSTEWARD_CA_FILE",
        "KEYSTEWARD_METADATA_URL",
        "keysteward agent unlock",
        "keysteward audit verify",
    ):
        assert step in code, step
    joined = code.replace("\\\n", " ")
    assert re.search(r"keysteward policy set .*docs/policies/\S+\.cedar", joined), "a policy file the docs ship"
    assert re.search(r"keysteward volume create \S+ .*--bind-account", joined), "a bound volume"


# The runner itself, on docs written here: a failure names its block, daemons die with the file.


def _doc(tmp_path: Path, *blocks: str) -> Path:
    doc = tmp_path / "sample.md"
    doc.write_text("# Sample\n\n" + "\n".join(f"```sh\n{b}```\n" for b in blocks))
    return doc


def test_a_failing_block_fails_its_file_and_is_shown(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "sleep 300 &\necho $! > daemon.pid\n", "echo 'about to fail' >&2\nfalse\n", "echo never\n")
    with pytest.raises(pytest.fail.Exception) as failed:
        run_doc(doc, tmp_path / "run")
    message = str(failed.value)
    assert "sample.md: exit status 1" in message
    assert "the block at sample.md:8" in message and "false" in message and "about to fail" in message
    assert "echo never" not in message
    pid = (tmp_path / "run" / "work" / "daemon.pid").read_text().strip()
    stat = Path("/proc") / pid / "stat"
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the daemon outlived its doc"


def test_a_step_that_must_fail_and_succeeds_fails_the_file(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="exit status 1"):
        run_doc(_doc(tmp_path, "(! true)\n"), tmp_path / "run")
    run_doc(_doc(tmp_path, "(! false)\n! true\n"), tmp_path / "run2")  # a bare ! never stops the shell


def test_a_hanging_file_is_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "DEFAULT_TIMEOUT", 2)
    with pytest.raises(pytest.fail.Exception, match="not done after 2 s"):
        run_doc(_doc(tmp_path, "echo started\nsleep 60\n"), tmp_path / "run")


def test_documented_ports_become_free_ones_and_no_keysteward_variable_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYSTEWARD_TOKEN", "from-the-test-runner")
    run_doc(_doc(tmp_path, "echo 8443 > port\necho ${KEYSTEWARD_TOKEN:-unset} > token\n[ ! -t 0 ]\n"), tmp_path / "run")
    port = (tmp_path / "run" / "work" / "port").read_text().strip()
    assert port.isdigit() and port != "8443"
    assert (tmp_path / "run" / "work" / "token").read_text().strip() == "unset"
