/*
 * log.c -- process-wide logging for broker and session.
 *
 * DESCRIPTION
 *	One message per call, never longer than LOG_LINE_MAX. Targets:
 *	  journal  journald's native protocol, written here (the session is a
 *	           static musl binary without libsystemd): one datagram to
 *	           /run/systemd/journal/socket of "KEY=value\n" fields; a value
 *	           holding a newline goes as "KEY\n", its length as 64-bit
 *	           little endian, the bytes and "\n" (binary-safe form). Fields:
 *	           MESSAGE, PRIORITY, SYSLOG_FACILITY, SYSLOG_IDENTIFIER, ERRNO,
 *	           MESSAGE_ID and the caller's IMAPPROXY_* fields. When the
 *	           datagram cannot be sent (no journald: xinetd on a host
 *	           without systemd, journald restarting) that message goes to
 *	           the fallback, stderr or syslog, and the next one tries again.
 *	  stderr   "ident[pid]: level: text", or "<N>text" when stderr is a
 *	           journal stream; control characters become '?', so a user
 *	           name cannot forge a line.
 *	  syslog   syslog(3): when fd 2 is the client socket (xinetd gives the
 *	           socket on 0, 1 and 2) we must never write there.
 *	Owns the only logging globals of the process, and the journal socket
 *	(opened at the first message, close-on-exec; in fork-server mode the
 *	children share it, which datagrams allow).
 * SECURITY
 *	Callers never pass secrets; untrusted text goes through log_sanitize().
 */
#include <errno.h>
#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"

#define LOG_LINE_MAX 2048
#define LOG_FIELDS_MAX 16 /* caller fields per message, besides context and ours */
#define LOG_CONTEXT_VALUE_MAX 256
#define JOURNAL_SOCKET "/run/systemd/journal/socket"

static const char *log_ident = "imapproxy";
static LogTarget log_target = LOG_TARGET_STDERR;
static LogTarget log_fallback = LOG_TARGET_STDERR; /* when the journal cannot be reached */
static int log_max_level = LOG_INFO;
static int log_facility = LOG_MAIL;
static int log_journal_prefix;
static int log_syslog_open;
static int journal_fd = -1;
static struct sockaddr_un journal_addr = { .sun_family = AF_UNIX, .sun_path = JOURNAL_SOCKET };

static struct {
        const char *key;
        char value[LOG_CONTEXT_VALUE_MAX];
} log_context[LOG_CONTEXT_MAX];

static const char *const level_names[] = {
        [LOG_EMERG] = "emerg", [LOG_ALERT] = "alert", [LOG_CRIT] = "crit", [LOG_ERR] = "error",
        [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
};

/* fd 2 is the stream systemd connected to the journal (JOURNAL_STREAM). */
static bool stderr_is_journal(const struct stat *st) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        return (unsigned long long) st->st_dev == dev && (unsigned long long) st->st_ino == ino;
}

void log_setup(const char *ident, LogTarget target) {
        const char *t = getenv("IMAPPROXY_LOG_TARGET");
        struct stat st; /* one fstat(): every session start pays for it */
        bool fd2_open = fstat(STDERR_FILENO, &st) == 0;
        bool fd2_unusable = !fd2_open || S_ISSOCK(st.st_mode); /* closed, or xinetd's socket */

        if (ident)
                log_ident = ident;
        if (t && target == LOG_TARGET_AUTO) {
                if (strcmp(t, "journal") == 0)
                        target = LOG_TARGET_JOURNAL;
                else if (strcmp(t, "stderr") == 0 && !fd2_unusable)
                        target = LOG_TARGET_STDERR;
                else if (strcmp(t, "syslog") == 0)
                        target = LOG_TARGET_SYSLOG;
        }
        log_journal_prefix = fd2_open && stderr_is_journal(&st);
        log_fallback = fd2_unusable ? LOG_TARGET_SYSLOG : LOG_TARGET_STDERR;
        if (target == LOG_TARGET_AUTO)
                target = log_journal_prefix || fd2_unusable ? LOG_TARGET_JOURNAL : LOG_TARGET_STDERR;
        log_target = target;
        const char *lvl = getenv("IMAPPROXY_LOG_LEVEL");
        if (lvl && strcmp(lvl, "debug") == 0)
                log_max_level = LOG_DEBUG;
}

int log_set_journal_socket(const char *path) {
        size_t n = strlen(path);

        if (n == 0 || n >= sizeof(journal_addr.sun_path))
                return -ENAMETOOLONG;
        memcpy(journal_addr.sun_path, path, n + 1);
        return 0;
}

