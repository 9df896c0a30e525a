"""LUKS2/LUKS1 volumes on files and block devices: the userspace data path and key slots."""
