/*
 * log.h -- process-wide logging for broker and session. See log.c.
 */
#pragma once

#include <stdarg.h>
#include <syslog.h>

#include "macro.h"

typedef enum LogTarget {
        LOG_TARGET_AUTO,   /* journal stream if stderr is one, else stderr, else syslog */
        LOG_TARGET_STDERR, /* plain "ident[pid]: level: text" lines */
        LOG_TARGET_SYSLOG, /* syslog(3), for xinetd where fd 2 is the client */
        LOG_TARGET_NULL,
} LogTarget;

void log_setup(const char *ident, LogTarget target);
void log_set_max_level(int level);
int log_get_max_level(void);
void log_set_facility(int facility);

/* Logs (if level passes) and returns -abs(error) (or 0 if error == 0). %m
 * expands to strerror(error). */
int log_internal(int level, int error, const char *fmt, ...) _printf_(3, 4);

#define log_full_errno(level, error, ...)                                                         \
        ({                                                                                        \
                int _l = (level), _e = (error);                                                   \
                (_l <= log_get_max_level()) ? log_internal(_l, _e, __VA_ARGS__)                   \
                                            : (_e < 0 ? _e : -_e);                                \
        })
#define log_full(level, ...) (void) log_full_errno((level), 0, __VA_ARGS__)

#define log_debug(...) log_full(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_full(LOG_INFO, __VA_ARGS__)
#define log_notice(...) log_full(LOG_NOTICE, __VA_ARGS__)
#define log_warning(...) log_full(LOG_WARNING, __VA_ARGS__)
#define log_error(...) log_full(LOG_ERR, __VA_ARGS__)

#define log_debug_errno(e, ...) log_full_errno(LOG_DEBUG, (e), __VA_ARGS__)
#define log_info_errno(e, ...) log_full_errno(LOG_INFO, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_full_errno(LOG_WARNING, (e), __VA_ARGS__)
#define log_error_errno(e, ...) log_full_errno(LOG_ERR, (e), __VA_ARGS__)

/* Write a printable, bounded rendition of untrusted bytes (backend or client
 * text) into out (NUL-terminated); control and 8-bit bytes become '?'.
 * Returns out. */
char *log_sanitize(const char *in, size_t inlen, char *out, size_t outsize);
