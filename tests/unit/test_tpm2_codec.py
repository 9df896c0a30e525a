"""The TPM2 codec and quote verifier against real swtpm output, and every way the bytes can be wrong.

The vectors below were made by swtpm 0.7 with tpm2-tools 5.4 (tpm2_createak, tpm2_quote -m/-s/-o,
tpm2_certify), quoting with qualifying data sha256(b"vector-binding") after PCR 7 was extended; the AK
Names are the ones the TPM itself printed, so ``Public.name()`` is checked against an independent source.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import pytest

from keysteward.attest.errors import BINDING_MISMATCH, EvidenceRejected
from keysteward.attest.tpm import ak_name, check_ak, make_credential, verify_quote
from keysteward.formats import tpm2
from keysteward.formats.tpm2 import Tpm2FormatError

pytestmark = pytest.mark.unit

AK_PUB = bytes.fromhex(
    "01180001000b00050072000000100014000b08000000000001009c5ecbad3fd61c0d2d493d48c861a34982ddbc8130515342970db5be05f2"
    "178f5c4f6a4c22cd20a927b00d04072be4c8e87f322fc0434748b1d53503427b2da5842f84f07d92a4fed6e70ab8fd850beef1e94356f769"
    "367c3d528f1c9a87ba8f6623b1e49fae99e939eef170ba0ecf70e50bdeced94062108f69a7d45d75f2b1530a2d198374096eca57f0088b4a"
    "6c3d0bc5839fa604517f6d23efd35c835549676f2f71f4f1b3baf505f8ac35579e04f89716c272e3e9495251f12c391729ec8e10bdbe5d77"
    "6c7c732833dc7225f3f1a6d03e201d76bd34d73e13de35fc096a5be3f4a59c93331e1a0d6b90544d875faadeee16efa64550bc176d25883d"
    "5783"
)
AKEC_PUB = bytes.fromhex(
    "00580023000b00050072000000100018000b0003001000200225f679ceb73664e8896d05c5f22b3905d6f062f1aa9570f0460391b32c688c"
    "0020e60e07ea532097b1c7c9558db0014fc9c428d7d7881cabc57aaaba6cd362d67c"
)
AKPSS_PUB = bytes.fromhex(
    "01180001000b00050072000000100016000b0800000000000100b5c265a08b31190541d742f09a0a93d8f6598a304e82021e5ce549b32d74"
    "3d5b9cc918bd092a96ac3fc08c14c43fd1908904ca77c608ca3a8daae8eb66a8603dd66242a845126dcd51795fac82423e5dc475b1efcac3"
    "b4528360c909595afd2b83a7be24872362c9861acb025791d72ec46da6a2f45face63c1aa2cc688966c7325249e1a8291002fca2021c0f40"
    "67f01b94135d6ff09212dc834d7a9a51aff422b0ec7b1f29e98996e5bc84fa899cd8be1c03518bb42360a9b9856869cd7df97643c8132877"
    "f245f2c908da2d81e49911120336b8aad9f670930e4e312793f9c5abc6b7c9f1290a9cfee0f1f2a1160c7b7d80bad3e9e4704f93d79fb5ba"
    "cb3d"
)
EK_PUB = bytes.fromhex(
    "013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa000600800043001008000000"
    "00000100b41428580bab7557f7a90a27d736bf5a797b26f53ca105e66a674bc5729d7c3b6964fc946528376f06349b50ec4d07eab31c492f"
    "14f97d68a4838a3485f35f9c166465a53a7faf74b17ad6fe4b75947b60af113b9dc5fc0db86f91fc23cfcc7c14361def45b164f935afb0a7"
    "99725281d79ed8d0a4fc13475852587486ccf9450687e336014052dddade2327b12f1e10bc6551740e364275a942876d9cf937ffdb2a7f21"
    "50cb9ade1214aae0007314e1754078a81af6b36888bbfbcf2d2bb1fec5852e832f4ab3e94f0efb8357cd799b0ef960112c77659520e6b6ca"
    "847d70d73d0ce329f101b9a21bbe922129c947e150d0182dd95c42a2d91685c0443d1f73"
)
EKEC_PUB = bytes.fromhex(
    "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa000600800043001000030010"
    "002033d041aa60443a50a97e829a4c0cddf904d50f00b49c8962828cbbf9de4b9e3100209114f78ef6e54dc6dcd3e10e18761110c8e560ee"
    "95709af5830b44c936ae71d2"
)
Q_RSA_MSG = bytes.fromhex(
    "ff54434780180022000b8da4098ed4b86c3507c02cf195ddfd58785330a20d5cabb95291020fa8576e120020baff347dbb98909f140430d4"
    "edd42cbe2ca18e46b5c536f40cbc6f9fe1efc4740000000000010e76000000010000000001201910230016363600000001000b0383000000"
    "2077f80fc419efe236e6352c81cc75306181eec6164e1d3c786e4ce5f687e07094"
)
Q_RSA_SIG = bytes.fromhex(
    "0014000b0100042a639b10fd7808098d97a097fe5445669fddb813f6636319a1a588f21c508fcab6b37d8ee7b0d411a17ac795d19c5e58c9"
    "d37e0e83d91df6981f937a88c4d64d812420acab9fdba2650bc1bc971f09b906442e711071fb0ffe7760dc4c7ba686022b48a1457447d343"
    "1101a7365673449ff2bb6cc599090f4e0ee7606238d0ee2d1f51108a30e16da659043cfe0a717554d8cd371c4270390e9c2657455ad1bf43"
    "5ebdca35996ba926a0ce015928966122d0d65417019d6a3af2930ce165bbcf1bcde8aee9537f8778a66e42df2652481c5498847d73406a6c"
    "0ad28b4e0b036809d812fb0f0c9b56cd06145b9687fa782e57a77b0509dc27e12975146a22c1"
)
Q_RSA_PCR = bytes.fromhex(
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000057fea962fd3b558c507214f3b54503db13923d29902ce7aae369ea52f1645f0f"
)
Q_EC_MSG = bytes.fromhex(
    "ff54434780180022000bf616972041f0649adb10c564ce01c04bc2cfef843bc15279c7843fe05b2318eb0020baff347dbb98909f140430d4"
    "edd42cbe2ca18e46b5c536f40cbc6f9fe1efc474000000000001046d000000010000000001201910230016363600000001000b0381000000"
    "203287439556825246489630a2742b21ad48cc87e4c04b46f248ac0af13a13353c"
)
Q_EC_SIG = bytes.fromhex(
    "0018000b002013acf625955a46382792131f656bbc5d9e2eaee317b9f2b81118100ea117c6fd00204c3ad37a3863b4e93fc8235dc03ecc23"
    "05bb478f499f6dcd468c76a1cdf500e6"
)
Q_EC_PCR = bytes.fromhex(
    "000000000000000000000000000000000000000000000000000000000000000057fea962fd3b558c507214f3b54503db13923d29902ce7aa"
    "e369ea52f1645f0f"
)
Q_PSS_MSG = bytes.fromhex(
    "ff54434780180022000b4bf72157eedaef6d1e25e0a1b74a653cab05000c29af8becb2b03cf8511c5d880020baff347dbb98909f140430d4"
    "edd42cbe2ca18e46b5c536f40cbc6f9fe1efc4740000000000011915000000010000000001201910230016363600000001000b0380000000"
    "207f5b9a0d0abc054f7e31e7946af1fd334607d7888ff9826058044a83426d6b5e"
)
Q_PSS_SIG = bytes.fromhex(
    "0016000b010028305b30c783be32af427e6b85f5c27a5ba629cbf97de055eafa086f540da10b8c7049af41afafbdd1a73ce433eb626e037b"
    "323bf08d54bc6c399fa122c27b4d796e84c726e898baed496dda34b828fcc5b2dbd075dba91e24acb67e1bd148d7d82420f95e00f73bbc83"
    "70dd403e7d596c87b05116b11dce91ea1b45cc33359043f1946465951a7dc4c4e8c3074e6868f44e3ae710eca88240654e6f4de92a80c7ea"
    "70f0183ead7e0a19dc6a81ac02b58ce8379a8ad59a1f916835626999e65e3e5d2beafe4234417192ba44bd739710368710debe89dc028fea"
    "a97b161e943512be6b9552f0cf4c1bd9597a02ee4db0bf0d77e61f0a570e310aa8eac8d5a6d0"
)
Q_PSS_PCR = bytes.fromhex("57fea962fd3b558c507214f3b54503db13923d29902ce7aae369ea52f1645f0f")
CERT_ATTEST = bytes.fromhex(
    "ff54434780170022000b8da4098ed4b86c3507c02cf195ddfd58785330a20d5cabb95291020fa8576e12000400ff55aa0000000000010e90"
    "00000001000000000120191023001636360022000bba3b92be146cdf9ef9597a4023ce9a11ed5ae9013f4c8b43a13b2cf87451e5cc002200"
    "0bf616972041f0649adb10c564ce01c04bc2cfef843bc15279c7843fe05b2318eb"
)
CERT_SIG = bytes.fromhex(
    "0014000b0100663e269ffec5d9c83084098b5fb6fad15e835802a3ae43c212a15b1ac4a9660c3928ae08f63d47254351d3ae1a91cff58e34"
    "0ba4c86c5b6411762e055942572cd7bc8d265d3121f6a38318257ed0165db223c9731789e7cd846400fb2822b1fe869d89e80e69e7824058"
    "4e1dd030fbea7c85a38c70271d811c7ca27e053c410a1e6f638aaa240760356b805894372aa97d5ea93325e59359af45020f1b28af39af6e"
    "89104c7faa1f853b125408dcae1599d5c8f4ccc58ad44806a055dff6c76df927ff590c6cf5c6b9a58838b5c093edfdba2f2cb08c367fdc4d"
    "4a9709654c4eaefedf3e79550283999b3e22074ba11843da5b54f169e97a2ba95ffc91f4475e"
)

BINDING = hashlib.sha256(b"vector-binding").digest()
AK_NAME = bytes.fromhex("000bc54d7dc05f4eb007de28411487b274db9c461d8bd023887a80910b2ad0cfc29c")
AKEC_NAME = bytes.fromhex("000bba3b92be146cdf9ef9597a4023ce9a11ed5ae9013f4c8b43a13b2cf87451e5cc")
AKPSS_NAME = bytes.fromhex("000bf3e3312f2e606611f6fc4966bf80389f03ca58bafc9553a5e7b3ac47bbd0884f")
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
PCR7 = "57fea962fd3b558c507214f3b54503db13923d29902ce7aae369ea52f1645f0f"

# (AK public, quote, signature, PCR values as tpm2_quote -o wrote them, quoted PCR indices)
VECTORS = {
    "rsassa": (AK_PUB, Q_RSA_MSG, Q_RSA_SIG, Q_RSA_PCR, [0, 1, 7]),
    "ecdsa": (AKEC_PUB, Q_EC_MSG, Q_EC_SIG, Q_EC_PCR, [0, 7]),
    "rsapss": (AKPSS_PUB, Q_PSS_MSG, Q_PSS_SIG, Q_PSS_PCR, [7]),
}


def evidence(kind: str) -> dict[str, Any]:
    _, quote, sig, values, indices = VECTORS[kind]
    return {
        "type": "tpm2-quote",
        "quote": base64.b64encode(quote).decode(),
        "signature": base64.b64encode(sig).decode(),
        "pcrs": {"sha256": {str(i): values[32 * k : 32 * k + 32].hex() for k, i in enumerate(indices)}},
    }


def null_scheme(public: bytes) -> bytes:
    """The same key with its signing scheme left open (TPM_ALG_NULL), as a TPM2B_PUBLIC."""
    tpmt = public[2:]
    assert tpm2.parse_tpmt_public(tpmt).symmetric is None  # scheme at offset 12, after a 2-byte NULL symmetric
    opened = tpmt[:12] + struct.pack(">H", tpm2.ALG_NULL) + tpmt[16:]
    assert tpm2.parse_tpmt_public(opened).scheme == (tpm2.ALG_NULL, tpm2.ALG_NULL)
    return struct.pack(">H", len(opened)) + opened


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- structures ---------------------------------------------------------------------------------------


def test_public_areas_parse_and_their_names_match_the_tpm() -> None:
    for pub, name in ((AK_PUB, AK_NAME), (AKEC_PUB, AKEC_NAME), (AKPSS_PUB, AKPSS_NAME)):
        assert ak_name(pub) == name
        check_ak(pub)
    rsa = tpm2.parse_public(AK_PUB)
    assert (rsa.type, rsa.name_alg, rsa.attributes, rsa.rsa_bits, rsa.exponent) == (tpm2.ALG_RSA, 0xB, 0x50072, 2048, 0)
    assert rsa.scheme == (tpm2.ALG_RSASSA, tpm2.ALG_SHA256) and rsa.symmetric is None and len(rsa.modulus) == 256
    ecc = tpm2.parse_public(AKEC_PUB)
    assert (ecc.type, ecc.curve, ecc.scheme, len(ecc.x), len(ecc.y)) == (tpm2.ALG_ECC, 3, (0x18, 0xB), 32, 32)
    for ek_pub in (EK_PUB, EKEC_PUB):
        ek = tpm2.parse_public(ek_pub)
        assert ek.auth_policy == EK_POLICY and ek.symmetric == (tpm2.ALG_AES, 128, tpm2.ALG_CFB)
        assert ek.has(tpm2.RESTRICTED) and ek.has(tpm2.DECRYPT) and not ek.has(tpm2.SIGN)


def test_attest_and_signature_round_trip() -> None:
    for _, quote, sig, values, indices in VECTORS.values():
        attest = tpm2.parse_attest(quote)
        assert attest.type == tpm2.ST_ATTEST_QUOTE and attest.extra_data == BINDING and attest.quote is not None
        assert attest.quote.pcr_select == (tpm2.PcrSelection(tpm2.ALG_SHA256, tuple(indices)),)
        assert attest.quote.pcr_digest == hashlib.sha256(values).digest()
        assert tpm2.encode_attest(attest) == quote
        assert tpm2.encode_signature(tpm2.parse_signature(sig)) == sig
    certify = tpm2.parse_attest(CERT_ATTEST)
    assert certify.type == tpm2.ST_ATTEST_CERTIFY and certify.certify is not None
    assert certify.certify.name == AKEC_NAME and tpm2.encode_attest(certify) == CERT_ATTEST
    ecdsa = tpm2.parse_signature(Q_EC_SIG)
    assert (ecdsa.sig_alg, ecdsa.hash_alg, len(ecdsa.r), len(ecdsa.s)) == (tpm2.ALG_ECDSA, tpm2.ALG_SHA256, 32, 32)


PARSERS = {
    "attest": (tpm2.parse_attest, Q_RSA_MSG),
    "signature": (tpm2.parse_signature, Q_RSA_SIG),
    "ecdsa signature": (tpm2.parse_signature, Q_EC_SIG),
    "public": (tpm2.parse_public, AK_PUB),
    "ecc public": (tpm2.parse_public, AKEC_PUB),
    "pcr selection": (tpm2.parse_pcr_selection, tpm2.encode_pcr_selection([tpm2.PcrSelection(0xB, (0, 7))])),
    "digest list": (tpm2.parse_digest_list, tpm2.encode_digest_list([bytes(32), bytes(20)])),
    "credential": (tpm2.parse_credential_file, make_credential(EK_PUB, AK_NAME, bytes(32))),
}


@pytest.mark.parametrize("name", PARSERS)
def test_every_truncation_and_trailing_byte_is_refused(name: str) -> None:
    parse, good = PARSERS[name]
    parse(good)
    for cut in range(len(good)):
        with pytest.raises(Tpm2FormatError):
            parse(good[:cut])
    with pytest.raises(Tpm2FormatError, match="unexpected bytes"):
        parse(good + b"\0")
    with pytest.raises(Tpm2FormatError):
        parse(good + bytes(4096))


def test_size_fields_beyond_the_tpms_maxima_are_refused() -> None:
    # extraData size (offset 4+2+2+34) claims 0x0100 bytes: more than TPM2B_DATA can hold
    bad = bytearray(Q_RSA_MSG)
    bad[42:44] = b"\x01\x00"
    with pytest.raises(Tpm2FormatError, match="extraData is 256 bytes, more than the maximum 66"):
        tpm2.parse_attest(bytes(bad))
    with pytest.raises(Tpm2FormatError, match="more than 16"):
        tpm2.parse_pcr_selection(struct.pack(">I", 17) + bytes(17 * 6))
    with pytest.raises(Tpm2FormatError, match="sizeofSelect 5"):
        tpm2.parse_pcr_selection(struct.pack(">IHB", 1, 0xB, 5) + bytes(5))
    with pytest.raises(Tpm2FormatError, match="more than 8"):
        tpm2.parse_digest_list(struct.pack(">I", 9) + b"\0\0" * 9)
    with pytest.raises(Tpm2FormatError, match="digest is 65 bytes"):
        tpm2.parse_digest_list(struct.pack(">IH", 1, 65) + bytes(65))
    with pytest.raises(Tpm2FormatError, match="unique is 513 bytes"):
        tpm2.parse_tpmt_public(AK_PUB[2:-258] + struct.pack(">H", 513) + bytes(513))


def test_wrong_magic_type_and_algorithms_are_refused() -> None:
    with pytest.raises(Tpm2FormatError, match="magic"):
        tpm2.parse_attest(b"\xff\x54\x43\x48" + Q_RSA_MSG[4:])
    with pytest.raises(Tpm2FormatError, match="unknown attestation type 0x8099"):
        tpm2.parse_attest(Q_RSA_MSG[:4] + b"\x80\x99" + Q_RSA_MSG[6:])
    with pytest.raises(Tpm2FormatError, match="safe"):
        bad = bytearray(Q_RSA_MSG)
        bad[44 + 32 + 16] = 2
        tpm2.parse_attest(bytes(bad))
    with pytest.raises(Tpm2FormatError, match="not RSASSA, RSAPSS or ECDSA"):
        tpm2.parse_signature(b"\x00\x05" + Q_RSA_SIG[2:])  # HMAC
    with pytest.raises(Tpm2FormatError, match="not RSA or ECC"):
        tpm2.parse_public(AK_PUB[:2] + b"\x00\x08" + AK_PUB[4:])  # keyedhash
    with pytest.raises(Tpm2FormatError, match="nameAlg"):
        tpm2.parse_public(AK_PUB[:4] + b"\x00\x12" + AK_PUB[6:])  # SM3
    cred = make_credential(EK_PUB, AK_NAME, bytes(16))
    with pytest.raises(Tpm2FormatError, match="BADCC0DE"):
        tpm2.parse_credential_file(b"\xba\xdc\xc0\xdf" + cred[4:])
    with pytest.raises(Tpm2FormatError, match="version"):
        tpm2.parse_credential_file(cred[:4] + b"\0\0\0\2" + cred[8:])


def test_lists_round_trip() -> None:
    selections = [tpm2.PcrSelection(0xB, (0, 1, 7, 23)), tpm2.PcrSelection(0x4, ())]
    assert list(tpm2.parse_pcr_selection(tpm2.encode_pcr_selection(selections))) == selections
    digests = [bytes(range(32)), b"\x01" * 20, b""]
    assert list(tpm2.parse_digest_list(tpm2.encode_digest_list(digests))) == digests
    with pytest.raises(Tpm2FormatError):
        tpm2.encode_pcr_selection([tpm2.PcrSelection(0xB, (24,))])


# --- the AK and the credential ------------------------------------------------------------------------


def test_check_ak_refuses_keys_that_could_sign_anything_or_decrypt() -> None:
    with pytest.raises(EvidenceRejected, match="lacks sign"):
        check_ak(EK_PUB)
    unrestricted = AK_PUB[:6] + struct.pack(">I", 0x50072 & ~tpm2.RESTRICTED) + AK_PUB[10:]
    with pytest.raises(EvidenceRejected, match="lacks restricted"):
        check_ak(unrestricted)
    migratable = AK_PUB[:6] + struct.pack(">I", 0x50072 & ~(tpm2.FIXED_TPM | tpm2.FIXED_PARENT)) + AK_PUB[10:]
    with pytest.raises(EvidenceRejected, match="lacks fixedTPM, fixedParent"):
        check_ak(migratable)
    decrypting = AK_PUB[:6] + struct.pack(">I", 0x50072 | tpm2.DECRYPT) + AK_PUB[10:]
    with pytest.raises(EvidenceRejected, match="decryption key"):
        check_ak(decrypting)


def test_make_credential_layout_and_refusals() -> None:
    rsa = tpm2.parse_credential_file(make_credential(EK_PUB, AK_NAME, b"x" * 32))
    assert (len(rsa.integrity_hmac), len(rsa.enc_identity), len(rsa.encrypted_secret)) == (32, 34, 256)
    ecc = tpm2.parse_credential_file(make_credential(EKEC_PUB, AK_NAME, b"x" * 16))
    assert (len(ecc.integrity_hmac), len(ecc.enc_identity), len(ecc.encrypted_secret)) == (32, 18, 68)
    assert make_credential(EK_PUB, AK_NAME, b"s") != make_credential(EK_PUB, AK_NAME, b"s")  # fresh seed
    with pytest.raises(ValueError, match="1 to 32 bytes"):
        make_credential(EK_PUB, AK_NAME, bytes(33))
    with pytest.raises(ValueError, match="TPM Name"):
        make_credential(EK_PUB, AK_NAME[:-1], bytes(32))
    with pytest.raises(EvidenceRejected, match="not a restricted decryption"):
        make_credential(AK_PUB, AK_NAME, bytes(32))


# --- verify_quote -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", VECTORS)
def test_real_quotes_verify(kind: str) -> None:
    ak = VECTORS[kind][0]
    claims = verify_quote(evidence(kind), ak, binding=BINDING)
    assert claims.pcrs["sha256"][7] == PCR7 and claims.ak_name == ak_name(ak).hex()
    assert claims.claims()["pcrs"]["sha256:7"] == PCR7 and claims.claims()["tee"] == "tpm2"
    assert claims.safe and claims.reset_count == 1


def test_quote_checks_reject_each_attack() -> None:
    good = evidence("rsassa")
    with pytest.raises(EvidenceRejected) as err:
        verify_quote(good, AK_PUB, binding=hashlib.sha256(b"another request").digest())
    assert err.value.code == BINDING_MISMATCH
    attacks: dict[str, tuple[dict[str, Any], bytes, str]] = {
        "altered pcr": ({**good, "pcrs": {"sha256": {**good["pcrs"]["sha256"], "0": "11" * 32}}}, AK_PUB, "pcrDigest"),
        "dropped pcr": ({**good, "pcrs": {"sha256": {"0": "00" * 32, "7": PCR7}}}, AK_PUB, "covers PCRs"),
        "other bank": ({**good, "pcrs": {"sha1": {"0": "00" * 20}, **good["pcrs"]}}, AK_PUB, "covers PCRs"),
        "other ak, other scheme": (good, AKPSS_PUB, "scheme is not the one"),
        "pss quote, rsassa ak": (evidence("rsapss"), AK_PUB, "scheme is not the one"),
        "other ak, any scheme": (good, null_scheme(AKPSS_PUB), "does not verify with the enrolled AK"),
        "ecdsa ak": (good, null_scheme(AKEC_PUB), "does not fit the key type"),
        "certify": ({**good, "quote": b64(CERT_ATTEST), "signature": b64(CERT_SIG)}, AK_PUB, "not a quote"),
        "flipped quote bit": ({**good, "quote": b64(Q_RSA_MSG[:-1] + b"\0")}, AK_PUB, "does not verify"),
        "flipped signature": ({**good, "signature": b64(Q_RSA_SIG[:-1] + b"\0")}, AK_PUB, "does not verify"),
        "sha1 signature": ({**good, "signature": b64(b"\0\x14\0\x04" + Q_RSA_SIG[4:])}, AK_PUB, "only SHA-256"),
        "oversized quote": ({**good, "quote": b64(Q_RSA_MSG + bytes(2048))}, AK_PUB, "larger than 2048"),
        "not base64": ({**good, "quote": "!!"}, AK_PUB, "not valid base64"),
        "leading zero index": ({**good, "pcrs": {"sha256": {"07": PCR7}}}, AK_PUB, "index"),
        "index 24": ({**good, "pcrs": {"sha256": {"24": PCR7}}}, AK_PUB, "index"),
        "short value": ({**good, "pcrs": {"sha256": {"7": PCR7[:-2]}}}, AK_PUB, "32 bytes of hex"),
        "unknown bank": ({**good, "pcrs": {"sm3_256": {"7": PCR7}}}, AK_PUB, "bank"),
        "no pcrs": ({**good, "pcrs": {}}, AK_PUB, "1 to 4"),
        "extra field": ({**good, "note": "x"}, AK_PUB, "exactly the fields"),
        "wrong type": ({**good, "type": "tpm2-certify"}, AK_PUB, "unknown TPM evidence type"),
        "corrupt enrolled ak": (good, AK_PUB[:-1], "enrolled AK does not parse"),
    }
    for what, (bad, ak, message) in attacks.items():
        with pytest.raises(EvidenceRejected, match=message) as err:
            verify_quote(bad, ak, binding=BINDING)
        assert err.value.code == "evidence_invalid", what
    with pytest.raises(EvidenceRejected, match="must be an object"):
        verify_quote([], AK_PUB, binding=BINDING)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        verify_quote(good, AK_PUB, binding=BINDING[:16])


def test_messages_carry_no_evidence_bytes() -> None:
    good = evidence("rsassa")
    bad = {**good, "pcrs": {"sha256": {**good["pcrs"]["sha256"], "0": "11" * 32}}}
    with pytest.raises(EvidenceRejected) as err:
        verify_quote(bad, AK_PUB, binding=BINDING)
    text = str(err.value)
    assert "11" * 32 not in text and PCR7 not in text and BINDING.hex() not in text
