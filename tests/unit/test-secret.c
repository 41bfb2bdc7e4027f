/*
 * test-secret.c -- common/secret.c: zeroed, page-backed, MADV_DONTDUMP, wiped.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "secret.h"

/* The VmFlags line of the /proc/self/smaps entry that contains p. */
static bool vmflags_of(const void *p, char *out, size_t outsize) {
        FILE *f = fopen("/proc/self/smaps", "re");
        char line[512];
        bool in = false, found = false;
        cr_assert_not_null(f);
        while (fgets(line, sizeof(line), f)) {
                unsigned long lo, hi;
                if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
                        in = (uintptr_t) p >= lo && (uintptr_t) p < hi;
                else if (in && strncmp(line, "VmFlags:", 8) == 0) {
                        snprintf(out, outsize, "%s", line + 8);
                        found = true;
                        break;
                }
        }
        fclose(f);
        return found;
}

Test(secret, zeroed_page_aligned_and_not_dumped) {
        size_t page = (size_t) sysconf(_SC_PAGESIZE);
        char flags[512];
        unsigned char *p = secret_alloc(3000);

        cr_assert_not_null(p);
        cr_assert_eq((uintptr_t) p % page, 0);
        for (size_t i = 0; i < page; i++)
                cr_assert_eq(p[i], 0, "byte %zu not zero", i);
        memset(p, 'S', page); /* the whole rounded-up page is ours */
        cr_assert(vmflags_of(p, flags, sizeof(flags)), "no smaps entry for the secret page");
        cr_assert_not_null(strstr(flags, " dd"), "secret page not marked MADV_DONTDUMP: VmFlags:%s", flags);
        secret_free(p, 3000);
}

Test(secret, sizes) {
        cr_assert_null(secret_alloc(0));
        cr_assert_null(secret_alloc(SIZE_MAX));
        secret_free(NULL, 10); /* accepted */
        void *p = secret_alloc(1);
        cr_assert_not_null(p);
        secret_free(p, 1);
        p = secret_alloc(3 * 4096 + 1);
        cr_assert_not_null(p);
        memset(p, 1, 3 * 4096 + 1);
        secret_free(p, 3 * 4096 + 1);
}
