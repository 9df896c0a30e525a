/* keysteward's native XTS extension: what every backend shares (errors, the handle type, helpers).
 * Compiled by src/keysteward/crypto/_xts_build.py, which explains the backends. */

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
