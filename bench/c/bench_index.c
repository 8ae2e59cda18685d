/* Benchmarks of the EMS index and pool read path in C, so that no Python binding cost is
 * counted. Each mode prints one JSON object on stdout; bench/test_index.py and
 * bench/test_concurrency.py build this file, run it and record the JSON.
 *
 * Usage: bench_index MODE [--name value ...]
 *   lookup  Fills a pool with --blocks blocks of --block-size bytes, then times
 *           ems_index_lookup, ems_pool_exists and ems_pool_exists_many (256 keys per
 *           call) over the present keys in random order, in --passes passes of at least
 *           --min-lookups lookups (whole rounds over the keys). Also times random 64-byte line reads
 *           over a buffer as large as the index and entry table, the memory limit of a
 *           lookup that misses the caches.
 *   batch   Times ems_pool_exists_many, ems_pool_get_many and ems_pool_put_many at
 *           --batch keys per call on a pool of --stored blocks of --block-size bytes.
 *           This is the C cost per key, to which the Python batch calls add theirs.
 *   mixed   Fills --blocks blocks, then runs --readers reader threads calling --op
 *           (exists: ems_pool_exists, index: ems_index_lookup, get: ems_pool_get,
 *           cached: exists_cached_geometry below) on random present keys for
 *           --phase-ms milliseconds.
 *           Phases alternate between the writer thread idle and the writer putting new
 *           keys and deleting old ones (a window of --window keys) without pause.
 *
 * Times are CLOCK_MONOTONIC wall time. Reader CPU time is CLOCK_THREAD_CPUTIME_ID, which
 * separates a reader that was descheduled (more threads than cores) from a reader slowed
 * by the writer.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "pool.h"

/* ---- helpers ---------------------------------------------------------------------- */

static void die(const char *call, int rc)
{
    fprintf(stderr, "bench_index: %s failed: %s\n", call, strerror(rc < 0 ? -rc : rc));
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Writes the 32-byte key number `i` of key family `family`; distinct (family, i) pairs
 * give distinct keys with overwhelming probability. */
static void make_key(uint8_t key[EMS_KEY_BYTES], uint64_t family, uint64_t i)
{
    uint64_t state = family * 0x100000000ULL + i;
    for (int w = 0; w < 4; w++) {
        uint64_t v = splitmix64(&state);
        memcpy(key + 8 * w, &v, 8);
    }
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        die("malloc", ENOMEM);
    return p;
}

/* Fisher-Yates shuffle of n records of `size` bytes. */
static void shuffle(uint8_t *records, uint64_t n, size_t size, uint64_t seed)
{
    uint8_t tmp[64];
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = splitmix64(&seed) % i;
        memcpy(tmp, records + (i - 1) * size, size);
        memcpy(records + (i - 1) * size, records + j * size, size);
        memcpy(records + j * size, tmp, size);
    }
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int n)
{
    qsort(values, (size_t)n, sizeof *values, compare_double);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

static void print_array(const char *name, const double *values, int n)
{
    printf("\"%s\": [", name);
    for (int i = 0; i < n; i++)
        printf("%s%.6g", i ? ", " : "", values[i]);
    printf("]");
}

/* ---- options ---------------------------------------------------------------------- */

typedef struct options {
    const char *mode;
    uint64_t blocks, block_size, stored, batch, rounds, window, min_lookups;
    int passes, readers, phase_ms, phases;
    const char *op;
} options_t;

static void parse_options(int argc, char **argv, options_t *o)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_index lookup|batch|mixed [--name value ...]\n");
        exit(2);
    }
    o->mode = argv[1];
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *name = argv[i], *value = argv[i + 1];
        uint64_t v = strtoull(value, NULL, 10);
        if (strcmp(name, "--blocks") == 0) o->blocks = v;
        else if (strcmp(name, "--block-size") == 0) o->block_size = v;
        else if (strcmp(name, "--stored") == 0) o->stored = v;
        else if (strcmp(name, "--batch") == 0) o->batch = v;
        else if (strcmp(name, "--rounds") == 0) o->rounds = v;
        else if (strcmp(name, "--window") == 0) o->window = v;
        else if (strcmp(name, "--min-lookups") == 0) o->min_lookups = v;
        else if (strcmp(name, "--passes") == 0) o->passes = (int)v;
        else if (strcmp(name, "--readers") == 0) o->readers = (int)v;
        else if (strcmp(name, "--phase-ms") == 0) o->phase_ms = (int)v;
        else if (strcmp(name, "--phases") == 0) o->phases = (int)v;
        else if (strcmp(name, "--op") == 0) o->op = value;
        else {
            fprintf(stderr, "bench_index: unknown option %s\n", name);
            exit(2);
        }
    }
}

