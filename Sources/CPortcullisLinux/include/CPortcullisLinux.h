// The Linux system calls the engine (PortcullisEngine) needs that Swift's Glibc module does not
// export: epoll, eventfd, accept4, and the datagram calls whose structures and macros Swift
// cannot use (struct mmsghdr needs _GNU_SOURCE; CMSG_* are macros). Marshalling only: what to
// do with a datagram is decided in Swift.
#ifndef CPORTCULLIS_LINUX_H
#define CPORTCULLIS_LINUX_H

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

/// accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC): accept4 is a GNU extension, declared
/// only with _GNU_SOURCE, which the .c file defines.
int portcullis_accept4(int fd, struct sockaddr *addr, socklen_t *len);

/// Most datagrams one `portcullis_receive_datagrams` call reads.
#define PORTCULLIS_DATAGRAM_BATCH 32

/// One datagram a batch read: who sent it (`sender_length`: how much of `sender` the kernel
/// filled, which tells an unnamed unix-domain sender, 0 or 2, and an abstract name's length),
/// where it was sent (from IP_PKTINFO/IPV6_PKTINFO, `destination.ss_family` 0 when the socket
/// does not ask), and its length (its bytes are at its slot of the caller's buffer).
struct portcullis_datagram {
    struct sockaddr_storage sender;
    socklen_t sender_length;
    struct sockaddr_storage destination;
    unsigned int length;
    int truncated;
};

/// recvmmsg(fd, …, MSG_DONTWAIT): up to `count` (at most PORTCULLIS_DATAGRAM_BATCH) datagrams,
/// the i-th into `buffer + i * slot`. Returns how many, or -1 with errno.
int portcullis_receive_datagrams(int fd, struct portcullis_datagram *datagrams, unsigned int count,
                                 unsigned char *buffer, unsigned int slot);

/// sendmsg(fd, bytes, to, MSG_DONTWAIT), leaving from `source` (IP_PKTINFO/IPV6_PKTINFO) when
/// it is not NULL: how a wildcard socket answers from the address the client dialled.
/// `to_length`: the length of `to` (a unix-domain address's depends on its path).
long portcullis_send_datagram(int fd, const void *bytes, size_t length, const struct sockaddr_storage *to,
                              socklen_t to_length, const struct sockaddr_storage *source);

/// sendmmsg(fd, …, MSG_DONTWAIT) on a connected socket: `count` datagrams (at most
/// PORTCULLIS_DATAGRAM_BATCH), the i-th made of `parts` vectors from `vectors + i * parts`.
/// Returns how many were sent (the first ones), or -1 with errno if none was.
int portcullis_send_connected(int fd, const struct iovec *vectors, unsigned int parts, unsigned int count);

#endif
