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
                 uint32_t max_block, int read_only, int structured, ks_xts *xts, void *ssl, const double *bounds,
                 int n_bounds, ks_nbd_plane **out);
int ks_plane_serve(ks_nbd_plane *p, unsigned char *header_out);
int ks_plane_recv(ks_nbd_plane *p, unsigned char *b, size_t n);
int ks_plane_send(ks_nbd_plane *p, const unsigned char *b, size_t n);
int ks_tls_load(unsigned long *version);
int ks_tls_owned_by(void *ssl, void *ctx);
void ks_plane_take(ks_nbd_plane *p, uint64_t *out);
void ks_plane_stop(ks_nbd_plane *p);
void ks_plane_free(ks_nbd_plane *p);
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

_GCRYPT_INIT = r"""
#include <pthread.h>
#include <stdio.h>
#include <gcrypt.h>

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

/* An XTS handle keyed with both halves (the caller checked the key), or NULL on failure. */
static gcry_cipher_hd_t ks_gcrypt_open(const unsigned char *key, size_t key_len)
{
    gcry_cipher_hd_t hd = NULL;

    if (gcry_cipher_open(&hd, key_len == 32 ? GCRY_CIPHER_AES128 : GCRY_CIPHER_AES256, GCRY_CIPHER_MODE_XTS, 0)
        != 0)
        return NULL;
    if (gcry_cipher_setkey(hd, key, key_len) != 0) {
        gcry_cipher_close(hd);
        return NULL;
    }
    return hd;
}

/* Many sectors through one handle: a new plain64 IV per sector, then one call over the sector. */
static int ks_gcrypt_sectors(gcry_cipher_hd_t hd, int encrypt, const unsigned char *in, unsigned char *out,
                             size_t n_sectors, size_t sector_size, uint64_t tweak, uint64_t tweak_step)
{
    unsigned char iv[16];
    gcry_error_t err;
    size_t i;

    for (i = 0; i < n_sectors; i++) {
        ks_plain64(iv, tweak);
        err = gcry_cipher_setiv(hd, iv, sizeof(iv));
        if (err == 0)
            err = encrypt ? gcry_cipher_encrypt(hd, out, sector_size, in, sector_size)
                          : gcry_cipher_decrypt(hd, out, sector_size, in, sector_size);
        if (err != 0)
            return KS_XTS_ERR_LIBRARY;
        in += sector_size;
        out += sector_size;
        tweak += tweak_step;
    }
    return KS_XTS_OK;
}
"""

_GCRYPT = r"""
struct ks_xts {
    gcry_cipher_hd_t hd;
};

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
    x->hd = ks_gcrypt_open(key, key_len);
    if (x->hd == NULL) {
        ks_xts_free(x);
        return KS_XTS_ERR_LIBRARY;
    }
    *out = x;
    return KS_XTS_OK;
}

static int ks_xts_crypt(ks_xts *x, int encrypt, const unsigned char *in, unsigned char *out,
                        size_t n_sectors, size_t sector_size, uint64_t first_tweak, uint64_t tweak_step)
{
    int rc = ks_check_crypt(x, in, out, n_sectors, sector_size);

    if (rc != KS_XTS_OK)
        return rc;
    return ks_gcrypt_sectors(x->hd, encrypt, in, out, n_sectors, sector_size, first_tweak, tweak_step);
}

static const char *ks_xts_backend(void)
{
    if (pthread_once(&ks_gcrypt_once, ks_gcrypt_init) != 0 || !ks_gcrypt_ok)
        return "libgcrypt (not initialised)";
    return ks_gcrypt_name;
}
"""


