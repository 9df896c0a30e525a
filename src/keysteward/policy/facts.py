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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.schema import ACTIONS, KMS_FIELDS, PCR_BANKS, PCR_COUNT, TEE_KINDS, entity_type

MAX_TEXT: Final = 256
MAX_TAGS: Final = 64
MAX_GROUPS: Final = 64
MAX_LONG: Final = 2**63 - 1
MAX_KMS_TEXT: Final = 2048  # ARNs are up to 2048 characters
_HEX = re.compile(r"[0-9a-fA-F]*")
_PCR_NAME = re.compile(r"(sha1|sha256|sha384)_([0-9]{1,2})")
_REQUEST_FIELDS: Final = frozenset(
    {"tenant", "action", "principal", "resource", "identity", "platform", "time", "source_ip", "encryption_context"}
) | {"kms"}
_IDENTITY_REQUIRED: Final = ("provider", "kind", "account", "instance_id")
_IDENTITY_OPTIONAL: Final = ("image_id", "region", "zone")
_INSTANCE_OPTIONAL: Final = ("image_id", "region", "zone")
_TCB_FIELDS: Final = ("bootloader", "tee", "snp", "microcode")
_PLATFORM_FIELDS: Final = frozenset({"tee", "debug", "measurement", "tcb", "chip_id", "vmpl", "secure_boot", "pcrs"})


def _fail(path: str, what: str) -> PolicyRequestInvalid:
    return PolicyRequestInvalid(f"{path} {what}")


def _text(value: Any, path: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not value and not empty):
        raise _fail(path, f"must be a string of {0 if empty else 1}-{MAX_TEXT} characters")
    if not _is_unicode(value):
        raise _fail(path, "must be valid Unicode (no lone surrogates)")
    return value


def _is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _long(value: Any, path: str, low: int = 0, high: int = MAX_LONG) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(path, f"must be an integer from {low} to {high}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "must be true or false")
    return value


def _hex(value: Any, path: str, digits: int | None = None) -> str:
    text = _text(value, path)
    if not _HEX.fullmatch(text) or len(text) % 2 or (digits is not None and len(text) != digits):
        size = f"{digits} hex digits" if digits else "an even number of hex digits"
        raise _fail(path, f"must be {size}")
    return text.lower()


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "must be an object")
    return value


def _only(value: Mapping[str, Any], allowed: frozenset[str] | tuple[str, ...], path: str) -> None:
    unknown = sorted(str(key)[:64] for key in value if key not in allowed)
    if unknown:
        raise _fail(path, f"has unknown field(s): {', '.join(unknown[:5])}")


def _tags(value: Any, path: str) -> dict[str, str]:
    tags = _mapping(value, path)
    if len(tags) > MAX_TAGS:
        raise _fail(path, f"has more than {MAX_TAGS} entries")
    return {_text(k, f"{path} key"): _text(v, f"{path}.{str(k)[:64]}", empty=True) for k, v in tags.items()}


def _principal(raw: Any, tenant: str) -> dict[str, Any]:
    """The principal as ``{"type", "id", attrs..., "tags"|"groups"}``, its id derived and checked."""
    data = _mapping(raw, "principal")
    kind = data.get("type")
    if kind == "Instance":
        _only(data, ("type", "id", "provider", "account", "instance_id", *_INSTANCE_OPTIONAL, "tags"), "principal")
        out: dict[str, Any] = {"type": kind}
        for name in ("provider", "account", "instance_id"):
            out[name] = _text(data.get(name), f"principal.{name}")
        for name in _INSTANCE_OPTIONAL:
            if data.get(name) is not None:
                out[name] = _text(data[name], f"principal.{name}", empty=True)
        out["tags"] = _tags(data.get("tags", {}), "principal.tags")
        derived = f"{out['provider']}/{out['account']}/{out['instance_id']}"
    elif kind in ("Host", "Agent", "Hypervisor", "Human", "CloudService"):
        extra = {"Human": ("role", "groups"), "CloudService": ("store",)}.get(kind, ())
        _only(data, ("type", "id", "name", *extra), "principal")
        out = {"type": kind, "name": _text(data.get("name"), "principal.name")}
        if kind == "CloudService":
            out["store"] = _text(data.get("store"), "principal.store", empty=True)
        if kind == "Human":
            out["role"] = _text(data.get("role"), "principal.role")
            groups = data.get("groups", [])
            if not isinstance(groups, list | tuple) or len(groups) > MAX_GROUPS:
                raise _fail("principal.groups", f"must be a list of at most {MAX_GROUPS} group names")
            out["groups"] = sorted({_text(g, "principal.groups[]") for g in groups})
        derived = f"{tenant}/{out['name']}"
    else:
        raise _fail("principal.type", "must be one of Instance, Host, Agent, Hypervisor, Human, CloudService")
    if data.get("id") is not None and data["id"] != derived:
        raise _fail("principal.id", f"must be {derived!r} (derived from the other fields)")
    out["id"] = derived
    return out


