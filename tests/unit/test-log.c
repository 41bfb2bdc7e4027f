/*
 * test-log.c -- Criterion tests for common/log.c: the journald native
 * protocol encoder, the stderr fallback and log_sanitize().
 *
 * Each test binds its own AF_UNIX datagram socket, points the logger at it
 * (log_set_journal_socket()), logs, and decodes what arrived with a decoder
 * written here from journald's protocol description: "KEY=value\n", or
 * "KEY\n" + 64-bit little-endian length + bytes + "\n" for values holding a
 * newline. Real journald reading these datagrams is covered by the
 * integration tests (test_ops, the nspawn check); this pins the bytes.
 * Criterion runs every test in a process of its own, so the logger's
 * globals start fresh each time.
 */
#include <criterion/criterion.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"
#include "message-ids.h"

#define MAX_FIELDS 64

typedef struct Field {
        char key[80];
        char *value;
        size_t len;
        bool binary; /* sent in the length-prefixed form */
} Field;

typedef struct Datagram {
        Field f[MAX_FIELDS];
        size_t n;
} Datagram;

static char sock_path[108];
static int sock_fd = -1;

static void journal_open(void) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        snprintf(sock_path, sizeof(sock_path), "/tmp/test-log-%d.sock", (int) getpid());
        unlink(sock_path);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
        sock_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        cr_assert(sock_fd >= 0);
        cr_assert(bind(sock_fd, (struct sockaddr *) &sa, sizeof(sa)) == 0, "bind: %s", strerror(errno));
        cr_assert(log_set_journal_socket(sock_path) == 0);
        log_setup("test-log", LOG_TARGET_JOURNAL);
}

static void journal_close(void) {
        if (sock_fd >= 0)
                close(sock_fd);
        sock_fd = -1;
        unlink(sock_path);
}

/* Decodes one datagram; fails the test on any framing error. */
static void decode(const uint8_t *p, size_t n, Datagram *d) {
        size_t i = 0;

        d->n = 0;
        while (i < n) {
                Field *f = &d->f[d->n];
                size_t k = i;

                cr_assert(d->n < MAX_FIELDS, "too many fields");
                while (k < n && p[k] != '=' && p[k] != '\n')
                        k++;
                cr_assert(k < n, "field without '=' or newline at offset %zu", i);
                cr_assert(k - i > 0 && k - i < sizeof(f->key), "bad key length at offset %zu", i);
                memcpy(f->key, p + i, k - i);
                f->key[k - i] = 0;
                if (p[k] == '=') {
                        const uint8_t *nl = memchr(p + k + 1, '\n', n - k - 1);
                        cr_assert(nl, "value of %s not ended by a newline", f->key);
                        f->len = (size_t) (nl - (p + k + 1));
                        f->value = strndup((const char *) p + k + 1, f->len);
                        f->binary = false;
                        i = (size_t) (nl - p) + 1;
                } else {
                        uint64_t le;
                        cr_assert(n - k - 1 >= sizeof(le), "%s: length cut", f->key);
                        memcpy(&le, p + k + 1, sizeof(le));
                        f->len = (size_t) le64toh(le);
                        i = k + 1 + sizeof(le);
                        cr_assert(n - i >= f->len + 1, "%s: value cut", f->key);
                        cr_assert(p[i + f->len] == '\n', "%s: binary value not ended by a newline", f->key);
                        f->value = malloc(f->len + 1);
                        memcpy(f->value, p + i, f->len);
                        f->value[f->len] = 0;
                        f->binary = true;
                        i += f->len + 1;
                }
                d->n++;
        }
}

/* Receives the next datagram (waiting at most 1 s); false if none came. */
static bool receive(Datagram *d, int wait_ms) {
        static uint8_t buf[65536];
        struct timeval tv = { .tv_sec = wait_ms / 1000, .tv_usec = (wait_ms % 1000) * 1000 };

        if (wait_ms == 0)
                tv.tv_usec = 1000;
        cr_assert(setsockopt(sock_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) == 0);
        ssize_t n = recv(sock_fd, buf, sizeof(buf), 0);
        if (n < 0) {
                cr_assert(errno == EAGAIN || errno == EWOULDBLOCK, "recv: %s", strerror(errno));
                return false;
        }
        decode(buf, (size_t) n, d);
        return true;
}

static const Field *field(const Datagram *d, const char *key) {
        const Field *found = NULL;
        for (size_t i = 0; i < d->n; i++)
                if (strcmp(d->f[i].key, key) == 0) {
                        cr_assert(!found, "field %s twice", key);
                        found = &d->f[i];
                }
        return found;
}

