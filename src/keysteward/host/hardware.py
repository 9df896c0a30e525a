"""What a host's hardware offers its VMs, read from the host (never from configuration).

The facts are what KVM itself reports it can give guests: ``/dev/kvm`` opens; the ``kvm_amd`` module's
``sev``, ``sev_es`` and ``sev_snp`` parameters; the ``kvm_intel`` module's ``tdx`` parameter. They go with
every VM start and restore, covered by the host's TPM quote (the binding includes them), and the tenant's
policy reads them as ``context.host`` (docs/hosts.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

PARAMETERS = {
    "sev": "/sys/module/kvm_amd/parameters/sev",
    "sev_es": "/sys/module/kvm_amd/parameters/sev_es",
    "sev_snp": "/sys/module/kvm_amd/parameters/sev_snp",
    "tdx": "/sys/module/kvm_intel/parameters/tdx",
}
KVM_DEVICE = "/dev/kvm"


def _enabled(text: str | None) -> bool:
    """A kernel module's boolean parameter as sysfs prints it (``Y``/``N``, ``1``/``0``)."""
    return text is not None and text.strip() in ("Y", "y", "1")


def facts_from(read: Callable[[str], str | None], kvm: bool) -> dict[str, bool]:
    """The hardware facts, given a reader of sysfs files (None: absent) and whether /dev/kvm opens."""
    facts = {name: _enabled(read(path)) for name, path in PARAMETERS.items()}
    facts["kvm"] = kvm
    return facts


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(64)
    except OSError:
        return None


def kvm_opens(device: str = KVM_DEVICE) -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def read_hardware() -> dict[str, bool]:
    """This host's facts, read now."""
    return facts_from(_read, kvm_opens())
