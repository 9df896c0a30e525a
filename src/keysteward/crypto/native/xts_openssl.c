/* The openssl backend of the native XTS extension (see src/keysteward/crypto/_xts_build.py). */

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
