/* Unit tests for csrc/arena.c: sizing, page kinds, zero fill, prefaulting, read-only
 * attach (in-process and from a forked child), close and argument errors.
 *
 * EMS_TEST_EXPECT_PAGES selects the hugetlb checks, because they depend on the host:
 *   "hugetlb"     2 MiB pages are reserved: AUTO and an explicit HUGETLB request must get them.
 *   "no-hugetlb"  no 2 MiB page is free: AUTO must fall back and HUGETLB must fail -ENOMEM.
 *   unset         hugetlb results are not checked.
 * tests/test_c_core.py sets it after reading (and, as root, changing) vm.nr_hugepages.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "arena.h"
#include "check.h"

#define MIB ((size_t)1 << 20)

static void check_all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, sizeof v);
        if (v != 0) {
            fprintf(stderr, "non-zero byte in a new arena near offset %zu\n", i);
        }
        CHECK(v == 0);
    }
}

/* Every page of the mapping must be resident right after creation, because the owner
 * prefaults so that a missing page never shows up later as SIGBUS during a copy. */
static void check_resident(const ems_arena_t *arena)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t npages = (arena->size + (size_t)page - 1) / (size_t)page;
    unsigned char *vec = malloc(npages);
    CHECK(vec != NULL);
    CHECK_EQ(mincore(arena->base, arena->size, vec), 0);
    for (size_t i = 0; i < npages; i++) {
        if (!(vec[i] & 1)) {
            fprintf(stderr, "page %zu of %zu is not resident after create\n", i, npages);
        }
        CHECK(vec[i] & 1);
    }
    free(vec);
}

static int fd_is_open(int fd)
{
    return fcntl(fd, F_GETFD) != -1;
}

/* Returns the bracketed choice of /sys/kernel/mm/transparent_hugepage/shmem_enabled,
 * or "" when the file is missing (kernel without THP). */
static const char *shmem_thp_mode(char *buf, size_t len)
{
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r");
    buf[0] = '\0';
    if (f == NULL) {
        return buf;
    }
    char line[256];
    if (fgets(line, sizeof line, f) != NULL) {
        char *open = strchr(line, '[');
        char *close = open ? strchr(open, ']') : NULL;
        if (open && close && (size_t)(close - open - 1) < len) {
            memcpy(buf, open + 1, (size_t)(close - open - 1));
            buf[close - open - 1] = '\0';
        }
    }
    fclose(f);
    return buf;
}

static void test_small_pages_round_to_2mib(void)
{
    static const struct {
        size_t request;
        size_t expected;
    } cases[] = {
        {1, 2 * MIB},
        {2 * MIB - 1, 2 * MIB},
        {2 * MIB, 2 * MIB},
        {2 * MIB + 1, 4 * MIB},
        {5 * MIB + 3, 6 * MIB},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ems_arena_t arena;
        memset(&arena, 0, sizeof arena);
        CHECK_EQ(ems_arena_create(&arena, cases[i].request, EMS_PAGES_SMALL, "ems-test-arena"),
                 0);
        CHECK_EQ(arena.size, cases[i].expected);
        CHECK_EQ(arena.size % EMS_HUGE_PAGE_BYTES, 0);
        CHECK(arena.base != NULL);
        CHECK(arena.fd >= 0);
        CHECK_EQ(arena.writable, 1);
        CHECK_EQ(arena.page_kind, EMS_PAGES_SMALL);

        /* Attached processes map the file size, so the memfd must be exactly as large. */
        struct stat st;
        CHECK_EQ(fstat(arena.fd, &st), 0);
        CHECK_EQ(st.st_size, arena.size);

        check_all_zero(arena.base, arena.size);
        check_resident(&arena);

        arena.base[0] = 0x11;
        arena.base[arena.size - 1] = 0x22;
        CHECK_EQ(arena.base[0], 0x11);
        CHECK_EQ(arena.base[arena.size - 1], 0x22);
        ems_arena_close(&arena);
    }
}