_VAES = r"""
/*
 * Own AES-XTS with VAES/VPCLMULQDQ on 512-bit registers (16 blocks per loop), used only when the
 * CPU has aes, avx512f/vl/bw, vaes and vpclmulqdq; otherwise every call goes to libgcrypt.
 * Whole blocks only (sector sizes are multiples of 16): no ciphertext stealing.
 */
#include <immintrin.h>
#include <stdlib.h>

#define KS_VAES_TARGET "aes,sse4.1,avx2,avx512f,avx512vl,avx512bw,vaes,vpclmulqdq"
#define KS_VAES_FN __attribute__((target(KS_VAES_TARGET)))
#define KS_VAES_INLINE static inline __attribute__((always_inline, target(KS_VAES_TARGET)))

struct ks_xts {
    gcry_cipher_hd_t hd;          /* the fallback; NULL on the VAES path */
    int nr;                       /* AES rounds: 10 or 14 (VAES path) */
    unsigned char ek[15][16];     /* key1 encryption round keys */
    unsigned char dk[15][16];     /* key1 decryption round keys (aesimc), in aesdec order */
    unsigned char tk[15][16];     /* key2 encryption round keys (the tweak) */
};

static pthread_once_t ks_vaes_once = PTHREAD_ONCE_INIT;
static int ks_vaes_ok, ks_vaes_cpu;

static void ks_vaes_detect(void)
{
    const char *off = getenv("KEYSTEWARD_XTS_NO_VAES");
    __builtin_cpu_init();  /* __builtin_cpu_supports also checks that the OS saves the zmm state */
    ks_vaes_cpu = __builtin_cpu_supports("aes") && __builtin_cpu_supports("avx512f")
                  && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
                  && __builtin_cpu_supports("vaes") && __builtin_cpu_supports("vpclmulqdq");
    ks_vaes_ok = ks_vaes_cpu && (off == NULL || off[0] == '\0' || off[0] == '0');
}

static int ks_vaes_available(void)
{
    if (pthread_once(&ks_vaes_once, ks_vaes_detect) != 0)
        return 0;
    return ks_vaes_ok;
}

KS_VAES_INLINE __m128i ks_exp_a(__m128i key, __m128i assist)
{
    assist = _mm_shuffle_epi32(assist, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

KS_VAES_INLINE __m128i ks_exp_b(__m128i key, __m128i assist)
{
    assist = _mm_shuffle_epi32(assist, 0xaa);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

/* Encryption round keys of a 16- or 32-byte AES key; returns the number of rounds. */
KS_VAES_FN static int ks_vaes_expand(const unsigned char *key, size_t len, unsigned char rk[15][16])
{
    __m128i k[15];
    int i;
    k[0] = _mm_loadu_si128((const __m128i *)key);
    if (len == 16) {
#define KS_E128(i, rcon) k[i] = ks_exp_a(k[i - 1], _mm_aeskeygenassist_si128(k[i - 1], rcon))
        KS_E128(1, 0x01); KS_E128(2, 0x02); KS_E128(3, 0x04); KS_E128(4, 0x08); KS_E128(5, 0x10);
        KS_E128(6, 0x20); KS_E128(7, 0x40); KS_E128(8, 0x80); KS_E128(9, 0x1b); KS_E128(10, 0x36);
#undef KS_E128
        for (i = 0; i <= 10; i++)
            _mm_storeu_si128((__m128i *)rk[i], k[i]);
        for (i = 0; i < 15; i++)
            k[i] = _mm_setzero_si128();
        return 10;
    }
    k[1] = _mm_loadu_si128((const __m128i *)(key + 16));
#define KS_E256(i, rcon)                                                                 \
    do {                                                                                 \
        k[i] = ks_exp_a(k[i - 2], _mm_aeskeygenassist_si128(k[i - 1], rcon));            \
        if (i + 1 < 15)                                                                  \
            k[i + 1] = ks_exp_b(k[i - 1], _mm_aeskeygenassist_si128(k[i], 0x00));        \
    } while (0)
    KS_E256(2, 0x01); KS_E256(4, 0x02); KS_E256(6, 0x04); KS_E256(8, 0x08);
    KS_E256(10, 0x10); KS_E256(12, 0x20);
    k[14] = ks_exp_a(k[12], _mm_aeskeygenassist_si128(k[13], 0x40));
#undef KS_E256
    for (i = 0; i <= 14; i++)
        _mm_storeu_si128((__m128i *)rk[i], k[i]);
    for (i = 0; i < 15; i++)
        k[i] = _mm_setzero_si128();
    return 14;
}

KS_VAES_FN static void ks_vaes_invert(int nr, const unsigned char ek[15][16], unsigned char dk[15][16])
{
    int i;
    _mm_storeu_si128((__m128i *)dk[0], _mm_loadu_si128((const __m128i *)ek[nr]));
    for (i = 1; i < nr; i++)
        _mm_storeu_si128((__m128i *)dk[i], _mm_aesimc_si128(_mm_loadu_si128((const __m128i *)ek[nr - i])));
    _mm_storeu_si128((__m128i *)dk[nr], _mm_loadu_si128((const __m128i *)ek[0]));
}

/* T * x^k in GF(2^128), XTS convention (little-endian, x^128 = x^7 + x^2 + x + 1), 1 <= k <= 56,
   in every 128-bit lane. */
#define KS_MULX(t, k, poly)                                                                     \
    _mm512_ternarylogic_epi64(_mm512_slli_epi64(t, k),                                          \
                              _mm512_bslli_epi128(_mm512_srli_epi64(t, 64 - (k)), 8),           \
                              _mm512_clmulepi64_epi128(_mm512_srli_epi64(t, 64 - (k)), poly, 0x01), \
                              0x96)

KS_VAES_INLINE __m128i ks_mulx1(__m128i t)
{
    /* the top bits of [lo, hi], swapped and widened to masks: [hi>>63 ? ~0 : 0, lo>>63 ? ~0 : 0] */
    __m128i carry = _mm_sub_epi64(_mm_setzero_si128(), _mm_shuffle_epi32(_mm_srli_epi64(t, 63), 0x4e));
    __m128i red = _mm_and_si128(carry, _mm_set_epi64x(1, 0x87));
    return _mm_xor_si128(_mm_slli_epi64(t, 1), red);
}

KS_VAES_INLINE void ks_vaes_sector(const __m512i *rk, int nr, int encrypt, const unsigned char *in,
                                   unsigned char *out, size_t blocks, __m128i t0)
{
    const __m512i poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    __m128i t1 = ks_mulx1(t0), t2 = ks_mulx1(t1), t3 = ks_mulx1(t2);
    __m512i w0, w1, w2, w3, b0, b1, b2, b3;
    int r;

    w0 = _mm512_inserti32x4(_mm512_castsi128_si512(t0), t1, 1);
    w0 = _mm512_inserti32x4(w0, t2, 2);
    w0 = _mm512_inserti32x4(w0, t3, 3);
    w1 = KS_MULX(w0, 4, poly);
    w2 = KS_MULX(w1, 4, poly);
    w3 = KS_MULX(w2, 4, poly);

#define KS_ROUNDS(b)                                                                   \
    do {                                                                               \
        if (encrypt) {                                                                 \
            _Pragma("GCC unroll 16")                                                   \
            for (r = 1; r < nr; r++)                                                   \
                b = _mm512_aesenc_epi128(b, rk[r]);                                    \
            b = _mm512_aesenclast_epi128(b, rk[nr]);                                   \
        } else {                                                                       \
            _Pragma("GCC unroll 16")                                                   \
            for (r = 1; r < nr; r++)                                                   \
                b = _mm512_aesdec_epi128(b, rk[r]);                                    \
            b = _mm512_aesdeclast_epi128(b, rk[nr]);                                   \
        }                                                                              \
    } while (0)

    for (; blocks >= 16; blocks -= 16, in += 256, out += 256) {
        b0 = _mm512_ternarylogic_epi64(_mm512_loadu_si512(in), w0, rk[0], 0x96);
        b1 = _mm512_ternarylogic_epi64(_mm512_loadu_si512(in + 64), w1, rk[0], 0x96);
        b2 = _mm512_ternarylogic_epi64(_mm512_loadu_si512(in + 128), w2, rk[0], 0x96);
        b3 = _mm512_ternarylogic_epi64(_mm512_loadu_si512(in + 192), w3, rk[0], 0x96);
        if (encrypt) {
            _Pragma("GCC unroll 16")
            for (r = 1; r < nr; r++) {
                b0 = _mm512_aesenc_epi128(b0, rk[r]);
                b1 = _mm512_aesenc_epi128(b1, rk[r]);
                b2 = _mm512_aesenc_epi128(b2, rk[r]);
                b3 = _mm512_aesenc_epi128(b3, rk[r]);
            }
            b0 = _mm512_aesenclast_epi128(b0, rk[nr]);
            b1 = _mm512_aesenclast_epi128(b1, rk[nr]);
            b2 = _mm512_aesenclast_epi128(b2, rk[nr]);
            b3 = _mm512_aesenclast_epi128(b3, rk[nr]);
        } else {
            _Pragma("GCC unroll 16")
            for (r = 1; r < nr; r++) {
                b0 = _mm512_aesdec_epi128(b0, rk[r]);
                b1 = _mm512_aesdec_epi128(b1, rk[r]);
                b2 = _mm512_aesdec_epi128(b2, rk[r]);
                b3 = _mm512_aesdec_epi128(b3, rk[r]);
            }
            b0 = _mm512_aesdeclast_epi128(b0, rk[nr]);
            b1 = _mm512_aesdeclast_epi128(b1, rk[nr]);
            b2 = _mm512_aesdeclast_epi128(b2, rk[nr]);
            b3 = _mm512_aesdeclast_epi128(b3, rk[nr]);
        }
        _mm512_storeu_si512(out, _mm512_xor_si512(b0, w0));
        _mm512_storeu_si512(out + 64, _mm512_xor_si512(b1, w1));
        _mm512_storeu_si512(out + 128, _mm512_xor_si512(b2, w2));
        _mm512_storeu_si512(out + 192, _mm512_xor_si512(b3, w3));
        w0 = KS_MULX(w0, 16, poly);
        w1 = KS_MULX(w1, 16, poly);
        w2 = KS_MULX(w2, 16, poly);
        w3 = KS_MULX(w3, 16, poly);
    }
    /* 1..15 blocks left: 4 at a time with w0, w1, w2 in turn, the last group masked */
    while (blocks > 0) {
        size_t n = blocks < 4 ? blocks : 4;
        __mmask8 m = (__mmask8)((1u << (2 * n)) - 1);
        b0 = _mm512_ternarylogic_epi64(_mm512_maskz_loadu_epi64(m, in), w0, rk[0], 0x96);
        KS_ROUNDS(b0);
        _mm512_mask_storeu_epi64(out, m, _mm512_xor_si512(b0, w0));
        w0 = w1;
        w1 = w2;
        w2 = w3;
        blocks -= n;
        in += 16 * n;
        out += 16 * n;
    }
#undef KS_ROUNDS
}

KS_VAES_INLINE void ks_vaes_crypt_nr(const ks_xts *x, const int nr, const int encrypt, const unsigned char *in,
                                     unsigned char *out, size_t n_sectors, size_t sector_size,
                                     uint64_t tweak, uint64_t tweak_step)
{
    __m512i rk[15];
    __m128i tk[15];
    const unsigned char (*keys)[16] = encrypt ? x->ek : x->dk;
    size_t i;
    int r;

    for (r = 0; r <= nr; r++) {
        rk[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)keys[r]));
        tk[r] = _mm_loadu_si128((const __m128i *)x->tk[r]);
    }
    for (i = 0; i < n_sectors; i++) {
        __m128i t = _mm_xor_si128(_mm_set_epi64x(0, (long long)tweak), tk[0]);
        _Pragma("GCC unroll 16")
        for (r = 1; r < nr; r++)
            t = _mm_aesenc_si128(t, tk[r]);
        t = _mm_aesenclast_si128(t, tk[nr]);
        ks_vaes_sector(rk, nr, encrypt, in, out, sector_size / 16, t);
        in += sector_size;
        out += sector_size;
        tweak += tweak_step;
    }
    for (r = 0; r <= nr; r++) {
        rk[r] = _mm512_setzero_si512();
        tk[r] = _mm_setzero_si128();
    }
    __asm__ __volatile__("" : : "r"(rk), "r"(tk) : "memory");
}

KS_VAES_FN static void ks_vaes_crypt(const ks_xts *x, int encrypt, const unsigned char *in, unsigned char *out,
                                     size_t n_sectors, size_t sector_size, uint64_t tweak, uint64_t tweak_step)
{
    /* constant rounds and direction: four straight-line copies, the round keys in registers */
    if (x->nr == 10 && encrypt)
        ks_vaes_crypt_nr(x, 10, 1, in, out, n_sectors, sector_size, tweak, tweak_step);
    else if (x->nr == 10)
        ks_vaes_crypt_nr(x, 10, 0, in, out, n_sectors, sector_size, tweak, tweak_step);
    else if (encrypt)
        ks_vaes_crypt_nr(x, 14, 1, in, out, n_sectors, sector_size, tweak, tweak_step);
    else
        ks_vaes_crypt_nr(x, 14, 0, in, out, n_sectors, sector_size, tweak, tweak_step);
}

/* Wipes the round keys (explicit_bzero: not optimised away) and closes the fallback handle. */
static void ks_xts_free(ks_xts *x)
{
    if (x == NULL)
        return;
    if (x->hd != NULL)
        gcry_cipher_close(x->hd);
    explicit_bzero(x, sizeof(*x));
    free(x);
}

static int ks_xts_new(const unsigned char *key, size_t key_len, ks_xts **out)
{
    ks_xts *x;
    size_t half = key_len / 2;
    int rc;

    *out = NULL;
    rc = ks_check_key(key, key_len);
    if (rc != KS_XTS_OK)
        return rc;
    if (!ks_vaes_available()
        && (pthread_once(&ks_gcrypt_once, ks_gcrypt_init) != 0 || !ks_gcrypt_ok))
        return KS_XTS_ERR_LIBRARY;
    x = calloc(1, sizeof(*x));
    if (x == NULL)
        return KS_XTS_ERR_NOMEM;
    if (ks_vaes_available()) {
        x->nr = ks_vaes_expand(key, half, x->ek);
        ks_vaes_expand(key + half, half, x->tk);
        ks_vaes_invert(x->nr, (const unsigned char (*)[16])x->ek, x->dk);
    } else if ((x->hd = ks_gcrypt_open(key, key_len)) == NULL) {
        ks_xts_free(x);
        return KS_XTS_ERR_LIBRARY;
    }
    *out = x;
    return KS_XTS_OK;
}

static int ks_xts_crypt(ks_xts *x, int encrypt, const unsigned char *in, unsigned char *out,
                        size_t n_sectors, size_t sector_size, uint64_t first_tweak, uint64_t tweak_step)
{
    int rc = ks_check_crypt(x, in, out, n_sectors, sector_size);

    if (rc != KS_XTS_OK)
        return rc;
    if (x->hd == NULL) {
        ks_vaes_crypt(x, encrypt, in, out, n_sectors, sector_size, first_tweak, tweak_step);
        return KS_XTS_OK;
    }
    return ks_gcrypt_sectors(x->hd, encrypt, in, out, n_sectors, sector_size, first_tweak, tweak_step);
}

static char ks_vaes_name[160];
static pthread_once_t ks_vaes_name_once = PTHREAD_ONCE_INIT;

static void ks_vaes_name_init(void)
{
    if (pthread_once(&ks_gcrypt_once, ks_gcrypt_init) != 0 || !ks_gcrypt_ok)
        snprintf(ks_vaes_name, sizeof(ks_vaes_name), "libgcrypt (not initialised)");
    else if (ks_vaes_available())
        snprintf(ks_vaes_name, sizeof(ks_vaes_name), "vaes: keysteward's own VAES/AVX-512 XTS (fallback %s)",
                 ks_gcrypt_name);
    else
        snprintf(ks_vaes_name, sizeof(ks_vaes_name), "%s (vaes off: %s; libgcrypt runs XTS)", ks_gcrypt_name,
                 ks_vaes_cpu ? "KEYSTEWARD_XTS_NO_VAES is set" : "the CPU lacks VAES/AVX-512");
}

/* Names the code that runs XTS: "vaes: ..." for keysteward's own, else the linked library's name. */
static const char *ks_xts_backend(void)
{
    if (pthread_once(&ks_vaes_name_once, ks_vaes_name_init) != 0)
        return "libgcrypt (not initialised)";
    return ks_vaes_name;
}
"""