LogTarget log_get_target(void) {
        return log_target;
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

void log_set_context(const char *key, const char *value) {
        size_t free_slot = LOG_CONTEXT_MAX;

        for (size_t i = 0; i < LOG_CONTEXT_MAX; i++) {
                if (log_context[i].key && strcmp(log_context[i].key, key) == 0) {
                        free_slot = i;
                        break;
                }
                if (!log_context[i].key && free_slot == LOG_CONTEXT_MAX)
                        free_slot = i;
        }
        if (free_slot == LOG_CONTEXT_MAX)
                return;
        if (!value) {
                log_context[free_slot].key = NULL;
                return;
        }
        log_context[free_slot].key = key;
        (void) snprintf(log_context[free_slot].value, sizeof(log_context[free_slot].value), "%s", value);
}

/* ---- journal native protocol ---- */

typedef struct JournalMsg {
        struct iovec iov[4 * (LOG_FIELDS_MAX + LOG_CONTEXT_MAX + 8)];
        size_t n;
        uint64_t lens[LOG_FIELDS_MAX + LOG_CONTEXT_MAX + 8]; /* little-endian lengths, binary form */
        size_t n_lens;
} JournalMsg;

static void iov_add(JournalMsg *m, const void *p, size_t l) {
        m->iov[m->n++] = (struct iovec) { .iov_base = (void *) p, .iov_len = l };
}

static void journal_field(JournalMsg *m, const char *key, const char *value) {
        size_t vl = strlen(value);

        if (m->n + 5 > ELEMENTSOF(m->iov) || m->n_lens >= ELEMENTSOF(m->lens))
                return;
        iov_add(m, key, strlen(key));
        if (memchr(value, '\n', vl)) {
                uint64_t le = htole64((uint64_t) vl);
                m->lens[m->n_lens] = le;
                iov_add(m, "\n", 1);
                iov_add(m, &m->lens[m->n_lens++], sizeof(uint64_t));
        } else
                iov_add(m, "=", 1);
        iov_add(m, value, vl);
        iov_add(m, "\n", 1);
}

static bool field_name_ok(const char *k) {
        if (!k || !*k || *k == '_' || strlen(k) > 64)
                return false;
        for (; *k; k++)
                if (!((*k >= 'A' && *k <= 'Z') || (*k >= '0' && *k <= '9') || *k == '_'))
                        return false;
        return true;
}

static int journal_send(int level, int error, const char *message_id, const LogField *fields, size_t n_fields,
                        const char *text) {
        char prio[16], fac[16], err[16];
        JournalMsg m = {};

        if (journal_fd < 0) {
                journal_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
                if (journal_fd < 0)
                        return -errno;
        }
        (void) snprintf(prio, sizeof(prio), "%d", level);
        (void) snprintf(fac, sizeof(fac), "%d", log_facility >> 3);
        journal_field(&m, "MESSAGE", text);
        journal_field(&m, "PRIORITY", prio);
        journal_field(&m, "SYSLOG_FACILITY", fac);
        journal_field(&m, "SYSLOG_IDENTIFIER", log_ident);
        if (error > 0) {
                (void) snprintf(err, sizeof(err), "%d", error);
                journal_field(&m, "ERRNO", err);
        }
        if (message_id)
                journal_field(&m, "MESSAGE_ID", message_id);
        for (size_t i = 0; i < LOG_CONTEXT_MAX; i++)
                if (log_context[i].key)
                        journal_field(&m, log_context[i].key, log_context[i].value);
        for (size_t i = 0; i < n_fields && i < LOG_FIELDS_MAX; i++)
                if (fields[i].value && field_name_ok(fields[i].key))
                        journal_field(&m, fields[i].key, fields[i].value);

        struct msghdr mh = {
                .msg_name = &journal_addr,
                .msg_namelen = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + strlen(journal_addr.sun_path) + 1),
                .msg_iov = m.iov,
                .msg_iovlen = m.n,
        };
        for (;;) {
                if (sendmsg(journal_fd, &mh, MSG_NOSIGNAL) >= 0)
                        return 0;
                if (errno != EINTR)
                        return -errno;
        }
}

/* ---- stderr and syslog ---- */

static void write_text(LogTarget target, int level, char *buf) {
        /* One line: no control character of a user name or server text may
         * start a forged line of its own. */
        for (char *q = buf; *q; q++)
                if ((unsigned char) *q < 0x20 || *q == 0x7f)
                        *q = '?';
        switch (target) {
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
}

static int log_dispatch(int level, int error, const char *message_id, const LogField *fields, size_t n_fields,
                        const char *fmt, va_list ap) {
        char buf[LOG_LINE_MAX];
        int saved = errno;

        if (error < 0)
                error = -error;
        errno = error;
        (void) vsnprintf(buf, sizeof(buf), fmt, ap);

        if (log_target != LOG_TARGET_JOURNAL ||
            journal_send(level, error, message_id, fields, n_fields, buf) < 0)
                write_text(log_target == LOG_TARGET_JOURNAL ? log_fallback : log_target, level, buf);
        errno = saved;
        return -error;
}

int log_internal(int level, int error, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_dispatch(level, error, NULL, NULL, 0, fmt, ap);
        va_end(ap);
        return r;
}

int log_struct_internal(int level, int error, const char *message_id, const LogField *fields, size_t n_fields,
                        const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_dispatch(level, error, message_id, fields, n_fields, fmt, ap);
        va_end(ap);
        return r;
}

char *log_sanitize(const char *in, size_t inlen, char *out, size_t outsize) {
        size_t o = 0;
        if (outsize == 0)
                return out;
        for (size_t i = 0; i < inlen && o + 1 < outsize; i++) {
                unsigned char c = (unsigned char) in[i];
                out[o++] = (c >= 0x20 && c < 0x7f) ? (char) c : '?';
        }
        if (o < inlen && o >= 3) /* cut: say so (text that just fits is left whole) */
                out[o - 1] = out[o - 2] = out[o - 3] = '.';
        out[o] = '\0';
        return out;
}
