// The Linux system calls the TCP engine (PortcullisEngine) needs that Swift's Glibc module
// does not export: epoll, eventfd, accept4. Declarations only; no logic lives here.
#ifndef CPORTCULLIS_LINUX_H
#define CPORTCULLIS_LINUX_H

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

/// accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC): accept4 is a GNU extension, declared
/// only with _GNU_SOURCE, which the .c file defines.
int portcullis_accept4(int fd, struct sockaddr *addr, socklen_t *len);

#endif
