/* The NBD data plane's plain I/O (nbd_plane.c): big-endian fields, the monotonic clock, and reads and
 * writes of whole buffers on a socket or a device, retried across EINTR and short transfers.
 *
 * Compiled into keysteward.crypto._xts_native before nbd_plane.c (src/keysteward/crypto/_xts_build.py).
 * Nothing here sees key material: the buffers hold guest data.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static uint32_t ks_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static uint64_t ks_be64(const unsigned char *p)
{
    return ((uint64_t)ks_be32(p) << 32) | (uint64_t)ks_be32(p + 4);
}

static void ks_put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static void ks_put64(unsigned char *p, uint64_t v)
{
    ks_put32(p, (uint32_t)(v >> 32));
    ks_put32(p + 4, (uint32_t)v);
}

static uint64_t ks_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* 1: all n bytes; 0: the peer closed (or the socket was shut down) first; -1: a socket error. */
static int ks_recv_all(int sock, unsigned char *b, size_t n)
{
    while (n > 0) {
        ssize_t r = recv(sock, b, n, MSG_WAITALL);
        if (r > 0) {
            b += r;
            n -= (size_t)r;
        } else if (r == 0) {
            return 0;
        } else if (errno != EINTR) {
            return -1;
        }
    }
    return 1;
}

static int ks_send_all(int sock, struct iovec *iov, int count)
{
    while (count > 0) {
        struct msghdr msg;
        ssize_t r;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)count;
        r = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        while (count > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (unsigned char *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

static int ks_pread_all(int fd, unsigned char *b, size_t n, uint64_t at)
{
    while (n > 0) {
        ssize_t r = pread(fd, b, n, (off_t)at);
        if (r > 0) {
            b += r;
            n -= (size_t)r;
            at += (uint64_t)r;
        } else if (r == 0 || errno != EINTR) {
            return -1; /* the end of the device inside the payload, or an I/O error */
        }
    }
    return 0;
}

static int ks_pwrite_all(int fd, const unsigned char *b, size_t n, uint64_t at)
{
    while (n > 0) {
        ssize_t r = pwrite(fd, b, n, (off_t)at);
        if (r > 0) {
            b += r;
            n -= (size_t)r;
            at += (uint64_t)r;
        } else if (r == 0 || errno != EINTR) {
            return -1;
        }
    }
    return 0;
}
