/* keysteward's native NBD data plane: one connection's transmission phase without the interpreter.
 *
 * Compiled into keysteward.crypto._xts_native (src/keysteward/crypto/_xts_build.py appends this file to
 * the extension's source, after nbd_io.c: big-endian fields, whole reads and writes), so it calls
 * ks_xts_crypt on the volume's own cipher context: the key is not copied anywhere new. keysteward/proxy/plane.py drives it from one thread per connection and keeps
 * everything else in Python: the handshake, the TLS handshake and client check, the decision which
 * connections run here, revocation (it shuts the socket down; the loop ends at its next recv or send),
 * metrics and logging. A TLS connection's records go through the session Python lent (nbd_tls.c).
 *
 * The loop serves the requests that are the data path, serially, with one reply each:
 *   - NBD_CMD_READ and NBD_CMD_WRITE of whole sectors inside the export, at most max_block bytes, with
 *     no flags but FUA, NO_HOLE and DF: pread + XTS decrypt in place + one sendmsg (simple or structured
 *     OFFSET_DATA reply); recv of the payload + XTS encrypt in place + pwrite (+ fdatasync for FUA);
 *   - NBD_CMD_FLUSH: fdatasync (nothing on a read-only export);
 *   - NBD_CMD_DISC: the end.
 * Anything else (bad magic, unknown command or flag, partial sectors, out of range, trim, write zeroes,
 * a write to a read-only export) is handed back undecided: ks_nbd_plane_serve returns KS_PLANE_HANDOFF
 * with the 28 header bytes, and Python answers it exactly as its own transmission phase does, then calls
 * the loop again. A failed pread, pwrite, fdatasync or cipher call answers NBD_EIO, as Python does.
 *
 * Counters (requests, bytes, latency histogram per command) are kept with atomic adds and taken (read and
 * zeroed) by ks_nbd_plane_take from another thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define KS_PLANE_DISC 0
#define KS_PLANE_HANDOFF 1
#define KS_PLANE_CLOSED 2
#define KS_PLANE_NOMEM 3
#define KS_PLANE_SOCKET 4
#define KS_PLANE_BUCKETS 16
#define KS_PLANE_STAT_WORDS (4 + KS_PLANE_BUCKETS)
#define KS_PLANE_STATS 4 /* read, write, flush, error */

#define KS_NBD_REQUEST_MAGIC 0x25609513u
#define KS_NBD_SIMPLE_MAGIC 0x67446698u
#define KS_NBD_STRUCTURED_MAGIC 0x668e33efu
#define KS_NBD_CMD_READ 0
#define KS_NBD_CMD_WRITE 1
#define KS_NBD_CMD_DISC 2
#define KS_NBD_CMD_FLUSH 3
#define KS_NBD_FLAG_FUA 1u
#define KS_NBD_FLAGS_SERVED (1u | 2u | 4u) /* FUA, NO_HOLE, DF */
#define KS_NBD_EIO 5u
#define KS_NBD_REPLY_FLAG_DONE 1u
#define KS_NBD_REPLY_OFFSET_DATA 1u
#define KS_NBD_REPLY_ERROR 32769u
#define KS_NBD_REQUEST_SIZE 28
#define KS_PLANE_TLS_IO (256 * 1024) /* the bounce buffer between the socket and a TLS session's BIOs */

typedef struct ks_nbd_plane {
    int sock;
    int fd;
    int read_only;
    int structured;
    uint64_t data_offset;
    uint64_t size;
    uint64_t iv_tweak;
    uint32_t sector_size;
    uint32_t max_block;
    ks_xts *xts;
    void *ssl;         /* a TLS session lent by Python (nbd_tls.c), or NULL: plaintext */
    unsigned char *io; /* its bounce buffer */
    unsigned char *pre; /* request bytes Python had received already when it handed the connection over */
    size_t pre_len;
    size_t pre_at;
    int wake[2]; /* a pipe: ks_plane_stop writes it, the loop polls it between requests */
    unsigned char *buf;
    size_t buf_size;
    int n_bounds;
    double bounds[KS_PLANE_BUCKETS - 1];
    uint64_t stats[KS_PLANE_STATS][KS_PLANE_STAT_WORDS]; /* count, bytes, nanoseconds, unused, buckets */
    int stop;                                            /* set by ks_plane_stop from another thread */
} ks_nbd_plane;

static int ks_tls_recv_all(void *ssl, int sock, unsigned char *io, size_t io_size, unsigned char *b, size_t n);
static int ks_tls_send_all(void *ssl, int sock, unsigned char *io, size_t io_size, struct iovec *iov, int count);
static int ks_tls_load(unsigned long *version);
static int ks_tls_input_pending(void *ssl);
static void ks_plane_free(ks_nbd_plane *p);

