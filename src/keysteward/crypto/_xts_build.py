"""cffi build script (API, out-of-line mode) for ``keysteward.crypto._xts_native``.

setuptools runs it through ``cffi_modules`` in setup.py on every ``pip install`` of keysteward. It
compiles a small C extension over a system crypto library that processes many sectors per call:
the key is set once per :class:`keysteward.crypto.xts.XtsCipher`, and between sectors only the
IV changes, so no key schedule is recomputed and no Python code runs per sector.

Backend, chosen when building (environment variable ``KEYSTEWARD_XTS_BACKEND``):

* ``gcrypt`` (default): the system libgcrypt (Debian ``libgcrypt20-dev``, also cryptsetup's crypto
  library); one ``gcry_cipher_hd_t``, ``gcry_cipher_setiv`` + ``gcry_cipher_encrypt``/``decrypt`` per
  sector. libgcrypt >= 1.9 has a VAES/AVX2 XTS path that Debian's OpenSSL 3.0 lacks: measured here it
  runs twice as fast (bench/xts.py prints which backend ran).
* ``openssl``: the system libcrypto (Debian ``libssl-dev``); one ``EVP_CIPHER_CTX`` per direction,
  ``EVP_CipherInit_ex`` with only a new IV per sector, then ``EVP_CipherUpdate``.

Both keep the key only inside the library's context, which the library wipes when the context is
freed (``EVP_CIPHER_CTX_free`` / ``gcry_cipher_close``). The C functions are static: nothing is
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
BACKENDS = {"openssl": ["crypto"], "gcrypt": ["gcrypt"]}

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
"""

_COMMON = r"""
#include <limits.h>
#include <stdint.h>
#include <string.h>

#define KS_XTS_OK 0
#define KS_XTS_ERR_KEY_LENGTH 1
#define KS_XTS_ERR_EQUAL_HALVES 2
#define KS_XTS_ERR_NOMEM 3
#define KS_XTS_ERR_ARGUMENT 4
#define KS_XTS_ERR_OVERLAP 5
#define KS_XTS_ERR_LIBRARY 6

typedef struct ks_xts ks_xts;

/* Constant time: the halves are secret, only "equal or not" may leak. */
static int ks_halves_equal(const unsigned char *key, size_t key_len)
{
    unsigned char diff = 0;
    size_t i, half = key_len / 2;
    for (i = 0; i < half; i++)
        diff |= (unsigned char)(key[i] ^ key[half + i]);
    return diff == 0;
}

static int ks_check_key(const unsigned char *key, size_t key_len)
{
    if (key_len != 32 && key_len != 64)
        return KS_XTS_ERR_KEY_LENGTH;
    /* OpenSSL refuses equal halves for encryption only; refuse both ways, like cryptsetup. */
    if (ks_halves_equal(key, key_len))
        return KS_XTS_ERR_EQUAL_HALVES;
    return KS_XTS_OK;
}

/* Shared argument checks of ks_xts_crypt; in == out (in place) is allowed, other overlaps not. */
static int ks_check_crypt(const ks_xts *x, const unsigned char *in, const unsigned char *out,
                          size_t n_sectors, size_t sector_size)
{
    size_t total;
    if (x == NULL || in == NULL || out == NULL || sector_size < 16 || sector_size % 16 != 0
        || sector_size > INT_MAX || (n_sectors != 0 && n_sectors > SIZE_MAX / sector_size))
        return KS_XTS_ERR_ARGUMENT;
    total = n_sectors * sector_size;
    if (in != out && (uintptr_t)out < (uintptr_t)in + total && (uintptr_t)in < (uintptr_t)out + total)
        return KS_XTS_ERR_OVERLAP;
    return KS_XTS_OK;
}

/* dm-crypt plain64: the 64-bit sector number, little-endian, zero-padded to 16 bytes. */
static void ks_plain64(unsigned char iv[16], uint64_t tweak)
{
    int b;
    for (b = 0; b < 8; b++)
        iv[b] = (unsigned char)(tweak >> (8 * b));
    memset(iv + 8, 0, 8);
}
"""