_BINDING_FIELDS = ("provider", "account", "instance_id", "image_id", "host")


def _resource(raw: Any, tenant: str) -> dict[str, Any]:
    data = _mapping(raw, "resource")
    kind = data.get("type", "Volume")
    if kind == "Tenant":
        _only(data, ("type", "id"), "resource")
        if data.get("id") not in (None, tenant):
            raise _fail("resource.id", "must be the request's tenant")
        return {"type": "Tenant", "id": tenant}
    if kind == "Key":
        _only(data, ("type", "id", "name"), "resource")
        name = _text(data.get("name"), "resource.name")
        if data.get("id") not in (None, f"{tenant}/{name}"):
            raise _fail("resource.id", f"must be {tenant}/{name!r} (derived from the name)")
        return {"type": "Key", "id": f"{tenant}/{name}", "name": name}
    if kind == "KmipObject":
        _only(data, ("type", "id", "uid", "object_type", "state", "labels"), "resource")
        uid = _text(data.get("uid"), "resource.uid")
        if data.get("id") not in (None, f"{tenant}/{uid}"):
            raise _fail("resource.id", f"must be {tenant}/{uid!r} (derived from the uid)")
        return {
            "type": "KmipObject",
            "id": f"{tenant}/{uid}",
            "uid": uid,
            "object_type": _text(data.get("object_type"), "resource.object_type"),
            "state": _text(data.get("state"), "resource.state"),
            "labels": _tags(data.get("labels", {}), "resource.labels"),  # entity tags, named as a volume's
        }
    if kind != "Volume":
        raise _fail("resource.type", "must be Volume, Key, KmipObject or Tenant")
    _only(data, ("type", "id", "name", "key", "labels", "binding"), "resource")
    binding = _mapping(data.get("binding", {}), "resource.binding")
    _only(binding, _BINDING_FIELDS, "resource.binding")
    return {
        "type": "Volume",
        "id": _text(data.get("id"), "resource.id"),
        "name": _text(data.get("name"), "resource.name"),
        "key": _text(data.get("key"), "resource.key"),
        "labels": _tags(data.get("labels", {}), "resource.labels"),
        "binding": {k: _text(v, f"resource.binding.{k}") for k, v in binding.items()},
    }


def _identity(raw: Any) -> dict[str, Any]:
    data = _mapping(raw, "identity")
    _only(data, (*_IDENTITY_REQUIRED, *_IDENTITY_OPTIONAL, "launched_at"), "identity")
    out: dict[str, Any] = {name: _text(data.get(name), f"identity.{name}") for name in _IDENTITY_REQUIRED}
    for name in _IDENTITY_OPTIONAL:
        if data.get(name) is not None:
            out[name] = _text(data[name], f"identity.{name}", empty=True)
    launched = data.get("launched_at")
    if isinstance(launched, str):  # InstanceIdentity.claims() gives ISO 8601; policies compare unix seconds
        launched = int(_datetime(launched, "identity.launched_at").timestamp())
    if launched is not None:
        out["launched_at"] = _long(launched, "identity.launched_at")
    return out


