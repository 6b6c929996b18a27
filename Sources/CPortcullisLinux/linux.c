#define _GNU_SOURCE
#include <sys/socket.h>
#include "CPortcullisLinux.h"

int portcullis_accept4(int fd, struct sockaddr *addr, socklen_t *len) {
    return accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
}