static void test_page_kind_names(void)
{
    CHECK(strcmp(ems_page_kind_name(EMS_PAGES_HUGETLB), "hugetlb") == 0);
    CHECK(strcmp(ems_page_kind_name(EMS_PAGES_THP), "thp") == 0);
    CHECK(strcmp(ems_page_kind_name(EMS_PAGES_SMALL), "small") == 0);
    CHECK(ems_page_kind_name(EMS_PAGES_AUTO) != NULL);
}

static void check_usable_arena(ems_arena_t *arena, size_t expected_size)
{
    CHECK(arena->base != NULL);
    CHECK_EQ(arena->size, expected_size);
    CHECK_EQ(arena->writable, 1);
    check_all_zero(arena->base, arena->size);
    check_resident(arena);
    memset(arena->base, 0x5a, arena->size);
    CHECK_EQ(arena->base[arena->size / 2], 0x5a);
}

static void test_auto_pages(void)
{
    const char *expect = getenv("EMS_TEST_EXPECT_PAGES");
    char thp_buf[32];
    const char *thp = shmem_thp_mode(thp_buf, sizeof thp_buf);
    int thp_enabled = strcmp(thp, "always") == 0 || strcmp(thp, "within_size") == 0 ||
                      strcmp(thp, "advise") == 0 || strcmp(thp, "force") == 0;

    ems_arena_t arena;
    memset(&arena, 0, sizeof arena);
    CHECK_EQ(ems_arena_create(&arena, 4 * MIB, EMS_PAGES_AUTO, "ems-test-auto"), 0);
    fprintf(stderr, "AUTO got page kind %s (shmem THP mode '%s', expectation %s)\n",
            ems_page_kind_name(arena.page_kind), thp, expect ? expect : "unset");
    CHECK(arena.page_kind == EMS_PAGES_HUGETLB || arena.page_kind == EMS_PAGES_THP ||
          arena.page_kind == EMS_PAGES_SMALL);
    check_usable_arena(&arena, 4 * MIB);
    if (arena.page_kind != EMS_PAGES_HUGETLB) {
        /* THP is reported only when the kernel would actually back shmem with huge pages. */
        CHECK_EQ(arena.page_kind, thp_enabled ? EMS_PAGES_THP : EMS_PAGES_SMALL);
    }

    if (expect != NULL && strcmp(expect, "hugetlb") == 0) {
        CHECK_EQ(arena.page_kind, EMS_PAGES_HUGETLB);
    } else if (expect != NULL && strcmp(expect, "no-hugetlb") == 0) {
        CHECK(arena.page_kind != EMS_PAGES_HUGETLB);
    }
    ems_arena_close(&arena);
}

static void test_explicit_thp(void)
{
    char thp_buf[32];
    const char *thp = shmem_thp_mode(thp_buf, sizeof thp_buf);
    int thp_enabled = strcmp(thp, "always") == 0 || strcmp(thp, "within_size") == 0 ||
                      strcmp(thp, "advise") == 0 || strcmp(thp, "force") == 0;

    ems_arena_t arena;
    memset(&arena, 0, sizeof arena);
    int rc = ems_arena_create(&arena, 4 * MIB, EMS_PAGES_THP, "ems-test-thp");
    if (thp_enabled) {
        CHECK_EQ(rc, 0);
        CHECK_EQ(arena.page_kind, EMS_PAGES_THP);
        check_usable_arena(&arena, 4 * MIB);
        ems_arena_close(&arena);
    } else {
        /* An explicit kind that cannot be mapped fails instead of falling back. */
        CHECK_EQ(rc, -ENOMEM);
    }
}

