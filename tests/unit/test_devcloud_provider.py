"""The devcloud provider's state: files, instances, and the identities it signs."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from asn1crypto import cms

from keysteward.devcloud.provider import CERT_FILE, INSTANCES_FILE, KEY_FILE, DevCloud, DevCloudError
from keysteward.errors import BadRequest, Conflict, NotFound

pytestmark = pytest.mark.unit

NONCE = "ab" * 32


@pytest.fixture
def cloud(tmp_path: Path) -> DevCloud:
    return DevCloud.init(tmp_path / "state")


def test_init_writes_key_certificate_and_empty_state(cloud: DevCloud) -> None:
    assert stat.S_IMODE((cloud.state / KEY_FILE).stat().st_mode) == 0o600
    assert (cloud.state / CERT_FILE).read_text() == cloud.certificate_pem()
    assert json.loads((cloud.state / INSTANCES_FILE).read_text()) == {"instances": []}
    key = cloud.certificate.public_key()
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert cloud.certificate.not_valid_before_utc < datetime.now(UTC) < cloud.certificate.not_valid_after_utc
    assert not [p for p in cloud.state.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_init_twice_is_refused_and_changes_nothing(cloud: DevCloud) -> None:
    before = {p.name: p.read_bytes() for p in cloud.state.iterdir()}
    with pytest.raises(Conflict, match="already holds a devcloud"):
        DevCloud.init(cloud.state)
    assert {p.name: p.read_bytes() for p in cloud.state.iterdir()} == before


def test_open_missing_state(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="devcloud init"):
        DevCloud(tmp_path / "nothing")


def test_two_clouds_have_different_keys(cloud: DevCloud, tmp_path: Path) -> None:
    other = DevCloud.init(tmp_path / "other")
    assert other.certificate.public_key() != cloud.certificate.public_key()


def test_create_defaults(cloud: DevCloud) -> None:
    instance = cloud.create()
    assert re.fullmatch(r"i-[0-9a-f]{17}", instance.id)
    assert re.fullmatch(r"\d{12}", instance.account)
    assert (instance.region, instance.zone, instance.state, instance.cloned_from) == (
        "dev-east-1",
        "dev-east-1a",
        "running",
        None,
    )
    assert instance.image_id.startswith("ami-")
    assert cloud.get(instance.id) == instance
    assert DevCloud(cloud.state).get(instance.id) == instance  # persisted


def test_create_with_values_and_bad_values(cloud: DevCloud) -> None:
    instance = cloud.create(account="acme-prod", image_id="img-1", region="eu-west-1", zone="eu-west-1c")
    assert (instance.account, instance.image_id, instance.region, instance.zone) == (
        "acme-prod",
        "img-1",
        "eu-west-1",
        "eu-west-1c",
    )
    before = (cloud.state / INSTANCES_FILE).read_bytes()
    for bad in ({"account": "a/b"}, {"region": ""}, {"zone": "x y"}, {"image_id": "-x"}):
        with pytest.raises(BadRequest):
            cloud.create(**bad)  # type: ignore[arg-type]
    assert (cloud.state / INSTANCES_FILE).read_bytes() == before


def test_clone_and_terminate(cloud: DevCloud) -> None:
    source = cloud.create(account="111122223333")
    clone = cloud.clone(source.id)
    assert clone.id != source.id and clone.cloned_from == source.id
    assert (clone.account, clone.image_id, clone.zone) == (source.account, source.image_id, source.zone)
    gone = cloud.terminate(source.id)
    assert gone.state == "terminated" and cloud.get(source.id).state == "terminated"
    assert cloud.get(clone.id).state == "running"
    assert {i.id for i in cloud.instances()} == {source.id, clone.id}
    with pytest.raises(NotFound):
        cloud.running(source.id)
    with pytest.raises(NotFound):
        cloud.aws_document(gone, NONCE)
    with pytest.raises(NotFound):
        cloud.gcp_token(gone, "aud", NONCE, datetime.now(UTC))
    for unknown in (cloud.clone, cloud.terminate, cloud.get):
        with pytest.raises(NotFound):
            unknown("i-00000000000000000")


def test_changes_by_another_process_are_seen(cloud: DevCloud) -> None:
    """The metadata service re-reads instances.json when it changes."""
    served = DevCloud(cloud.state)
    assert served.instances() == []
    instance = DevCloud(cloud.state).create()
    assert served.running(instance.id) == instance
    DevCloud(cloud.state).terminate(instance.id)
    with pytest.raises(NotFound):
        served.running(instance.id)


def test_concurrent_creates_lose_nothing(cloud: DevCloud) -> None:
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                for _ in range(5):
                    DevCloud(cloud.state).create()
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert len(cloud.instances()) == 20


def test_damaged_state_is_reported(cloud: DevCloud) -> None:
    (cloud.state / INSTANCES_FILE).write_text("{not json")
    with pytest.raises(DevCloudError, match="damaged"):
        cloud.instances()


def test_aws_document_and_signature(cloud: DevCloud) -> None:
    instance = cloud.create(account="123456789012", zone="dev-east-1b")
    document, signature = cloud.aws_document(instance, NONCE)
    doc = json.loads(document)
    assert doc["accountId"] == "123456789012" and doc["instanceId"] == instance.id
    assert (doc["availabilityZone"], doc["region"], doc["nonce"]) == ("dev-east-1b", "dev-east-1", NONCE)
    assert doc["pendingTime"].endswith("Z")
    assert cloud.aws_document(instance, NONCE)[0] == document  # the same bytes for each of the two fetches
    signed = cms.ContentInfo.load(signature)["content"]
    assert signed["encap_content_info"]["content"].native == document  # attached
    assert len(signed["certificates"]) == 0  # no certificates embedded
    signer = signed["signer_infos"][0]
    assert signer["digest_algorithm"]["algorithm"].native == "sha256"
    assert signer["signature_algorithm"]["algorithm"].native == "rsassa_pkcs1v15"


def test_gcp_token(cloud: DevCloud) -> None:
    instance = cloud.create(account="acme-prod", region="europe-west1", zone="europe-west1b")
    now = datetime(2030, 1, 1, tzinfo=UTC)
    token = cloud.gcp_token(instance, "https://kms", NONCE, now)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = jwt.decode(
        token,
        cloud.certificate.public_key(),
        algorithms=["RS256"],
        audience="https://kms",  # type: ignore[arg-type]
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["exp"] - claims["iat"] == 3600 and claims["iat"] == int(now.timestamp())
    engine = claims["google"]["compute_engine"]
    assert (engine["project_id"], engine["instance_id"], engine["zone"]) == ("acme-prod", instance.id, "europe-west1-b")
    assert claims["nonce"] == NONCE
    standard = cloud.gcp_token(instance, "a", NONCE, now, full=False)
    assert "google" not in jwt.decode(standard, options={"verify_signature": False})


@pytest.mark.parametrize("nonce", ["", "ab" * 31, "AB" * 32, "zz" * 32, "ab" * 33])
def test_bad_nonce(cloud: DevCloud, nonce: str) -> None:
    instance = cloud.create()
    with pytest.raises(BadRequest, match="64 lowercase hex"):
        cloud.aws_document(instance, nonce)
    with pytest.raises(BadRequest, match="64 lowercase hex"):
        cloud.gcp_token(instance, "aud", nonce, datetime.now(UTC))


def test_bad_audience(cloud: DevCloud) -> None:
    with pytest.raises(BadRequest, match="audience"):
        cloud.gcp_token(cloud.create(), "", NONCE, datetime.now(UTC))
