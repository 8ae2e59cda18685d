#define _GNU_SOURCE
#include "netio.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>

uint64_t ems_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t ems_deadline_in(uint32_t timeout_ms)
{
    return timeout_ms == 0 ? EMS_NO_DEADLINE : ems_now_ms() + timeout_ms;
}

static int wait_for(int fd, short events, uint64_t deadline)
{
    for (;;) {
        int timeout = -1;
        if (deadline != EMS_NO_DEADLINE) {
            uint64_t now = ems_now_ms();
            if (now >= deadline)
                return 0;
            uint64_t left = deadline - now;
            timeout = left > 60000 ? 60000 : (int)left;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, timeout);
        if (rc > 0)
            return 1;
        if (rc < 0 && errno != EINTR)
            return -errno;
    }
}

int ems_wait_readable(int fd, uint64_t deadline)
{
    return wait_for(fd, POLLIN, deadline);
}

int ems_send_all(int fd, struct iovec *iov, int iovcnt, uint64_t deadline)
{
    while (iovcnt > 0) {
        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)(iovcnt > 1024 ? 1024 : iovcnt)};
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            int ready = wait_for(fd, POLLOUT, deadline);
            if (ready <= 0)
                return ready == 0 ? -ETIMEDOUT : ready;
            continue;
        }
        size_t left = (size_t)sent;
        while (iovcnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

int ems_recv_all(int fd, void *buf, size_t len, uint64_t deadline)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t got = recv(fd, p, len, MSG_DONTWAIT);
        if (got > 0) {
            p += got;
            len -= (size_t)got;
            continue;
        }
        if (got == 0)
            return -ECONNRESET;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        int ready = wait_for(fd, POLLIN, deadline);
        if (ready <= 0)
            return ready == 0 ? -ETIMEDOUT : ready;
    }
    return 0;
}

void ems_tune_socket(int fd, int tcp)
{
    /* Buffer sizes are left to the kernel's autotuning, which grows them further on
     * loopback than a fixed SO_SNDBUF/SO_RCVBUF would. */
    int one = 1;
    if (tcp)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}
