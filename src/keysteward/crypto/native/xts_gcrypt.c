/* The gcrypt backend of the native XTS extension (see src/keysteward/crypto/_xts_build.py). */

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
