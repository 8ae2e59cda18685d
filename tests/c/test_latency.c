/* Latency histogram tests (latency.c): which bucket a duration lands in, the sum, and
 * exact counts when several threads record at once (run under ThreadSanitizer too).
 *
 * Usage: test_latency [observations_per_thread] (default 200000).
 */
#define _GNU_SOURCE

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "latency.h"

#define NTHREADS 4

static uint64_t total_count(const ems_latency_snapshot_t *snap)
{
    uint64_t total = 0;
    for (unsigned i = 0; i <= EMS_LATENCY_BOUNDS; i++)
        total += snap->counts[i];
    return total;
}

static void test_bounds_ascend(void)
{
    CHECK_EQ(ems_latency_bounds_ns[0], 10000);
    CHECK_EQ(ems_latency_bounds_ns[EMS_LATENCY_BOUNDS - 1], 30000000000ull);
    for (unsigned i = 1; i < EMS_LATENCY_BOUNDS; i++)
        CHECK(ems_latency_bounds_ns[i] > ems_latency_bounds_ns[i - 1]);
}

/* A duration equal to a bound counts in that bound's bucket (Prometheus buckets are
 * "less than or equal"), one nanosecond more in the next. */
static void test_bucket_edges(void)
{
    for (unsigned i = 0; i < EMS_LATENCY_BOUNDS; i++) {
        ems_latency_t h;
        memset(&h, 0, sizeof h);
        ems_latency_observe(&h, ems_latency_bounds_ns[i]);
        ems_latency_observe(&h, ems_latency_bounds_ns[i] + 1);
        ems_latency_snapshot_t snap;
        ems_latency_read(&h, &snap);
        CHECK_EQ(snap.counts[i], 1);
        CHECK_EQ(snap.counts[i + 1], 1);
        CHECK_EQ(total_count(&snap), 2);
        CHECK_EQ(snap.sum_ns, 2 * ems_latency_bounds_ns[i] + 1);
    }
}

static void test_zero_and_overflow(void)
{
    ems_latency_t h;
    memset(&h, 0, sizeof h);
    ems_latency_observe(&h, 0);
    ems_latency_observe(&h, UINT64_MAX / 4);
    ems_latency_snapshot_t snap;
    ems_latency_read(&h, &snap);
    CHECK_EQ(snap.counts[0], 1);
    CHECK_EQ(snap.counts[EMS_LATENCY_BOUNDS], 1);
    CHECK_EQ(total_count(&snap), 2);
}

static void test_clock_moves_forward(void)
{
    uint64_t a = ems_now_ns();
    uint64_t b = ems_now_ns();
    CHECK(a > 0);
    CHECK(b >= a);
}

typedef struct recorder {
    ems_latency_t *histogram;
    long observations;
    unsigned seed;
    pthread_t thread;
} recorder_t;

/* Thread i records durations i, i + NTHREADS, ... so the expected sum has a closed form. */
static void *recorder_main(void *arg)
{
    recorder_t *r = arg;
    for (long k = 0; k < r->observations; k++)
        ems_latency_observe(r->histogram, (uint64_t)(r->seed + (unsigned long)k * NTHREADS));
    return NULL;
}

/* Concurrent relaxed adds lose nothing: once the threads are joined, the counts and the
 * sum are exact. */
static void test_concurrent_observers(long per_thread)
{
    ems_latency_t h;
    memset(&h, 0, sizeof h);
    recorder_t recorders[NTHREADS];
    for (unsigned i = 0; i < NTHREADS; i++) {
        recorders[i] = (recorder_t){.histogram = &h, .observations = per_thread, .seed = i};
        CHECK_EQ(pthread_create(&recorders[i].thread, NULL, recorder_main, &recorders[i]), 0);
    }
    for (unsigned i = 0; i < NTHREADS; i++)
        CHECK_EQ(pthread_join(recorders[i].thread, NULL), 0);

    ems_latency_snapshot_t snap;
    ems_latency_read(&h, &snap);
    uint64_t n = (uint64_t)per_thread * NTHREADS;
    CHECK_EQ(total_count(&snap), n);
    CHECK_EQ(snap.sum_ns, n * (n - 1) / 2);   /* every value 0 .. n-1 exactly once */
    uint64_t within_first = ems_latency_bounds_ns[0] + 1 < n ? ems_latency_bounds_ns[0] + 1 : n;
    CHECK_EQ(snap.counts[0], within_first);
}

int main(int argc, char **argv)
{
    long per_thread = argc > 1 ? atol(argv[1]) : 200000;
    RUN_TEST(test_bounds_ascend);
    RUN_TEST(test_bucket_edges);
    RUN_TEST(test_zero_and_overflow);
    RUN_TEST(test_clock_moves_forward);
    fprintf(stderr, "[ RUN  ] test_concurrent_observers\n");
    test_concurrent_observers(per_thread);
    fprintf(stderr, "[  OK  ] test_concurrent_observers\n");
    printf("test_latency: ok\n");
    return 0;
}