def backend() -> str:
    name = os.environ.get("KEYSTEWARD_XTS_BACKEND", "vaes").strip().lower() or "vaes"
    if name not in BACKENDS:
        raise ValueError(f"KEYSTEWARD_XTS_BACKEND must be one of {sorted(BACKENDS)}, not {name!r}")
    return name


PLANE_SOURCES = ("nbd_plane.c", "nbd_tls.c")


def _nbd_plane_source() -> str:
    """The native NBD data plane (src/keysteward/proxy/nbd_plane.c and its TLS pump, nbd_tls.c), compiled into
    this module so that it calls ks_xts_crypt on the volume's own cipher contexts."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = []
    for name in PLANE_SOURCES:
        with open(os.path.join(here, "..", "proxy", name), encoding="utf-8") as source:
            parts.append(source.read())
    return "\n".join(parts)


def make_ffibuilder(name: str) -> FFI:
    builder = FFI()
    builder.cdef(CDEF)
    body = {"openssl": _OPENSSL, "gcrypt": _GCRYPT_INIT + _GCRYPT, "vaes": _GCRYPT_INIT + _VAES}[name]
    builder.set_source(MODULE, _COMMON + body + _nbd_plane_source(), libraries=BACKENDS[name])
    return builder


ffibuilder = make_ffibuilder(backend())

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