def _pcrs(raw: Any) -> dict[str, str]:
    """PCR values as ``{"sha256_7": hex}``; a nested ``{"sha256": {"7": hex}}`` is accepted and flattened."""
    data = _mapping(raw, "platform.pcrs")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in PCR_BANKS and isinstance(value, Mapping):
            flat.update({f"{key}_{index}": digest for index, digest in value.items()})
        else:
            flat[str(key)] = value
    out = {}
    for name, value in flat.items():
        match = _PCR_NAME.fullmatch(name)
        if match is None or int(match.group(2)) >= PCR_COUNT or str(int(match.group(2))) != match.group(2):
            raise _fail("platform.pcrs", f"has a bad PCR name {name[:64]!r} (want e.g. sha256_7)")
        out[name] = _hex(value, f"platform.pcrs.{name}", PCR_BANKS[match.group(1)])
    return out


def _platform(raw: Any) -> dict[str, Any]:
    data = _mapping(raw, "platform")
    _only(data, _PLATFORM_FIELDS, "platform")
    if data.get("tee") not in TEE_KINDS:
        raise _fail("platform.tee", f"must be one of {', '.join(TEE_KINDS)}")
    out: dict[str, Any] = {"tee": data["tee"]}
    for name in ("debug", "secure_boot"):
        if data.get(name) is not None:
            out[name] = _bool(data[name], f"platform.{name}")
    for name in ("measurement", "chip_id"):
        if data.get(name) is not None:
            out[name] = _hex(data[name], f"platform.{name}")
    if data.get("vmpl") is not None:
        out["vmpl"] = _long(data["vmpl"], "platform.vmpl", 0, 3)
    if data.get("tcb") is not None:
        tcb = _mapping(data["tcb"], "platform.tcb")
        _only(tcb, _TCB_FIELDS, "platform.tcb")
        out["tcb"] = {name: _long(tcb.get(name), f"platform.tcb.{name}", 0, 255) for name in _TCB_FIELDS}
    if data.get("pcrs") is not None:
        out["pcrs"] = _pcrs(data["pcrs"])
    return out


def _datetime(value: Any, path: str) -> datetime:
    if isinstance(value, str) and len(value) <= 64:
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _fail(path, "must be an ISO 8601 time with a UTC offset") from None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise _fail(path, "must be an ISO 8601 time with a UTC offset")
    return value