static int ks_plane_new(int sock, int fd, uint64_t data_offset, uint64_t size, uint64_t iv_tweak,
                        uint32_t sector_size, uint32_t max_block, int read_only, int structured, ks_xts *xts,
                        void *ssl, const unsigned char *pre, size_t pre_len, const double *bounds, int n_bounds,
                        ks_nbd_plane **out)
{
    ks_nbd_plane *p;
    int i;
    if (out == NULL || xts == NULL || sock < 0 || fd < 0 || sector_size < 512 || sector_size % 512 != 0
        || max_block < sector_size || n_bounds < 0 || n_bounds > KS_PLANE_BUCKETS - 1
        || (n_bounds > 0 && bounds == NULL) || (ssl != NULL && ks_tls_load(NULL) != 0)
        || (pre_len > 0 && pre == NULL))
        return KS_XTS_ERR_ARGUMENT;
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        return KS_XTS_ERR_NOMEM;
    p->wake[0] = p->wake[1] = -1;
    if ((ssl != NULL && (p->io = malloc(KS_PLANE_TLS_IO)) == NULL)
        || (pre_len > 0 && (p->pre = malloc(pre_len)) == NULL) || pipe2(p->wake, O_CLOEXEC | O_NONBLOCK) != 0) {
        ks_plane_free(p);
        return KS_XTS_ERR_NOMEM;
    }
    if (pre_len > 0)
        memcpy(p->pre, pre, pre_len);
    p->pre_len = pre_len;
    p->ssl = ssl;
    p->sock = sock;
    p->fd = fd;
    p->data_offset = data_offset;
    p->size = size;
    p->iv_tweak = iv_tweak;
    p->sector_size = sector_size;
    p->max_block = max_block;
    p->read_only = read_only;
    p->structured = structured;
    p->xts = xts;
    p->n_bounds = n_bounds;
    for (i = 0; i < n_bounds; i++)
        p->bounds[i] = bounds[i];
    *out = p;
    return KS_XTS_OK;
}

/* The buffer holds guest data (plaintext between the cipher and the socket), never key material. */
static void ks_plane_free(ks_nbd_plane *p)
{
    if (p == NULL)
        return;
    free(p->buf);
    free(p->io);
    free(p->pre);
    if (p->wake[0] >= 0)
        close(p->wake[0]);
    if (p->wake[1] >= 0)
        close(p->wake[1]);
    free(p);
}

/* The connection's bytes, plaintext or through its TLS session: 1 all n bytes, 0 closed, -1 an error. */
static int ks_plane_recv_all(ks_nbd_plane *p, unsigned char *b, size_t n)
{
    if (p->pre_at < p->pre_len) {
        size_t k = p->pre_len - p->pre_at < n ? p->pre_len - p->pre_at : n;
        memcpy(b, p->pre + p->pre_at, k);
        p->pre_at += k;
        b += k;
        n -= k;
        if (n == 0)
            return 1;
    }
    if (p->ssl != NULL)
        return ks_tls_recv_all(p->ssl, p->sock, p->io, KS_PLANE_TLS_IO, b, n);
    return ks_recv_all(p->sock, b, n);
}

static int ks_plane_send_all(ks_nbd_plane *p, struct iovec *iov, int count)
{
    if (p->ssl != NULL)
        return ks_tls_send_all(p->ssl, p->sock, p->io, KS_PLANE_TLS_IO, iov, count);
    return ks_send_all(p->sock, iov, count);
}

/* For Python, while the loop is not running (a request it handed back), a reply out; the write's payload
 * comes in through ks_plane_recv_all. */
static int ks_plane_send(ks_nbd_plane *p, const unsigned char *b, size_t n)
{
    struct iovec iov[1];
    iov[0].iov_base = (void *)b;
    iov[0].iov_len = n;
    return ks_plane_send_all(p, iov, 1);
}

static int ks_plane_room(ks_nbd_plane *p, size_t n)
{
    unsigned char *b;
    if (n <= p->buf_size)
        return 0;
    b = malloc(n);
    if (b == NULL)
        return -1;
    free(p->buf);
    p->buf = b;
    p->buf_size = n;
    return 0;
}