/* ---- pool setup ------------------------------------------------------------------- */

/* Creates an auto-paged pool with 1 MiB slabs and room for `nblocks` blocks of
 * `block_size` bytes, so that neither the data region nor the entry table evicts while
 * it is filled with exactly that many. */
static void pool_for_blocks(ems_pool_t *pool, uint64_t nblocks, uint64_t block_size)
{
    const uint64_t slab = 1u << 20;
    uint64_t slot = ems_slab_class_size(ems_slab_class_of(block_size));
    uint64_t per_slab = slab / slot;
    ems_pool_config_t config = {
        .capacity = (nblocks + per_slab - 1) / per_slab * slab,
        .slab_size = slab,
        .max_blocks = (uint32_t)nblocks,
        .pages = EMS_PAGES_AUTO,
        .debug_name = "ems-bench",
    };
    int rc = ems_pool_create(pool, &config);
    if (rc != 0)
        die("ems_pool_create", rc);
}

/* Puts keys 0..n-1 of `family`, then returns how many are present afterwards in
 * *present and their keys, in random order, in *probe (n * 32 bytes, caller frees).
 * A key can be absent when both of its index buckets filled up and the pool evicted to
 * make room, which is why the probe set is taken from what is present. */
static uint64_t fill_pool(ems_pool_t *pool, uint64_t family, uint64_t n, uint64_t block_size,
                          uint8_t **probe, double *fill_s)
{
    uint8_t *payload = xmalloc(block_size);
    memset(payload, 0x5a, block_size);
    uint8_t key[EMS_KEY_BYTES];

    double t0 = now_s();
    for (uint64_t i = 0; i < n; i++) {
        make_key(key, family, i);
        int rc = ems_pool_put(pool, key, payload, block_size);
        if (rc < 0)
            die("ems_pool_put during fill", rc);
    }
    *fill_s = now_s() - t0;
    free(payload);

    uint8_t *keys = xmalloc(n * EMS_KEY_BYTES);
    uint64_t present = 0;
    for (uint64_t i = 0; i < n; i++) {
        make_key(key, family, i);
        if (ems_pool_exists(pool, key))
            memcpy(keys + present++ * EMS_KEY_BYTES, key, EMS_KEY_BYTES);
    }
    shuffle(keys, present, EMS_KEY_BYTES, 12345);
    *probe = keys;
    return present;
}

static void print_pool_facts(ems_pool_t *pool)
{
    ems_pool_stats_t s;
    ems_pool_stats(pool, &s, NULL, 0);
    printf("\"page_kind\": \"%s\", \"capacity\": %llu, \"slab_size\": %llu, "
           "\"max_blocks\": %llu, \"blocks\": %llu, \"evictions\": %llu, "
           "\"index_bytes\": %llu, \"entry_table_bytes\": %llu",
           ems_page_kind_name(pool->arena.page_kind), (unsigned long long)s.capacity,
           (unsigned long long)s.slab_size, (unsigned long long)s.max_blocks,
           (unsigned long long)s.blocks, (unsigned long long)s.evictions,
           (unsigned long long)pool->layout->nbuckets * sizeof(ems_bucket_t),
           (unsigned long long)pool->layout->nentries * sizeof(ems_entry_t));
}

/* ---- lookup mode ------------------------------------------------------------------ */

/* A buffer of `bytes` bytes with the page size of the pool: huge pages are requested only
 * when the pool got them, so TLB reach matches the pool's. */
static uint8_t *line_buffer(uint64_t bytes, int huge, size_t *size)
{
    *size = (size_t)(bytes / 64 * 64);
    uint8_t *buf = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    if (buf == MAP_FAILED)
        die("mmap", errno);
    if (huge)
        madvise(buf, *size, MADV_HUGEPAGE);
    memset(buf, 1, *size);
    return buf;
}