static void test_explicit_hugetlb(void)
{
    const char *expect = getenv("EMS_TEST_EXPECT_PAGES");
    if (expect == NULL) {
        fprintf(stderr, "EMS_TEST_EXPECT_PAGES unset: explicit hugetlb not checked\n");
        return;
    }
    ems_arena_t arena;
    memset(&arena, 0, sizeof arena);
    int rc = ems_arena_create(&arena, 3 * MIB, EMS_PAGES_HUGETLB, "ems-test-hugetlb");
    if (strcmp(expect, "hugetlb") == 0) {
        CHECK_EQ(rc, 0);
        CHECK_EQ(arena.page_kind, EMS_PAGES_HUGETLB);
        check_usable_arena(&arena, 4 * MIB);

        ems_arena_t reader;
        memset(&reader, 0, sizeof reader);
        CHECK_EQ(ems_arena_attach(&reader, arena.fd), 0);
        CHECK_EQ(reader.size, arena.size);
        CHECK_EQ(reader.base[arena.size - 1], 0x5a);
        ems_arena_close(&reader);
        ems_arena_close(&arena);
    } else {
        CHECK(strcmp(expect, "no-hugetlb") == 0);
        CHECK_EQ(rc, -ENOMEM);
    }
}

static void test_attach_in_process(void)
{
    ems_arena_t owner, reader;
    memset(&owner, 0, sizeof owner);
    memset(&reader, 0, sizeof reader);
    CHECK_EQ(ems_arena_create(&owner, 4 * MIB, EMS_PAGES_SMALL, "ems-test-attach"), 0);
    for (size_t i = 0; i < owner.size; i += 4096) {
        owner.base[i] = (uint8_t)(i >> 12);
    }

    CHECK_EQ(ems_arena_attach(&reader, owner.fd), 0);
    CHECK_EQ(reader.writable, 0);
    CHECK_EQ(reader.size, owner.size);
    CHECK(reader.base != NULL);
    CHECK(reader.base != owner.base);
    /* The fd is duplicated: the reader owns its own descriptor. */
    CHECK(reader.fd >= 0);
    CHECK(reader.fd != owner.fd);

    CHECK(memcmp(reader.base, owner.base, owner.size) == 0);

    /* Writes after the attach are visible through the reader mapping (same pages). */
    owner.base[12345] = 0xab;
    owner.base[owner.size - 7] = 0xcd;
    CHECK_EQ(reader.base[12345], 0xab);
    CHECK_EQ(reader.base[owner.size - 7], 0xcd);

    /* The reader mapping is read-only. A kernel write into it through read(2) fails with
     * EFAULT instead of raising a signal, which keeps this check sanitizer-friendly. */
    int pipefd[2];
    CHECK_EQ(pipe(pipefd), 0);
    CHECK_EQ(write(pipefd[1], "x", 1), 1);
    errno = 0;
    CHECK_EQ(read(pipefd[0], reader.base + 100, 1), -1);
    CHECK_EQ(errno, EFAULT);
    close(pipefd[0]);
    close(pipefd[1]);
    CHECK_EQ(owner.base[100], 0);

    int reader_fd = reader.fd;
    ems_arena_close(&reader);
    CHECK(!fd_is_open(reader_fd));
    /* Closing the reader leaves the owner's descriptor and data alone. */
    CHECK(fd_is_open(owner.fd));
    CHECK_EQ(owner.base[12345], 0xab);
    ems_arena_close(&reader);
    ems_arena_close(&owner);
}

/* A forked child attaches through the inherited fd and must see both the bytes written
 * before the fork and a byte the parent writes after the child has mapped the arena. */
