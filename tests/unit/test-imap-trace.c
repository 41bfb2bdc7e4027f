/*
 * test-imap-trace.c -- unit tests for common/imap-trace.c: the lines
 * imapproxyctl trace shows, and that no credential ever reaches them.
 *
 * DESCRIPTION
 *	Every transcript is fed whole, one byte at a time, and split at every
 *	offset; all three must emit the same lines. The password used in the
 *	transcripts ("Secr3tPw", also base64-encoded inside SASL messages)
 *	must appear in no emitted line.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "imap-trace.h"

#define OUT_MAX 16384

typedef struct Out {
        char text[OUT_MAX];
        size_t len;
} Out;

static void collect(void *userdata, IpcTraceDir dir, const char *line, bool truncated) {
        Out *o = userdata;
        int n = snprintf(o->text + o->len, sizeof(o->text) - o->len, "%c: %s%s\n",
                         dir == IPC_TRACE_CLIENT ? 'C' : dir == IPC_TRACE_SERVER ? 'S' : '*', line,
                         truncated ? " [...]" : "");
        cr_assert(n > 0 && (size_t) n < sizeof(o->text) - o->len, "output buffer too small");
        o->len += (size_t) n;
}

/* A transcript: a list of (direction, bytes) chunks. */
typedef struct Chunk {
        IpcTraceDir dir;
        const char *data;
} Chunk;

/* Feed the chunks; each chunk is cut into pieces of `piece` bytes (0: whole),
 * or, with split_at, into two pieces at that offset. */
static void run(const Chunk *c, size_t n, size_t piece, size_t split_at, Out *o) {
        ImapTrace t;
        memset(o, 0, sizeof(*o));
        imap_trace_init(&t, collect, o);
        for (size_t i = 0; i < n; i++) {
                const uint8_t *d = (const uint8_t *) c[i].data;
                size_t len = strlen(c[i].data);
                if (split_at) {
                        size_t a = split_at < len ? split_at : len;
                        imap_trace_feed(&t, c[i].dir, d, a);
                        imap_trace_feed(&t, c[i].dir, d + a, len - a);
                } else if (piece == 0)
                        imap_trace_feed(&t, c[i].dir, d, len);
                else
                        for (size_t k = 0; k < len; k += piece)
                                imap_trace_feed(&t, c[i].dir, d + k, len - k < piece ? len - k : piece);
        }
}

/* Run all the ways and check they agree; return the output. */
static void check(const Chunk *c, size_t n, const char *want) {
        Out whole, bytes, split;
        size_t maxlen = 0;

        run(c, n, 0, 0, &whole);
        cr_assert_str_eq(whole.text, want);
        run(c, n, 1, 0, &bytes);
        cr_assert_str_eq(bytes.text, want, "fed one byte at a time");
        for (size_t i = 0; i < n; i++)
                maxlen = strlen(c[i].data) > maxlen ? strlen(c[i].data) : maxlen;
        for (size_t at = 1; at < maxlen; at++) {
                run(c, n, 0, at, &split);
                cr_assert_str_eq(split.text, want, "split at %zu", at);
        }
        cr_assert_null(strstr(whole.text, "Secr3tPw"), "the password leaked");
        cr_assert_null(strstr(whole.text, "U2VjcjN0UHc"), "the base64 password leaked");
}

#define CHECK(want, ...)                                                                          \
        do {                                                                                      \
                const Chunk _c[] = { __VA_ARGS__ };                                               \
                check(_c, sizeof(_c) / sizeof(_c[0]), want);                                      \
        } while (0)
#define C(s) { IPC_TRACE_CLIENT, s }
#define S(s) { IPC_TRACE_SERVER, s }

Test(imap_trace, plain_commands_and_responses) {
        CHECK("C: a1 SELECT INBOX\nS: * 5 EXISTS\nS: a1 OK [READ-WRITE] Select completed.\n",
              C("a1 SELECT INBOX\r\n"), S("* 5 EXISTS\r\na1 OK [READ-WRITE] Select completed.\r\n"));
}

Test(imap_trace, login_atoms_redacted) {
        CHECK("C: a2 LOGIN [redacted]\nS: a2 BAD Unknown command\n", C("a2 LOGIN alice Secr3tPw\r\n"),
              S("a2 BAD Unknown command\r\n"));
}

Test(imap_trace, login_quoted_and_lowercase_redacted) {
        CHECK("C: x login [redacted]\n", C("x login \"alice\" \"Secr3tPw\"\r\n"));
}

