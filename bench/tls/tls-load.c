// Load generator for bench/tls.sh (the same client for nginx and Portcullis):
//   tls-load handshakes PORT THREADS SECONDS full|resumed
//       THREADS threads each connect, handshake (full, or resumed from the thread's last
//       session), read the server's reply to its end, and close, for SECONDS seconds.
//       Prints: handshakes=N per_second=R
//   tls-load bulk PORT MEGABYTES STREAMS
//       STREAMS connections each send MEGABYTES over TLS, then close. Prints: megabytes=N seconds=S gbit=G
//   tls-load sink PORT
//       A plain TCP server that reads and discards (the upstream of the bulk test).
// Loopback only; every loop is bounded by its count or time.
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port;
static double seconds_limit;
static int resumed_mode;
static SSL_CTX *ctx;
static atomic_long done_count;
static atomic_long failures;
static atomic_long reused_count;
static long megabytes;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *handshaker(void *unused) {
    (void)unused;
    SSL_SESSION *session = NULL;
    double end = now() + seconds_limit;
    char buffer[4096];
    while (now() < end) {
        int fd = dial();
        if (fd < 0) { atomic_fetch_add(&failures, 1); continue; }
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, fd);
        if (resumed_mode && session) SSL_set_session(ssl, session);
        if (SSL_connect(ssl) == 1) {
            // Read the reply to its end: TLS 1.3 tickets arrive here too.
            while (SSL_read(ssl, buffer, sizeof buffer) > 0) {}
            if (SSL_session_reused(ssl)) atomic_fetch_add(&reused_count, 1);
            if (resumed_mode) {
                // The newest session (TLS 1.3 tickets are replaced on each resumption).
                SSL_SESSION *latest = SSL_get1_session(ssl);
                if (latest) {
                    if (session) SSL_SESSION_free(session);
                    session = latest;
                }
            }
            atomic_fetch_add(&done_count, 1);
            SSL_shutdown(ssl);
        } else {
            atomic_fetch_add(&failures, 1);
            ERR_clear_error();
        }
        SSL_free(ssl);
        close(fd);
    }
    if (session) SSL_SESSION_free(session);
    return NULL;
}

static void *bulk_stream(void *unused) {
    (void)unused;
    static char block[1 << 16];
    int fd = dial();
    if (fd < 0) { atomic_fetch_add(&failures, 1); return NULL; }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) { atomic_fetch_add(&failures, 1); return NULL; }
    long total = megabytes << 20;
    while (total > 0) {
        int n = SSL_write(ssl, block, total < (long)sizeof block ? (int)total : (int)sizeof block);
        if (n <= 0) { atomic_fetch_add(&failures, 1); break; }
        total -= n;
    }
    SSL_shutdown(ssl);
    shutdown(fd, SHUT_WR);
    while (SSL_read(ssl, block, sizeof block) > 0) {}
    SSL_free(ssl);
    close(fd);
    return NULL;
}

static void *sink_connection(void *arg) {
    int fd = (int)(long)arg;
    char buffer[1 << 16];
    while (read(fd, buffer, sizeof buffer) > 0) {}
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: see the comment at the top\n"); return 2; }
    port = atoi(argv[2]);
    if (strcmp(argv[1], "sink") == 0) {
        int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        if (bind(listener, (struct sockaddr *)&a, sizeof a) != 0 || listen(listener, 128) != 0) { perror("sink"); return 1; }
        for (;;) {
            int fd = accept(listener, NULL, NULL);
            if (fd < 0) continue;
            pthread_t t;
            pthread_create(&t, NULL, sink_connection, (void *)(long)fd);
            pthread_detach(t);
        }
    }
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT);
    int threads;
    if (strcmp(argv[1], "handshakes") == 0 && argc == 6) {
        threads = atoi(argv[3]);
        seconds_limit = atof(argv[4]);
        resumed_mode = strcmp(argv[5], "resumed") == 0;
        pthread_t t[256];
        double start = now();
        for (int i = 0; i < threads && i < 256; i++) pthread_create(&t[i], NULL, handshaker, NULL);
        for (int i = 0; i < threads && i < 256; i++) pthread_join(t[i], NULL);
        double took = now() - start;
        printf("handshakes=%ld per_second=%.0f reused=%ld failures=%ld\n", atomic_load(&done_count),
               atomic_load(&done_count) / took, atomic_load(&reused_count), atomic_load(&failures));
        return 0;
    }
    if (strcmp(argv[1], "bulk") == 0 && argc == 5) {
        megabytes = atol(argv[3]);
        threads = atoi(argv[4]);
        pthread_t t[64];
        double start = now();
        for (int i = 0; i < threads && i < 64; i++) pthread_create(&t[i], NULL, bulk_stream, NULL);
        for (int i = 0; i < threads && i < 64; i++) pthread_join(t[i], NULL);
        double took = now() - start;
        long total = megabytes * threads;
        printf("megabytes=%ld seconds=%.3f gbit=%.2f failures=%ld\n", total, took, total * 8.0 / 1024 / took,
               atomic_load(&failures));
        return 0;
    }
    fprintf(stderr, "usage: see the comment at the top\n");
    return 2;
}
