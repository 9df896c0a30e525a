"""cffi build script (API, out-of-line mode) for ``keysteward.crypto._xts_native``.

setuptools runs it through ``cffi_modules`` in setup.py on every ``pip install`` of keysteward. It
compiles a small C extension over a system crypto library that processes many sectors per call:
the key is set once per :class:`keysteward.crypto.xts.XtsCipher`, and between sectors only the
IV changes, so no key schedule is recomputed and no Python code runs per sector.

Backend, chosen when building (environment variable ``KEYSTEWARD_XTS_BACKEND``):

* ``vaes`` (default): keysteward's own AES-XTS in C with AVX-512 intrinsics (VAES + VPCLMULQDQ, 16
  blocks per loop in four zmm registers), linked against libgcrypt like ``gcrypt``. At run time it
  checks the CPU once (``__builtin_cpu_supports``: aes, avx512f/vl/bw, vaes, vpclmulqdq); without
  those, or with ``KEYSTEWARD_XTS_NO_VAES=1`` in the environment, every cipher object uses the
  ``gcrypt`` code path below instead. The AES key schedules (key1 encrypt and decrypt, key2 encrypt)
  are expanded once per cipher object with AES-NI, kept in its C struct and wiped with
  ``explicit_bzero`` when it is freed. Per sector: T = AES-enc(key2, plain64 tweak), then whole
  blocks only (sector sizes are multiples of 16: no ciphertext stealing), the tweak of block j being
  T * x^j in GF(2^128) (little-endian, x^128 = x^7 + x^2 + x + 1). ``ks_xts_backend`` starts with
  ``vaes`` when this code runs XTS, and with the libgcrypt version when the fallback does.
* ``gcrypt``: the system libgcrypt (Debian ``libgcrypt20-dev``, also cryptsetup's crypto
  library); one ``gcry_cipher_hd_t``, ``gcry_cipher_setiv`` + ``gcry_cipher_encrypt``/``decrypt`` per
  sector. libgcrypt >= 1.9 has a VAES/AVX2 XTS path that Debian's OpenSSL 3.0 lacks: measured here it
  runs twice as fast (bench/xts.py prints which backend ran).
* ``openssl``: the system libcrypto (Debian ``libssl-dev``); one ``EVP_CIPHER_CTX`` per direction,
  ``EVP_CipherInit_ex`` with only a new IV per sector, then ``EVP_CipherUpdate``.

``openssl`` and ``gcrypt`` keep the key only inside the library's context, which the library wipes
when the context is freed (``EVP_CIPHER_CTX_free`` / ``gcry_cipher_close``); ``vaes`` keeps only the
expanded round keys, in its own struct, and wipes them in ``ks_xts_free``. The C functions are static: nothing is
added to the process's symbol table but the module's init function.

cffi releases the GIL around every call into an API-mode extension (the generated wrapper brackets
each call with ``Py_BEGIN_ALLOW_THREADS``/``Py_END_ALLOW_THREADS``), so two Python threads with two
keys use two cores. keysteward.crypto.xts serializes calls that share one context.

Nothing imports this file at run time; keysteward.crypto.xts falls back to pyca/cryptography when
the extension was not built.
"""

from __future__ import annotations

import os

from cffi import FFI

MODULE = "keysteward.crypto._xts_native"
BACKENDS = {"openssl": ["crypto"], "gcrypt": ["gcrypt"], "vaes": ["gcrypt"]}

CDEF = """
#define KS_XTS_OK ...
#define KS_XTS_ERR_KEY_LENGTH ...
#define KS_XTS_ERR_EQUAL_HALVES ...
#define KS_XTS_ERR_NOMEM ...
#define KS_XTS_ERR_ARGUMENT ...
#define KS_XTS_ERR_OVERLAP ...
#define KS_XTS_ERR_LIBRARY ...

typedef struct ks_xts ks_xts;

int ks_xts_new(const unsigned char *key, size_t key_len, ks_xts **out);
int ks_xts_crypt(ks_xts *x, int encrypt, const unsigned char *in, unsigned char *out,
                 size_t n_sectors, size_t sector_size, uint64_t first_tweak, uint64_t tweak_step);
void ks_xts_free(ks_xts *x);
const char *ks_xts_backend(void);

#define KS_PLANE_DISC ...
#define KS_PLANE_HANDOFF ...
#define KS_PLANE_CLOSED ...
#define KS_PLANE_NOMEM ...
#define KS_PLANE_SOCKET ...
#define KS_PLANE_BUCKETS ...
#define KS_PLANE_STAT_WORDS ...
#define KS_PLANE_STATS ...

typedef struct ks_nbd_plane ks_nbd_plane;

int ks_plane_new(int sock, int fd, uint64_t data_offset, uint64_t size, uint64_t iv_tweak, uint32_t sector_size,
                 uint32_t max_block, int read_only, int structured, ks_xts *xts, void *ssl,
                 const unsigned char *pre, size_t pre_len, const double *bounds, int n_bounds, ks_nbd_plane **out);
int ks_plane_serve(ks_nbd_plane *p, unsigned char *header_out);
int ks_plane_recv_all(ks_nbd_plane *p, unsigned char *b, size_t n);
int ks_plane_send(ks_nbd_plane *p, const unsigned char *b, size_t n);
int ks_tls_load(unsigned long *version);
int ks_tls_owned_by(void *ssl, void *ctx);
void ks_plane_take(ks_nbd_plane *p, uint64_t *out);
void ks_plane_stop(ks_nbd_plane *p);
void ks_plane_free(ks_nbd_plane *p);
"""


def backend() -> str:
    name = os.environ.get("KEYSTEWARD_XTS_BACKEND", "vaes").strip().lower() or "vaes"
    if name not in BACKENDS:
        raise ValueError(f"KEYSTEWARD_XTS_BACKEND must be one of {sorted(BACKENDS)}, not {name!r}")
    return name


HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = {
    "openssl": ("native/xts_common.c", "native/xts_openssl.c"),
    "gcrypt": ("native/xts_common.c", "native/xts_gcrypt_init.c", "native/xts_gcrypt.c"),
    "vaes": ("native/xts_common.c", "native/xts_gcrypt_init.c", "native/xts_vaes.c"),
}
"""Each backend's C source, in order, under src/keysteward/crypto/."""
PLANE_SOURCES = ("../proxy/nbd_io.c", "../proxy/nbd_plane.c", "../proxy/nbd_tls.c")
"""The native NBD data plane (its plain I/O, its loop, its TLS pump), compiled into this module so that it
calls ks_xts_crypt on the volume's own cipher contexts."""


def _read(names: tuple[str, ...]) -> str:
    parts = []
    for name in names:
        with open(os.path.join(HERE, name), encoding="utf-8") as source:
            parts.append(source.read())
    return "\n".join(parts)


def make_ffibuilder(name: str) -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(MODULE, _read(SOURCES[name] + PLANE_SOURCES), libraries=BACKENDS[name])
    return builder


ffibuilder = make_ffibuilder(backend())

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