_OPENSSL = r"""
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>

struct ks_xts {
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
};

/* Frees both contexts (OpenSSL cleanses the key schedules it holds) and cleanses the struct. */
static void ks_xts_free(ks_xts *x)
{
    if (x == NULL)
        return;
    EVP_CIPHER_CTX_free(x->enc);
    EVP_CIPHER_CTX_free(x->dec);
    OPENSSL_clear_free(x, sizeof(*x));
}

/* key is key1 || key2 (32 bytes: AES-128-XTS, 64 bytes: AES-256-XTS), as dm-crypt takes it. */
static int ks_xts_new(const unsigned char *key, size_t key_len, ks_xts **out)
{
    ks_xts *x;
    const EVP_CIPHER *cipher;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    EVP_CIPHER *fetched;
#endif
    int rc, ok;

    *out = NULL;
    rc = ks_check_key(key, key_len);
    if (rc != KS_XTS_OK)
        return rc;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* An explicit fetch: the contexts keep it, so re-initialising them never fetches again. */
    fetched = EVP_CIPHER_fetch(NULL, key_len == 32 ? "AES-128-XTS" : "AES-256-XTS", NULL);
    if (fetched == NULL) {
        ERR_clear_error();
        return KS_XTS_ERR_LIBRARY;
    }
    cipher = fetched;
#else
    cipher = key_len == 32 ? EVP_aes_128_xts() : EVP_aes_256_xts();
#endif
    x = OPENSSL_zalloc(sizeof(*x));
    ok = x != NULL && (x->enc = EVP_CIPHER_CTX_new()) != NULL && (x->dec = EVP_CIPHER_CTX_new()) != NULL;
    rc = ok ? KS_XTS_OK : KS_XTS_ERR_NOMEM;
    if (ok && (EVP_CipherInit_ex(x->enc, cipher, NULL, key, NULL, 1) != 1
               || EVP_CipherInit_ex(x->dec, cipher, NULL, key, NULL, 0) != 1))
        rc = KS_XTS_ERR_LIBRARY;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    EVP_CIPHER_free(fetched);
#endif
    if (rc != KS_XTS_OK) {
        ks_xts_free(x);
        ERR_clear_error();
        return rc;
    }
    *out = x;
    return KS_XTS_OK;
}

/*
 * n_sectors data units of sector_size bytes; unit i is processed with the plain64 tweak
 * first_tweak + i * tweak_step (mod 2^64).
 */
static int ks_xts_crypt(ks_xts *x, int encrypt, const unsigned char *in, unsigned char *out,
                        size_t n_sectors, size_t sector_size, uint64_t first_tweak, uint64_t tweak_step)
{
    EVP_CIPHER_CTX *ctx;
    unsigned char iv[16];
    uint64_t tweak = first_tweak;
    size_t i;
    int outl, rc;

    rc = ks_check_crypt(x, in, out, n_sectors, sector_size);
    if (rc != KS_XTS_OK)
        return rc;
    ctx = encrypt ? x->enc : x->dec;
    for (i = 0; i < n_sectors; i++) {
        ks_plain64(iv, tweak);
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1
            || EVP_CipherUpdate(ctx, out, &outl, in, (int)sector_size) != 1 || outl != (int)sector_size) {
            ERR_clear_error();
            return KS_XTS_ERR_LIBRARY;
        }
        in += sector_size;
        out += sector_size;
        tweak += tweak_step;
    }
    return KS_XTS_OK;
}

static const char *ks_xts_backend(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}
"""

