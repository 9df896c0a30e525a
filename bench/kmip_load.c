/* kmip_load: a lean KMIP load generator (TTLV over TLS 1.2), as wrk is for HTTP. Used by bench/kmip.py.
 *
 *   kmip_load HOST PORT MODE THREADS SECONDS CERT KEY CA [VERSION]     (VERSION: KMIP's, default 1.2)
 *   kmip_load --dump [VERSION] [UID]
 *
 * MODE new: vSphere style, every operation on a NEW TCP+TLS connection resuming the previous TLS session
 *   (SSL_get1_session / SSL_set_session, as vCenter's Java TLS does): Create, Get(uid), Activate(uid),
 *   GetAttributes(uid) in turn, each timed from connect start to its answer read;
 * MODE persistent: one connection per thread, Create an AES-256 key, then Get(uid) again and again;
 * MODE encrypt: one connection per thread, Create, Activate, then Encrypt(uid, AES-CBC-PKCS5, 64 zero bytes).
 * THREADS threads run for SECONDS. CERT/KEY: the client certificate and key (PEM); CA: the PEM that must
 * verify the server's certificate (no hostname check). TLS 1.2 only.
 *
 * Requests are built by the TTLV encoder below (tag 3 bytes, type 1, length 4 big-endian, value zero-padded
 * to 8), on persistent connections once. An answer is a success when it holds an encoded Result Status Success (42007f05
 * 00000004 00000000 00000000) and, with persistent connections, is as long as the first; anything else or
 * a connection error is a failure. Output: one JSON line {"ops", "failures", "seconds", "p50_ms", "p99_ms",
 * "max_ms", "client_cpu_s", "resumed", "failed_by", "first_failure"}: ops = successful operations (the
 * latencies are theirs), resumed = connections that resumed a session, failed_by = failures by kind
 * (connect, handshake, io, answer), first_failure = what the first one was (an answer's ResultReason and
 * ResultMessage, never its payload). --dump prints the requests, one "name hex" line each (UID defaults to
 * "uid-0"), which the bench compares byte for byte with keysteward's own TTLV codec's.
 *
 *   gcc -O2 -o kmip_load kmip_load.c -lssl -lcrypto -pthread
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kmip_load_ttlv.h"

/* ---- failures: counted by kind, the first one described ------------------------------------- */
enum { F_CONNECT, F_HANDSHAKE, F_IO, F_ANSWER };
static const char *KINDS[4] = {"connect", "handshake", "io", "answer"};
static long failed_by[4];
static char first_failure[200];
static pthread_mutex_t failure_lock = PTHREAD_MUTEX_INITIALIZER;

static void note(int kind, const char *detail) {
    pthread_mutex_lock(&failure_lock);
    failed_by[kind]++;
    if (!first_failure[0]) snprintf(first_failure, sizeof first_failure, "%s: %s", KINDS[kind], detail);
    pthread_mutex_unlock(&failure_lock);
}

static void note_errno(int kind, const char *what) {
    char text[120], buf[80];
    snprintf(text, sizeof text, "%s: %s", what, strerror_r(errno, buf, sizeof buf));
    note(kind, text);
}

/* An answer without Success: its ResultReason and ResultMessage (the server's words, never key material). */
static void note_answer(const unsigned char *answer, size_t n) {
    uint32_t len = 0, mlen = 0;
    const unsigned char *reason = find_item(answer, n, 0x42007e, T_ENUM, &len);
    const unsigned char *message = find_item(answer, n, 0x42007d, T_TEXT, &mlen);
    char text[160];
    int at = snprintf(text, sizeof text, "no Success; ResultReason %u; ", reason && len == 4 ? get32(reason) : 0);
    for (uint32_t i = 0; message && i < mlen && at < (int)sizeof text - 1; i++)
        text[at++] = isprint(message[i]) && message[i] != '"' && message[i] != '\\' ? message[i] : '?';
    text[at < (int)sizeof text ? at : (int)sizeof text - 1] = 0;
    note(F_ANSWER, text);
}

static int uid_of(const unsigned char *answer, size_t n, char *out) { /* UniqueIdentifier, as a C string */
    uint32_t len = 0;
    const unsigned char *v = find_item(answer, n, 0x420094, T_TEXT, &len);
    if (!v || len == 0 || len >= UID_MAX) return note(F_ANSWER, "a Create answer without a UniqueIdentifier"), 0;
    memcpy(out, v, len);
    out[len] = 0;
    return 1;
}

/* ---- TLS connections ------------------------------------------------------------------------- */
static SSL_CTX *ctx;
static struct addrinfo *server_addr;