static void test_attach_from_child_process(void)
{
    ems_arena_t owner;
    memset(&owner, 0, sizeof owner);
    CHECK_EQ(ems_arena_create(&owner, 2 * MIB, EMS_PAGES_SMALL, "ems-test-fork"), 0);
    memset(owner.base, 0x77, owner.size);

    int to_child[2], to_parent[2];
    CHECK_EQ(pipe(to_child), 0);
    CHECK_EQ(pipe(to_parent), 0);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        ems_arena_t reader;
        memset(&reader, 0, sizeof reader);
        CHECK_EQ(ems_arena_attach(&reader, owner.fd), 0);
        CHECK_EQ(reader.writable, 0);
        CHECK_EQ(reader.size, 2 * MIB);
        for (size_t i = 0; i < reader.size; i += 4096) {
            CHECK_EQ(reader.base[i], 0x77);
        }
        char c = 'a';
        CHECK_EQ(write(to_parent[1], &c, 1), 1);
        CHECK_EQ(read(to_child[0], &c, 1), 1);
        CHECK_EQ(reader.base[4096 * 3 + 5], 0x99);
        ems_arena_close(&reader);
        _Exit(0);
    }
    char c;
    CHECK_EQ(read(to_parent[0], &c, 1), 1);
    owner.base[4096 * 3 + 5] = 0x99;
    CHECK_EQ(write(to_child[1], &c, 1), 1);
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    close(to_child[0]);
    close(to_child[1]);
    close(to_parent[0]);
    close(to_parent[1]);
    ems_arena_close(&owner);
}

static void test_close_twice(void)
{
    ems_arena_t arena;
    memset(&arena, 0, sizeof arena);
    CHECK_EQ(ems_arena_create(&arena, 2 * MIB, EMS_PAGES_SMALL, "ems-test-close"), 0);
    int fd = arena.fd;
    uint8_t *base = arena.base;
    unsigned char vec[1];

    ems_arena_close(&arena);
    CHECK(!fd_is_open(fd));
    /* mincore fails with ENOMEM on an address range that is no longer mapped. */
    errno = 0;
    CHECK_EQ(mincore(base, 4096, vec), -1);
    CHECK_EQ(errno, ENOMEM);

    /* A second close must neither crash nor close an fd that now belongs to someone else. */
    int other = open("/dev/null", O_RDONLY);
    CHECK(other >= 0);
    ems_arena_close(&arena);
    CHECK(fd_is_open(other));
    close(other);
}

static void test_invalid_arguments(void)
{
    ems_arena_t arena;
    memset(&arena, 0, sizeof arena);
    CHECK_EQ(ems_arena_create(&arena, 0, EMS_PAGES_SMALL, "ems-test-zero"), -EINVAL);
    CHECK_EQ(ems_arena_create(&arena, 0, EMS_PAGES_AUTO, "ems-test-zero"), -EINVAL);
    CHECK_EQ(ems_arena_create(&arena, 2 * MIB, (ems_page_kind_t)99, "ems-test-kind"), -EINVAL);

    memset(&arena, 0, sizeof arena);
    CHECK_EQ(ems_arena_attach(&arena, -1), -EBADF);

    /* An fd number that is not open. */
    int fd = open("/dev/null", O_RDONLY);
    CHECK(fd >= 0);
    close(fd);
    memset(&arena, 0, sizeof arena);
    CHECK_EQ(ems_arena_attach(&arena, fd), -EBADF);

    /* An empty file has nothing to map. */
    int empty = memfd_create("ems-test-empty", MFD_CLOEXEC);
    CHECK(empty >= 0);
    memset(&arena, 0, sizeof arena);
    CHECK_EQ(ems_arena_attach(&arena, empty), -EINVAL);
    CHECK(fd_is_open(empty));
    close(empty);
}

int main(void)
{
    RUN_TEST(test_small_pages_round_to_2mib);
    RUN_TEST(test_page_kind_names);
    RUN_TEST(test_auto_pages);
    RUN_TEST(test_explicit_thp);
    RUN_TEST(test_explicit_hugetlb);
    RUN_TEST(test_attach_in_process);
    RUN_TEST(test_attach_from_child_process);
    RUN_TEST(test_close_twice);
    RUN_TEST(test_invalid_arguments);
    fprintf(stderr, "test_arena: all passed\n");
    return 0;
}
