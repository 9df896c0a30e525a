"""The facts a policy decision sees, checked once, and their two forms: JSON (dry runs) and Cedar.

A :class:`PolicyRequest` is everything the decision depends on: who asks (the principal), for what (the
resource and action), the verified claims (identity, platform) and the request's time and address. It is
built by the release path from verified evidence, or read from a JSON file for ``keysteward policy test``;
either way the same checks run in ``__post_init__``, so a request that exists is well formed, and its
Cedar form conforms to the schema by construction (a forbid that cannot evaluate is a bug, not a grant).

The Cedar form (entities and context as JSON text) is built once per request and kept on it: evaluation
hands those strings to Cedar as they are, and the engine caches the parsed entities by their text.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from keysteward.policy import fact_values as check
from keysteward.policy.context_facts import host_facts as _host
from keysteward.policy.context_facts import identity_facts, platform_facts
from keysteward.policy.context_facts import kms_facts as _kms
from keysteward.policy.schema import ACTIONS, entity_type

MAX_GROUPS: Final = 64
_REQUEST_FIELDS: Final = frozenset(
    {"tenant", "action", "principal", "resource", "identity", "platform", "time", "source_ip", "encryption_context"}
) | {"kms", "host"}
_INSTANCE_OPTIONAL: Final = ("image_id", "region", "zone")


def _principal(raw: Any, tenant: str) -> dict[str, Any]:
    """The principal as ``{"type", "id", attrs..., "tags"|"groups"}``, its id derived and checked."""
    data = check.mapping(raw, "principal")
    kind = data.get("type")
    if kind == "Instance":
        check.only(data, ("type", "id", "provider", "account", "instance_id", *_INSTANCE_OPTIONAL, "tags"), "principal")
        out: dict[str, Any] = {"type": kind}
        for name in ("provider", "account", "instance_id"):
            out[name] = check.text(data.get(name), f"principal.{name}")
        for name in _INSTANCE_OPTIONAL:
            if data.get(name) is not None:
                out[name] = check.text(data[name], f"principal.{name}", empty=True)
        out["tags"] = check.tags(data.get("tags", {}), "principal.tags")
        derived = f"{out['provider']}/{out['account']}/{out['instance_id']}"
    elif kind in ("Host", "Agent", "Hypervisor", "Human", "CloudService"):
        extra = {"Human": ("role", "groups"), "CloudService": ("store",)}.get(kind, ())
        check.only(data, ("type", "id", "name", *extra), "principal")
        out = {"type": kind, "name": check.text(data.get("name"), "principal.name")}
        if kind == "CloudService":
            out["store"] = check.text(data.get("store"), "principal.store", empty=True)
        if kind == "Human":
            out["role"] = check.text(data.get("role"), "principal.role")
            groups = data.get("groups", [])
            if not isinstance(groups, list | tuple) or len(groups) > MAX_GROUPS:
                raise check.fail("principal.groups", f"must be a list of at most {MAX_GROUPS} group names")
            out["groups"] = sorted({check.text(g, "principal.groups[]") for g in groups})
        derived = f"{tenant}/{out['name']}"
    else:
        raise check.fail("principal.type", "must be one of Instance, Host, Agent, Hypervisor, Human, CloudService")
    if data.get("id") is not None and data["id"] != derived:
        raise check.fail("principal.id", f"must be {derived!r} (derived from the other fields)")
    out["id"] = derived
    return out


_BINDING_FIELDS = ("provider", "account", "instance_id", "image_id", "host")


def _resource(raw: Any, tenant: str) -> dict[str, Any]:
    data = check.mapping(raw, "resource")
    kind = data.get("type", "Volume")
    if kind == "Tenant":
        check.only(data, ("type", "id"), "resource")
        if data.get("id") not in (None, tenant):
            raise check.fail("resource.id", "must be the request's tenant")
        return {"type": "Tenant", "id": tenant}
    if kind == "Key":
        check.only(data, ("type", "id", "name"), "resource")
        name = check.text(data.get("name"), "resource.name")
        if data.get("id") not in (None, f"{tenant}/{name}"):
            raise check.fail("resource.id", f"must be {tenant}/{name!r} (derived from the name)")
        return {"type": "Key", "id": f"{tenant}/{name}", "name": name}
    if kind == "KmipObject":
        check.only(data, ("type", "id", "uid", "object_type", "state", "labels"), "resource")
        uid = check.text(data.get("uid"), "resource.uid")
        if data.get("id") not in (None, f"{tenant}/{uid}"):
            raise check.fail("resource.id", f"must be {tenant}/{uid!r} (derived from the uid)")
        return {
            "type": "KmipObject",
            "id": f"{tenant}/{uid}",
            "uid": uid,
            "object_type": check.text(data.get("object_type"), "resource.object_type"),
            "state": check.text(data.get("state"), "resource.state"),
            "labels": check.tags(data.get("labels", {}), "resource.labels"),  # entity tags, named as a volume's
        }
    if kind == "Vm":
        check.only(data, ("type", "id", "name", "memory_mb", "cpus", "labels"), "resource")
        return {
            "type": "Vm",
            "id": check.text(data.get("id"), "resource.id"),
            "name": check.text(data.get("name"), "resource.name"),
            "memory_mb": check.long_int(data.get("memory_mb"), "resource.memory_mb", 1, 1 << 24),
            "cpus": check.long_int(data.get("cpus"), "resource.cpus", 1, 1024),
            "labels": check.tags(data.get("labels", {}), "resource.labels"),
        }
    if kind != "Volume":
        raise check.fail("resource.type", "must be Volume, Vm, Key, KmipObject or Tenant")
    check.only(data, ("type", "id", "name", "key", "labels", "binding"), "resource")
    binding = check.mapping(data.get("binding", {}), "resource.binding")
    check.only(binding, _BINDING_FIELDS, "resource.binding")
    return {
        "type": "Volume",
        "id": check.text(data.get("id"), "resource.id"),
        "name": check.text(data.get("name"), "resource.name"),
        "key": check.text(data.get("key"), "resource.key"),
        "labels": check.tags(data.get("labels", {}), "resource.labels"),
        "binding": {k: check.text(v, f"resource.binding.{k}") for k, v in binding.items()},
    }


def _uid(kind: str, ident: str) -> dict[str, str]:
    return {"type": entity_type(kind), "id": ident}


def _entities(tenant: str, principal: Mapping[str, Any], resource: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Cedar entities of a request: principal (and its groups), resource (and its key), the tenant."""
    tenant_uid = _uid("Tenant", tenant)
    entities: list[dict[str, Any]] = [{"uid": tenant_uid, "attrs": {}, "parents": []}]
    kind = principal["type"]
    entity: dict[str, Any] = {"uid": _uid(kind, principal["id"]), "attrs": {"tenant": tenant}, "parents": []}
    if kind == "Instance":
        entity["attrs"].update(
            {k: principal[k] for k in ("provider", "account", "instance_id", *_INSTANCE_OPTIONAL) if k in principal}
        )
        entity["tags"] = dict(principal["tags"])
    else:
        entity["attrs"]["name"] = principal["name"]
    if kind == "CloudService":
        entity["attrs"]["store"] = principal["store"]
    if kind == "Human":
        entity["attrs"]["role"] = principal["role"]
        entity["parents"] = [_uid("Group", group) for group in principal["groups"]]
        entities.extend({"uid": _uid("Group", group), "attrs": {}, "parents": []} for group in principal["groups"])
    entities.append(entity)
    if resource["type"] == "Key":
        entities.append(
            {
                "uid": _uid("Key", resource["id"]),
                "attrs": {"tenant": tenant, "name": resource["name"]},
                "parents": [tenant_uid],
            }
        )
    if resource["type"] == "KmipObject":
        attrs = {k: resource[k] for k in ("uid", "object_type", "state")}
        entities.append(
            {
                "uid": _uid("KmipObject", resource["id"]),
                "attrs": {"tenant": tenant, **attrs},
                "parents": [tenant_uid],
                "tags": dict(resource["labels"]),
            }
        )
    if resource["type"] == "Vm":
        attrs = {"tenant": tenant, **{k: resource[k] for k in ("name", "memory_mb", "cpus")}}
        entities.append(
            {"uid": _uid("Vm", resource["id"]), "attrs": attrs, "parents": [tenant_uid], "tags": resource["labels"]}
        )
    if resource["type"] == "Volume":
        key_uid = _uid("Key", f"{tenant}/{resource['key']}")
        labels = dict(resource["labels"])
        attrs = {
            "tenant": tenant,
            "name": resource["name"],
            "key": {"__entity": key_uid},
            "binding": dict(resource.get("binding", {})),
        }
        attrs["sensitivity"] = labels.get("sensitivity", "normal")
        entities.append({"uid": key_uid, "attrs": {"tenant": tenant, "name": resource["key"]}, "parents": [tenant_uid]})
        entities.append(
            {"uid": _uid("Volume", resource["id"]), "attrs": attrs, "parents": [tenant_uid], "tags": labels}
        )
    return entities