def _address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as Cedar's ``ip()`` reads it: an IPv4 client seen by a dual-stack socket becomes IPv4."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise _fail("source_ip", "must be an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise _fail("source_ip", "must be an address without a zone (%...)")
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _kms(raw: Any) -> dict[str, str]:
    """An XKS call's requestMetadata facts: ``operation`` and ``request_id`` required, the rest optional."""
    data = _mapping(raw, "kms")
    _only(data, KMS_FIELDS, "kms")
    out: dict[str, str] = {}
    for name in KMS_FIELDS:
        value = data.get(name)
        if value is None and name in ("operation", "request_id"):
            raise _fail(f"kms.{name}", "is missing")
        if value is not None:
            if not isinstance(value, str) or len(value) > MAX_KMS_TEXT or not _is_unicode(value):
                raise _fail(f"kms.{name}", f"must be a string of at most {MAX_KMS_TEXT} characters")
            out[name] = value
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


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
    cedar_uids: tuple[dict[str, str], dict[str, str], dict[str, str]] = field(init=False, repr=False, compare=False)
    cedar_entities: str = field(init=False, repr=False, compare=False)
    cedar_context: str = field(init=False, repr=False, compare=False)
    context_values: Mapping[str, Any] = field(init=False, repr=False, compare=False)
    source_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tenant = _text(self.tenant, "tenant")
        if not isinstance(self.action, str) or self.action not in ACTIONS:
            raise _fail("action", f"must be one of {', '.join(ACTIONS)}")
        principal = _principal(self.principal, tenant)
        resource = _resource(self.resource, tenant)
        principal_types, resource_type, context_type = ACTIONS[self.action]
        if principal["type"] not in principal_types or resource["type"] != resource_type:
            allowed = "/".join(principal_types)
            raise _fail("action", f"{self.action} applies to a {allowed} principal and a {resource_type} resource")
        moment = _datetime(self.time, "time").astimezone(UTC)
        request: dict[str, Any] = {"time": int(moment.timestamp()), "hour": moment.hour, "weekday": moment.isoweekday()}
        address = None if self.source_ip is None else _address(self.source_ip)
        if address is not None:
            request["source_ip"] = {"__extn": {"fn": "ip", "arg": str(address)}}
        if context_type == "ReleaseContext":
            identity, platform = _identity(self.identity), _platform(self.platform)
            if principal["type"] == "Instance" and any(
                identity[k] != principal[k] for k in ("provider", "account", "instance_id")
            ):
                raise _fail("identity", "names another instance than the principal")
            context: dict[str, Any] = {"identity": identity, "platform": platform, "request": request}
        elif context_type == "KeyUseContext":
            if _mapping(self.identity, "identity") or _mapping(self.platform, "platform"):
                raise _fail("identity", f"and platform apply to release and renew only, not to {self.action}")
            pairs = _tags(self.encryption_context, "encryption_context")
            identity, platform = {}, {}
            context = {"request": request, "encryption_context": sorted(f"{k}={v}" for k, v in pairs.items())}
            if _mapping(self.kms, "kms"):
                context["kms"] = _kms(self.kms)
        else:
            if _mapping(self.identity, "identity") or _mapping(self.platform, "platform"):
                raise _fail("identity", f"and platform apply to release and renew only, not to {self.action}")
            identity, platform, context = {}, {}, {"request": request}
        uids = (
            _uid(principal["type"], principal["id"]),
            _uid("Action", self.action),
            _uid(resource["type"], resource["id"]),
        )
        if context_type != "KeyUseContext" and _mapping(self.encryption_context, "encryption_context"):
            raise _fail("encryption_context", f"applies to key uses only, not to {self.action}")
        if context_type != "KeyUseContext" and _mapping(self.kms, "kms"):
            raise _fail("kms", f"applies to key uses only, not to {self.action}")
        values = {
            "principal": principal,
            "resource": resource,
            "identity": identity,
            "platform": platform,
            "encryption_context": dict(self.encryption_context),
            "kms": dict(context.get("kms", {})),
        }
        for name, value in values.items():
            object.__setattr__(self, name, _freeze(value))
        object.__setattr__(self, "time", moment)
        object.__setattr__(self, "source_ip", None if address is None else str(address))
        object.__setattr__(self, "source_address", address)
        object.__setattr__(self, "cedar_uids", uids)
        object.__setattr__(self, "cedar_entities", json.dumps(_entities(tenant, principal, resource), sort_keys=True))
        object.__setattr__(self, "cedar_context", json.dumps(context, sort_keys=True))
        object.__setattr__(self, "context_values", _freeze(context))

    def to_json(self) -> dict[str, Any]:
        """The request as JSON data (``from_json`` reads it back to an equal request)."""
        out: dict[str, Any] = {
            "tenant": self.tenant,
            "action": self.action,
            "principal": _thaw(self.principal),
            "resource": _thaw(self.resource),
            "identity": _thaw(self.identity),
            "platform": _thaw(self.platform),
            "time": self.time.isoformat().replace("+00:00", "Z"),
        }
        if self.source_ip is not None:
            out["source_ip"] = self.source_ip
        if self.encryption_context:
            out["encryption_context"] = _thaw(self.encryption_context)
        if self.kms:
            out["kms"] = _thaw(self.kms)
        return out

    @classmethod
    def from_json(cls, data: Any) -> PolicyRequest:
        """Read a request from JSON data (a dry-run file, an audit record); bad data raises PolicyRequestInvalid."""
        body = _mapping(data, "request")
        _only(body, _REQUEST_FIELDS, "request")
        for name in ("tenant", "action", "principal", "resource", "time"):
            if name not in body:
                raise _fail(name, "is missing")
        source_ip = body.get("source_ip")
        if source_ip is not None and not isinstance(source_ip, str):
            raise _fail("source_ip", "must be an IPv4 or IPv6 address")
        return cls(
            tenant=body["tenant"],
            action=body["action"],
            principal=body["principal"],
            resource=body["resource"],
            identity=body.get("identity", {}),
            platform=body.get("platform", {}),
            time=_datetime(body["time"], "time"),
            source_ip=source_ip,
            encryption_context=_mapping(body.get("encryption_context", {}), "encryption_context"),
            kms=_mapping(body.get("kms", {}), "kms"),
        )
