// A throwaway TCP relay in C for decision 0012's engine question: how fast can plain epoll, and
// how fast can io_uring, accept, dial and relay short connections on this machine, with no
// policy, no logging and no Swift. Not part of Portcullis: bench/spikes/relay-spike.sh builds it
// and measures it next to nginx and Portcullis in the same run.
//
//   relay MODE LISTEN_PORT UPSTREAM_PORT THREADS      MODE: epoll | uring | poll
//
// Both modes: one thread per core, each with its own SO_REUSEPORT listener on 127.0.0.1; each
// connection gets a non-blocking upstream socket to 127.0.0.1:UPSTREAM_PORT, bytes are relayed
// through a 16 KiB buffer per direction, and when either side reaches EOF both are closed (the
// HTTP `Connection: close` load this is for never half-closes). TCP_NODELAY on both sockets.
//
// epoll: level-triggered listener, accept4 batches, edge-triggered sockets registered once.
// uring: multishot accept, IORING_OP_CONNECT, recv/send SQEs, IORING_OP_CLOSE; one
//        io_uring_submit_and_wait per loop turn for everything queued in it.
// poll:  io_uring only as the readiness source (multishot poll SQEs instead of epoll_ctl, one
//        io_uring_enter instead of epoll_wait); accept aside, reads, writes, connect and close
//        are the epoll mode's system calls.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSZ 16384

static int listen_port, upstream_port;
static struct sockaddr_in upstream;

struct side {
    int fd;
    char buf[BUFSZ];
    int len, off;  // bytes in buf not yet written to the other side
    int eof;
};

struct conn {
    struct side s[2];  // 0: client, 1: upstream
    int connected;
    int closing;
    int inflight;  // uring: SQEs not completed yet
};

static int listener(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(listen_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (void *)&a, sizeof a) || listen(fd, 4096)) { perror("bind/listen"); exit(1); }
    return fd;
}

static int upstream_socket(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

// ---- epoll -------------------------------------------------------------------------------

// Freed after the batch: a later event of the same batch may still name the connection.
static __thread struct conn *ep_closed[512];
static __thread int ep_closed_count;

static void ep_close(int ep, struct conn *c) {
    (void)ep;
    close(c->s[0].fd);
    close(c->s[1].fd);
    ep_closed[ep_closed_count++] = c;
}

// Moves what `from` has to the other side; returns -1 when the connection should end.
static int ep_pump(struct conn *c, int from) {
    struct side *in = &c->s[from], *out = &c->s[1 - from];
    for (;;) {
        if (in->len > in->off) {
            ssize_t n = send(out->fd, in->buf + in->off, in->len - in->off, MSG_NOSIGNAL);
            if (n < 0) return errno == EAGAIN ? 0 : -1;
            in->off += n;
            if (in->off < in->len) return 0;
        }
        in->len = in->off = 0;
        ssize_t n = recv(in->fd, in->buf, BUFSZ, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        in->len = n;
    }
}

static void *ep_loop(void *arg) {
    (void)arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int lfd = listener();
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) {
                for (int k = 0; k < 64; k++) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break;
                    struct conn *c = calloc(1, sizeof *c);
                    c->s[0].fd = cfd;
                    c->s[1].fd = upstream_socket();
                    connect(c->s[1].fd, (void *)&upstream, sizeof upstream);
                    // Tagged pointers: low bit says which side.
                    struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET};
                    e.data.u64 = (uint64_t)(uintptr_t)c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &e);
                    e.data.u64 = (uint64_t)(uintptr_t)c | 1;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c->s[1].fd, &e);
                }
                continue;
            }
            struct conn *c = (void *)(uintptr_t)(events[i].data.u64 & ~1ULL);
            int side = events[i].data.u64 & 1;
            if (c->closing) continue;
            if (side == 1 && !c->connected) {
                if (events[i].events & (EPOLLERR | EPOLLHUP)) { c->closing = 1; ep_close(ep, c); continue; }
                c->connected = 1;
            }
            if (!c->connected) continue;
            if (ep_pump(c, side) < 0 || ep_pump(c, 1 - side) < 0) { c->closing = 1; ep_close(ep, c); }
        }
        for (int i = 0; i < ep_closed_count; i++) free(ep_closed[i]);
        ep_closed_count = 0;
    }
    return NULL;
}

// ---- io_uring ------------------------------------------------------------------------------