/* Reads one random 64-byte line per step from a buffer of `bytes` bytes, `n` steps with
 * precomputed independent indices. This is the access pattern of lookups of independent
 * keys, so the CPU may overlap the misses. Fills rates[0..passes) with lines/s. */
static void random_line_rates(uint64_t bytes, uint64_t n, int passes, int huge, double *rates)
{
    size_t size;
    uint8_t *buf = line_buffer(bytes, huge, &size);
    uint64_t lines = size / 64;
    uint32_t *idx = xmalloc(n * sizeof *idx);
    uint64_t seed = 777;
    for (uint64_t i = 0; i < n; i++)
        idx[i] = (uint32_t)(splitmix64(&seed) % lines);

    volatile uint64_t sink = 0;
    for (int p = 0; p < passes; p++) {
        uint64_t sum = 0;
        double t0 = now_s();
        for (uint64_t i = 0; i < n; i++)
            sum += *(const volatile uint64_t *)(buf + (uint64_t)idx[i] * 64);
        rates[p] = (double)n / (now_s() - t0);
        sink += sum;
    }
    (void)sink;
    free(idx);
    munmap(buf, size);
}

/* Nanoseconds per load of a chain of dependent random line reads over `bytes` bytes: the
 * latency of one cache miss, which bounds a lookup whose loads depend on each other. */
