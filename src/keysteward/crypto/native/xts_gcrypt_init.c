/* libgcrypt's one-time initialisation, shared by the gcrypt and vaes backends (see _xts_build.py). */

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