enum op { OP_ACCEPT = 1, OP_CONNECT, OP_RECV, OP_SEND, OP_CLOSE };

// user_data: conn pointer | op << 1 | side (conn is 16-byte aligned: 4 low bits free).
static uint64_t tag(struct conn *c, enum op op, int side) { return (uint64_t)(uintptr_t)c | (uint64_t)op << 1 | side; }

static struct io_uring_sqe *sqe_for(struct io_uring *ring) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) { io_uring_submit(ring); sqe = io_uring_get_sqe(ring); }
    return sqe;
}

static void ur_recv(struct io_uring *ring, struct conn *c, int side) {
    struct io_uring_sqe *sqe = sqe_for(ring);
    io_uring_prep_recv(sqe, c->s[side].fd, c->s[side].buf, BUFSZ, 0);
    io_uring_sqe_set_data64(sqe, tag(c, OP_RECV, side));
    c->inflight++;
}

static void ur_send(struct io_uring *ring, struct conn *c, int from) {
    struct side *in = &c->s[from];
    struct io_uring_sqe *sqe = sqe_for(ring);
    io_uring_prep_send(sqe, c->s[1 - from].fd, in->buf + in->off, in->len - in->off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, tag(c, OP_SEND, from));
    c->inflight++;
}

static void ur_close(struct io_uring *ring, struct conn *c) {
    if (c->closing) return;
    c->closing = 1;
    // Closing cancels the other side's pending recv; the conn is freed once nothing is in flight.
    for (int s = 0; s < 2; s++) {
        struct io_uring_sqe *sqe = sqe_for(ring);
        io_uring_prep_cancel_fd(sqe, c->s[s].fd, IORING_ASYNC_CANCEL_ALL);
        io_uring_sqe_set_data64(sqe, 0);
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    }
    for (int s = 0; s < 2; s++) {
        struct io_uring_sqe *sqe = sqe_for(ring);
        io_uring_prep_close(sqe, c->s[s].fd);
        io_uring_sqe_set_data64(sqe, tag(c, OP_CLOSE, s));
        c->inflight++;
    }
}

static void *ur_loop(void *arg) {
    (void)arg;
    struct io_uring ring;
    struct io_uring_params p = {0};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init_params(4096, &ring, &p) < 0) {
        memset(&p, 0, sizeof p);
        if (io_uring_queue_init_params(4096, &ring, &p) < 0) { perror("io_uring_queue_init"); exit(1); }
    }
    int lfd = listener();
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, OP_ACCEPT << 1);
    for (;;) {
        io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            uint64_t data = cqe->user_data;
            int res = cqe->res;
            if (data == 0) continue;
            enum op op = (data >> 1) & 7;
            int side = data & 1;
            struct conn *c = (void *)(uintptr_t)(data & ~15ULL);
            if (op == OP_ACCEPT) {
                if (!(cqe->flags & IORING_CQE_F_MORE)) {  // re-arm
                    struct io_uring_sqe *s = sqe_for(&ring);
                    io_uring_prep_multishot_accept(s, lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    io_uring_sqe_set_data64(s, OP_ACCEPT << 1);
                }
                if (res < 0) continue;
                struct conn *n;
                if (posix_memalign((void **)&n, 16, sizeof *n)) exit(1);
                memset(n, 0, sizeof *n);
                n->s[0].fd = res;
                n->s[1].fd = upstream_socket();
                struct io_uring_sqe *s = sqe_for(&ring);
                io_uring_prep_connect(s, n->s[1].fd, (void *)&upstream, sizeof upstream);
                io_uring_sqe_set_data64(s, tag(n, OP_CONNECT, 1));
                n->inflight++;
                continue;
            }
            c->inflight--;
            switch (op) {
            case OP_CONNECT:
                if (c->closing) break;
                if (res < 0) { ur_close(&ring, c); break; }
                c->connected = 1;
                ur_recv(&ring, c, 0);
                ur_recv(&ring, c, 1);
                break;
            case OP_RECV:
                if (c->closing) break;
                if (res <= 0) { ur_close(&ring, c); break; }
                c->s[side].len = res;
                c->s[side].off = 0;
                ur_send(&ring, c, side);
                break;
            case OP_SEND:
                if (c->closing) break;
                if (res < 0) { ur_close(&ring, c); break; }
                c->s[side].off += res;
                if (c->s[side].off < c->s[side].len) ur_send(&ring, c, side);
                else ur_recv(&ring, c, side);
                break;
            default:
                break;
            }
            if (c->closing && c->inflight == 0) free(c);
        }
        io_uring_cq_advance(&ring, seen);
    }
    return NULL;
}