static double dependent_line_ns(uint64_t bytes, uint64_t steps, int huge)
{
    size_t size;
    uint8_t *buf = line_buffer(bytes, huge, &size);
    uint64_t lines = size / 64;
    uint32_t *order = xmalloc(lines * sizeof *order);
    for (uint64_t i = 0; i < lines; i++)
        order[i] = (uint32_t)i;
    uint64_t seed = 99;
    for (uint64_t i = lines; i > 1; i--) {
        uint64_t j = splitmix64(&seed) % i;
        uint32_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    /* One cycle through every line in shuffled order. */
    for (uint64_t i = 0; i < lines; i++)
        *(uint64_t *)(buf + (uint64_t)order[i] * 64) = (uint64_t)order[(i + 1) % lines] * 64;
    free(order);

    uint64_t at = 0;
    double t0 = now_s();
    for (uint64_t i = 0; i < steps; i++)
        at = *(const volatile uint64_t *)(buf + at);
    double ns = (now_s() - t0) * 1e9 / (double)steps;
    munmap(buf, size);
    return at == UINT64_MAX ? 0 : ns;
}

static int run_lookup(const options_t *o)
{
    if (o->passes < 1 || o->passes > 64 || o->blocks == 0 || o->block_size == 0) {
        fprintf(stderr, "bench_index lookup: need --blocks, --block-size, --passes 1..64\n");
        return 2;
    }
    ems_pool_t pool;
    pool_for_blocks(&pool, o->blocks, o->block_size);
    uint8_t *probe;
    double fill_s;
    uint64_t n = fill_pool(&pool, 1, o->blocks, o->block_size, &probe, &fill_s);

    double index_rates[64], exists_rates[64], many_rates[64], line_rates[64];
    uint64_t index_hits = 0, exists_hits = 0, many_hits = 0;
    uint8_t out[256];
    /* Rounds over all present keys per pass, so a small pool still gives passes long
     * enough to time. */
    uint64_t rounds = o->min_lookups > n ? (o->min_lookups + n - 1) / n : 1;
    double per_pass = (double)(rounds * n);

    /* Interleaved passes, so drift on a shared machine hits all three calls alike. */
    for (int p = 0; p < o->passes; p++) {
        uint64_t hits = 0, word;
        double t0 = now_s();
        for (uint64_t r = 0; r < rounds; r++)
            for (uint64_t i = 0; i < n; i++)
                hits += ems_index_lookup(&pool.index, probe + i * EMS_KEY_BYTES, &word) == 1;
        index_rates[p] = per_pass / (now_s() - t0);
        index_hits += hits;

        hits = 0;
        t0 = now_s();
        for (uint64_t r = 0; r < rounds; r++)
            for (uint64_t i = 0; i < n; i++)
                hits += (uint64_t)ems_pool_exists(&pool, probe + i * EMS_KEY_BYTES);
        exists_rates[p] = per_pass / (now_s() - t0);
        exists_hits += hits;

        hits = 0;
        t0 = now_s();
        for (uint64_t r = 0; r < rounds; r++) {
            for (uint64_t i = 0; i < n; i += 256) {
                uint64_t count = n - i < 256 ? n - i : 256;
                hits += ems_pool_exists_many(&pool, probe + i * EMS_KEY_BYTES, count, out);
            }
        }
        many_rates[p] = per_pass / (now_s() - t0);
        many_hits += hits;
    }

    uint64_t footprint = (uint64_t)pool.layout->nbuckets * sizeof(ems_bucket_t) +
                         (uint64_t)pool.layout->nentries * sizeof(ems_entry_t);
    int huge = pool.arena.page_kind != EMS_PAGES_SMALL;
    random_line_rates(footprint, rounds * n, o->passes, huge, line_rates);
    double latency_ns = dependent_line_ns(footprint, 1000000, huge);

    printf("{\"mode\": \"lookup\", \"requested_blocks\": %llu, \"present_keys\": %llu, "
           "\"block_size\": %llu, \"passes\": %d, \"fill_s\": %.4f, ",
           (unsigned long long)o->blocks, (unsigned long long)n,
           (unsigned long long)o->block_size, o->passes, fill_s);
    print_pool_facts(&pool);
    printf(", \"index_lookup_hits\": %llu, \"exists_hits\": %llu, \"exists_many_hits\": %llu, "
           "\"lookups_per_pass\": %llu, \"dependent_line_latency_ns\": %.1f, ",
           (unsigned long long)index_hits, (unsigned long long)exists_hits,
           (unsigned long long)many_hits, (unsigned long long)(rounds * n), latency_ns);
    printf("\"footprint_bytes\": %llu, \"line_buffer_huge_pages_requested\": %s, ",
           (unsigned long long)footprint, huge ? "true" : "false");
    print_array("index_lookup_per_s", index_rates, o->passes);
    printf(", ");
    print_array("exists_per_s", exists_rates, o->passes);
    printf(", ");
    print_array("exists_many_256_per_s", many_rates, o->passes);
    printf(", ");
    print_array("random_lines_per_s", line_rates, o->passes);
    printf(", \"index_lookup_per_s_median\": %.6g, \"exists_per_s_median\": %.6g, "
           "\"exists_many_256_per_s_median\": %.6g, \"random_lines_per_s_median\": %.6g}\n",
           median(index_rates, o->passes), median(exists_rates, o->passes),
           median(many_rates, o->passes), median(line_rates, o->passes));
    free(probe);
    ems_pool_close(&pool);
    return 0;
}

/* ---- batch mode ------------------------------------------------------------------- */

/* Repeats of each timed loop of `rounds` batch calls; the JSON gives all and the median. */
#define REPEATS 5

static int run_batch(const options_t *o)
{
    uint64_t b = o->batch, stored = o->stored, rounds = o->rounds;
    if (b == 0 || stored < b || rounds == 0 || o->block_size == 0) {
        fprintf(stderr, "bench_index batch: need --batch B, --stored >= B, --rounds, "
                        "--block-size\n");
        return 2;
    }
    ems_pool_t pool;
    pool_for_blocks(&pool, stored, o->block_size);
    uint8_t *probe;
    double fill_s;
    uint64_t n = fill_pool(&pool, 2, stored, o->block_size, &probe, &fill_s);
    if (n < b) {
        fprintf(stderr, "bench_index batch: only %llu keys stayed present\n",
                (unsigned long long)n);
        return 1;
    }
    /* Batches of present keys; a few keys may have been evicted by bucket overflow. */
    uint64_t nbatches = n / b;

    uint8_t *out = xmalloc(b);
    uint8_t *dst = xmalloc(b * o->block_size);
    void **dsts = xmalloc(b * sizeof *dsts);
    const void **srcs = xmalloc(b * sizeof *srcs);
    uint64_t *lengths = xmalloc(b * sizeof *lengths);
    int64_t *results = xmalloc(b * sizeof *results);
    uint8_t *src = xmalloc(b * o->block_size);
    memset(src, 0x33, b * o->block_size);
    for (uint64_t i = 0; i < b; i++) {
        dsts[i] = dst + i * o->block_size;
        srcs[i] = src + i * o->block_size;
    }

    double exists_ns[REPEATS], get_ns[REPEATS], put_ns[REPEATS];
    uint64_t misses = 0;
    for (int r = 0; r < REPEATS; r++) {
        double t0 = now_s();
        for (uint64_t i = 0; i < rounds; i++) {
            const uint8_t *keys = probe + (i % nbatches) * b * EMS_KEY_BYTES;
            misses += b - ems_pool_exists_many(&pool, keys, b, out);
        }
        exists_ns[r] = (now_s() - t0) * 1e9 / (double)(rounds * b);

        t0 = now_s();
        for (uint64_t i = 0; i < rounds; i++) {
            const uint8_t *keys = probe + (i % nbatches) * b * EMS_KEY_BYTES;
            for (uint64_t k = 0; k < b; k++)
                lengths[k] = o->block_size;
            misses += b - ems_pool_get_many(&pool, keys, b, dsts, lengths, results);
        }
        get_ns[r] = (now_s() - t0) * 1e9 / (double)(rounds * b);
    }

    /* Puts of new keys into the full pool: every put evicts one block. Keys are made
     * before the timed loop, and each repeat uses keys never stored before. */
    uint8_t *fresh = xmalloc(rounds * b * EMS_KEY_BYTES);
    uint64_t failed = 0, put_exists = 0;
    for (int r = 0; r < REPEATS; r++) {
        for (uint64_t i = 0; i < rounds * b; i++)
            make_key(fresh + i * EMS_KEY_BYTES, 100 + (uint64_t)r, i);
        for (uint64_t k = 0; k < b; k++)
            lengths[k] = o->block_size;
        double t0 = now_s();
        for (uint64_t i = 0; i < rounds; i++) {
            failed += ems_pool_put_many(&pool, fresh + i * b * EMS_KEY_BYTES, b, srcs,
                                        lengths, results);
            for (uint64_t k = 0; k < b; k++)
                put_exists += results[k] == 1;
        }
        put_ns[r] = (now_s() - t0) * 1e9 / (double)(rounds * b);
    }

    printf("{\"mode\": \"batch\", \"batch\": %llu, \"stored\": %llu, \"rounds\": %llu, "
           "\"block_size\": %llu, ",
           (unsigned long long)b, (unsigned long long)stored, (unsigned long long)rounds,
           (unsigned long long)o->block_size);
    print_pool_facts(&pool);
    printf(", \"present_keys\": %llu, \"read_misses\": %llu, \"put_failed\": %llu, \"put_exists\": %llu, ",
           (unsigned long long)n, (unsigned long long)misses, (unsigned long long)failed,
           (unsigned long long)put_exists);
    print_array("exists_many_ns_per_key", exists_ns, REPEATS);
    printf(", ");
    print_array("get_many_ns_per_key", get_ns, REPEATS);
    printf(", ");
    print_array("put_many_ns_per_key", put_ns, REPEATS);
    printf(", \"exists_many_ns_per_key_median\": %.6g, \"get_many_ns_per_key_median\": %.6g, "
           "\"put_many_ns_per_key_median\": %.6g}\n",
           median(exists_ns, REPEATS), median(get_ns, REPEATS), median(put_ns, REPEATS));

    free(fresh);
    free(out);
    free(dst);
    free(dsts);
    free(srcs);
    free(lengths);
    free(results);
    free(src);
    free(probe);
    ems_pool_close(&pool);
    return 0;
}

/* ---- mixed mode ------------------------------------------------------------------- */

enum { OP_EXISTS, OP_INDEX, OP_GET, OP_CACHED };

/* Pool geometry copied out of the shared header into reader-private memory. */
typedef struct geometry {
    ems_index_t index;
    ems_entry_t *entries;
    uint8_t *data;
    uint64_t slab_size;
    uint32_t nentries, nslabs;
} geometry_t;

/* The checks ems_pool_exists makes (pool_read.c: index lookup, entry generation and
 * state, block location, key, generation again), reading the pool geometry from `g`
 * instead of the shared header. Diagnostic only: with a busy writer, the difference to
 * ems_pool_exists is the cost of reading header lines that the writer modifies. Keep it
 * in step with view_from_word in csrc/pool_read.c. */
static int exists_cached_geometry(const geometry_t *g, const uint8_t key[EMS_KEY_BYTES])
{
    uint64_t word;
    if (ems_index_lookup(&g->index, key, &word) != 1)
        return 0;
    uint32_t id = EMS_SLOT_ENTRY(word) - 1;
    if (id >= g->nentries)
        return 0;
    ems_entry_t *e = &g->entries[id];
    uint32_t gen = atomic_load_explicit(&e->gen, memory_order_acquire);
    if ((uint16_t)gen != EMS_SLOT_GEN(word) || !(gen & 1u))
        return 0;
    uint32_t state = EMS_ENTRY_STATE(atomic_load_explicit(&e->flags, memory_order_relaxed));
    if (state != EMS_ENTRY_COMMITTED && state != EMS_ENTRY_DEAD)
        return 0;
    uint32_t length = __atomic_load_n(&e->length, __ATOMIC_RELAXED);
    uint32_t slab = __atomic_load_n(&e->slab, __ATOMIC_RELAXED);
    uint32_t slot = __atomic_load_n(&e->slot, __ATOMIC_RELAXED);
    if (slab >= g->nslabs || length == 0 || length > g->slab_size)
        return 0;
    uint64_t slot_size = ems_slab_class_size(ems_slab_class_of(length));
    if ((uint64_t)(slot + 1) * slot_size > g->slab_size)
        return 0;
    const uint8_t *data = g->data + (uint64_t)slab * g->slab_size + (uint64_t)slot * slot_size;
    (void)data; /* computed as ems_block_ptr does; exists reads no payload */
    if (memcmp(e->key, key, EMS_KEY_BYTES) != 0)
        return 0;
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&e->gen, memory_order_relaxed) == gen;
}