@dataclass(frozen=True)
class PolicyRequest:
    """Everything one decision sees; checked on construction, immutable, with a JSON round trip for dry runs.

    ``principal``: ``{"type": "Instance", "provider", "account", "instance_id", "image_id"?, "region"?,
    "zone"?, "tags": {}}``, ``{"type": "Host", "name"}`` or ``{"type": "Human", "name", "role", "groups": []}``;
    the ``id`` is derived ("provider/account/instance_id" or "tenant/name") and checked when given.
    ``resource``: ``{"type": "Volume", "id": uuid, "name", "key", "labels": {}, "binding": {}}`` or
    ``{"type": "Tenant"}``.
    ``identity`` and ``platform`` are the verified claims of a release or renew (empty for human actions).
    """

    tenant: str
    action: str
    principal: Mapping[str, Any]
    resource: Mapping[str, Any]
    identity: Mapping[str, Any]
    platform: Mapping[str, Any]
    time: datetime
    source_ip: str | None = None
    encryption_context: Mapping[str, str] = field(default_factory=dict)
    """The caller's encryption context (key uses only): ``context.encryption_context`` holds ``"k=v"``."""
    kms: Mapping[str, str] = field(default_factory=dict)
    """An XKS call's requestMetadata (key uses only): ``context.kms`` (see :data:`KMS_FIELDS`)."""
    host: Mapping[str, bool] = field(default_factory=dict)
    """A host's hardware facts (VM actions only): ``context.host`` (see :data:`HOST_FACTS`)."""
    cedar_uids: tuple[dict[str, str], dict[str, str], dict[str, str]] = field(init=False, repr=False, compare=False)
    cedar_entities: str = field(init=False, repr=False, compare=False)
    context_values: Mapping[str, Any] = field(init=False, repr=False, compare=False)
    context_json: str | None = field(init=False, default=None, repr=False, compare=False)
    """``context_values`` as Cedar's JSON, made when first asked for (:attr:`cedar_context`)."""
    memo: dict[int, Any] = field(init=False, default_factory=dict, repr=False, compare=False)
    """What readers derive from everything but ``context.kms`` (:mod:`keysteward.policy.decision_key`),
    shared with the requests :meth:`with_kms` makes from this one, which differ from it only there."""
    source_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tenant = check.text(self.tenant, "tenant")
        if not isinstance(self.action, str) or self.action not in ACTIONS:
            raise check.fail("action", f"must be one of {', '.join(ACTIONS)}")
        principal = _principal(self.principal, tenant)
        resource = _resource(self.resource, tenant)
        principal_types, resource_type, context_type = ACTIONS[self.action]
        if principal["type"] not in principal_types or resource["type"] != resource_type:
            allowed = "/".join(principal_types)
            raise check.fail("action", f"{self.action} applies to a {allowed} principal and a {resource_type} resource")
        moment = check.moment(self.time, "time").astimezone(UTC)
        request: dict[str, Any] = {"time": int(moment.timestamp()), "hour": moment.hour, "weekday": moment.isoweekday()}
        address = None if self.source_ip is None else check.address(self.source_ip)
        if address is not None:
            request["source_ip"] = {"__extn": {"fn": "ip", "arg": str(address)}}
        host: dict[str, bool] = {}
        if context_type in ("ReleaseContext", "HostContext"):
            identity, platform = identity_facts(self.identity), platform_facts(self.platform)
            if principal["type"] == "Instance" and any(
                identity[k] != principal[k] for k in ("provider", "account", "instance_id")
            ):
                raise check.fail("identity", "names another instance than the principal")
            context: dict[str, Any] = {"identity": identity, "platform": platform, "request": request}
            if context_type == "HostContext":
                host = _host(self.host)
                context["host"] = host
        elif context_type == "KmipContext":  # the hypervisor's latest verified quote (release/platform_reports.py)
            if check.mapping(self.identity, "identity"):
                raise check.fail("identity", f"applies to release and renew only, not to {self.action}")
            identity, platform = {}, platform_facts(check.mapping(self.platform, "platform") or {"tee": "none"})
            context = {"platform": platform, "request": request}
        elif context_type == "KeyUseContext":
            if check.mapping(self.identity, "identity") or check.mapping(self.platform, "platform"):
                raise check.fail("identity", f"and platform apply to release and renew only, not to {self.action}")
            pairs = check.tags(self.encryption_context, "encryption_context")
            identity, platform = {}, {}
            context = {"request": request, "encryption_context": sorted(f"{k}={v}" for k, v in pairs.items())}
            if check.mapping(self.kms, "kms"):
                context["kms"] = _kms(self.kms)
        else:
            if check.mapping(self.identity, "identity") or check.mapping(self.platform, "platform"):
                raise check.fail("identity", f"and platform apply to release and renew only, not to {self.action}")
            identity, platform, context = {}, {}, {"request": request}
        uids = (
            _uid(principal["type"], principal["id"]),
            _uid("Action", self.action),
            _uid(resource["type"], resource["id"]),
        )
        if context_type != "KeyUseContext" and check.mapping(self.encryption_context, "encryption_context"):
            raise check.fail("encryption_context", f"applies to key uses only, not to {self.action}")
        if context_type != "KeyUseContext" and check.mapping(self.kms, "kms"):
            raise check.fail("kms", f"applies to key uses only, not to {self.action}")
        if context_type != "HostContext" and check.mapping(self.host, "host"):
            raise check.fail("host", f"applies to VM actions only, not to {self.action}")
        values = {
            "principal": principal,
            "resource": resource,
            "identity": identity,
            "platform": platform,
            "encryption_context": dict(self.encryption_context),
            "kms": dict(context.get("kms", {})),
            "host": host,
        }
        for name, value in values.items():
            object.__setattr__(self, name, check.freeze(value))
        object.__setattr__(self, "time", moment)
        object.__setattr__(self, "source_ip", None if address is None else str(address))
        object.__setattr__(self, "source_address", address)
        object.__setattr__(self, "cedar_uids", uids)
        object.__setattr__(self, "cedar_entities", json.dumps(_entities(tenant, principal, resource), sort_keys=True))
        object.__setattr__(self, "context_values", check.freeze(context))

    @property
    def cedar_context(self) -> str:
        """The context as Cedar's JSON (made once, when a decision is not remembered and Cedar is asked)."""
        text = self.context_json
        if text is None:
            text = json.dumps(check.thaw(self.context_values), sort_keys=True)
            object.__setattr__(self, "context_json", text)
        return text

    def with_kms(self, kms: Mapping[str, str]) -> PolicyRequest:
        """This request with another ``context.kms``: an XKS call like an earlier one but for its
        requestMetadata (a new kmsRequestId each call). Only ``kms`` is checked and rebuilt; the principal,
        resource and entities are the earlier request's, already checked."""
        if not self.kms:
            raise check.fail("kms", f"applies to key uses only, not to {self.action}")
        kms_values = check.freeze(_kms(kms))
        context = dict(self.context_values)
        context["kms"] = kms_values
        other = object.__new__(PolicyRequest)
        other.__dict__.update(self.__dict__)  # ``memo`` too: it holds nothing of context.kms
        object.__setattr__(other, "kms", kms_values)
        object.__setattr__(other, "context_values", MappingProxyType(context))
        object.__setattr__(other, "context_json", None)
        return other

    def to_json(self) -> dict[str, Any]:
        """The request as JSON data (``from_json`` reads it back to an equal request)."""
        out: dict[str, Any] = {
            "tenant": self.tenant,
            "action": self.action,
            "principal": check.thaw(self.principal),
            "resource": check.thaw(self.resource),
            "identity": check.thaw(self.identity),
            "platform": check.thaw(self.platform),
            "time": self.time.isoformat().replace("+00:00", "Z"),
        }
        if self.source_ip is not None:
            out["source_ip"] = self.source_ip
        if self.encryption_context:
            out["encryption_context"] = check.thaw(self.encryption_context)
        if self.kms:
            out["kms"] = check.thaw(self.kms)
        if self.host:
            out["host"] = check.thaw(self.host)
        return out

    @classmethod
    def from_json(cls, data: Any) -> PolicyRequest:
        """Read a request from JSON data (a dry-run file, an audit record); bad data raises PolicyRequestInvalid."""
        body = check.mapping(data, "request")
        check.only(body, _REQUEST_FIELDS, "request")
        for name in ("tenant", "action", "principal", "resource", "time"):
            if name not in body:
                raise check.fail(name, "is missing")
        source_ip = body.get("source_ip")
        if source_ip is not None and not isinstance(source_ip, str):
            raise check.fail("source_ip", "must be an IPv4 or IPv6 address")
        return cls(
            tenant=body["tenant"],
            action=body["action"],
            principal=body["principal"],
            resource=body["resource"],
            identity=body.get("identity", {}),
            platform=body.get("platform", {}),
            time=check.moment(body["time"], "time"),
            source_ip=source_ip,
            encryption_context=check.mapping(body.get("encryption_context", {}), "encryption_context"),
            kms=check.mapping(body.get("kms", {}), "kms"),
            host=check.mapping(body.get("host", {}), "host"),
        )
