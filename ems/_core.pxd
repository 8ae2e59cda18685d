# C declarations of the EMS core (csrc/pool.h, csrc/spill_ring.h and csrc/arena.h) for the
# Cython bindings.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "arena.h":
    ctypedef enum ems_page_kind_t:
        EMS_PAGES_AUTO
        EMS_PAGES_HUGETLB
        EMS_PAGES_THP
        EMS_PAGES_SMALL

    ctypedef struct ems_arena_t:
        int fd
        ems_page_kind_t page_kind
        size_t size

    const char *ems_page_kind_name(ems_page_kind_t kind)


cdef extern from "crc32c.h":
    uint32_t ems_crc32c(uint32_t crc, const void *data, size_t length) nogil
    uint32_t ems_crc32c_software(uint32_t crc, const void *data, size_t length) nogil
    int ems_crc32c_hardware() nogil


cdef extern from "spill_ring.h":
    enum: EMS_SPILL_RECORD_HEADER
    uint64_t ems_spill_record_bytes(uint64_t length) nogil


cdef extern from "pool.h":
    ctypedef struct ems_pool_config_t:
        uint64_t capacity
        uint64_t slab_size
        uint32_t max_blocks
        ems_page_kind_t pages
        const char *debug_name

    ctypedef struct ems_pool_t:
        ems_arena_t arena
        int owner

    ctypedef struct ems_reservation_t:
        uint32_t entry
        uint32_t gen
        uint8_t *data
        uint64_t length
        int exists

    ctypedef struct ems_class_stats_t:
        uint32_t size_class
        uint64_t slot_size, slabs, blocks, payload_bytes, wasted_bytes, evictions

    ctypedef struct ems_pool_stats_t:
        uint64_t capacity, slab_size, slabs, free_slabs, max_blocks, blocks
        uint64_t bytes_used, bytes_free, bytes_wasted, metadata_bytes
        uint64_t hits, misses, puts, put_exists, evictions, deletes, slab_moves, pool_full
        uint64_t suspended_drops
        uint32_t suspended
        uint64_t reader_hits, reader_misses, reader_retries
        uint64_t spill_captured, spill_dropped, spill_ring_bytes, spill_ring_used
        uint32_t page_kind, nclasses_used

    uint64_t ems_pool_default_slab_size(uint64_t capacity) nogil
    int ems_pool_create(ems_pool_t *pool, const ems_pool_config_t *config) nogil
    int ems_pool_attach(ems_pool_t *pool, int fd) nogil
    void ems_pool_close(ems_pool_t *pool) nogil
    void ems_pool_disown(ems_pool_t *pool) nogil
    uint64_t ems_pool_max_block(const ems_pool_t *pool) nogil
    int ems_pool_set_suspended(ems_pool_t *pool, int suspended) nogil
    int ems_pool_suspended(const ems_pool_t *pool) nogil

    int ems_pool_reserve(ems_pool_t *pool, const uint8_t *key, uint64_t length,
                         ems_reservation_t *r) nogil
    int ems_pool_commit(ems_pool_t *pool, ems_reservation_t *r) nogil
    void ems_pool_abort(ems_pool_t *pool, ems_reservation_t *r) nogil
    int ems_pool_put(ems_pool_t *pool, const uint8_t *key, const void *src,
                     uint64_t length) nogil
    int ems_pool_delete(ems_pool_t *pool, const uint8_t *key) nogil
    int64_t ems_pool_protect(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                             int protect) nogil

    int ems_pool_set_spill_ring(ems_pool_t *pool, uint64_t bytes) nogil
    uint64_t ems_pool_take_evicted(ems_pool_t *pool, uint8_t *out_keys, uint64_t *out_lengths,
                                   uint8_t *buf, uint64_t buf_len, uint64_t max_blocks) nogil
    int64_t ems_pool_mark_spilled(ems_pool_t *pool, const uint8_t *keys, uint64_t n) nogil
    uint64_t ems_pool_evict_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n) nogil

    int64_t ems_pool_length(ems_pool_t *pool, const uint8_t *key) nogil
    int64_t ems_pool_get(ems_pool_t *pool, const uint8_t *key, void *dst, uint64_t dst_len,
                         uint64_t *actual) nogil
    int ems_pool_exists(ems_pool_t *pool, const uint8_t *key) nogil
    uint64_t ems_pool_match_prefix(ems_pool_t *pool, const uint8_t *keys, uint64_t n) nogil

    uint64_t ems_pool_put_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                               const void *const *srcs, const uint64_t *lengths,
                               int64_t *results) nogil
    uint64_t ems_pool_get_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                               void *const *dsts, uint64_t *lengths, int64_t *results) nogil
    uint64_t ems_pool_exists_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                                  uint8_t *out) nogil

    uint64_t ems_pool_keys(ems_pool_t *pool, uint64_t *cursor, uint8_t *out, uint64_t max) nogil

    int ems_pool_stats(ems_pool_t *pool, ems_pool_stats_t *stats, ems_class_stats_t *classes,
                       uint32_t max_classes) nogil