typedef struct shared {
    ems_pool_t *pool;
    const uint8_t *probe;
    uint64_t nprobe;
    uint64_t block_size;
    uint64_t window;
    int op;
    int readers;
    pthread_barrier_t start;
    _Atomic int stop;
    uint64_t writer_next; /* next writer key number; writer thread only */
} shared_t;

typedef struct reader_result {
    shared_t *shared;
    int id;
    uint64_t lookups, hits;
    double wall_s, cpu_s;
} reader_result_t;

typedef struct writer_result {
    shared_t *shared;
    uint64_t ops;
    double wall_s;
} writer_result_t;

static void *reader_main(void *arg)
{
    reader_result_t *r = arg;
    shared_t *sh = r->shared;
    uint64_t i = (uint64_t)r->id * (sh->nprobe / (uint64_t)sh->readers);
    uint64_t lookups = 0, hits = 0, word;
    uint8_t *dst = xmalloc(sh->block_size);
    const ems_layout_t *layout = sh->pool->layout;
    geometry_t g = {.index = sh->pool->index, .entries = sh->pool->entries,
                    .data = (uint8_t *)layout + layout->data_off,
                    .slab_size = layout->slab_size, .nentries = layout->nentries,
                    .nslabs = layout->nslabs};

    pthread_barrier_wait(&sh->start);
    double w0 = now_s(), c0 = thread_cpu_s();
    while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
        /* 256 lookups between checks of the stop flag. */
        for (int k = 0; k < 256; k++) {
            const uint8_t *key = sh->probe + i * EMS_KEY_BYTES;
            if (++i == sh->nprobe)
                i = 0;
            if (sh->op == OP_EXISTS)
                hits += (uint64_t)ems_pool_exists(sh->pool, key);
            else if (sh->op == OP_INDEX)
                hits += ems_index_lookup(&g.index, key, &word) == 1;
            else if (sh->op == OP_CACHED)
                hits += (uint64_t)exists_cached_geometry(&g, key);
            else
                hits += ems_pool_get(sh->pool, key, dst, sh->block_size, NULL) >= 0;
        }
        lookups += 256;
    }
    r->wall_s = now_s() - w0;
    r->cpu_s = thread_cpu_s() - c0;
    r->lookups = lookups;
    r->hits = hits;
    free(dst);
    return NULL;
}

