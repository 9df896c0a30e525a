"""Wiring: the services one server process holds, built from settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import CollectorRegistry

from keysteward.access import (
    admin_actions,
    approval_actions,
    key_actions,
    kmip_actions,
    kmip_crypto,
    kmip_lifecycle,
    kmip_mac,
    kmip_states,
    kmip_wrap,
    vm_actions,
    vm_migrate,
    volume_actions,
    xks_actions,
)
from keysteward.access.actions import ActionTable
from keysteward.access.key_actions import KeyUse
from keysteward.access.kmip_access import KmipAccess
from keysteward.access.kmip_report import KmipReport
from keysteward.access.refusals import RefusalGate
from keysteward.access.service import AccessService
from keysteward.audit.log import AuditLog
from keysteward.audit.publisher import CheckpointPublisher
from keysteward.audit.refusals import RefusalTally
from keysteward.identity.tenants import Tenants
from keysteward.keys.ca import CertificateAuthorities
from keysteward.keys.envelope import Envelope
from keysteward.keys.keystore import KeyStore
from keysteward.keys.kmip_objects import KmipObjects
from keysteward.keys.kmip_pins import KmipPins
from keysteward.keys.rewrap import Rewrapper
from keysteward.keys.root import RootOfTrust
from keysteward.keys.xks_crypto import XksCrypto
from keysteward.keys.xks_registry import XksRegistry
from keysteward.policy.store import PolicyStore
from keysteward.ratelimit import FailureLimiter
from keysteward.release.alerts import Alerts
from keysteward.release.nonces import Nonces
from keysteward.release.platform import PlatformVerifier
from keysteward.release.platform_reports import PlatformReports
from keysteward.release.registry import Registry
from keysteward.release.tpm_enrollment import TpmEnrollments
from keysteward.release.vms import Vms
from keysteward.settings import Settings
from keysteward.store.db import Database
from keysteward.xks.metrics import XksMetrics


@dataclass
class Services:
    settings: Settings
    db: Database
    root: RootOfTrust
    audit: AuditLog
    tenants: Tenants
    keys: KeyStore
    envelope: KeyUse
    cas: CertificateAuthorities
    rewrapper: Rewrapper
    registry: Registry
    access: AccessService
    nonces: Nonces
    alerts: Alerts
    policies: PolicyStore
    tpm: TpmEnrollments
    checkpoints: CheckpointPublisher
    refusals: RefusalTally
    xks: XksRegistry
    xks_crypto: XksCrypto
    xks_metrics: XksMetrics
    kmip: KmipAccess
    kmip_report: KmipReport
    kmip_pins: KmipPins
    platform_reports: PlatformReports
    vms: Vms
    kmip_metrics: CollectorRegistry | None = None
    """The KMIP listener's metrics, when it runs in this process (``/metrics`` appends them)."""

    @classmethod
    def build(cls, settings: Settings) -> Services:
        db = Database(
            settings.database_url,
            sqlite_synchronous=settings.storage.sqlite_synchronous,
            pool_size=settings.storage.pool_size,
            timeout=settings.storage.database_timeout_seconds,
        )
        db.migrate()
        audit = AuditLog(db)
        root = RootOfTrust(db, settings.seal)
        root.on_unseal(lambda r: audit.set_signer(r.signer))
        root.on_seal(lambda: audit.set_signer(None))
        checkpoints = CheckpointPublisher.from_settings(
            audit,
            settings.audit.checkpoint_sinks,
            settings.data_dir,
            interval=settings.audit.checkpoint_interval,
            webhook_timeout=settings.audit.checkpoint_webhook_timeout,
        )
        root.on_unseal(lambda _r: checkpoints.wake())
        keys = KeyStore(db, root, audit)
        tenants = Tenants(db, audit)
        registry = Registry(db, keys, audit)
        alerts = Alerts(settings.release.alert_webhook_url, settings.release.alert_webhook_timeout)
        nonces = Nonces(root, settings.release.nonce_ttl_seconds)
        policies = PolicyStore(db, audit)
        platform = PlatformVerifier(db, settings.release)
        actions = ActionTable()
        envelope = Envelope(keys)
        key_actions.register(actions, envelope)
        volume_actions.register(actions, registry, keys, nonces, platform, policies, settings.release)
        admin_actions.register(actions, registry, policies)
        vms = Vms(registry)
        vm_actions.register(actions, registry, vms, keys, nonces, platform, policies, settings.release)
        cas = CertificateAuthorities(db, root, audit)
        vm_migrate.register(actions, registry, vms, keys, nonces, platform, policies, settings.release, cas)
        cooling_off = timedelta(seconds=settings.release.approver_cooling_off_seconds)
        approval_actions.register(actions, registry, policies, cooling_off)
        xks = XksRegistry(db, root, keys, audit)
        xks_crypto = XksCrypto(keys, db)
        xks_actions.register(actions, xks, xks_crypto, keys)
        kmip_objects = KmipObjects(keys, settings.kmip.kek)
        platform_reports = PlatformReports(db, audit, nonces, platform, settings.kmip.platform_max_age)
        kmip_objects.platform_of = platform_reports.latest
        kmip_objects.platform_warm = platform_reports.is_warm
        kmip_actions.register(actions, kmip_objects)
        kmip_states.register(actions, kmip_objects)
        kmip_crypto.register(actions, kmip_objects)
        kmip_mac.register(actions, kmip_objects)
        kmip_lifecycle.register(actions, kmip_objects)
        kmip_wrap.register(actions, kmip_objects)
        refusals = RefusalTally(audit, settings.audit.refusal_interval)
        limiter = FailureLimiter(settings.release.refusals_per_source, None, settings.release.refusal_window_seconds)
        access = AccessService(
            tenants, policies, audit, actions, alert=alerts.send, refusals=RefusalGate(limiter, refusals)
        )
        return cls(
            settings=settings,
            db=db,
            root=root,
            audit=audit,
            tenants=tenants,
            keys=keys,
            envelope=KeyUse(access, envelope),
            cas=cas,
            rewrapper=Rewrapper(keys, settings.rewrap),
            registry=registry,
            access=access,
            nonces=nonces,
            alerts=alerts,
            policies=policies,
            tpm=TpmEnrollments(registry, audit, nonces, platform, settings.release),
            checkpoints=checkpoints,
            refusals=refusals,
            xks=xks,
            xks_crypto=xks_crypto,
            xks_metrics=XksMetrics(),
            kmip=KmipAccess(access, kmip_objects),
            kmip_report=KmipReport(db),
            kmip_pins=KmipPins(db, audit),
            platform_reports=platform_reports,
            vms=vms,
        )

    def close(self) -> None:
        self.refusals.stop()  # the counted refusals pending, into the chains the last checkpoints cover
        self.checkpoints.stop()  # its last round signs the final heads: before the seal below
        self.rewrapper.stop()
        self.alerts.close()
        self.audit.close()
        self.root.seal()
        self.db.dispose()
