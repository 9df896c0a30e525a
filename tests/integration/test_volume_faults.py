"""Interrupted writes: SIGKILL of the real CLI at random points, and crashes injected at every write.

- ``keysteward volume write`` killed after a random delay, several rounds: the header still opens,
  every sector holds either its old or its new content, and a run that finished reads back in full;
- ``keysteward volume add-key`` killed at random points: the volume still opens with the old
  passphrase (keysteward and cryptsetup), and with the new one whenever add-key finished;
- a crash injected at each write of add-key, remove-key and create (the write torn in half): every
  state on disk still opens with a passphrase that opened it before.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from keysteward.volume import CreateOptions, Device, KdfChoice, LuksVolume, add_key, create_volume, remove_key
from keysteward.volume.luks_volume import check_passphrase
from tests.integration.test_volume_tools import KEYSTEWARD, MIB, PBKDF2_FAST, keyfile, ks, pattern, run, tool

pytestmark = pytest.mark.integration


def _sectors_old_or_new(actual: bytes, old: bytes, new: bytes, sector: int) -> tuple[int, int]:
    """Check each sector is entirely old or entirely new; returns (new sectors, changed sectors)."""
    assert len(actual) == len(old) == len(new)
    fresh = changed = 0
    a, o, n = memoryview(actual), memoryview(old), memoryview(new)
    for at in range(0, len(actual), sector):
        got, was, will = a[at : at + sector], o[at : at + sector], n[at : at + sector]
        if was != will:
            changed += 1
            fresh += got == will
        assert got == was or got == will, f"sector at {at} is neither old nor new"
    return fresh, changed


def _run_and_kill(argv: list[str], *, feed: bytes | None, delay: float) -> int:
    """Start the CLI; feed it ``feed`` on stdin (then wait ``delay``) or just wait ``delay``; SIGKILL it."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if feed is not None:
        assert proc.stdin is not None
        proc.stdin.write(feed)  # the CLI is still reading: it has not seen the end of its input
        proc.stdin.flush()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if proc.stdin is not None:
        proc.stdin.close()
    return proc.returncode


@pytest.mark.parametrize("sector", [4096, 512])
def test_sigkill_during_write(tmp_path: Path, sector: int) -> None:
    rng = random.Random(sector)
    image, pw = tmp_path / "v.img", keyfile(tmp_path / "pw", b"kill me")
    size = 48 * MIB
    ks("create", image, "--size", "48M", "--passphrase-file", pw, "--sector-size", sector, *PBKDF2_FAST)
    state = pattern(size, 100)
    ks("write", image, "--passphrase-file", pw, "--input", keyfile(tmp_path / "a.bin", state))
    outcomes = []
    for round_ in range(6):
        offset = rng.randrange(0, 8 * MIB)
        data = pattern(rng.randrange(24 * MIB, size - offset), round_)
        argv = [KEYSTEWARD, "volume", "write", str(image), "--passphrase-file", str(pw), "--offset", str(offset)]
        if round_ % 2:  # from a file, killed after a random delay (before, during or after the writing)
            src = keyfile(tmp_path / "in.bin", data)
            code = _run_and_kill([*argv, "--input", str(src)], feed=None, delay=rng.uniform(0.15, 0.35))
        else:  # from a pipe that has given part of the data: killed in the middle of the writing
            fed = rng.randrange(MIB, len(data))
            code = _run_and_kill(argv, feed=data[:fed], delay=0.3)
        finished = code == 0
        new = state[:offset] + data + state[offset + len(data) :]
        ks("check", image, "--passphrase-file", pw)
        actual = ks("read", image, "--passphrase-file", pw).stdout
        fresh, changed = _sectors_old_or_new(actual, state, new, sector)
        if finished:
            assert actual == new, "a write that finished reads back in full"
        outcomes.append("finished" if finished else f"{fresh}/{changed}")
        state = actual
    interrupted = [o for o in outcomes if "/" in o and o.split("/")[0] not in ("0", o.split("/")[1])]
    assert interrupted, f"no round was killed in the middle of its writing: {outcomes}"