static void expect_field(const Datagram *d, const char *key, const char *value) {
        const Field *f = field(d, key);
        cr_assert(f, "field %s missing", key);
        cr_expect_str_eq(f->value, value, "field %s", key);
}

TestSuite(log, .init = journal_open, .fini = journal_close);

Test(log, plain_message_fields) {
        Datagram d;

        log_info("hello %s", "world");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "MESSAGE", "hello world");
        expect_field(&d, "PRIORITY", "6");
        expect_field(&d, "SYSLOG_FACILITY", "2"); /* LOG_MAIL */
        expect_field(&d, "SYSLOG_IDENTIFIER", "test-log");
        cr_expect_null(field(&d, "ERRNO"));
        cr_expect_null(field(&d, "MESSAGE_ID"));
        cr_expect_eq(d.n, 4, "only our four fields, got %zu", d.n);
}

Test(log, errno_and_percent_m) {
        Datagram d;

        int r = log_error_errno(-ENOENT, "open %s: %m", "/x");
        cr_expect_eq(r, -ENOENT);
        cr_assert(receive(&d, 1000));
        expect_field(&d, "MESSAGE", "open /x: No such file or directory");
        expect_field(&d, "PRIORITY", "3");
        expect_field(&d, "ERRNO", "2");
        /* a positive error works the same */
        cr_expect_eq(log_warning_errno(EACCES, "w"), -EACCES);
        cr_assert(receive(&d, 1000));
        expect_field(&d, "ERRNO", "13");
}

Test(log, newline_goes_binary) {
        Datagram d;

        log_info("two\nlines\n");
        cr_assert(receive(&d, 1000));
        const Field *f = field(&d, "MESSAGE");
        cr_assert(f);
        cr_expect(f->binary, "a value with a newline must use the length form");
        cr_expect_eq(f->len, 10);
        cr_expect_str_eq(f->value, "two\nlines\n");
        cr_expect(!field(&d, "PRIORITY")->binary);
}

Test(log, struct_fields_and_message_id) {
        Datagram d;

        log_struct(LOG_NOTICE, IMAPPROXY_MSGID_BROKER_STARTED,
                   LOG_FIELDS({ "IMAPPROXY_USER", "alice" }, { "IMAPPROXY_CACHE", "hit" },
                              { "IMAPPROXY_NOTE", "a\nb" }, { "IMAPPROXY_NONE", NULL }),
                   "m");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "MESSAGE_ID", IMAPPROXY_MSGID_BROKER_STARTED);
        expect_field(&d, "IMAPPROXY_USER", "alice");
        expect_field(&d, "IMAPPROXY_CACHE", "hit");
        expect_field(&d, "IMAPPROXY_NOTE", "a\nb");
        cr_expect(field(&d, "IMAPPROXY_NOTE")->binary);
        cr_expect_null(field(&d, "IMAPPROXY_NONE"), "a NULL value leaves the field out");
        expect_field(&d, "PRIORITY", "5");
}

Test(log, bad_field_names_dropped) {
        Datagram d;
        char long_key[70];

        memset(long_key, 'K', 65);
        long_key[65] = 0;
        log_struct(LOG_INFO, NULL,
                   LOG_FIELDS({ "_SYSTEMD_UNIT", "forged.service" }, { "lower_case", "x" }, { "", "x" },
                              { "BAD-DASH", "x" }, { "EQ=UALS", "x" }, { long_key, "x" }, { NULL, "x" },
                              { "GOOD_1", "y" }),
                   "m");
        cr_assert(receive(&d, 1000));
        cr_expect_null(field(&d, "_SYSTEMD_UNIT"), "trusted fields cannot be forged");
        cr_expect_null(field(&d, "lower_case"));
        cr_expect_null(field(&d, "BAD-DASH"));
        cr_expect_null(field(&d, long_key));
        expect_field(&d, "GOOD_1", "y");
        cr_expect_eq(d.n, 5, "our four fields and GOOD_1, got %zu", d.n);
}

