/*
 * fd-util.h -- file descriptor helpers (close, non-blocking, socket options,
 * whole-buffer writes). See fd-util.c.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "macro.h"

int safe_close(int fd);
static inline void closep(int *fd) {
        *fd = safe_close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

int fd_set_nonblock(int fd, bool nonblock);
int fd_set_cloexec(int fd, bool cloexec);
int fd_set_nodelay(int fd);
int fd_set_keepalive(int fd);
int fd_set_link_timeout(int fd, unsigned seconds);

/* Write all of buf to a (possibly non-blocking) fd, waiting with poll() up to
 * timeout_ms in total (-1: no limit). 0 or -errno (-ETIMEDOUT). */
int fd_write_all(int fd, const void *buf, size_t len, int timeout_ms);

/* Monotonic clock in microseconds. */
unsigned long long now_usec(void);
