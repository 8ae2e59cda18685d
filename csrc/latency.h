/* Latency histogram with fixed buckets, for request durations on the data path.
 *
 * Any thread records into a histogram without a lock: each observation is two relaxed
 * atomic adds (its bucket and the sum). A reader sees every counter whole, but not one
 * consistent snapshot across counters: an observation in flight may be in its bucket and
 * not yet in the sum. The buckets are not cumulative here; Prometheus exposition sums them.
 * The bounds are the same for every histogram and never change, so scrapes of different
 * nodes and builds can be added together. */
#ifndef EMS_LATENCY_H
#define EMS_LATENCY_H

#include <stdatomic.h>
#include <stdint.h>

/* Finite upper bounds, from 10 us to 30 s. One more bucket counts what lies above. */
#define EMS_LATENCY_BOUNDS 20

typedef struct ems_latency {
    /* counts[i] counts durations in (bound[i-1], bound[i]], and counts[EMS_LATENCY_BOUNDS]
     * those above the largest bound. */
    _Atomic uint64_t counts[EMS_LATENCY_BOUNDS + 1];
    _Atomic uint64_t sum_ns;
} ems_latency_t;

typedef struct ems_latency_snapshot {
    uint64_t counts[EMS_LATENCY_BOUNDS + 1];
    uint64_t sum_ns;
} ems_latency_snapshot_t;

/* Upper bounds of the buckets in nanoseconds, ascending. */
extern const uint64_t ems_latency_bounds_ns[EMS_LATENCY_BOUNDS];

/* Returns CLOCK_MONOTONIC in nanoseconds. */
uint64_t ems_now_ns(void);

/* Counts one duration of `ns` nanoseconds. Thread-safe and lock-free. */
void ems_latency_observe(ems_latency_t *histogram, uint64_t ns);

/* Copies the counters with relaxed loads (the file comment describes what a reader may see). */
void ems_latency_read(const ems_latency_t *histogram, ems_latency_snapshot_t *out);

#endif
