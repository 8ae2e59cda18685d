/* Socket I/O bounded by deadlines, shared by the transfer server and client.
 *
 * Sockets stay in blocking mode; every wait goes through poll() with the time left until
 * the deadline, so no call blocks past it. Deadlines are CLOCK_MONOTONIC milliseconds. */
#ifndef EMS_NETIO_H
#define EMS_NETIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define EMS_NO_DEADLINE UINT64_MAX

uint64_t ems_now_ms(void);

/* Deadline `timeout_ms` from now; 0 means none. */
uint64_t ems_deadline_in(uint32_t timeout_ms);

/* Sends every byte of iov[0..iovcnt) (the array is modified as it is consumed), in as few
 * sendmsg calls as the socket allows. Returns 0, -ETIMEDOUT, or the negative errno of the
 * failing call (-EPIPE, -ECONNRESET ...). */
int ems_send_all(int fd, struct iovec *iov, int iovcnt, uint64_t deadline);

/* Receives exactly len bytes. Returns 0, -ETIMEDOUT, -ECONNRESET when the peer closed
 * first, or the negative errno of recv. */
int ems_recv_all(int fd, void *buf, size_t len, uint64_t deadline);

/* ems_recv_all in chunks of EMS_CRC_CHUNK bytes, extending *crc (CRC-32C) over each
 * chunk right after it arrives, while it is still in cache: one pass over memory instead
 * of a receive pass and a checksum pass. */
#define EMS_CRC_CHUNK (256u << 10)
int ems_recv_crc(int fd, void *buf, size_t len, uint64_t deadline, uint32_t *crc);

/* Waits until fd is readable. Returns 1 when readable, 0 on timeout, or a negative errno. */
int ems_wait_readable(int fd, uint64_t deadline);

/* TCP_NODELAY for TCP sockets; a failure is ignored (it only costs latency). */
void ems_tune_socket(int fd, int tcp);

#endif
