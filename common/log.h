/*
 * log.h -- process-wide logging for broker and session. See log.c.
 */
#pragma once

#include <stdarg.h>
#include <stddef.h>
#include <syslog.h>

#include "macro.h"
#include "message-ids.h"

typedef enum LogTarget {
        LOG_TARGET_AUTO,    /* see log_setup() */
        LOG_TARGET_JOURNAL, /* journald's native protocol; falls back to stderr or syslog */
        LOG_TARGET_STDERR,  /* plain "ident[pid]: level: text" lines */
        LOG_TARGET_SYSLOG,  /* syslog(3), for xinetd where fd 2 is the client */
        LOG_TARGET_NULL,
} LogTarget;

/* AUTO: the journal (native protocol) when stderr is connected to it
 * (JOURNAL_STREAM), or when stderr is a socket or closed (xinetd) -- then
 * syslog is the fallback; otherwise stderr (a terminal, a file: foreground
 * debugging). IMAPPROXY_LOG_TARGET=journal|stderr|syslog|auto overrides. */
void log_setup(const char *ident, LogTarget target);
LogTarget log_get_target(void);
/* Where journald's native socket is (default /run/systemd/journal/socket):
 * for tests, which read what we send. -ENAMETOOLONG if it does not fit. */
int log_set_journal_socket(const char *path);
void log_set_max_level(int level);
int log_get_max_level(void);
void log_set_facility(int facility);

/* A field for the journal: KEY (A-Z, 0-9, '_', not starting with '_') and a
 * value (any bytes but NUL; newlines are sent in the binary-safe form).
 * value NULL: the field is left out. Never pass a secret. */
typedef struct LogField {
        const char *key;
        const char *value;
} LogField;

/* Process-wide fields added to every message (the session's client address
 * and user). At most LOG_CONTEXT_MAX keys; value NULL removes the key.
 * Values are copied (and cut at 255 bytes). */
#define LOG_CONTEXT_MAX 4
void log_set_context(const char *key, const char *value);

/* Logs (if level passes) and returns -abs(error) (or 0 if error == 0). %m
 * expands to strerror(error). */
int log_internal(int level, int error, const char *fmt, ...) _printf_(3, 4);
/* The same with a MESSAGE_ID (NULL: none) and extra journal fields. */
int log_struct_internal(int level, int error, const char *message_id, const LogField *fields, size_t n_fields,
                        const char *fmt, ...) _printf_(6, 7);

#define log_full_errno(level, error, ...)                                                         \
        ({                                                                                        \
                int _l = (level), _e = (error);                                                   \
                (_l <= log_get_max_level()) ? log_internal(_l, _e, __VA_ARGS__)                   \
                                            : (_e < 0 ? _e : -_e);                                \
        })
#define log_full(level, ...) (void) log_full_errno((level), 0, __VA_ARGS__)

/* log_struct(LOG_INFO, IMAPPROXY_MSGID_X, LOG_FIELDS({ "IMAPPROXY_USER", u }, ...), "fmt", ...) */
#define LOG_FIELDS(...)                                                                           \
        ((const LogField[]){ __VA_ARGS__ }), (sizeof((const LogField[]){ __VA_ARGS__ }) / sizeof(LogField))
#define log_struct_errno(level, error, message_id, fields_and_n, ...)                             \
        ({                                                                                        \
                int _l = (level), _e = (error);                                                   \
                (_l <= log_get_max_level())                                                       \
                        ? log_struct_internal(_l, _e, (message_id), fields_and_n, __VA_ARGS__)    \
                        : (_e < 0 ? _e : -_e);                                                    \
        })
#define log_struct(level, message_id, fields_and_n, ...)                                          \
        (void) log_struct_errno((level), 0, (message_id), fields_and_n, __VA_ARGS__)

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
