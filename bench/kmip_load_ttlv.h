/* kmip_load_ttlv.h: the TTLV requests kmip_load sends and the answers it reads (KMIP 1.x/2.x encoding).
 * Checked byte for byte against keysteward's codec by bench/_kmip_load.py before every run. Included by
 * kmip_load.c only; static functions, no separate object. */
#ifndef KMIP_LOAD_TTLV_H
#define KMIP_LOAD_TTLV_H
#include <openssl/err.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { T_STRUCT = 0x01, T_INT = 0x02, T_ENUM = 0x05, T_TEXT = 0x07, T_BYTES = 0x08 };
enum { OP_CREATE = 1, OP_GET = 10, OP_GETATTRS = 11, OP_ACTIVATE = 18, OP_ENCRYPT = 31 };
#define MAX_ANSWER (1u << 20)
#define UID_MAX 256

static const unsigned char SUCCESS[16] = {0x42, 0x00, 0x7f, 0x05, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0};

/* ---- TTLV encoder ---------------------------------------------------------------------------- */
typedef struct {
    unsigned char b[2048];
    size_t n;
    size_t open[8]; /* offsets of the structures not closed yet */
    int depth;
} ttlv;

static void die(const char *what) {
    fprintf(stderr, "kmip_load: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

static void set32(unsigned char *p, uint32_t v) { p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v; }
static uint32_t get32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | p[2] << 8 | p[3]; }

static void put_head(ttlv *t, uint32_t tag, int type, uint32_t len) {
    if (t->n + 8 + len + 8 > sizeof t->b) die("request too large");
    set32(t->b + t->n, tag << 8 | type); /* 3 bytes of tag, 1 of type */
    set32(t->b + t->n + 4, len);
    t->n += 8;
}

static void put(ttlv *t, uint32_t tag, int type, const void *value, uint32_t len) {
    put_head(t, tag, type, len);
    memcpy(t->b + t->n, value, len);
    t->n += len;
    while (t->n % 8) t->b[t->n++] = 0;
}

static void put_u32(ttlv *t, uint32_t tag, int type, uint32_t v) { /* Integer and Enumeration: 4 bytes */
    unsigned char be[4] = {v >> 24, v >> 16, v >> 8, v};
    put(t, tag, type, be, 4);
}

static void put_text(ttlv *t, uint32_t tag, const char *s) { put(t, tag, T_TEXT, s, strlen(s)); }

static void open_struct(ttlv *t, uint32_t tag) {
    if (t->depth == 8) die("structures nest too deep");
    t->open[t->depth++] = t->n;
    put_head(t, tag, T_STRUCT, 0);
}

static void close_struct(ttlv *t) {
    size_t at = t->open[--t->depth];
    set32(t->b + at + 4, t->n - at - 8);
}

static int kmip_major = 1, kmip_minor = 2;

/* RequestMessage{RequestHeader{ProtocolVersion{Major, Minor}, BatchCount 1}, BatchItem{Operation, RequestPayload{...*/
static void begin_request(ttlv *t, uint32_t operation) {
    t->n = 0, t->depth = 0;
    open_struct(t, 0x420078);               /* RequestMessage */
    open_struct(t, 0x420077);               /* RequestHeader */
    open_struct(t, 0x420069);               /* ProtocolVersion */
    put_u32(t, 0x42006a, T_INT, kmip_major); /* ProtocolVersionMajor */
    put_u32(t, 0x42006b, T_INT, kmip_minor); /* ProtocolVersionMinor */
    close_struct(t);
    put_u32(t, 0x42000d, T_INT, 1); /* BatchCount */
    close_struct(t);
    open_struct(t, 0x42000f);               /* BatchItem */
    put_u32(t, 0x42005c, T_ENUM, operation); /* Operation */
    open_struct(t, 0x420079);               /* RequestPayload */
}

static void end_request(ttlv *t) {
    while (t->depth) close_struct(t); /* RequestPayload, BatchItem, RequestMessage */
}

static void attribute(ttlv *t, const char *name, int type, uint32_t value) {
    open_struct(t, 0x420008); /* Attribute */
    put_text(t, 0x42000a, name);
    put_u32(t, 0x42000b, type, value); /* AttributeValue */
    close_struct(t);
}

/* Create: ObjectType SymmetricKey, TemplateAttribute{AES, 256 bits, usage Encrypt|Decrypt}, no Name (vCenter) */
static void create_request(ttlv *t) {
    begin_request(t, OP_CREATE);
    put_u32(t, 0x420057, T_ENUM, 2); /* ObjectType SymmetricKey */
    open_struct(t, 0x420091);        /* TemplateAttribute */
    attribute(t, "Cryptographic Algorithm", T_ENUM, 3);
    attribute(t, "Cryptographic Length", T_INT, 256);
    attribute(t, "Cryptographic Usage Mask", T_INT, 12);
    close_struct(t);
    end_request(t);
}

static void uid_request(ttlv *t, uint32_t operation, const char *uid) {
    begin_request(t, operation);
    put_text(t, 0x420094, uid); /* UniqueIdentifier */
    end_request(t);
}

static void encrypt_request(ttlv *t, const char *uid) {
    static const unsigned char zeros[64];
    begin_request(t, OP_ENCRYPT);
    put_text(t, 0x420094, uid);
    open_struct(t, 0x42002b);        /* CryptographicParameters */
    put_u32(t, 0x420011, T_ENUM, 1); /* BlockCipherMode CBC */
    put_u32(t, 0x42005f, T_ENUM, 3); /* PaddingMethod PKCS5 */
    put_u32(t, 0x420028, T_ENUM, 3); /* CryptographicAlgorithm AES */
    close_struct(t);
    put(t, 0x4200c2, T_BYTES, zeros, sizeof zeros); /* Data */
    end_request(t);
}

/* The first item of this tag and type anywhere in the structures of [p, p + n): its value and length. */
static const unsigned char *find_item(const unsigned char *p, size_t n, uint32_t tag, int type, uint32_t *len) {
    while (n >= 8) {
        uint32_t size = get32(p + 4);
        size_t padded = ((size_t)size + 7) & ~(size_t)7;
        if (padded > n - 8) return NULL;
        if (get32(p) >> 8 == tag && p[3] == type) return *len = size, p + 8;
        const unsigned char *inner = p[3] == T_STRUCT ? find_item(p + 8, size, tag, type, len) : NULL;
        if (inner) return inner;
        p += 8 + padded, n -= 8 + padded;
    }
    return NULL;
}

#endif