// ---- io_uring as a readiness source only (multishot poll), read/write/close as syscalls ------
// What it would take to keep an epoll-style engine and swap only its wait: registration and
// its removal become SQEs batched into the one io_uring_enter per turn.

static __thread struct conn *pl_closed[512];
static __thread int pl_closed_count;

static void pl_watch(struct io_uring *ring, struct conn *c, int fd, uint64_t data) {
    c->inflight++;  // until its last CQE (one without IORING_CQE_F_MORE)
    struct io_uring_sqe *sqe = sqe_for(ring);
    io_uring_prep_poll_multishot(sqe, fd, POLLIN | POLLOUT | POLLRDHUP);
    io_uring_sqe_set_data64(sqe, data);
}

static void pl_close(struct io_uring *ring, struct conn *c) {
    c->closing = 1;
    for (int s = 0; s < 2; s++) {
        // The poll holds a reference to the file: cancel it, or the socket would stay open.
        struct io_uring_sqe *sqe = sqe_for(ring);
        io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)c | s);
        io_uring_sqe_set_data64(sqe, 0);
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
        close(c->s[s].fd);
    }
}

static void *pl_loop(void *arg) {
    (void)arg;
    struct io_uring ring;
    struct io_uring_params p = {0};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init_params(4096, &ring, &p) < 0) { perror("io_uring_queue_init"); exit(1); }
    int lfd = listener();
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, 2);
    for (;;) {
        io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            uint64_t data = cqe->user_data;
            int res = cqe->res;
            if (data == 0) continue;
            if (data == 2) {
                if (!(cqe->flags & IORING_CQE_F_MORE)) {
                    struct io_uring_sqe *s = sqe_for(&ring);
                    io_uring_prep_multishot_accept(s, lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    io_uring_sqe_set_data64(s, 2);
                }
                if (res < 0) continue;
                struct conn *c;
                if (posix_memalign((void **)&c, 16, sizeof *c)) exit(1);
                memset(c, 0, sizeof *c);
                c->s[0].fd = res;
                c->s[1].fd = upstream_socket();
                connect(c->s[1].fd, (void *)&upstream, sizeof upstream);
                pl_watch(&ring, c, c->s[0].fd, (uint64_t)(uintptr_t)c);
                pl_watch(&ring, c, c->s[1].fd, (uint64_t)(uintptr_t)c | 1);
                continue;
            }
            struct conn *c = (void *)(uintptr_t)(data & ~15ULL);
            int side = data & 1;
            if (!(cqe->flags & IORING_CQE_F_MORE)) {
                c->inflight--;
                if (c->closing) {
                    if (c->inflight == 0) pl_closed[pl_closed_count++] = c;
                    continue;
                }
                if (res >= 0) pl_watch(&ring, c, c->s[side].fd, data);  // re-arm
            }
            if (c->closing) continue;
            if (res < 0) { pl_close(&ring, c); continue; }
            if (side == 1 && !c->connected) {
                if (res & (POLLERR | POLLHUP)) { pl_close(&ring, c); continue; }
                c->connected = 1;
            }
            if (!c->connected) continue;
            if (ep_pump(c, side) < 0 || ep_pump(c, 1 - side) < 0) pl_close(&ring, c);
        }
        io_uring_cq_advance(&ring, seen);
        for (int i = 0; i < pl_closed_count; i++) free(pl_closed[i]);
        pl_closed_count = 0;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "relay epoll|uring LISTEN_PORT UPSTREAM_PORT THREADS\n"); return 2; }
    void *(*loop)(void *) = strcmp(argv[1], "uring") == 0 ? ur_loop : strcmp(argv[1], "poll") == 0 ? pl_loop : ep_loop;
    listen_port = atoi(argv[2]);
    upstream_port = atoi(argv[3]);
    int threads = atoi(argv[4]);
    upstream.sin_family = AF_INET;
    upstream.sin_port = htons(upstream_port);
    upstream.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    pthread_t t[64];
    for (int i = 0; i < threads && i < 64; i++) pthread_create(&t[i], NULL, loop, NULL);
    pthread_join(t[0], NULL);
    return 0;
}
