"""The VM tables (docs/hosts.md): a VM's launch settings and disks, the orders hosts carry out, snapshots.

A VM's key, state and leases are its row in ``volumes`` (``kind = 'vm'``): the lease, revocation,
shredding and rotation of a VM are those of a volume. Its disks are volumes of ``kind = 'vm-disk'``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from keysteward.store.models import Base


class Vm(Base):
    __tablename__ = "vms"
    id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[int] = mapped_column(Integer)
    launch: Mapped[str] = mapped_column(Text, default="{}")
    """JSON: ``kernel``, ``initrd``, ``append`` (paths on the hosts) for a direct kernel boot, or nothing."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VmDisk(Base):
    __tablename__ = "vm_disks"
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"), unique=True)
    path: Mapped[str] = mapped_column(Text)
    """Where the hosts find the volume's file (shared storage)."""


class VmOrder(Base):
    """What an operator asked of a host (start, stop, snapshot, restore), and what came of it."""

    __tablename__ = "vm_orders"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"))
    host: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    snapshot_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    migration_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    """A ``migrate-out`` order's migration (a ``migrate`` order's id is its migration's)."""
    state: Mapped[str] = mapped_column(String(16))
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_vm_orders_host_state", "tenant_id", "host", "state"),)


class VmSnapshot(Base):
    """A saved VM state: the file the host wrote (encrypted under the VM's key), recorded by ``vm.snapshot``."""

    __tablename__ = "vm_snapshots"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    host: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VmMigration(Base):
    """A live migration (docs/hosts.md, Migration): its id is the destination's ``migrate`` order's."""

    __tablename__ = "vm_migrations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    source: Mapped[str] = mapped_column(String(128))
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    """``requested``, ``incoming`` (leases granted), ``ready`` (listening), ``switched``, ``failed``."""
    source_lease_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    incoming_lease_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    address: Mapped[str | None] = mapped_column(String(128), nullable=True)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The source's latest progress report (JSON: status, transferred, remaining and total bytes, downtime)."""
    downtime_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """QEMU's downtime as the source reported it once completed (the downtime histogram of /metrics)."""
    failed_in: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """For a failed migration: the state it was in when it failed (``requested``, ``incoming``, ``ready``)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
