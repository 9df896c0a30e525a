"""The test guest's ``/init``: a busybox shell script that reports on the serial console.

Kernel command line parameters it reads (from ``/proc/cmdline``; the kernel keeps dotted names away
from init's argv and environment):

- ``ks.marker=HEX``: the bytes it decodes to, repeated to fill 4 MiB, are written to a tmpfs file,
  so they sit in guest RAM. Only their md5 is ever printed (``ram=``), never the marker.
- ``ks.fill_mb=N``: N MiB of non-zero, non-repeating-within-a-page data (a 64 KiB random seed,
  repeated) written to tmpfs, so a save of the VM's memory has real bytes to carry. Capped at what
  the guest has available less 48 MiB (tmpfs cannot be swapped: more would kill init by OOM), so
  the ``filled mb=`` line says what was filled; :func:`guest_memory_mb` sizes a VM for a fill.

Serial lines, in order: ``ks-guest ready`` first (the "first serial line" of a boot), then
``ks-guest filled mb=N`` if asked to fill, then every ~0.5 s
``ks-guest tick=N counter=C ram=<md5 of the marker file, or ->``. The counter lives in the first
sector of ``/dev/vda`` as ``KSCOUNTER <n>``; each tick reads it, adds one and writes it back with
``fsync``, so it survives a reboot or a save/restore (counter 0 means no disk).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

MARKER_BYTES: Final = 4 * 1024 * 1024
COUNTER_MAGIC: Final = "KSCOUNTER"

_TEMPLATE: Final = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
echo "ks-guest ready"
mount -t tmpfs -o size=95%,mode=0700 ram /mnt
for m in @MODULES@; do insmod "/lib/modules/$m.ko" 2>/dev/null; done
marker=""
fill=0
for p in $(cat /proc/cmdline); do
  case "$p" in
    ks.marker=*) marker="${p#ks.marker=}" ;;
    ks.fill_mb=*) fill="${p#ks.fill_mb=}" ;;
  esac
done
case "$fill" in ''|*[!0-9]*) fill=0 ;; esac
case "$marker" in *[!0-9a-fA-F]*) marker="" ;; esac
if [ -n "$marker" ]; then
  echo "$marker" | xxd -r -p >/mnt/marker
  marker=""
  while [ "$(stat -c %s /mnt/marker)" -lt @MARKER_BYTES@ ]; do
    cat /mnt/marker /mnt/marker >/mnt/marker.next && mv /mnt/marker.next /mnt/marker
  done
  head -c @MARKER_BYTES@ /mnt/marker >/mnt/marker.next && mv /mnt/marker.next /mnt/marker
fi
avail=$(($(sed -n 's/^MemAvailable: *\([0-9]*\) kB$/\1/p' /proc/meminfo) / 1024 - 48))
[ "$fill" -gt "$avail" ] && fill=$avail
if [ "$fill" -gt 0 ]; then
  head -c 65536 /dev/urandom >/mnt/seed
  for i in 1 2 3 4; do cat /mnt/seed /mnt/seed /mnt/seed /mnt/seed >/mnt/seed.next; mv /mnt/seed.next /mnt/seed; done
  left="$fill"
  while [ "$left" -ge 16 ]; do cat /mnt/seed >>/mnt/fill; left=$((left - 16)); done
  [ "$left" -gt 0 ] && head -c $((left * 1048576)) /mnt/seed >>/mnt/fill
  rm -f /mnt/seed
  echo "ks-guest filled mb=$fill"
fi
n=0
while [ $n -lt 40 ] && [ ! -b /dev/vda ]; do sleep 0.05; n=$((n + 1)); done
tick=0
while true; do
  tick=$((tick + 1))
  counter=0
  if [ -b /dev/vda ]; then
    line="$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1)"
    case "$line" in "@COUNTER_MAGIC@ "*) counter="${line#@COUNTER_MAGIC@ }" ;; esac
    case "$counter" in ''|*[!0-9]*) counter=0 ;; esac
    counter=$((counter + 1))
    printf '@COUNTER_MAGIC@ %d\n' "$counter" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
    sync
  fi
  ram="-"
  [ -f /mnt/marker ] && ram="$(md5sum /mnt/marker | cut -d ' ' -f 1)"
  echo "ks-guest tick=$tick counter=$counter ram=$ram"
  sleep 0.5
done
"""


def guest_memory_mb(fill_mb: int) -> int:
    """Guest RAM for ``ks.fill_mb=fill_mb``: the fill plus the kernel, the initramfs and the marker."""
    return max(128, fill_mb + fill_mb // 16 + 176)


def init_script(modules: Sequence[str]) -> str:
    """The ``/init`` text that loads ``modules`` (file stems, in dependency order) with insmod."""
    for name in modules:
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"bad module name {name!r}")
    return (
        _TEMPLATE.replace("@MODULES@", " ".join(modules))
        .replace("@MARKER_BYTES@", str(MARKER_BYTES))
        .replace("@COUNTER_MAGIC@", COUNTER_MAGIC)
    )
