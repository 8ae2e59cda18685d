#define _GNU_SOURCE
#include "netio.h"

#include "crc32c.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
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

/* Sets SO_RCVTIMEO or SO_SNDTIMEO to the time left until the deadline, so one blocking
 * call moves a whole buffer: a syscall per buffer instead of a poll and a syscall per
 * chunk the kernel hands over. Returns 0, or -ETIMEDOUT when the deadline has passed. */
static int arm_timeout(int fd, int option, uint64_t deadline)
{
    struct timeval tv = {0, 0};   /* zero: no timeout */
    if (deadline != EMS_NO_DEADLINE) {
        uint64_t now = ems_now_ms();
        if (now >= deadline)
            return -ETIMEDOUT;
        uint64_t left = deadline - now;
        tv.tv_sec = (time_t)(left / 1000);
        tv.tv_usec = (suseconds_t)(left % 1000) * 1000;
    }
    setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv);
    return 0;
}

int ems_send_all(int fd, struct iovec *iov, int iovcnt, uint64_t deadline)
{
    while (iovcnt > 0) {
        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        int rc = arm_timeout(fd, SO_SNDTIMEO, deadline);
        if (rc < 0)
            return rc;
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)(iovcnt > 1024 ? 1024 : iovcnt)};
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;   /* the deadline check above ends a timed-out wait */
            return -errno;
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
        int rc = arm_timeout(fd, SO_RCVTIMEO, deadline);
        if (rc < 0)
            return rc;
        ssize_t got = recv(fd, p, len, MSG_WAITALL);
        if (got > 0) {
            p += got;
            len -= (size_t)got;
            continue;
        }
        if (got == 0)
            return -ECONNRESET;
        if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
    }
    return 0;
}

int ems_recv_crc(int fd, void *buf, size_t len, uint64_t deadline, uint32_t *crc)
{
    uint8_t *p = buf;
    while (len > 0) {
        size_t take = len < EMS_CRC_CHUNK ? len : EMS_CRC_CHUNK;
        int rc = ems_recv_all(fd, p, take, deadline);
        if (rc < 0)
            return rc;
        *crc = ems_crc32c(*crc, p, take);
        p += take;
        len -= take;
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