static void ks_plane_count(ks_nbd_plane *p, int which, uint64_t bytes, uint64_t started)
{
    uint64_t ns = ks_now_ns() - started;
    double seconds = (double)ns / 1e9;
    int bucket = 0;
    while (bucket < p->n_bounds && seconds > p->bounds[bucket])
        bucket++;
    __atomic_fetch_add(&p->stats[which][0], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&p->stats[which][1], bytes, __ATOMIC_RELAXED);
    __atomic_fetch_add(&p->stats[which][2], ns, __ATOMIC_RELAXED);
    __atomic_fetch_add(&p->stats[which][4 + bucket], 1, __ATOMIC_RELAXED);
}

/* Reads and zeroes the counters into out[KS_PLANE_STATS * KS_PLANE_STAT_WORDS]. */
static void ks_plane_take(ks_nbd_plane *p, uint64_t *out)
{
    int i, j;
    for (i = 0; i < KS_PLANE_STATS; i++)
        for (j = 0; j < KS_PLANE_STAT_WORDS; j++)
            out[i * KS_PLANE_STAT_WORDS + j] = __atomic_exchange_n(&p->stats[i][j], 0, __ATOMIC_RELAXED);
}

/* Ask the loop to end once the client's requests that reached the server are answered: the one it serves
 * now (its payload included) and those whose bytes are already there to read. A loop waiting for a request
 * wakes at once. (To end it at once, the caller also shuts the socket down.) */
static void ks_plane_stop(ks_nbd_plane *p)
{
    static const unsigned char one = 1;
    __atomic_store_n(&p->stop, 1, __ATOMIC_SEQ_CST);
    if (write(p->wake[1], &one, 1) < 0) {
        /* full (woken already) or closed: either way the loop sees the flag at its next request */
    }
}

/* Between requests: 1 when a request's bytes are there to read (or the socket has news), 0 when stopped
 * and nothing the client sent before is left unread. A request sent before the stop but not yet read is
 * in flight for the client: closing with it unread would also reset the connection, losing the replies
 * already sent. */
static int ks_plane_wait(ks_nbd_plane *p)
{
    struct pollfd f[2];
    if (p->pre_at < p->pre_len || (p->ssl != NULL && ks_tls_input_pending(p->ssl)))
        return 1;
    f[0].fd = p->sock;
    f[0].events = POLLIN;
    f[1].fd = p->wake[0];
    f[1].events = POLLIN;
    for (;;) {
        int stopping = __atomic_load_n(&p->stop, __ATOMIC_SEQ_CST);
        f[0].revents = f[1].revents = 0;
        if (poll(f, stopping ? 1 : 2, stopping ? 0 : -1) < 0) {
            if (errno == EINTR)
                continue;
            return 0;
        }
        if (f[0].revents)
            return 1;
        if (stopping)
            return 0;
    }
}

/* Does the loop serve this request itself? (Everything else goes to Python, undecided.) */
static int ks_plane_serves(const ks_nbd_plane *p, uint32_t command, uint32_t flags, uint64_t offset,
                           uint32_t length)
{
    if (flags & ~KS_NBD_FLAGS_SERVED)
        return 0;
    if (command == KS_NBD_CMD_FLUSH)
        return 1;
    if (command != KS_NBD_CMD_READ && command != KS_NBD_CMD_WRITE)
        return 0;
    if (command == KS_NBD_CMD_WRITE && p->read_only)
        return 0;
    return length > 0 && length <= p->max_block && offset % p->sector_size == 0 && length % p->sector_size == 0
           && offset <= p->size && length <= p->size - offset;
}

static int ks_plane_reply(ks_nbd_plane *p, const unsigned char *handle, uint32_t error)
{
    unsigned char r[16];
    struct iovec iov[1];
    ks_put32(r, KS_NBD_SIMPLE_MAGIC);
    ks_put32(r + 4, error);
    memcpy(r + 8, handle, 8);
    iov[0].iov_base = r;
    iov[0].iov_len = sizeof(r);
    return ks_plane_send_all(p, iov, 1);
}

