"""Stored volumes, and volumes about to be made, as the ``resource`` of a policy request."""

from __future__ import annotations

from typing import Any

from keysteward.release.volumes import VolumeInfo, VolumeSpec


def volume_resource(volume: VolumeInfo) -> dict[str, Any]:
    """A stored volume as the policy's ``resource``."""
    return {
        "type": "Volume",
        "id": volume.id,
        "name": volume.name,
        "key": volume.key,
        "labels": dict(volume.labels),
        "binding": volume.binding.as_dict(),
    }


def spec_resource(volume_id: str, spec: VolumeSpec) -> dict[str, Any]:
    """A volume being registered (its id chosen, nothing stored yet) as the policy's ``resource``."""
    return {
        "type": "Volume",
        "id": volume_id,
        "name": spec.name,
        "key": spec.key,
        "labels": dict(spec.labels),
        "binding": spec.binding.as_dict(),
    }
