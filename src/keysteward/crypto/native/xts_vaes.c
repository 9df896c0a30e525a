/* The vaes backend of the native XTS extension: AES-XTS with VAES/VPCLMULQDQ, libgcrypt as fallback
 * (see src/keysteward/crypto/_xts_build.py). */

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