_GCRYPT = r"""
#include <pthread.h>
#include <stdio.h>
#include <gcrypt.h>

struct ks_xts {
    gcry_cipher_hd_t hd;
};

static pthread_once_t ks_gcrypt_once = PTHREAD_ONCE_INIT;
static int ks_gcrypt_ok;
static char ks_gcrypt_name[64];

static void ks_gcrypt_init(void)
{
    /* The process may have initialised libgcrypt already (another extension); otherwise do it. */
    if (!gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) {
        if (gcry_check_version(GCRYPT_VERSION) == NULL)
            return;
        gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    }
    snprintf(ks_gcrypt_name, sizeof(ks_gcrypt_name), "libgcrypt %s", gcry_check_version(NULL));
    ks_gcrypt_ok = 1;
}

/* gcry_cipher_close wipes the handle, key schedules included. */
static void ks_xts_free(ks_xts *x)
{
    if (x == NULL)
        return;
    if (x->hd != NULL)
        gcry_cipher_close(x->hd);
    x->hd = NULL;
    gcry_free(x);
}

static int ks_xts_new(const unsigned char *key, size_t key_len, ks_xts **out)
{
    ks_xts *x;
    int rc;

    *out = NULL;
    rc = ks_check_key(key, key_len);
    if (rc != KS_XTS_OK)
        return rc;
    if (pthread_once(&ks_gcrypt_once, ks_gcrypt_init) != 0 || !ks_gcrypt_ok)
        return KS_XTS_ERR_LIBRARY;
    x = gcry_calloc(1, sizeof(*x));
    if (x == NULL)
        return KS_XTS_ERR_NOMEM;
    if (gcry_cipher_open(&x->hd, key_len == 32 ? GCRY_CIPHER_AES128 : GCRY_CIPHER_AES256,
                         GCRY_CIPHER_MODE_XTS, 0) != 0
        || gcry_cipher_setkey(x->hd, key, key_len) != 0) {
        ks_xts_free(x);
        return KS_XTS_ERR_LIBRARY;
    }
    *out = x;
    return KS_XTS_OK;
}

static int ks_xts_crypt(ks_xts *x, int encrypt, const unsigned char *in, unsigned char *out,
                        size_t n_sectors, size_t sector_size, uint64_t first_tweak, uint64_t tweak_step)
{
    unsigned char iv[16];
    uint64_t tweak = first_tweak;
    size_t i;
    gcry_error_t err;
    int rc;

    rc = ks_check_crypt(x, in, out, n_sectors, sector_size);
    if (rc != KS_XTS_OK)
        return rc;
    for (i = 0; i < n_sectors; i++) {
        ks_plain64(iv, tweak);
        err = gcry_cipher_setiv(x->hd, iv, sizeof(iv));
        if (err == 0)
            err = encrypt ? gcry_cipher_encrypt(x->hd, out, sector_size, in, sector_size)
                          : gcry_cipher_decrypt(x->hd, out, sector_size, in, sector_size);
        if (err != 0)
            return KS_XTS_ERR_LIBRARY;
        in += sector_size;
        out += sector_size;
        tweak += tweak_step;
    }
    return KS_XTS_OK;
}

static const char *ks_xts_backend(void)
{
    if (pthread_once(&ks_gcrypt_once, ks_gcrypt_init) != 0 || !ks_gcrypt_ok)
        return "libgcrypt (not initialised)";
    return ks_gcrypt_name;
}
"""


def backend() -> str:
    name = os.environ.get("KEYSTEWARD_XTS_BACKEND", "gcrypt").strip().lower() or "gcrypt"
    if name not in BACKENDS:
        raise ValueError(f"KEYSTEWARD_XTS_BACKEND must be one of {sorted(BACKENDS)}, not {name!r}")
    return name


def make_ffibuilder(name: str) -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    body = _OPENSSL if name == "openssl" else _GCRYPT
    builder.set_source(MODULE, _COMMON + body, libraries=BACKENDS[name])
    return builder


ffibuilder = make_ffibuilder(backend())

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