static SSL *connect_tls(SSL_SESSION *resume) {
    int fd = socket(server_addr->ai_family, SOCK_STREAM, 0);
    if (fd < 0) return note_errno(F_CONNECT, "socket"), NULL;
    int one = 1;
    struct timeval tv = {20, 0}; /* as the Python client's socket timeout */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, server_addr->ai_addr, server_addr->ai_addrlen) != 0) {
        note_errno(F_CONNECT, "connect");
        close(fd);
        return NULL;
    }
    SSL *ssl = SSL_new(ctx);
    if (!ssl || !SSL_set_fd(ssl, fd) || (resume && !SSL_set_session(ssl, resume)) || SSL_connect(ssl) != 1) {
        char text[160];
        unsigned long e = ERR_peek_last_error();
        if (e) ERR_error_string_n(e, text, sizeof text);
        e ? note(F_HANDSHAKE, text) : note_errno(F_HANDSHAKE, "TLS handshake");
        ERR_clear_error();
        SSL_free(ssl);
        close(fd);
        return NULL;
    }
    return ssl;
}

static void close_tls(SSL *ssl) {
    int fd = SSL_get_fd(ssl);
    SSL_shutdown(ssl); /* sends close_notify, does not wait for the peer's */
    SSL_free(ssl);
    close(fd);
    ERR_clear_error();
}