Test(imap_trace, login_literal_redacted) {
        CHECK("C: a3 LOGIN [redacted]\n", C("a3 LOGIN {5}\r\nalice {8}\r\nSecr3tPw\r\n"));
        CHECK("C: a3 LOGIN [redacted]\n", C("a3 LOGIN alice {8+}\r\nSecr3tPw\r\n"));
}

Test(imap_trace, authenticate_with_initial_response) {
        /* base64("\0alice\0Secr3tPw") */
        CHECK("C: a4 AUTHENTICATE PLAIN [redacted]\nS: a4 NO no\nC: a5 NOOP\n",
              C("a4 AUTHENTICATE PLAIN AGFsaWNlAFNlY3IzdFB3\r\n"), S("a4 NO no\r\n"), C("a5 NOOP\r\n"));
}

Test(imap_trace, authenticate_exchange) {
        CHECK("C: a6 AUTHENTICATE LOGIN\nS: + VXNlcm5hbWU6\nC: [redacted]\nS: + UGFzc3dvcmQ6\nC: [redacted]\n"
              "S: a6 NO [CANNOT] no\nC: a7 NOOP\n",
              C("a6 AUTHENTICATE LOGIN\r\n"), S("+ VXNlcm5hbWU6\r\n"), C("YWxpY2U=\r\n"), S("+ UGFzc3dvcmQ6\r\n"),
              C("U2VjcjN0UHc=\r\n"), S("a6 NO [CANNOT] no\r\n"), C("a7 NOOP\r\n"));
}

Test(imap_trace, sasl_response_after_refusal_redacted) {
        /* the server refused AUTHENTICATE before the client sent its response */
        CHECK("C: a8 AUTHENTICATE PLAIN\nS: a8 BAD no\nC: [redacted]\nC: a9 LOGOUT\n",
              C("a8 AUTHENTICATE PLAIN\r\n"), S("a8 BAD no\r\n"), C("AGFsaWNlAFNlY3IzdFB3\r\na9 LOGOUT\r\n"));
}

Test(imap_trace, done_is_kept) {
        CHECK("C: i IDLE\nS: + idling\nC: DONE\nS: i OK done\n", C("i IDLE\r\n"), S("+ idling\r\n"), C("DONE\r\n"),
              S("i OK done\r\n"));
}

Test(imap_trace, literal_contents_never_shown) {
        CHECK("C: b1 APPEND INBOX (\\Seen) {24}[24 bytes]\nS: b1 OK done\n",
              C("b1 APPEND INBOX (\\Seen) {24}\r\nSubject: x\r\n\r\nSecr3tPw\r\n\r\n"), S("b1 OK done\r\n"));
        CHECK("S: * 1 FETCH (BODY[] {10}[10 bytes] FLAGS (\\Seen))\nS: f OK\n",
              S("* 1 FETCH (BODY[] {10}\r\nSecr3tPw\r\n FLAGS (\\Seen))\r\nf OK\r\n"));
        CHECK("S: * 1 FETCH (BINARY[] ~{8}[8 bytes])\n", S("* 1 FETCH (BINARY[] ~{8}\r\nSecr3tPw)\r\n"));
}

Test(imap_trace, control_bytes_replaced) {
        CHECK("C: c1 SELECT \"a?b?\"\n", C("c1 SELECT \"a\x1b" "b\x7f\"\r\n"));
}

Test(imap_trace, long_line_truncated) {
        static char line[4096], want[IPC_TRACE_LINE_MAX + 32];
        memset(line, 'x', 3000);
        memcpy(line, "d1 SEARCH ", 10);
        memcpy(line + 3000, "\r\n", 3);
        snprintf(want, sizeof(want), "C: %.*s [...]\n", IPC_TRACE_LINE_MAX - 1, line);
        CHECK(want, C(line));
}

Test(imap_trace, long_tag_hides_the_command) {
        /* a tag that fills the kept prefix: the command (maybe LOGIN) is unseen */
        static char line[4096];
        memset(line, 't', 1000);
        memcpy(line + 1000, " LOGIN alice Secr3tPw\r\n", 24);
        CHECK("C: [redacted]\n", C(line));
}

Test(imap_trace, huge_literal_announcement) {
        /* {N} with more digits than a uint64 holds is not a literal to us */
        CHECK("C: e1 APPEND INBOX {123456789012345678901}\n", C("e1 APPEND INBOX {123456789012345678901}\r\n"));
}