static int ks_plane_read_reply(ks_nbd_plane *p, const unsigned char *handle, uint64_t offset, uint32_t length,
                               uint32_t error)
{
    static const char message[] = "read failed"; /* what Python's structured error says */
    unsigned char r[20 + 8 + sizeof(message)];
    struct iovec iov[2];
    int n = 1;
    if (!p->structured) {
        ks_put32(r, KS_NBD_SIMPLE_MAGIC);
        ks_put32(r + 4, error);
        memcpy(r + 8, handle, 8);
        iov[0].iov_len = 16;
    } else {
        uint32_t body = error ? 4 + 2 + (uint32_t)(sizeof(message) - 1) : 8 + length;
        ks_put32(r, KS_NBD_STRUCTURED_MAGIC);
        r[4] = 0;
        r[5] = KS_NBD_REPLY_FLAG_DONE;
        r[6] = (unsigned char)((error ? KS_NBD_REPLY_ERROR : KS_NBD_REPLY_OFFSET_DATA) >> 8);
        r[7] = (unsigned char)(error ? KS_NBD_REPLY_ERROR : KS_NBD_REPLY_OFFSET_DATA);
        memcpy(r + 8, handle, 8);
        ks_put32(r + 16, body);
        if (error) {
            ks_put32(r + 20, error);
            r[24] = 0;
            r[25] = (unsigned char)(sizeof(message) - 1);
            memcpy(r + 26, message, sizeof(message) - 1);
            iov[0].iov_len = 26 + sizeof(message) - 1;
        } else {
            ks_put64(r + 20, offset);
            iov[0].iov_len = 28;
        }
    }
    iov[0].iov_base = r;
    if (!error) {
        iov[1].iov_base = p->buf;
        iov[1].iov_len = length;
        n = 2;
    }
    return ks_plane_send_all(p, iov, n);
}

static uint32_t ks_plane_crypt(ks_nbd_plane *p, int encrypt, uint64_t offset, uint32_t length)
{
    uint64_t first = offset / 512 + p->iv_tweak;
    int rc = ks_xts_crypt(p->xts, encrypt, p->buf, p->buf, length / p->sector_size, p->sector_size, first,
                          p->sector_size / 512);
    return rc == KS_XTS_OK ? 0 : KS_NBD_EIO;
}

/* Serves requests until one it does not serve (KS_PLANE_HANDOFF, its header in header_out), NBD_CMD_DISC
 * (KS_PLANE_DISC), the peer closing or the socket being shut down (KS_PLANE_CLOSED), a socket error
 * (KS_PLANE_SOCKET) or no memory for a payload (KS_PLANE_NOMEM). */
static int ks_plane_serve(ks_nbd_plane *p, unsigned char *header_out)
{
    unsigned char h[KS_NBD_REQUEST_SIZE];
    for (;;) {
        uint32_t flags, command, length, error = 0;
        uint64_t offset, started;
        int rc;
        if (!ks_plane_wait(p))
            return KS_PLANE_CLOSED;
        rc = ks_plane_recv_all(p, h, sizeof(h));
        if (rc <= 0)
            return rc == 0 ? KS_PLANE_CLOSED : KS_PLANE_SOCKET;
        started = ks_now_ns();
        flags = ((uint32_t)h[4] << 8) | h[5];
        command = ((uint32_t)h[6] << 8) | h[7];
        offset = ks_be64(h + 16);
        length = ks_be32(h + 24);
        if (ks_be32(h) != KS_NBD_REQUEST_MAGIC || !ks_plane_serves(p, command, flags, offset, length)) {
            if (ks_be32(h) == KS_NBD_REQUEST_MAGIC && command == KS_NBD_CMD_DISC)
                return KS_PLANE_DISC;
            memcpy(header_out, h, sizeof(h));
            return KS_PLANE_HANDOFF;
        }
        if (command == KS_NBD_CMD_FLUSH) {
            if (!p->read_only && fdatasync(p->fd) != 0)
                error = KS_NBD_EIO;
            if (ks_plane_reply(p, h + 8, error) != 0)
                return KS_PLANE_SOCKET;
            ks_plane_count(p, error ? 3 : 2, 0, started);
            continue;
        }
        if (ks_plane_room(p, length) != 0)
            return KS_PLANE_NOMEM;
        if (command == KS_NBD_CMD_READ) {
            if (ks_pread_all(p->fd, p->buf, length, p->data_offset + offset) != 0)
                error = KS_NBD_EIO;
            else
                error = ks_plane_crypt(p, 0, offset, length);
            if (ks_plane_read_reply(p, h + 8, offset, length, error) != 0)
                return KS_PLANE_SOCKET;
            ks_plane_count(p, error ? 3 : 0, error ? 0 : length, started);
            continue;
        }
        rc = ks_plane_recv_all(p, p->buf, length);
        if (rc <= 0)
            return rc == 0 ? KS_PLANE_CLOSED : KS_PLANE_SOCKET;
        error = ks_plane_crypt(p, 1, offset, length);
        if (!error && ks_pwrite_all(p->fd, p->buf, length, p->data_offset + offset) != 0)
            error = KS_NBD_EIO;
        if (!error && (flags & KS_NBD_FLAG_FUA) && fdatasync(p->fd) != 0)
            error = KS_NBD_EIO;
        if (ks_plane_reply(p, h + 8, error) != 0)
            return KS_PLANE_SOCKET;
        ks_plane_count(p, error ? 3 : 1, error ? 0 : length, started);
    }
}
