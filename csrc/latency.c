/* Fixed-bucket latency histograms (see latency.h). */
#define _GNU_SOURCE
#include "latency.h"

#include <time.h>

/* 1-2.5-5 steps per decade: fine enough to tell a memcpy-sized request (tens of
 * microseconds) from one that waited on a disk or a slow peer (milliseconds and more).
 * The last bound is the daemon's default I/O timeout (30 s). */
const uint64_t ems_latency_bounds_ns[EMS_LATENCY_BOUNDS] = {
    10000ull,      25000ull,      50000ull,      100000ull,      250000ull,
    500000ull,     1000000ull,    2500000ull,    5000000ull,     10000000ull,
    25000000ull,   50000000ull,   100000000ull,  250000000ull,   500000000ull,
    1000000000ull, 2500000000ull, 5000000000ull, 10000000000ull, 30000000000ull,
};

uint64_t ems_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void ems_latency_observe(ems_latency_t *histogram, uint64_t ns)
{
    /* A linear scan: most requests end in the first few buckets. */
    unsigned bucket = 0;
    while (bucket < EMS_LATENCY_BOUNDS && ns > ems_latency_bounds_ns[bucket])
        bucket++;
    atomic_fetch_add_explicit(&histogram->counts[bucket], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&histogram->sum_ns, ns, memory_order_relaxed);
}

void ems_latency_read(const ems_latency_t *histogram, ems_latency_snapshot_t *out)
{
    for (unsigned i = 0; i <= EMS_LATENCY_BOUNDS; i++)
        out->counts[i] = atomic_load_explicit(&histogram->counts[i], memory_order_relaxed);
    out->sum_ns = atomic_load_explicit(&histogram->sum_ns, memory_order_relaxed);
}