Test(log, context_fields) {
        Datagram d;
        char big[400];

        memset(big, 'v', sizeof(big) - 1);
        big[sizeof(big) - 1] = 0;
        log_set_context("IMAPPROXY_CLIENT", "192.0.2.1");
        log_set_context("IMAPPROXY_USER", "bob");
        log_info("one");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "IMAPPROXY_CLIENT", "192.0.2.1");
        expect_field(&d, "IMAPPROXY_USER", "bob");

        log_set_context("IMAPPROXY_USER", "carol"); /* replaces, does not add */
        log_set_context("IMAPPROXY_CLIENT", NULL);  /* removes */
        log_set_context("IMAPPROXY_BIG", big);      /* cut at 255 bytes */
        log_info("two");
        cr_assert(receive(&d, 1000));
        cr_expect_null(field(&d, "IMAPPROXY_CLIENT"));
        expect_field(&d, "IMAPPROXY_USER", "carol");
        cr_expect_eq(field(&d, "IMAPPROXY_BIG")->len, 255);

        /* more keys than LOG_CONTEXT_MAX: the extra ones are ignored */
        log_set_context("IMAPPROXY_C3", "3");
        log_set_context("IMAPPROXY_C4", "4");
        log_set_context("IMAPPROXY_C5", "5");
        log_info("three");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "IMAPPROXY_C4", "4");
        cr_expect_null(field(&d, "IMAPPROXY_C5"));
}

Test(log, many_fields_bounded) {
        static const char *const keys[] = { "F00", "F01", "F02", "F03", "F04", "F05", "F06",
                                            "F07", "F08", "F09", "F10", "F11", "F12", "F13",
                                            "F14", "F15", "F16", "F17", "F18", "F19" };
        LogField f[20];
        Datagram d;

        for (size_t i = 0; i < 20; i++)
                f[i] = (LogField) { keys[i], i % 2 ? "odd\nvalue" : "even" };
        log_struct_internal(LOG_INFO, 0, NULL, f, 20, "many");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "F00", "even");
        expect_field(&d, "F15", "odd\nvalue");
        cr_expect_null(field(&d, "F16"), "at most 16 caller fields");
        cr_expect_eq(d.n, 4 + 16);
}

Test(log, long_message_cut) {
        Datagram d;
        char *big = malloc(5000);

        memset(big, 'x', 4999);
        big[4999] = 0;
        log_info("%s", big);
        free(big);
        cr_assert(receive(&d, 1000));
        cr_expect_eq(field(&d, "MESSAGE")->len, 2047, "cut to LOG_LINE_MAX - 1");
}

Test(log, level_filter) {
        Datagram d;

        log_debug("not sent");
        cr_expect(!receive(&d, 100), "debug is below the default level");
        log_set_max_level(LOG_DEBUG);
        log_debug("sent");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "MESSAGE", "sent");
        expect_field(&d, "PRIORITY", "7");
}

/* No journal: the message goes to stderr instead, and the next one tries
 * the journal again. */
Test(log, fallback_to_stderr_and_back) {
        int p[2], saved = dup(STDERR_FILENO);
        char buf[512];
        Datagram d;

        cr_assert(pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
        cr_assert(dup2(p[1], STDERR_FILENO) == STDERR_FILENO);
        log_setup("test-log", LOG_TARGET_JOURNAL); /* fd 2 is a pipe: stderr is the fallback */
        cr_assert(log_set_journal_socket("/nonexistent/journal.sock") == 0);
        log_info("lost journal \x1b[31m");
        cr_assert(log_set_journal_socket(sock_path) == 0);
        log_info("journal again");
        dup2(saved, STDERR_FILENO);
        close(saved);

        ssize_t n = read(p[0], buf, sizeof(buf) - 1);
        cr_assert(n > 0, "nothing on stderr");
        buf[n] = 0;
        char want[128];
        snprintf(want, sizeof(want), "test-log[%d]: info: lost journal ?[31m\n", (int) getpid());
        cr_expect_str_eq(buf, want, "control characters become '?'");
        cr_assert(receive(&d, 1000));
        expect_field(&d, "MESSAGE", "journal again");
        cr_expect(!receive(&d, 50), "the lost message must not arrive late");
        close(p[0]);
        close(p[1]);
}

Test(log, socket_path_bounds) {
        char path[200];

        memset(path, 'p', sizeof(path) - 1);
        path[sizeof(path) - 1] = 0;
        cr_expect_eq(log_set_journal_socket(path), -ENAMETOOLONG);
        cr_expect_eq(log_set_journal_socket(""), -ENAMETOOLONG);
        /* the old path still works */
        Datagram d;
        log_info("still here");
        cr_assert(receive(&d, 1000));
}

Test(log, sanitize) {
        char out[16];

        cr_expect_str_eq(log_sanitize("a\r\nb\x7f\xc3\xa9", 7, out, sizeof(out)), "a??b???");
        cr_expect_str_eq(log_sanitize("0123456789abcdefXYZ", 19, out, sizeof(out)), "0123456789ab...");
        cr_expect_str_eq(log_sanitize("", 0, out, sizeof(out)), "");
        cr_expect_str_eq(log_sanitize("abc", 3, out, 4), "abc");
}
