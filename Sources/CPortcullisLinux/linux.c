#define _GNU_SOURCE
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include "CPortcullisLinux.h"

int portcullis_accept4(int fd, struct sockaddr *addr, socklen_t *len) {
    return accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

/// Room for either packet-info message.
union portcullis_control {
    char bytes[CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo))];
    struct cmsghdr align;
};

int portcullis_receive_datagrams(int fd, struct portcullis_datagram *datagrams, unsigned int count,
                                 unsigned char *buffer, unsigned int slot) {
    struct mmsghdr messages[PORTCULLIS_DATAGRAM_BATCH];
    struct iovec vectors[PORTCULLIS_DATAGRAM_BATCH];
    union portcullis_control controls[PORTCULLIS_DATAGRAM_BATCH];
    if (count > PORTCULLIS_DATAGRAM_BATCH) count = PORTCULLIS_DATAGRAM_BATCH;
    memset(messages, 0, sizeof(messages[0]) * count);
    for (unsigned int i = 0; i < count; i++) {
        vectors[i].iov_base = buffer + (size_t)i * slot;
        vectors[i].iov_len = slot;
        messages[i].msg_hdr.msg_name = &datagrams[i].sender;
        messages[i].msg_hdr.msg_namelen = sizeof(datagrams[i].sender);
        messages[i].msg_hdr.msg_iov = &vectors[i];
        messages[i].msg_hdr.msg_iovlen = 1;
        messages[i].msg_hdr.msg_control = controls[i].bytes;
        messages[i].msg_hdr.msg_controllen = sizeof(controls[i].bytes);
    }
    int received = recvmmsg(fd, messages, count, MSG_DONTWAIT, NULL);
    for (int i = 0; i < received; i++) {
        struct portcullis_datagram *datagram = &datagrams[i];
        struct msghdr *header = &messages[i].msg_hdr;
        datagram->length = messages[i].msg_len;
        datagram->sender_length = header->msg_namelen;
        datagram->truncated = (header->msg_flags & MSG_TRUNC) != 0;
        datagram->destination.ss_family = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(header); c != NULL; c = CMSG_NXTHDR(header, c)) {
            if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
                struct in_pktinfo info;
                memcpy(&info, CMSG_DATA(c), sizeof(info));
                struct sockaddr_in *to = (struct sockaddr_in *)&datagram->destination;
                memset(to, 0, sizeof(*to));
                to->sin_family = AF_INET;
                to->sin_addr = info.ipi_addr;
            } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
                struct in6_pktinfo info;
                memcpy(&info, CMSG_DATA(c), sizeof(info));
                struct sockaddr_in6 *to = (struct sockaddr_in6 *)&datagram->destination;
                memset(to, 0, sizeof(*to));
                to->sin6_family = AF_INET6;
                to->sin6_addr = info.ipi6_addr;
            }
        }
    }
    return received;
}

long portcullis_send_datagram(int fd, const void *bytes, size_t length, const struct sockaddr_storage *to,
                              socklen_t to_length, const struct sockaddr_storage *source) {
    struct iovec vector = { .iov_base = (void *)bytes, .iov_len = length };
    struct msghdr header;
    union portcullis_control control;
    memset(&header, 0, sizeof(header));
    header.msg_name = (void *)to;
    header.msg_namelen = to_length;
    header.msg_iov = &vector;
    header.msg_iovlen = 1;
    if (source != NULL && source->ss_family != 0) {
        memset(&control, 0, sizeof(control));
        header.msg_control = control.bytes;
        struct cmsghdr *c = (struct cmsghdr *)control.bytes;
        if (source->ss_family == AF_INET6) {
            // Also for an IPv4 client of a dual-stack socket: Linux takes the mapped address.
            struct in6_pktinfo info = { .ipi6_addr = ((const struct sockaddr_in6 *)source)->sin6_addr, .ipi6_ifindex = 0 };
            c->cmsg_level = IPPROTO_IPV6;
            c->cmsg_type = IPV6_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof(info));
            memcpy(CMSG_DATA(c), &info, sizeof(info));
            header.msg_controllen = CMSG_SPACE(sizeof(info));
        } else {
            struct in_pktinfo info;
            memset(&info, 0, sizeof(info));
            info.ipi_spec_dst = ((const struct sockaddr_in *)source)->sin_addr;
            c->cmsg_level = IPPROTO_IP;
            c->cmsg_type = IP_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof(info));
            memcpy(CMSG_DATA(c), &info, sizeof(info));
            header.msg_controllen = CMSG_SPACE(sizeof(info));
        }
    }
    return sendmsg(fd, &header, MSG_DONTWAIT);
}

int portcullis_send_connected(int fd, const struct iovec *vectors, unsigned int parts, unsigned int count) {
    struct mmsghdr messages[PORTCULLIS_DATAGRAM_BATCH];
    if (count > PORTCULLIS_DATAGRAM_BATCH) count = PORTCULLIS_DATAGRAM_BATCH;
    memset(messages, 0, sizeof(messages[0]) * count);
    for (unsigned int i = 0; i < count; i++) {
        messages[i].msg_hdr.msg_iov = (struct iovec *)vectors + (size_t)i * parts;
        messages[i].msg_hdr.msg_iovlen = parts;
    }
    return sendmmsg(fd, messages, count, MSG_DONTWAIT);
}
