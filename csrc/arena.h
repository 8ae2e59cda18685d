/* Arena: the one memory mapping that holds a whole pool (header, index, entry table,
 * slab metadata and block data), backed by a memfd so other processes on the host can
 * map the same pages.
 *
 * Page kinds are tried in order: hugetlb (MFD_HUGETLB, 2 MiB pages), then a regular memfd
 * with madvise(MADV_HUGEPAGE), then plain 4 KiB pages. The owner maps read-write and
 * prefaults every page, so a missing page never surfaces later as SIGBUS in a copy.
 * Attached processes map read-only: they cannot corrupt the pool. The arena does not
 * know what is stored in it.
 */
#ifndef EMS_ARENA_H
#define EMS_ARENA_H

#include <stddef.h>
#include <stdint.h>

typedef enum ems_page_kind {
    EMS_PAGES_AUTO = 0,    /* request only: try hugetlb, then THP, then 4 KiB */
    EMS_PAGES_HUGETLB = 1, /* MFD_HUGETLB memfd, 2 MiB pages reserved by the kernel */
    EMS_PAGES_THP = 2,     /* regular memfd, MADV_HUGEPAGE accepted and shmem THP enabled */
    EMS_PAGES_SMALL = 3,   /* regular memfd on 4 KiB pages */
} ems_page_kind_t;

#define EMS_HUGE_PAGE_BYTES (2u << 20)

typedef struct ems_arena {
    uint8_t *base;             /* start of the mapping */
    size_t size;               /* mapped bytes, a multiple of EMS_HUGE_PAGE_BYTES */
    int fd;                    /* memfd (owner) or the fd it was attached through */
    int writable;              /* 1 for the owner, 0 for an attached reader */
    ems_page_kind_t page_kind; /* what the mapping got */
} ems_arena_t;

/* Creates and prefaults a shared arena of at least `size` bytes with the requested page
 * kind; EMS_PAGES_AUTO walks the fallback chain. Returns 0, -EINVAL for a zero size or an
 * unknown kind, -ENOMEM when no kind could be mapped (or the one requested could not), or
 * another negative errno from memfd_create/ftruncate/fallocate. */
int ems_arena_create(ems_arena_t *arena, size_t size, ems_page_kind_t requested,
                     const char *debug_name);

/* Maps an existing arena read-only through `fd` (the fd is duplicated, the caller keeps
 * its own). Returns 0 or a negative errno (-EBADF, -EINVAL for an empty file). */
int ems_arena_attach(ems_arena_t *arena, int fd);

/* Unmaps and closes. Safe to call twice. */
void ems_arena_close(ems_arena_t *arena);

const char *ems_page_kind_name(ems_page_kind_t kind);

#endif
