/*
 * macro.h -- small helpers every module uses: cleanup attributes, ownership
 * transfer, array sizes. Header only; no state.
 */
#pragma once

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define _cleanup_(f) __attribute__((__cleanup__(f)))
#define _unused_ __attribute__((__unused__))
#define _printf_(a, b) __attribute__((__format__(printf, a, b)))
#define _noreturn_ __attribute__((__noreturn__))
#define _pure_ __attribute__((__pure__))
#define _likely_(x) __builtin_expect(!!(x), 1)
#define _unlikely_(x) __builtin_expect(!!(x), 0)

#define ELEMENTSOF(x)                                                                             \
        (__builtin_choose_expr(                                                                   \
                !__builtin_types_compatible_p(typeof(x), typeof(&*(x))), sizeof(x) / sizeof((x)[0]), \
                (void) 0))

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Hand over ownership of a pointer or fd held in a _cleanup_ variable. */
#define TAKE_PTR(p)                                                                               \
        ({                                                                                        \
                typeof(p) _p_ = (p);                                                              \
                (p) = NULL;                                                                       \
                _p_;                                                                              \
        })
#define TAKE_FD(fd)                                                                               \
        ({                                                                                        \
                int _fd_ = (fd);                                                                  \
                (fd) = -EBADF;                                                                    \
                _fd_;                                                                             \
        })

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

/* Zero memory in a way the compiler may not optimise out (secrets). */
static inline void explicit_bzero_safe(void *p, size_t n) {
        if (p && n > 0)
                explicit_bzero(p, n);
}

/* Case-insensitive ASCII compare that ignores the locale (IMAP atoms). */
static inline int ascii_strcasecmp_n(const char *a, size_t alen, const char *b) {
        size_t blen = strlen(b);
        if (alen != blen)
                return 1;
        for (size_t i = 0; i < alen; i++) {
                unsigned char x = (unsigned char) a[i], y = (unsigned char) b[i];
                if (x >= 'a' && x <= 'z')
                        x -= 32;
                if (y >= 'a' && y <= 'z')
                        y -= 32;
                if (x != y)
                        return 1;
        }
        return 0;
}
