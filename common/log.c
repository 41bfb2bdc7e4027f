/*
 * log.c -- process-wide logging for broker and session.
 *
 * DESCRIPTION
 *	One line per message, never longer than LOG_LINE_MAX. When stderr is
 *	connected to journald (JOURNAL_STREAM names fd 2) lines get a "<N>"
 *	priority prefix; when fd 2 is the client socket (xinetd gives the
 *	socket on 0, 1 and 2) we must never write there, so AUTO falls back to
 *	syslog. Owns the only logging globals of the process.
 * SECURITY
 *	Callers never pass secrets; untrusted text goes through log_sanitize().
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

#define LOG_LINE_MAX 2048

static const char *log_ident = "imapproxy";
static LogTarget log_target = LOG_TARGET_STDERR;
static int log_max_level = LOG_INFO;
static int log_facility = LOG_MAIL;
static int log_journal_prefix;
static int log_syslog_open;

static const char *const level_names[] = {
        [LOG_EMERG] = "emerg", [LOG_ALERT] = "alert", [LOG_CRIT] = "crit", [LOG_ERR] = "error",
        [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
};

static int stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return 0;
        if (fstat(STDERR_FILENO, &st) < 0)
                return 0;
        return (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

static int stderr_is_closed(void) {
        struct stat st;
        return fstat(STDERR_FILENO, &st) < 0;
}

static int stderr_is_socket(void) {
        struct stat st;
        return fstat(STDERR_FILENO, &st) == 0 && S_ISSOCK(st.st_mode);
}

void log_setup(const char *ident, LogTarget target) {
        if (ident)
                log_ident = ident;
        log_journal_prefix = 0;
        if (target == LOG_TARGET_AUTO) {
                if (stderr_is_journal()) {
                        target = LOG_TARGET_STDERR;
                        log_journal_prefix = 1;
                } else if (stderr_is_socket() || stderr_is_closed())
                        target = LOG_TARGET_SYSLOG;
                else
                        target = LOG_TARGET_STDERR;
        }
        log_target = target;
        const char *lvl = getenv("IMAPPROXY_LOG_LEVEL");
        if (lvl && strcmp(lvl, "debug") == 0)
                log_max_level = LOG_DEBUG;
}

void log_set_max_level(int level) {
        log_max_level = level;
}

int log_get_max_level(void) {
        return log_max_level;
}

void log_set_facility(int facility) {
        log_facility = facility;
}

int log_internal(int level, int error, const char *fmt, ...) {
        char buf[LOG_LINE_MAX];
        int saved = errno;
        va_list ap;

        if (error < 0)
                error = -error;
        errno = error;
        va_start(ap, fmt);
        (void) vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);

        switch (log_target) {
        case LOG_TARGET_NULL:
                break;
        case LOG_TARGET_SYSLOG:
                if (!log_syslog_open) {
                        openlog(log_ident, LOG_PID | LOG_NDELAY, log_facility);
                        log_syslog_open = 1;
                }
                syslog(level, "%s", buf);
                break;
        default:
                if (log_journal_prefix)
                        (void) dprintf(STDERR_FILENO, "<%d>%s\n", level, buf);
                else
                        (void) dprintf(STDERR_FILENO, "%s[%d]: %s: %s\n", log_ident, (int) getpid(),
                                       level >= 0 && level < (int) ELEMENTSOF(level_names) ? level_names[level] : "?",
                                       buf);
                break;
        }
        errno = saved;
        return -error;
}

char *log_sanitize(const char *in, size_t inlen, char *out, size_t outsize) {
        size_t o = 0;
        if (outsize == 0)
                return out;
        for (size_t i = 0; i < inlen && o + 1 < outsize; i++) {
                unsigned char c = (unsigned char) in[i];
                out[o++] = (c >= 0x20 && c < 0x7f) ? (char) c : '?';
        }
        if (inlen > 0 && o + 1 == outsize && o >= 3) {
                out[o - 1] = out[o - 2] = out[o - 3] = '.';
        }
        out[o] = '\0';
        return out;
}