def test_sigkill_during_add_key(tmp_path: Path) -> None:
    cryptsetup = tool("cryptsetup", "cryptsetup-bin")
    rng = random.Random(5)
    base, pw, new = tmp_path / "base.img", keyfile(tmp_path / "pw", b"old"), keyfile(tmp_path / "new", b"new")
    ks("create", base, "--size", "1M", "--passphrase-file", pw, *PBKDF2_FAST)
    argv = [KEYSTEWARD, "volume", "add-key", "", "--passphrase-file", str(pw), "--new-passphrase-file", str(new),
            "--kdf", "pbkdf2", "--pbkdf-iterations", "200000"]  # fmt: skip
    image = tmp_path / "timing.img"
    shutil.copyfile(base, image)
    started = time.monotonic()
    run([*argv[:3], str(image), *argv[4:]])
    whole = time.monotonic() - started
    outcomes = []
    for round_ in range(8):  # killed anywhere from start-up to the end (the writes are a few ms of it)
        image = tmp_path / f"v{round_}.img"
        shutil.copyfile(base, image)
        code = _run_and_kill([*argv[:3], str(image), *argv[4:]], feed=None, delay=rng.uniform(0.3, 1.1) * whole)
        assert json.loads(ks("check", image, "--passphrase-file", pw, "--json").stdout)["keyslot"] == 0
        run([cryptsetup, "open", "--test-passphrase", "--key-file", str(pw), str(image)])
        opens_new = ks("check", image, "--passphrase-file", new, check=False).returncode == 0
        if code == 0:
            assert opens_new, "an add-key that finished opens with the new passphrase"
        outcomes.append((code, opens_new))
    assert any(code != 0 for code, _ in outcomes), f"no round was interrupted: {outcomes}"


# -- crashes injected at each write ----------------------------------------------------------------


class Crash(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _crash_after(monkeypatch: pytest.MonkeyPatch, writes: int, torn: bool) -> list[int]:
    """Make Device.pwrite crash at write number ``writes`` (writing half of it first when ``torn``)."""
    real = Device.pwrite
    count = [0]

    def pwrite(self: Device, offset: int, data: bytes | bytearray | memoryview) -> None:
        if count[0] == writes:
            if torn:
                view = memoryview(data)
                real(self, offset, view[: len(view) // 2])
            raise Crash
        count[0] += 1
        real(self, offset, data)

    monkeypatch.setattr(Device, "pwrite", pwrite)
    return count


def _writes_of(action: object, monkeypatch: pytest.MonkeyPatch) -> int:
    count = _crash_after(monkeypatch, 10**9, False)
    assert callable(action)
    action()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("luks1", [False, True], ids=["luks2", "luks1"])
def test_crash_at_every_write_of_a_keyslot_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, luks1: bool) -> None:
    base = tmp_path / "base.img"
    fast = KdfChoice("pbkdf2", 1000)
    create_volume(str(base), b"old", CreateOptions(4 * MIB, sector_size=512, kdf=fast, luks1=luks1))
    add_key(str(base), b"old", b"other", kdf=fast)
    image = tmp_path / "v.img"

    def adding() -> None:
        add_key(str(image), b"old", b"new", kdf=fast)

    def removing() -> None:
        remove_key(str(image), 1, b"old")

    for name, action, before_ok, after in [
        ("add", adding, [b"old", b"other"], b"new"),
        ("remove", removing, [b"old"], None),
    ]:
        shutil.copyfile(base, image)
        total = _writes_of(action, monkeypatch)
        assert total >= 2, name
        for at in range(total):
            for torn in (False, True):
                shutil.copyfile(base, image)
                _crash_after(monkeypatch, at, torn)
                with pytest.raises(Crash):
                    action()
                monkeypatch.undo()
                for passphrase in before_ok:
                    check_passphrase(str(image), passphrase)
        shutil.copyfile(base, image)
        action()
        if after is not None:
            check_passphrase(str(image), after)


def test_crash_during_create_never_leaves_a_half_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "v.img"
    options = CreateOptions(MIB, kdf=KdfChoice("pbkdf2", 1000))
    image.write_bytes(bytes(20 * MIB))  # an existing file: create zeroes it first
    total = _writes_of(lambda: create_volume(str(image), b"pw", options), monkeypatch)
    for at in range(total):
        image.write_bytes(bytes(20 * MIB))
        _crash_after(monkeypatch, at, True)
        with pytest.raises(Crash):
            create_volume(str(image), b"pw", options)
        monkeypatch.undo()
        try:
            volume = LuksVolume.open(str(image), b"pw")
        except Exception as exc:  # not a volume yet: fine, as long as it is refused cleanly
            assert type(exc).__name__ in ("LuksFormatError",), exc
        else:  # only once a whole header copy is on disk (the secondary, written before the primary)
            with volume:
                assert at >= total - 2 and volume.payload_size == MIB, f"opens after a crash at write {at}/{total}"
    with LuksVolume.open(str(image), b"pw") as volume:
        assert volume.payload_size == MIB