/* Puts writer key `next`, and once `window` keys are stored deletes key next-window, so
 * the pool holds a constant number of blocks and every op changes the index. */
static void *writer_main(void *arg)
{
    writer_result_t *w = arg;
    shared_t *sh = w->shared;
    uint8_t key[EMS_KEY_BYTES];
    uint8_t *payload = xmalloc(sh->block_size);
    memset(payload, 0x77, sh->block_size);
    uint64_t ops = 0;

    pthread_barrier_wait(&sh->start);
    double w0 = now_s();
    while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
        uint64_t next = sh->writer_next++;
        make_key(key, 3, next);
        int rc = ems_pool_put(sh->pool, key, payload, sh->block_size);
        if (rc < 0)
            die("writer ems_pool_put", rc);
        ops++;
        if (next >= sh->window) {
            make_key(key, 3, next - sh->window);
            rc = ems_pool_delete(sh->pool, key);
            if (rc != 0 && rc != -ENOENT)
                die("writer ems_pool_delete", rc);
            ops++;
        }
    }
    w->wall_s = now_s() - w0;
    w->ops = ops;
    free(payload);
    return NULL;
}

typedef struct phase_result {
    double reader_per_s;     /* all readers' lookups / phase wall time */
    double reader_per_cpu_s; /* all readers' lookups / their summed CPU time */
    double reader_cpu_share; /* readers' CPU seconds / (readers * wall seconds) */
    double writer_ops_per_s;
    uint64_t lookups, hits;
} phase_result_t;