static int read_exactly(SSL *ssl, unsigned char *p, size_t n) {
    while (n) {
        int got = SSL_read(ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
        if (got <= 0) {
            int why = SSL_get_error(ssl, got);
            char text[160] = "read: the server closed the connection";
            if (why == SSL_ERROR_SSL) ERR_error_string_n(ERR_peek_last_error(), text, sizeof text);
            why == SSL_ERROR_SYSCALL && errno ? note_errno(F_IO, "read") : note(F_IO, text);
            return 0;
        }
        p += got, n -= (size_t)got;
    }
    return 1;
}

/* Sends one request and reads one whole answer into buf; its length, or 0 on any error (noted). */
static size_t ask(SSL *ssl, const ttlv *request, unsigned char *buf) {
    if (SSL_write(ssl, request->b, (int)request->n) != (int)request->n) return note_errno(F_IO, "write"), 0;
    if (!read_exactly(ssl, buf, 8)) return 0;
    uint32_t len = get32(buf + 4);
    if (buf[3] != T_STRUCT || len > MAX_ANSWER - 8) return note(F_IO, "an answer that is not a KMIP message"), 0;
    if (!read_exactly(ssl, buf + 8, len)) return 0;
    ERR_clear_error();
    return 8 + (size_t)len;
}

/* A Success answer (of the same length as the first one when ``want`` is set); a failure is noted. */
static int success(const unsigned char *answer, size_t n, size_t want) {
    if (!n) return 0; /* noted by ask */
    if (!memmem(answer, n, SUCCESS, sizeof SUCCESS)) return note_answer(answer, n), 0;
    if (want && n != want) return note(F_ANSWER, "an answer of another length than the first"), 0;
    return 1;
}

/* ---- the client threads ---------------------------------------------------------------------- */
typedef struct {
    double *lat; /* milliseconds of each successful operation */
    size_t ops, cap;
    long failures, resumed;
    unsigned char *buf;
} worker;

static const char *mode;
static double deadline;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void record(worker *w, double started, int ok) {
    if (!ok) {
        w->failures++;
        return;
    }
    if (w->ops == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 4096;
        if (!(w->lat = realloc(w->lat, w->cap * sizeof *w->lat))) die("out of memory");
    }
    w->lat[w->ops++] = 1000 * (now() - started);
}

/* One connection: Create (Activate for encrypt), then the same Get or Encrypt until the deadline. */
static void run_persistent(worker *w) {
    ttlv req;
    char uid[UID_MAX];
    int encrypt = strcmp(mode, "encrypt") == 0, ok = 0;
    size_t n = 0, first = 0;
    SSL *ssl = connect_tls(NULL);
    if (ssl) {
        create_request(&req);
        n = ask(ssl, &req, w->buf);
        ok = success(w->buf, n, 0) && uid_of(w->buf, n, uid);
    }
    if (ok && encrypt) uid_request(&req, OP_ACTIVATE, uid), ok = success(w->buf, ask(ssl, &req, w->buf), 0);
    if (!ok) {
        w->failures++;
        if (ssl) close_tls(ssl);
        return;
    }
    encrypt ? encrypt_request(&req, uid) : uid_request(&req, OP_GET, uid);
    while (now() < deadline) {
        double started = now();
        n = ask(ssl, &req, w->buf);
        ok = success(w->buf, n, first);
        first = first ? first : n;
        record(w, started, ok);
        if (!n) break; /* the connection is gone */
    }
    close_tls(ssl);
}

/* vSphere style: a new connection per operation, resuming the last session; Create, Get, Activate,
 * GetAttributes of the key just made. A failure starts again from Create, after a short pause. */
static void run_new(worker *w) {
    static const uint32_t ops[4] = {OP_CREATE, OP_GET, OP_ACTIVATE, OP_GETATTRS};
    ttlv create, req;
    char uid[UID_MAX];
    SSL_SESSION *session = NULL;
    create_request(&create);
    while (now() < deadline) {
        for (int i = 0; i < 4; i++) {
            double started = now();
            SSL *ssl = connect_tls(session);
            int ok = 0;
            if (ssl) {
                if (session && SSL_session_reused(ssl)) w->resumed++;
                if (i > 0) uid_request(&req, ops[i], uid);
                size_t n = ask(ssl, i == 0 ? &create : &req, w->buf);
                ok = success(w->buf, n, 0) && (i > 0 || uid_of(w->buf, n, uid)); /* Create: its key's identifier */
                SSL_SESSION *next = SSL_get1_session(ssl); /* the session to resume next time */
                if (next) SSL_SESSION_free(session), session = next;
                close_tls(ssl);
            }
            record(w, started, ok);
            if (!ok) {
                usleep(10000);
                break;
            }
        }
    }
    SSL_SESSION_free(session);
}

static void *thread_main(void *arg) {
    worker *w = arg;
    strcmp(mode, "new") == 0 ? run_new(w) : run_persistent(w);
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, size_t n, double q) { /* as the Python bench: sorted[int(q n)] */
    size_t at = (size_t)(q * n);
    return n ? sorted[at < n ? at : n - 1] : 0.0;
}

static void parse_version(const char *s) {
    if (sscanf(s, "%d.%d", &kmip_major, &kmip_minor) != 2) die("VERSION is MAJOR.MINOR, e.g. 1.2");
}

static void dump(const char *name, const ttlv *t) {
    printf("%s ", name);
    for (size_t k = 0; k < t->n; k++) printf(k + 1 < t->n ? "%02x" : "%02x\n", t->b[k]);
}

static void dump_all(const char *uid) {
    ttlv t;
    create_request(&t), dump("Create", &t);
    uid_request(&t, OP_GET, uid), dump("Get", &t);
    uid_request(&t, OP_ACTIVATE, uid), dump("Activate", &t);
    uid_request(&t, OP_GETATTRS, uid), dump("GetAttributes", &t);
    encrypt_request(&t, uid), dump("Encrypt", &t);
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--dump") == 0) {
        if (argc >= 3) parse_version(argv[2]);
        dump_all(argc >= 4 ? argv[3] : "uid-0");
        return 0;
    }
    if (argc < 9 || argc > 10) {
        fprintf(stderr, "usage: kmip_load HOST PORT new|persistent|encrypt THREADS SECONDS CERT KEY CA [VERSION]\n"
                        "       kmip_load --dump [VERSION] [UID]\n");
        return 2;
    }
    mode = argv[3];
    int threads = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (argc == 10) parse_version(argv[9]);
    if (strcmp(mode, "new") && strcmp(mode, "persistent") && strcmp(mode, "encrypt")) die("unknown MODE");
    if (threads < 1 || threads > 1024 || seconds <= 0) die("THREADS must be 1-1024 and SECONDS above 0");

    signal(SIGPIPE, SIG_IGN); /* a peer that closed first is a failed operation, not the end of the run */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    if (getaddrinfo(argv[1], argv[2], &hints, &server_addr) != 0) die("cannot resolve HOST PORT");
    if (!(ctx = SSL_CTX_new(TLS_client_method()))) die("SSL_CTX_new");
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) || !SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION))
        die("cannot pin TLS 1.2");
    if (SSL_CTX_load_verify_locations(ctx, argv[8], NULL) != 1) die("cannot load CA");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[6]) != 1) die("cannot load CERT");
    if (SSL_CTX_use_PrivateKey_file(ctx, argv[7], SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(ctx) != 1)
        die("cannot load KEY");

    worker *ws = calloc(threads, sizeof *ws);
    pthread_t *ids = calloc(threads, sizeof *ids);
    if (!ws || !ids) die("out of memory");
    double started = now();
    deadline = started + seconds;
    for (int i = 0; i < threads; i++) {
        if (!(ws[i].buf = malloc(MAX_ANSWER))) die("out of memory");
        if (pthread_create(&ids[i], NULL, thread_main, &ws[i]) != 0) die("pthread_create");
    }
    size_t total = 0;
    long failures = 0, resumed = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ids[i], NULL);
        total += ws[i].ops, failures += ws[i].failures, resumed += ws[i].resumed;
    }
    double elapsed = now() - started;
    double *all = malloc((total ? total : 1) * sizeof *all);
    if (!all) die("out of memory");
    for (size_t i = 0, k = 0; i < (size_t)threads; k += ws[i++].ops)
        memcpy(all + k, ws[i].lat, ws[i].ops * sizeof *all);
    qsort(all, total, sizeof *all, by_value);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"ops\": %zu, \"failures\": %ld, \"seconds\": %.3f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"max_ms\": %.3f, \"client_cpu_s\": %.3f, \"resumed\": %ld, \"failed_by\": {\"connect\": %ld, "
           "\"handshake\": %ld, \"io\": %ld, \"answer\": %ld}, \"first_failure\": \"%s\"}\n",
           total, failures, elapsed, percentile(all, total, 0.5), percentile(all, total, 0.99),
           percentile(all, total, 1), cpu, resumed, failed_by[0], failed_by[1], failed_by[2], failed_by[3],
           first_failure);
    return 0;
}
