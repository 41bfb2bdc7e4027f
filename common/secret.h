/*
 * secret.h -- memory for secrets: kept out of core dumps, wiped on free.
 */
#pragma once

#include <stddef.h>

/* Zeroed memory of at least size bytes, whole pages of its own, marked
 * MADV_DONTDUMP. NULL on failure (errno set). */
void *secret_alloc(size_t size);
/* Wipes and unmaps what secret_alloc(size) returned. Accepts NULL. */
void secret_free(void *p, size_t size);
