/* TLS for the native NBD data plane: the connection's own OpenSSL session, lent by Python's ssl module.
 *
 * Compiled into keysteward.crypto._xts_native after nbd_plane.c. A TLS connection's handshake, client
 * certificate check and option haggling stay in Python (the event loop's TLS transport over an SSLObject);
 * once the export is chosen, keysteward/proxy/tls_lend.py lends the session (the SSLObject's SSL *, whose
 * BIOs are the two memory BIOs the transport pumps) to the plane's thread, and the transport stops
 * reading the socket. The plane then pumps those same BIOs itself: what recv brings goes into the read
 * BIO and SSL_read decrypts it into the request's buffer; SSL_write encrypts a reply into the write BIO
 * and what it holds goes out with send. Records already in the read BIO when the session was lent are
 * the first ones read. Nothing here sees a key: OpenSSL keeps the session's keys where it always did.
 *
 * libssl is not linked: ks_tls_load finds the copy Python's ssl module already loaded (dlopen with
 * RTLD_NOLOAD), so the functions called are those of the library that made the session; tls_lend.py
 * checks the version numbers agree and that the SSL * it found belongs to the connection's SSL_CTX.
 */
#include <dlfcn.h>
#include <limits.h>

#define KS_SSL_ERROR_WANT_READ 2
#define KS_SSL_ERROR_ZERO_RETURN 6

typedef struct ks_tls_api {
    int (*ssl_read)(void *ssl, void *buf, int num);
    int (*ssl_write)(void *ssl, const void *buf, int num);
    int (*ssl_get_error)(const void *ssl, int ret);
    int (*ssl_pending)(const void *ssl);
    void *(*ssl_get_rbio)(const void *ssl);
    void *(*ssl_get_wbio)(const void *ssl);
    void *(*ssl_get_ssl_ctx)(const void *ssl);
    int (*bio_read)(void *bio, void *data, int dlen);
    int (*bio_write)(void *bio, const void *data, int dlen);
    size_t (*bio_ctrl_pending)(void *bio);
    void (*err_clear_error)(void);
    unsigned long (*version_num)(void);
} ks_tls_api;

static ks_tls_api ks_tls;
static int ks_tls_ready;

/* 0 (and libssl's OpenSSL_version_num in *version) when this process has libssl.so.3 loaded already and it
 * has every function the plane calls; -1 otherwise (the TLS connections then stay on the Python path). */
static int ks_tls_load(unsigned long *version)
{
    void *lib;
    if (!ks_tls_ready) {
        lib = dlopen("libssl.so.3", RTLD_NOW | RTLD_NOLOAD);
        if (lib == NULL)
            return -1;
        *(void **)&ks_tls.ssl_read = dlsym(lib, "SSL_read");
        *(void **)&ks_tls.ssl_write = dlsym(lib, "SSL_write");
        *(void **)&ks_tls.ssl_get_error = dlsym(lib, "SSL_get_error");
        *(void **)&ks_tls.ssl_pending = dlsym(lib, "SSL_pending");
        *(void **)&ks_tls.ssl_get_rbio = dlsym(lib, "SSL_get_rbio");
        *(void **)&ks_tls.ssl_get_wbio = dlsym(lib, "SSL_get_wbio");
        *(void **)&ks_tls.ssl_get_ssl_ctx = dlsym(lib, "SSL_get_SSL_CTX");
        *(void **)&ks_tls.bio_read = dlsym(lib, "BIO_read");
        *(void **)&ks_tls.bio_write = dlsym(lib, "BIO_write");
        *(void **)&ks_tls.bio_ctrl_pending = dlsym(lib, "BIO_ctrl_pending");
        *(void **)&ks_tls.err_clear_error = dlsym(lib, "ERR_clear_error");
        *(void **)&ks_tls.version_num = dlsym(lib, "OpenSSL_version_num");
        if (!ks_tls.ssl_read || !ks_tls.ssl_write || !ks_tls.ssl_get_error || !ks_tls.ssl_pending || !ks_tls.ssl_get_rbio
            || !ks_tls.ssl_get_wbio || !ks_tls.ssl_get_ssl_ctx || !ks_tls.bio_read || !ks_tls.bio_write
            || !ks_tls.bio_ctrl_pending || !ks_tls.err_clear_error || !ks_tls.version_num)
            return -1; /* the handle stays open: the library was loaded before and stays loaded */
        ks_tls_ready = 1;
    }
    if (version != NULL)
        *version = ks_tls.version_num();
    return 0;
}

