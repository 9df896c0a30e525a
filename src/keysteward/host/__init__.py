"""The hypervisor host side: what a host runs to start VMs with keys released by the access path.

``qmp`` speaks QEMU's machine protocol, ``qemu`` turns a VM's launch into a QEMU process and
controls it (pause, stop, state saved to and loaded from a file descriptor).
"""
