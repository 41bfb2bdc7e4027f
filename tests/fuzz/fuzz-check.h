/*
 * fuzz-check.h -- CHECK(x) for the fuzz targets: an invariant that does not
 * hold is reported with its place and abort()s, which libFuzzer records as
 * a crash (and the plain replay in make check as a failure).
 */
#pragma once

#include <stdio.h>
#include <stdlib.h>

#define CHECK(x)                                                                                  \
        do {                                                                                      \
                if (!(x)) {                                                                       \
                        fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #x);   \
                        abort();                                                                  \
                }                                                                                 \
        } while (0)
