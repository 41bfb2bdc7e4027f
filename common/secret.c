/*
 * secret.c -- memory for secrets (passwords, keys): out of core dumps, wiped.
 *
 * SYNOPSIS
 *	void *secret_alloc(size_t size);
 *	void secret_free(void *p, size_t size);
 * DESCRIPTION
 *	Whole anonymous pages from mmap(), marked MADV_DONTDUMP so that a core
 *	dump of the process does not contain them; secret_free() wipes them
 *	with explicit_bzero() before munmap(). A system call each way: meant
 *	for the broker's per-login buffers and its HMAC key, not for the
 *	session's start-up path. Owns nothing beyond what it returns.
 * ERRORS
 *	secret_alloc() returns NULL with errno set (ENOMEM, or EINVAL for 0).
 *	MADV_DONTDUMP failing (very old kernels) is not an error: the memory
 *	is still wiped after use.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "secret.h"

static size_t secret_round(size_t size) {
        size_t page = (size_t) sysconf(_SC_PAGESIZE);
        if (page == 0 || page == (size_t) -1)
                page = 4096;
        if (size > SIZE_MAX - page)
                return 0;
        return (size + page - 1) / page * page;
}

void *secret_alloc(size_t size) {
        size_t n = secret_round(size);
        if (size == 0 || n == 0) {
                errno = size == 0 ? EINVAL : ENOMEM;
                return NULL;
        }
        void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
                return NULL;
        (void) madvise(p, n, MADV_DONTDUMP);
        return p;
}

void secret_free(void *p, size_t size) {
        if (!p)
                return;
        size_t n = secret_round(size);
        explicit_bzero(p, n);
        (void) munmap(p, n);
}