/* Is ssl a session of ctx (both pointers as Python's ssl module holds them)? 1 or 0. */
static int ks_tls_owned_by(void *ssl, void *ctx)
{
    return ks_tls_ready && ssl != NULL && ctx != NULL && ks_tls.ssl_get_ssl_ctx(ssl) == ctx;
}

/* Does the session hold input already: decrypted bytes, or records in the read BIO? (Then a poll of the
 * socket would wait for bytes that are already here.) */
static int ks_tls_input_pending(void *ssl)
{
    return ks_tls.ssl_pending(ssl) > 0 || ks_tls.bio_ctrl_pending(ks_tls.ssl_get_rbio(ssl)) > 0;
}

/* Sends what SSL_write (or SSL_read: a key update's answer, an alert) left in the write BIO. */
static int ks_tls_flush(void *ssl, int sock, unsigned char *io, size_t io_size)
{
    void *wbio = ks_tls.ssl_get_wbio(ssl);
    size_t pending;
    while ((pending = ks_tls.bio_ctrl_pending(wbio)) > 0) {
        struct iovec iov[1];
        int k = ks_tls.bio_read(wbio, io, (int)(pending < io_size ? pending : io_size));
        if (k <= 0)
            return -1;
        iov[0].iov_base = io;
        iov[0].iov_len = (size_t)k;
        if (ks_send_all(sock, iov, 1) != 0)
            return -1;
    }
    return 0;
}

/* As ks_recv_all, through the session: 1 all n bytes, 0 the peer closed (or sent close_notify, or the socket
 * was shut down), -1 a socket or TLS error (a record that fails to authenticate is one). */
static int ks_tls_recv_all(void *ssl, int sock, unsigned char *io, size_t io_size, unsigned char *b, size_t n)
{
    while (n > 0) {
        int r = ks_tls.ssl_read(ssl, b, n > INT_MAX ? INT_MAX : (int)n);
        ssize_t got;
        if (r > 0) {
            b += r;
            n -= (size_t)r;
            continue;
        }
        switch (ks_tls.ssl_get_error(ssl, r)) {
        case KS_SSL_ERROR_WANT_READ:
            break;
        case KS_SSL_ERROR_ZERO_RETURN:
            return 0;
        default:
            ks_tls.err_clear_error();
            return -1;
        }
        if (ks_tls_flush(ssl, sock, io, io_size) != 0)
            return -1;
        do
            got = recv(sock, io, io_size, 0);
        while (got < 0 && errno == EINTR);
        if (got <= 0)
            return got == 0 ? 0 : -1;
        if (ks_tls.bio_write(ks_tls.ssl_get_rbio(ssl), io, (int)got) != (int)got)
            return -1;
    }
    return 1;
}

/* As ks_send_all, through the session: each part is one SSL_write (records of up to 16 KiB) into the write
 * BIO, which is emptied into the socket whenever it holds more than the bounce buffer, and at the end. */
static int ks_tls_send_all(void *ssl, int sock, unsigned char *io, size_t io_size, struct iovec *iov, int count)
{
    int i;
    for (i = 0; i < count; i++) {
        const unsigned char *b = iov[i].iov_base;
        size_t n = iov[i].iov_len;
        while (n > 0) {
            int chunk = n > (size_t)(1 << 20) ? (1 << 20) : (int)n;
            if (ks_tls.ssl_write(ssl, b, chunk) != chunk) {
                ks_tls.err_clear_error();
                return -1;
            }
            b += chunk;
            n -= (size_t)chunk;
            if (ks_tls.bio_ctrl_pending(ks_tls.ssl_get_wbio(ssl)) >= io_size
                && ks_tls_flush(ssl, sock, io, io_size) != 0)
                return -1;
        }
    }
    return ks_tls_flush(ssl, sock, io, io_size);
}
