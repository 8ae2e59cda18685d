/* Arena: memfd-backed shared mapping with a hugepage fallback chain (see arena.h). */
#define _GNU_SOURCE
#include "arena.h"
#include "common.h"

#include <fcntl.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

const char *ems_page_kind_name(ems_page_kind_t kind)
{
    switch (kind) {
    case EMS_PAGES_HUGETLB: return "hugetlb";
    case EMS_PAGES_THP: return "thp";
    case EMS_PAGES_SMALL: return "small";
    default: return "auto";
    }
}

/* madvise(MADV_HUGEPAGE) succeeds on shmem even when the kernel will never back it with
 * huge pages, so whether THP applies is read from the shmem policy instead: "always",
 * "within_size", "advise" and "force" honour the hint, "never" and "deny" do not. */
static int shmem_thp_enabled(void)
{
    char policy[128] = {0};
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r");
    if (!f)
        return 0;
    size_t n = fread(policy, 1, sizeof policy - 1, f);
    fclose(f);
    policy[n] = '\0';
    return !(strstr(policy, "[never]") || strstr(policy, "[deny]"));
}

/* Maps `size` bytes of a fresh memfd. Pages are allocated with fallocate first, so a
 * shortage fails here with an errno instead of a SIGBUS on first touch, then prefaulted
 * with MAP_POPULATE. Returns 0 or a negative errno; on failure nothing stays open. */
static int map_memfd(ems_arena_t *arena, size_t size, unsigned flags, const char *name)
{
    int fd = memfd_create(name ? name : "ems-pool", flags | MFD_CLOEXEC);
    if (fd < 0)
        return -errno;

    int rc = 0;
    if (ftruncate(fd, (off_t)size) != 0) {
        rc = -errno;
        goto fail;
    }
    rc = fallocate(fd, 0, 0, (off_t)size);
    if (rc != 0) {
        rc = -errno;
        /* Old kernels and some file systems lack fallocate on memfd: MAP_POPULATE below
         * still prefaults, only without the early failure. */
        if (rc != -EOPNOTSUPP && rc != -ENOSYS)
            goto fail;
        rc = 0;
    }

    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        goto fail;
    }
    arena->base = base;
    arena->size = size;
    arena->fd = fd;
    arena->writable = 1;
    return 0;

fail:
    close(fd);
    return rc;
}

int ems_arena_create(ems_arena_t *arena, size_t size, ems_page_kind_t requested,
                     const char *debug_name)
{
    memset(arena, 0, sizeof *arena);
    arena->fd = -1;
    if (size == 0 || requested > EMS_PAGES_SMALL)
        return -EINVAL;
    size = (size_t)ems_round_up(size, EMS_HUGE_PAGE_BYTES);

    /* Step 1: hugetlb pages, only when the kernel has enough of them reserved. */
    int rc = -ENOMEM;
    if (requested == EMS_PAGES_AUTO || requested == EMS_PAGES_HUGETLB) {
        rc = map_memfd(arena, size, MFD_HUGETLB, debug_name);
        if (rc == 0) {
            arena->page_kind = EMS_PAGES_HUGETLB;
            return 0;
        }
        if (requested == EMS_PAGES_HUGETLB)
            return rc == -ENOSPC || rc == -EINVAL ? -ENOMEM : rc;
    }

    /* Step 2: a regular memfd, asking for transparent huge pages; 4 KiB pages otherwise. */
    if (requested == EMS_PAGES_THP && !shmem_thp_enabled())
        return -ENOMEM;
    rc = map_memfd(arena, size, 0, debug_name);
    if (rc != 0)
        return rc;
    if (requested != EMS_PAGES_SMALL && madvise(arena->base, size, MADV_HUGEPAGE) == 0 &&
        shmem_thp_enabled())
        arena->page_kind = EMS_PAGES_THP;
    else
        arena->page_kind = EMS_PAGES_SMALL;
    return 0;
}

int ems_arena_attach(ems_arena_t *arena, int fd)
{
    memset(arena, 0, sizeof *arena);
    arena->fd = -1;

    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    if (st.st_size <= 0)
        return -EINVAL;

    int own_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own_fd < 0)
        return -errno;
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, own_fd, 0);
    if (base == MAP_FAILED) {
        int rc = -errno;
        close(own_fd);
        return rc;
    }
    arena->base = base;
    arena->size = (size_t)st.st_size;
    arena->fd = own_fd;
    arena->writable = 0;
    return 0;
}

void ems_arena_close(ems_arena_t *arena)
{
    if (arena->base) {
        munmap(arena->base, arena->size);
        arena->base = NULL;
    }
    if (arena->fd >= 0) {
        close(arena->fd);
        arena->fd = -1;
    }
}