static void run_phase(shared_t *sh, int busy, int phase_ms, phase_result_t *out)
{
    pthread_t threads[16];
    reader_result_t readers[16];
    writer_result_t writer = {.shared = sh};
    int nthreads = sh->readers + (busy ? 1 : 0);

    atomic_store(&sh->stop, 0);
    pthread_barrier_init(&sh->start, NULL, (unsigned)nthreads + 1);
    for (int r = 0; r < sh->readers; r++) {
        readers[r] = (reader_result_t){.shared = sh, .id = r};
        if (pthread_create(&threads[r], NULL, reader_main, &readers[r]) != 0)
            die("pthread_create", errno);
    }
    if (busy && pthread_create(&threads[sh->readers], NULL, writer_main, &writer) != 0)
        die("pthread_create", errno);

    pthread_barrier_wait(&sh->start);
    struct timespec ts = {.tv_sec = phase_ms / 1000, .tv_nsec = (phase_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    atomic_store(&sh->stop, 1);
    for (int t = 0; t < nthreads; t++)
        pthread_join(threads[t], NULL);
    pthread_barrier_destroy(&sh->start);

    double lookups = 0, cpu = 0, wall = 0;
    out->hits = 0;
    for (int r = 0; r < sh->readers; r++) {
        lookups += (double)readers[r].lookups;
        cpu += readers[r].cpu_s;
        wall += readers[r].wall_s;
        out->hits += readers[r].hits;
    }
    out->lookups = (uint64_t)lookups;
    out->reader_per_s = lookups / (wall / sh->readers);
    out->reader_per_cpu_s = lookups / cpu;
    out->reader_cpu_share = cpu / wall;
    out->writer_ops_per_s = busy ? (double)writer.ops / writer.wall_s : 0.0;
}

static int run_mixed(const options_t *o)
{
    int op = o->op == NULL || strcmp(o->op, "exists") == 0 ? OP_EXISTS
             : strcmp(o->op, "index") == 0                 ? OP_INDEX
             : strcmp(o->op, "get") == 0                   ? OP_GET
             : strcmp(o->op, "cached") == 0                ? OP_CACHED
                                                           : -1;
    if (op < 0 || o->readers < 1 || o->readers > 15 || o->phases < 1 || o->phases > 32 ||
        o->phase_ms < 1 || o->blocks == 0 || o->window == 0 || o->block_size == 0) {
        fprintf(stderr, "bench_index mixed: need --blocks, --block-size, --window, "
                        "--readers 1..15, --phases 1..32, --phase-ms, "
                        "--op exists|index|get|cached\n");
        return 2;
    }
    ems_pool_t pool;
    /* Room for every reader block plus window + 1 writer blocks (the writer puts before
     * it deletes), so neither the entry table nor the data region ever evicts: the only
     * evictions left are those of index buckets that are full. */
    pool_for_blocks(&pool, o->blocks + o->window + 1, o->block_size);
    uint8_t *probe;
    double fill_s;
    uint64_t n = fill_pool(&pool, 1, o->blocks, o->block_size, &probe, &fill_s);
    ems_pool_stats_t after_fill;
    ems_pool_stats(&pool, &after_fill, NULL, 0);

    shared_t sh = {.pool = &pool, .probe = probe, .nprobe = n, .block_size = o->block_size,
                   .window = o->window, .op = op, .readers = o->readers};
    phase_result_t idle[32], busy[32];
    /* Alternating idle and busy phases, so slow drift of the machine affects both. */
    for (int p = 0; p < o->phases; p++) {
        run_phase(&sh, 0, o->phase_ms, &idle[p]);
        run_phase(&sh, 1, o->phase_ms, &busy[p]);
    }

    double v[32];
    double idle_rate, busy_rate, idle_cpu_rate, busy_cpu_rate, idle_share, busy_share,
        writer_rate;
    uint64_t busy_lookups = 0, busy_hits = 0;
#define MEDIAN_OF(arr, field, dest)            \
    do {                                       \
        for (int p = 0; p < o->phases; p++)    \
            v[p] = (arr)[p].field;             \
        dest = median(v, o->phases);           \
    } while (0)
    MEDIAN_OF(idle, reader_per_s, idle_rate);
    MEDIAN_OF(busy, reader_per_s, busy_rate);
    MEDIAN_OF(idle, reader_per_cpu_s, idle_cpu_rate);
    MEDIAN_OF(busy, reader_per_cpu_s, busy_cpu_rate);
    MEDIAN_OF(idle, reader_cpu_share, idle_share);
    MEDIAN_OF(busy, reader_cpu_share, busy_share);
    MEDIAN_OF(busy, writer_ops_per_s, writer_rate);
#undef MEDIAN_OF
    for (int p = 0; p < o->phases; p++) {
        busy_lookups += busy[p].lookups;
        busy_hits += busy[p].hits;
    }

    ems_pool_stats_t s;
    ems_pool_stats(&pool, &s, NULL, 0);
    printf("{\"mode\": \"mixed\", \"op\": \"%s\", \"readers\": %d, \"phases\": %d, "
           "\"phase_ms\": %d, \"present_keys\": %llu, \"window\": %llu, \"block_size\": %llu, "
           "\"fill_s\": %.4f, ",
           o->op ? o->op : "exists", o->readers, o->phases, o->phase_ms,
           (unsigned long long)n, (unsigned long long)o->window,
           (unsigned long long)o->block_size, fill_s);
    print_pool_facts(&pool);
    /* Every writer op is a put of a new key, followed by a delete once the window is
     * full, so the writer's puts are the pool's puts since the fill. */
    printf(", \"fill_evictions\": %llu, \"writer_puts\": %llu, \"deletes\": %llu, "
           "\"busy_lookups\": %llu, \"busy_hits\": %llu, ",
           (unsigned long long)after_fill.evictions,
           (unsigned long long)(s.puts - after_fill.puts), (unsigned long long)s.deletes,
           (unsigned long long)busy_lookups, (unsigned long long)busy_hits);
    for (int p = 0; p < o->phases; p++)
        v[p] = idle[p].reader_per_s;
    print_array("idle_reader_per_s", v, o->phases);
    printf(", ");
    for (int p = 0; p < o->phases; p++)
        v[p] = busy[p].reader_per_s;
    print_array("busy_reader_per_s", v, o->phases);
    printf(", \"idle_reader_per_s_median\": %.6g, \"busy_reader_per_s_median\": %.6g, "
           "\"idle_reader_per_cpu_s_median\": %.6g, \"busy_reader_per_cpu_s_median\": %.6g, "
           "\"idle_reader_cpu_share\": %.4f, \"busy_reader_cpu_share\": %.4f, "
           "\"writer_ops_per_s_median\": %.6g}\n",
           idle_rate, busy_rate, idle_cpu_rate, busy_cpu_rate, idle_share, busy_share,
           writer_rate);
    free(probe);
    ems_pool_close(&pool);
    return 0;
}

int main(int argc, char **argv)
{
    options_t o = {0};
    parse_options(argc, argv, &o);
    if (strcmp(o.mode, "lookup") == 0)
        return run_lookup(&o);
    if (strcmp(o.mode, "batch") == 0)
        return run_batch(&o);
    if (strcmp(o.mode, "mixed") == 0)
        return run_mixed(&o);
    fprintf(stderr, "bench_index: unknown mode %s\n", o.mode);
    return 2;
}
