/*
 * test-imap-scanner.c -- unit tests for common/imap-scanner.c
 *
 * DESCRIPTION
 *	Every case goes through expect_scan(): the input is scanned whole,
 *	one byte at a time, and split in two at every offset, and the event
 *	logs of all runs must be identical (the scanner is resumable at any
 *	byte). The log of the whole run is then compared with the expected
 *	text, one event per line:
 *
 *	  LINE@<offset after LF> bytes=<line_bytes> [lits=N] [args_truncated]: <args>
 *	  LITERAL@<offset after CRLF> size=N [+|-|~ flags] partial: <args so far>
 *	  ERROR@<offset of the offending byte> -E... "<error text>"
 *	  END@<offset> [line_start] [literal_remaining=N]
 *
 *	Args print as TYPE"text" (C-escaped), "(" and ")", with @depth when
 *	depth > 0, ~full_len when truncated, and + - ~ after LITERAL for
 *	{n+} {n-} ~{n}.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imap-scanner.h"

#define S(lit) (const uint8_t *) (lit), sizeof(lit) - 1

typedef struct Script {
        ImapScanMode mode;
        ImapScanLimits limits;
        unsigned raw_after_line;   /* expect_raw_line() after this LINE event (1-based) */
        unsigned reset_at_literal; /* reset() at this LITERAL event: a refused sync literal */
        bool skip_on_error;        /* skip_line() after an error and go on */
} Script;

static const ImapScanLimits default_limits = {
        .max_line = 200,
        .max_literal = 1000,
        .max_depth = 4,
        .capture_size = 256,
        .max_args = 32,
};

static const Script client = { .mode = IMAP_SCAN_CLIENT, .limits = default_limits };
static const Script server = { .mode = IMAP_SCAN_SERVER, .limits = default_limits };

static const char *errno_name(int r) {
        switch (r) {
        case -EMSGSIZE:
                return "-EMSGSIZE";
        case -EFBIG:
                return "-EFBIG";
        case -EBADMSG:
                return "-EBADMSG";
        case -ELOOP:
                return "-ELOOP";
        default:
                return "-E?";
        }
}

static void log_bytes(FILE *f, const char *p, size_t n) {
        fputc('"', f);
        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) p[i];
                if (c == '"' || c == '\\')
                        fprintf(f, "\\%c", c);
                else if (c >= 0x20 && c < 0x7f)
                        fputc(c, f);
                else
                        fprintf(f, "\\x%02x", c);
        }
        fputc('"', f);
}

static void log_args(FILE *f, const ImapLine *l) {
        static const char *const names[] = {
                [IMAP_ARG_ATOM] = "ATOM",       [IMAP_ARG_QUOTED] = "QUOTED",
                [IMAP_ARG_LITERAL] = "LITERAL", [IMAP_ARG_LIST_START] = "(",
                [IMAP_ARG_LIST_END] = ")",      [IMAP_ARG_CODE] = "CODE",
                [IMAP_ARG_TEXT] = "TEXT",
        };

        for (size_t i = 0; i < l->n_args; i++) {
                const ImapArg *a = &l->args[i];

                cr_assert(a->type < _IMAP_ARG_TYPE_MAX);
                cr_assert_not_null(a->str);
                cr_assert_eq(a->str[a->len], '\0', "captured text is NUL-terminated");
                cr_assert(a->len <= a->full_len);
                cr_assert_eq(a->truncated, a->len < a->full_len);

                fprintf(f, " %s", names[a->type]);
                if (a->type == IMAP_ARG_LITERAL) {
                        if (a->literal_flags & IMAP_LITERAL_MINUS)
                                fputc('-', f);
                        else if (a->literal_flags & IMAP_LITERAL_NONSYNC)
                                fputc('+', f);
                        if (a->literal_flags & IMAP_LITERAL_BINARY)
                                fputc('~', f);
                }
                if (a->depth > 0)
                        fprintf(f, "@%u", a->depth);
                if (a->type == IMAP_ARG_LIST_START || a->type == IMAP_ARG_LIST_END)
                        continue;
                log_bytes(f, a->str, a->len);
                if (a->truncated)
                        fprintf(f, "~%llu", (unsigned long long) a->full_len);
        }
}

/* Scans in[0..len) in chunks: of `step` bytes if step > 0, else split in two
 * at `split` if 0 < split < len, else whole. Returns the event log (free it). */
static char *scan_log(const Script *sc, const uint8_t *in, size_t len, size_t step, size_t split) {
        ImapScanner *s = NULL;
        char *buf = NULL;
        size_t bufsz = 0, pos = 0, feeds = 0;
        unsigned lines = 0, literals = 0;
        FILE *f;
        int r;

        r = imap_scanner_new(sc->mode, &sc->limits, &s);
        cr_assert_eq(r, 0);
        f = open_memstream(&buf, &bufsz);
        cr_assert_not_null(f);

        while (pos < len) {
                size_t end = step > 0 ? (len - pos > step ? pos + step : len)
                           : split > pos && split < len ? split
                                                        : len;

                for (;;) {
                        size_t n = 12345;

                        cr_assert(++feeds < 10 * len + 100, "scanner does not progress");
                        r = imap_scanner_feed(s, in + pos, end - pos, &n);
                        cr_assert(n <= end - pos);
                        pos += n;
                        if (r == IMAP_SCAN_NEED_MORE) {
                                cr_assert_eq(pos, end, "NEED_MORE must consume everything");
                                break;
                        }
                        if (r < 0) {
                                size_t n2 = 12345;
                                int r2 = imap_scanner_feed(s, in + pos, end - pos, &n2);
                                cr_assert_eq(r2, r, "errors are sticky");
                                cr_assert_eq(n2, 0);
                                cr_assert(!imap_scanner_at_line_start(s));
                                fprintf(f, "ERROR@%zu %s \"%s\"\n", pos, errno_name(r),
                                        imap_scanner_error_text(s));
                                if (!sc->skip_on_error)
                                        goto done;
                                imap_scanner_skip_line(s);
                                cr_assert_eq(imap_scanner_error(s), IMAP_SCAN_OK);
                                continue;
                        }
                        if (r == IMAP_SCAN_LITERAL) {
                                uint64_t size;
                                unsigned flags;

                                imap_scanner_literal(s, &size, &flags);
                                cr_assert_eq(imap_scanner_literal_remaining(s), size);
                                fprintf(f, "LITERAL@%zu size=%llu%s%s%s partial:", pos,
                                        (unsigned long long) size,
                                        flags & IMAP_LITERAL_NONSYNC ? " nonsync" : "",
                                        flags & IMAP_LITERAL_MINUS ? " minus" : "",
                                        flags & IMAP_LITERAL_BINARY ? " binary" : "");
                                log_args(f, imap_scanner_partial_line(s));
                                fputc('\n', f);
                                if (++literals == sc->reset_at_literal)
                                        imap_scanner_reset(s);
                                continue;
                        }
                        cr_assert_eq(r, IMAP_SCAN_LINE);
                        const ImapLine *l = imap_scanner_line(s);
                        cr_assert(l->line_bytes <= sc->limits.max_line);
                        cr_assert(imap_scanner_at_line_start(s));
                        cr_assert_eq(imap_scanner_partial_line(s)->n_args, 0);
                        fprintf(f, "LINE@%zu bytes=%zu", pos, l->line_bytes);
                        if (l->n_literals > 0)
                                fprintf(f, " lits=%u", l->n_literals);
                        if (l->args_truncated)
                                fputs(" args_truncated", f);
                        fputc(':', f);
                        log_args(f, l);
                        fputc('\n', f);
                        if (++lines == sc->raw_after_line)
                                imap_scanner_expect_raw_line(s);
                }
        }
        fprintf(f, "END@%zu", pos);
        if (imap_scanner_at_line_start(s))
                fputs(" line_start", f);
        if (imap_scanner_literal_remaining(s) > 0)
                fprintf(f, " literal_remaining=%llu",
                        (unsigned long long) imap_scanner_literal_remaining(s));
        fputc('\n', f);
done:
        fclose(f);
        imap_scanner_free(s);
        return buf;
}

/* Whole, byte by byte, split at every offset: all identical; returns the log. */
static char *scan_checked(const Script *sc, const uint8_t *in, size_t len) {
        char *whole = scan_log(sc, in, len, 0, 0);
        char *bytes = scan_log(sc, in, len, 1, 0);

        cr_assert_str_eq(bytes, whole, "byte-by-byte run differs from whole run");
        free(bytes);
        for (size_t k = 1; k < len; k++) {
                char *split = scan_log(sc, in, len, 0, k);
                cr_assert_str_eq(split, whole, "run split at %zu differs from whole run", k);
                free(split);
        }
        return whole;
}

#define expect_scan(sc, input, expected)                                                           \
        do {                                                                                      \
                char *_log = scan_checked((sc), S(input));                                        \
                cr_assert_str_eq(_log, (expected));                                               \
                free(_log);                                                                       \
        } while (0)

/* Scans a generated input the three ways. */
static char *scan_checked_buf(const Script *sc, const char *in, size_t len) {
        return scan_checked(sc, (const uint8_t *) in, len);
}

/* ---------------------------------------------------------------- framing */

Test(imap_scanner, simple_command) {
        expect_scan(&client, "a001 NOOP\r\n",
                    "LINE@11 bytes=11: ATOM\"a001\" ATOM\"NOOP\"\n"
                    "END@11 line_start\n");
        expect_scan(&client, "a SELECT INBOX (CONDSTORE)\r\n",
                    "LINE@28 bytes=28: ATOM\"a\" ATOM\"SELECT\" ATOM\"INBOX\" ( ATOM@1\"CONDSTORE\" )\n"
                    "END@28 line_start\n");
}

Test(imap_scanner, pipelined_commands_in_order) {
        expect_scan(&client, "a NOOP\r\nb CHECK\r\nc LOGOUT\r\n",
                    "LINE@8 bytes=8: ATOM\"a\" ATOM\"NOOP\"\n"
                    "LINE@17 bytes=9: ATOM\"b\" ATOM\"CHECK\"\n"
                    "LINE@27 bytes=10: ATOM\"c\" ATOM\"LOGOUT\"\n"
                    "END@27 line_start\n");
}

Test(imap_scanner, incomplete_line_needs_more) {
        expect_scan(&client, "a LOGIN us", "END@10\n");
}

Test(imap_scanner, lenient_spacing_and_bare_lf) {
        /* multiple spaces, trailing space, lone LF as line end (like Dovecot) */
        expect_scan(&client, "a   NOOP  \nb NOOP\r\n",
                    "LINE@11 bytes=11: ATOM\"a\" ATOM\"NOOP\"\n"
                    "LINE@19 bytes=8: ATOM\"b\" ATOM\"NOOP\"\n"
                    "END@19 line_start\n");
}

Test(imap_scanner, fetch_section_and_stray_paren) {
        /* framing is what matters: the section tokenises as atom ( atoms ) atom */
        expect_scan(&client, "a FETCH 1 BODY[HEADER.FIELDS (A B)]<0.10>\r\n",
                    "LINE@43 bytes=43: ATOM\"a\" ATOM\"FETCH\" ATOM\"1\" ATOM\"BODY[HEADER.FIELDS\" ("
                    " ATOM@1\"A\" ATOM@1\"B\" ) ATOM\"]<0.10>\"\n"
                    "END@43 line_start\n");
        /* a ")" at depth 0 is an atom; tokens need no separating space */
        expect_scan(&client, "a X ) \"q\"b(c)\r\n",
                    "LINE@15 bytes=15: ATOM\"a\" ATOM\"X\" ATOM\")\" QUOTED\"q\" ATOM\"b\" ( ATOM@1\"c\" )\n"
                    "END@15 line_start\n");
}

Test(imap_scanner, eight_bit_atom_bytes) {
        expect_scan(&client, "a LOGIN j\xc3\xb6rg \xff\x80\x01\r\n",
                    "LINE@19 bytes=19: ATOM\"a\" ATOM\"LOGIN\" ATOM\"j\\xc3\\xb6rg\" ATOM\"\\xff\\x80\\x01\"\n"
                    "END@19 line_start\n");
}

/* ----------------------------------------------------------------- quoted */

Test(imap_scanner, login_quoted_with_escapes) {
        expect_scan(&client, "a LOGIN \"jo\\\"e\" \"p\\\\ss w\xc3\xb6rd\"\r\n",
                    "LINE@31 bytes=31: ATOM\"a\" ATOM\"LOGIN\" QUOTED\"jo\\\"e\" QUOTED\"p\\\\ss w\\xc3\\xb6rd\"\n"
                    "END@31 line_start\n");

        /* the same through the API: unescaped, NUL-terminated, lengths */
        ImapScanner *s;
        size_t n;
        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &default_limits, &s), 0);
        cr_assert_eq(imap_scanner_feed(s, S("a LOGIN \"jo\\\"e\" \"p\\\\ss\"\r\n"), &n), IMAP_SCAN_LINE);
        const ImapLine *l = imap_scanner_line(s);
        cr_assert_eq(l->n_args, 4);
        cr_assert(imap_arg_is(&l->args[1], "login"));
        cr_assert(!imap_arg_is(&l->args[1], "LOG"));
        cr_assert_str_eq(l->args[2].str, "jo\"e");
        cr_assert_eq(l->args[2].len, 4);
        cr_assert_str_eq(l->args[3].str, "p\\ss");
        cr_assert_eq(l->args[3].full_len, 4);
        imap_scanner_wipe(s);
        cr_assert_eq(l->args[3].str[0], '\0', "wipe() clears the capture buffer");
        imap_scanner_free(s);
}

Test(imap_scanner, quoted_empty_and_specials) {
        expect_scan(&client, "a X \"\" \"({5}\r\n)\"\r\n",
                    "ERROR@12 -EBADMSG \"Invalid quoted string\"\n");
        expect_scan(&client, "a X \"\" \"({5})\"\r\n",
                    "LINE@16 bytes=16: ATOM\"a\" ATOM\"X\" QUOTED\"\" QUOTED\"({5})\"\n"
                    "END@16 line_start\n");
}

Test(imap_scanner, quoted_bad_escape) {
        expect_scan(&client, "a LOGIN \"a\\b\" x\r\n", "ERROR@11 -EBADMSG \"Invalid quoted string\"\n");
}

Test(imap_scanner, nul_in_quoted_string) {
        expect_scan(&client, "a LOGIN \"us\0er\" pw\r\n", "ERROR@11 -EBADMSG \"NUL byte in command\"\n");
        expect_scan(&client, "a LOGIN \"us\\\0er\" pw\r\n", "ERROR@12 -EBADMSG \"NUL byte in command\"\n");
}

Test(imap_scanner, nul_in_atom) {
        expect_scan(&client, "a LO\0GIN\r\n", "ERROR@4 -EBADMSG \"NUL byte in command\"\n");
        expect_scan(&client, "\0", "ERROR@0 -EBADMSG \"NUL byte in command\"\n");
}

Test(imap_scanner, cr_without_lf) {
        expect_scan(&client, "a NOOP\rx\r\n", "ERROR@7 -EBADMSG \"CR without LF\"\n");
        expect_scan(&client, "a NOOP\r\r\n", "ERROR@7 -EBADMSG \"CR without LF\"\n");
        expect_scan(&client, "a {5}\rx", "ERROR@6 -EBADMSG \"CR without LF\"\n");
}

/* --------------------------------------------------------------- literals */

Test(imap_scanner, login_sync_literals) {
        expect_scan(&client, "a LOGIN {4}\r\njoe1 {6}\r\nsec\0t\n\r\n",
                    "LITERAL@13 size=4 partial: ATOM\"a\" ATOM\"LOGIN\"\n"
                    "LITERAL@23 size=6 partial: ATOM\"a\" ATOM\"LOGIN\" LITERAL\"joe1\"\n"
                    "LINE@31 bytes=21 lits=2: ATOM\"a\" ATOM\"LOGIN\" LITERAL\"joe1\" LITERAL\"sec\\x00t\\x0a\"\n"
                    "END@31 line_start\n");
}

Test(imap_scanner, login_nonsync_literals) {
        expect_scan(&client, "a LOGIN {4+}\r\njoe1 {6-}\r\nsecret\r\n",
                    "LITERAL@14 size=4 nonsync partial: ATOM\"a\" ATOM\"LOGIN\"\n"
                    "LITERAL@25 size=6 nonsync minus partial: ATOM\"a\" ATOM\"LOGIN\" LITERAL+\"joe1\"\n"
                    "LINE@33 bytes=23 lits=2: ATOM\"a\" ATOM\"LOGIN\" LITERAL+\"joe1\" LITERAL-\"secret\"\n"
                    "END@33 line_start\n");
}

Test(imap_scanner, append_binary_literal_with_nul_and_8bit) {
        expect_scan(&client, "a APPEND INBOX (\\Seen) ~{7}\r\n\0\xff\r\n\x80z)\r\n",
                    "LITERAL@29 size=7 binary partial: ATOM\"a\" ATOM\"APPEND\" ATOM\"INBOX\" ( ATOM@1\"\\\\Seen\" )\n"
                    "LINE@38 bytes=31 lits=1: ATOM\"a\" ATOM\"APPEND\" ATOM\"INBOX\" ( ATOM@1\"\\\\Seen\" )"
                    " LITERAL~\"\\x00\\xff\\x0d\\x0a\\x80z)\"\n"
                    "END@38 line_start\n");
        expect_scan(&client, "a APPEND INBOX ~{2+}\r\nab\r\n",
                    "LITERAL@22 size=2 nonsync binary partial: ATOM\"a\" ATOM\"APPEND\" ATOM\"INBOX\"\n"
                    "LINE@26 bytes=24 lits=1: ATOM\"a\" ATOM\"APPEND\" ATOM\"INBOX\" LITERAL+~\"ab\"\n"
                    "END@26 line_start\n");
}

Test(imap_scanner, zero_length_literal) {
        expect_scan(&client, "a LOGIN {0}\r\n {3}\r\nabc\r\n",
                    "LITERAL@13 size=0 partial: ATOM\"a\" ATOM\"LOGIN\"\n"
                    "LITERAL@19 size=3 partial: ATOM\"a\" ATOM\"LOGIN\" LITERAL\"\"\n"
                    "LINE@24 bytes=21 lits=2: ATOM\"a\" ATOM\"LOGIN\" LITERAL\"\" LITERAL\"abc\"\n"
                    "END@24 line_start\n");
        /* a zero-length literal at the end of the input: still pending, no bytes to consume */
        expect_scan(&client, "a X {0}\r\n",
                    "LITERAL@9 size=0 partial: ATOM\"a\" ATOM\"X\"\n"
                    "END@9\n");
}

Test(imap_scanner, multiple_literals_in_lists) {
        expect_scan(&client, "a X ({1}\r\na {2}\r\nbc ({0}\r\n)) {1}\r\nd\r\n",
                    "LITERAL@10 size=1 partial: ATOM\"a\" ATOM\"X\" (\n"
                    "LITERAL@17 size=2 partial: ATOM\"a\" ATOM\"X\" ( LITERAL@1\"a\"\n"
                    "LITERAL@26 size=0 partial: ATOM\"a\" ATOM\"X\" ( LITERAL@1\"a\" LITERAL@1\"bc\" (@1\n"
                    "LITERAL@34 size=1 partial: ATOM\"a\" ATOM\"X\" ( LITERAL@1\"a\" LITERAL@1\"bc\" (@1 LITERAL@2\"\" )@1 )\n"
                    "LINE@37 bytes=33 lits=4: ATOM\"a\" ATOM\"X\" ( LITERAL@1\"a\" LITERAL@1\"bc\" (@1"
                    " LITERAL@2\"\" )@1 ) LITERAL\"d\"\n"
                    "END@37 line_start\n");
}

Test(imap_scanner, literal_content_does_not_count_against_max_line) {
        Script sc = client;
        sc.limits.max_line = 16;
        expect_scan(&sc, "a X {20}\r\n01234567890123456789\r\n",
                    "LITERAL@10 size=20 partial: ATOM\"a\" ATOM\"X\"\n"
                    "LINE@32 bytes=12 lits=1: ATOM\"a\" ATOM\"X\" LITERAL\"01234567890123456789\"\n"
                    "END@32 line_start\n");
}

Test(imap_scanner, literal_pending_state) {
        expect_scan(&client, "a APPEND X {10}\r\n0123",
                    "LITERAL@17 size=10 partial: ATOM\"a\" ATOM\"APPEND\" ATOM\"X\"\n"
                    "END@21 literal_remaining=6\n");
}

Test(imap_scanner, brace_tokens_that_are_atoms) {
        /* not at the line end, or not of the literal form: atoms */
        expect_scan(&client, "a X {abc} {5}x {5} ~x {} \"q\"{5}\r\n",
                    "LITERAL@33 size=5 partial: ATOM\"a\" ATOM\"X\" ATOM\"{abc}\" ATOM\"{5}x\" ATOM\"{5}\""
                    " ATOM\"~x\" ATOM\"{}\" QUOTED\"q\"\n"
                    "END@33 literal_remaining=5\n");
        expect_scan(&client, "a X x{5} {5\r\n",
                    "LINE@13 bytes=13: ATOM\"a\" ATOM\"X\" ATOM\"x{5}\" ATOM\"{5\"\n"
                    "END@13 line_start\n");
}

Test(imap_scanner, malformed_literal_at_line_end) {
        expect_scan(&client, "a X {abc}\r\n", "ERROR@10 -EBADMSG \"Invalid literal\"\n");
        expect_scan(&client, "a X {}\r\n", "ERROR@7 -EBADMSG \"Invalid literal\"\n");
        expect_scan(&client, "a X {5+-}\r\n", "ERROR@10 -EBADMSG \"Invalid literal\"\n");
        expect_scan(&client, "a X {5}}\n", "ERROR@8 -EBADMSG \"Invalid literal\"\n");
}

Test(imap_scanner, literal_size_overflow) {
        expect_scan(&client, "a LOGIN {18446744073709551616}\r\n",
                    "ERROR@31 -EFBIG \"Literal too big\"\n");
        expect_scan(&client, "a LOGIN {99999999999999999999999999999999+}\r\n",
                    "ERROR@44 -EFBIG \"Literal too big\"\n");
        Script sc = client;
        sc.limits.max_literal = UINT64_MAX;
        expect_scan(&sc, "a X {18446744073709551615}\r\n",
                    "LITERAL@28 size=18446744073709551615 partial: ATOM\"a\" ATOM\"X\"\n"
                    "END@28 literal_remaining=18446744073709551615\n");
        expect_scan(&sc, "a X {18446744073709551616}\r\n", "ERROR@27 -EFBIG \"Literal too big\"\n");
}

Test(imap_scanner, literal_above_max_literal) {
        expect_scan(&client, "a APPEND X {1000}\r\n",
                    "LITERAL@19 size=1000 partial: ATOM\"a\" ATOM\"APPEND\" ATOM\"X\"\n"
                    "END@19 literal_remaining=1000\n");
        expect_scan(&client, "a APPEND X {1001}\r\n", "ERROR@18 -EFBIG \"Literal too big\"\n");
        expect_scan(&client, "a APPEND X {0001001}\n", "ERROR@20 -EFBIG \"Literal too big\"\n");
}

Test(imap_scanner, nonsync_literal_above_limit) {
        expect_scan(&client, "a APPEND X {1001+}\r\n", "ERROR@19 -EFBIG \"Literal too big\"\n");
        expect_scan(&client, "a APPEND X ~{4096-}\r\n", "ERROR@20 -EFBIG \"Literal too big\"\n");
}

Test(imap_scanner, refused_sync_literal_then_reset) {
        /* the session answers the LITERAL event with a tagged NO and resets; the
         * client, which waits for "+", sends its next command */
        Script sc = client;
        sc.reset_at_literal = 1;
        expect_scan(&sc, "a APPEND INBOX {500}\r\nb NOOP\r\n",
                    "LITERAL@22 size=500 partial: ATOM\"a\" ATOM\"APPEND\" ATOM\"INBOX\"\n"
                    "LINE@30 bytes=8: ATOM\"b\" ATOM\"NOOP\"\n"
                    "END@30 line_start\n");
}

/* ------------------------------------------------------------------ limits */

Test(imap_scanner, depth_limit) {
        expect_scan(&client, "a X ((((a))))\r\n",
                    "LINE@15 bytes=15: ATOM\"a\" ATOM\"X\" ( (@1 (@2 (@3 ATOM@4\"a\" )@3 )@2 )@1 )\n"
                    "END@15 line_start\n");
        expect_scan(&client, "a X (((((a)))))\r\n", "ERROR@8 -ELOOP \"Too deep nesting\"\n");
        /* depth is per line */
        expect_scan(&client, "a X ((((\r\nb X ((((a))))\r\n",
                    "LINE@10 bytes=10: ATOM\"a\" ATOM\"X\" ( (@1 (@2 (@3\n"
                    "LINE@25 bytes=15: ATOM\"b\" ATOM\"X\" ( (@1 (@2 (@3 ATOM@4\"a\" )@3 )@2 )@1 )\n"
                    "END@25 line_start\n");
}

Test(imap_scanner, max_line_exact_and_one_more) {
        Script sc = client;
        sc.limits.max_line = 16;
        expect_scan(&sc, "a X 0123456789\r\n",
                    "LINE@16 bytes=16: ATOM\"a\" ATOM\"X\" ATOM\"0123456789\"\n"
                    "END@16 line_start\n");
        expect_scan(&sc, "a X 01234567890\r\n", "ERROR@16 -EMSGSIZE \"Line too long\"\n");
        expect_scan(&sc, "a X 012345678\r\r\n", "ERROR@14 -EBADMSG \"CR without LF\"\n");
        /* literal headers count, literal contents do not */
        expect_scan(&sc, "a X {1}\r\nZ 0123\r\n",
                    "LITERAL@9 size=1 partial: ATOM\"a\" ATOM\"X\"\n"
                    "LINE@17 bytes=16 lits=1: ATOM\"a\" ATOM\"X\" LITERAL\"Z\" ATOM\"0123\"\n"
                    "END@17 line_start\n");
        expect_scan(&sc, "a X {1}\r\nZ 01234\r\n",
                    "LITERAL@9 size=1 partial: ATOM\"a\" ATOM\"X\"\n"
                    "ERROR@17 -EMSGSIZE \"Line too long\"\n");
}

Test(imap_scanner, megabyte_line_fails_early) {
        const size_t big = 1024 * 1024;
        uint8_t *in = malloc(big);
        ImapScanner *s;
        size_t n;

        cr_assert_not_null(in);
        memset(in, 'a', big);
        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &default_limits, &s), 0);
        cr_assert_eq(imap_scanner_feed(s, in, big, &n), -EMSGSIZE);
        cr_assert_eq(n, default_limits.max_line, "stops at the first byte beyond max_line");
        cr_assert_eq(imap_scanner_error(s), IMAP_SCAN_ERR_LINE_TOO_LONG);
        cr_assert_str_eq(imap_scanner_error_text(s), "Line too long");

        /* also when the line arrives in small pieces */
        imap_scanner_reset(s);
        size_t off = 0;
        int r = 0;
        while (off < big && r >= 0) {
                r = imap_scanner_feed(s, in + off, 100, &n);
                off += n;
        }
        cr_assert_eq(r, -EMSGSIZE);
        cr_assert_eq(off, default_limits.max_line);
        imap_scanner_free(s);
        free(in);
}

Test(imap_scanner, args_truncated_and_capture_truncated) {
        Script sc = client;
        sc.limits.max_args = 4;
        sc.limits.capture_size = 12;
        /* "a\0" + "LOGIN\0" use 8 bytes; "alice" gets 3 bytes + NUL; then the buffer is full */
        expect_scan(&sc, "a LOGIN alice \"\" secret\r\n",
                    "LINE@25 bytes=25 args_truncated: ATOM\"a\" ATOM\"LOGIN\" ATOM\"ali\"~5 QUOTED\"\"\n"
                    "END@25 line_start\n");
        sc.limits.max_args = 8;
        expect_scan(&sc, "a LOGIN alice {6}\r\nsecret (x)\r\n",
                    "LITERAL@19 size=6 partial: ATOM\"a\" ATOM\"LOGIN\" ATOM\"ali\"~5\n"
                    "LINE@31 bytes=25 lits=1: ATOM\"a\" ATOM\"LOGIN\" ATOM\"ali\"~5 LITERAL\"\"~6 ("
                    " ATOM@1\"\"~1 )\n"
                    "END@31 line_start\n");
        /* framing continues with max_args = 0 and no capture at all */
        sc.limits.max_args = 0;
        sc.limits.capture_size = 0;
        expect_scan(&sc, "a LOGIN {3}\r\nabc x\r\nb NOOP\r\n",
                    "LITERAL@13 size=3 partial:\n"
                    "LINE@20 bytes=17 lits=1 args_truncated:\n"
                    "LINE@28 bytes=8 args_truncated:\n"
                    "END@28 line_start\n");
}

Test(imap_scanner, truncated_arg_is_never_a_keyword) {
        ImapScanLimits lim = default_limits;
        ImapScanner *s;
        size_t n;

        lim.capture_size = 5; /* "a\0" + "LOG" */
        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &lim, &s), 0);
        cr_assert_eq(imap_scanner_feed(s, S("a LOGIN x y\r\n"), &n), IMAP_SCAN_LINE);
        const ImapLine *l = imap_scanner_line(s);
        cr_assert_str_eq(l->args[1].str, "LO");
        cr_assert(l->args[1].truncated);
        cr_assert(!imap_arg_is(&l->args[1], "LO"));
        cr_assert(!imap_arg_is(&l->args[1], "LOGIN"));
        cr_assert_str_eq(l->args[2].str, "");
        imap_scanner_free(s);
}

/* ------------------------------------------------------------ server mode */

Test(imap_scanner, server_tagged_ok_with_code_and_brace_text) {
        expect_scan(&server, "a1 OK [CAPABILITY IMAP4rev1 LITERAL+] Logged in {5}\r\n",
                    "LINE@53 bytes=53: ATOM\"a1\" ATOM\"OK\" CODE\"CAPABILITY IMAP4rev1 LITERAL+\""
                    " TEXT\"Logged in {5}\"\n"
                    "END@53 line_start\n");
        expect_scan(&server, "a1 no \"quoted\" (paren {5}\r\n",
                    "LINE@27 bytes=27: ATOM\"a1\" ATOM\"no\" TEXT\"\\\"quoted\\\" (paren {5}\"\n"
                    "END@27 line_start\n");
}

Test(imap_scanner, server_untagged_ok_alert) {
        expect_scan(&server, "* OK [ALERT] text\r\n* BYE [UNAVAILABLE]\r\n* PREAUTH [x\r\n* BAD\r\n",
                    "LINE@19 bytes=19: ATOM\"*\" ATOM\"OK\" CODE\"ALERT\" TEXT\"text\"\n"
                    "LINE@40 bytes=21: ATOM\"*\" ATOM\"BYE\" CODE\"UNAVAILABLE\"\n"
                    "LINE@54 bytes=14: ATOM\"*\" ATOM\"PREAUTH\" CODE\"x\"\n"
                    "LINE@61 bytes=7: ATOM\"*\" ATOM\"BAD\"\n"
                    "END@61 line_start\n");
        /* code stops at the first "]"; text after it need not start with SP */
        expect_scan(&server, "* OK [BADCHARSET (\"a]b\")]x [y]\r\n",
                    "LINE@32 bytes=32: ATOM\"*\" ATOM\"OK\" CODE\"BADCHARSET (\\\"a\" TEXT\"b\\\")]x [y]\"\n"
                    "END@32 line_start\n");
}

Test(imap_scanner, server_continuation) {
        expect_scan(&server, "+ idling\r\n+\r\n+ {5}\r\n+ \r\n",
                    "LINE@10 bytes=10: ATOM\"+\" TEXT\"idling\"\n"
                    "LINE@13 bytes=3: ATOM\"+\"\n"
                    "LINE@20 bytes=7: ATOM\"+\" TEXT\"{5}\"\n"
                    "LINE@24 bytes=4: ATOM\"+\"\n"
                    "END@24 line_start\n");
}

Test(imap_scanner, server_resp_text_errors) {
        expect_scan(&server, "* OK [ALERT] a\0b\r\n", "ERROR@14 -EBADMSG \"NUL byte in command\"\n");
        expect_scan(&server, "* OK a\rb\r\n", "ERROR@7 -EBADMSG \"CR without LF\"\n");
}

Test(imap_scanner, server_fetch_literal) {
        expect_scan(&server, "* 1 FETCH (BODY[] {5}\r\nhello)\r\n",
                    "LITERAL@23 size=5 partial: ATOM\"*\" ATOM\"1\" ATOM\"FETCH\" ( ATOM@1\"BODY[]\"\n"
                    "LINE@31 bytes=26 lits=1: ATOM\"*\" ATOM\"1\" ATOM\"FETCH\" ( ATOM@1\"BODY[]\""
                    " LITERAL@1\"hello\" )\n"
                    "END@31 line_start\n");
        expect_scan(&server, "* LIST () \"/\" {5}\r\nINBOX\r\n* 3 EXISTS\r\n",
                    "LITERAL@19 size=5 partial: ATOM\"*\" ATOM\"LIST\" ( ) QUOTED\"/\"\n"
                    "LINE@26 bytes=21 lits=1: ATOM\"*\" ATOM\"LIST\" ( ) QUOTED\"/\" LITERAL\"INBOX\"\n"
                    "LINE@38 bytes=12: ATOM\"*\" ATOM\"3\" ATOM\"EXISTS\"\n"
                    "END@38 line_start\n");
}

Test(imap_scanner, client_mode_has_no_resp_text) {
        expect_scan(&client, "a OK [x] {2}\r\nab\r\n",
                    "LITERAL@14 size=2 partial: ATOM\"a\" ATOM\"OK\" ATOM\"[x]\"\n"
                    "LINE@18 bytes=16 lits=1: ATOM\"a\" ATOM\"OK\" ATOM\"[x]\" LITERAL\"ab\"\n"
                    "END@18 line_start\n");
}

/* --------------------------------------------------------- raw-line mode */

Test(imap_scanner, raw_line_mode) {
        Script sc = client;
        sc.raw_after_line = 1;
        expect_scan(&sc, "a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nb NOOP\r\n",
                    "LINE@22 bytes=22: ATOM\"a\" ATOM\"AUTHENTICATE\" ATOM\"PLAIN\"\n"
                    "LINE@44 bytes=22: TEXT\"AGFsaWNlAHNlY3JldA==\"\n"
                    "LINE@52 bytes=8: ATOM\"b\" ATOM\"NOOP\"\n"
                    "END@52 line_start\n");
        /* no quoting, no literals, empty line is an empty TEXT */
        expect_scan(&sc, "a IDLE\r\n\"(x {5}\r\n", "LINE@8 bytes=8: ATOM\"a\" ATOM\"IDLE\"\n"
                                                  "LINE@17 bytes=9: TEXT\"\\\"(x {5}\"\n"
                                                  "END@17 line_start\n");
        expect_scan(&sc, "a AUTHENTICATE X\r\n\r\n",
                    "LINE@18 bytes=18: ATOM\"a\" ATOM\"AUTHENTICATE\" ATOM\"X\"\n"
                    "LINE@20 bytes=2: TEXT\"\"\n"
                    "END@20 line_start\n");
}

Test(imap_scanner, raw_line_errors_and_limit) {
        Script sc = client;
        sc.raw_after_line = 1;
        sc.limits.max_line = 8;
        expect_scan(&sc, "a X\r\nab\0\r\n", "LINE@5 bytes=5: ATOM\"a\" ATOM\"X\"\n"
                                           "ERROR@7 -EBADMSG \"NUL byte in command\"\n");
        expect_scan(&sc, "a X\r\nab\rc\r\n", "LINE@5 bytes=5: ATOM\"a\" ATOM\"X\"\n"
                                             "ERROR@8 -EBADMSG \"CR without LF\"\n");
        expect_scan(&sc, "a X\r\n0123456\r\n", "LINE@5 bytes=5: ATOM\"a\" ATOM\"X\"\n"
                                               "ERROR@13 -EMSGSIZE \"Line too long\"\n");
}

Test(imap_scanner, raw_line_only_at_line_start) {
        ImapScanner *s;
        size_t n;

        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &default_limits, &s), 0);
        cr_assert(imap_scanner_at_line_start(s));
        cr_assert_eq(imap_scanner_feed(s, S("a X"), &n), IMAP_SCAN_NEED_MORE);
        cr_assert(!imap_scanner_at_line_start(s));
        imap_scanner_expect_raw_line(s); /* ignored mid-line */
        cr_assert_eq(imap_scanner_feed(s, S(" \"y\"\r\n"), &n), IMAP_SCAN_LINE);
        cr_assert_eq(imap_scanner_line(s)->args[2].type, IMAP_ARG_QUOTED);
        imap_scanner_expect_raw_line(s);
        cr_assert_eq(imap_scanner_feed(s, S("\"y\"\r\n"), &n), IMAP_SCAN_LINE);
        cr_assert_eq(imap_scanner_line(s)->n_args, 1);
        cr_assert_str_eq(imap_scanner_line(s)->args[0].str, "\"y\"");
        /* reset() drops a pending raw-line request */
        imap_scanner_expect_raw_line(s);
        imap_scanner_reset(s);
        cr_assert_eq(imap_scanner_feed(s, S("\"y\"\r\n"), &n), IMAP_SCAN_LINE);
        cr_assert_eq(imap_scanner_line(s)->args[0].type, IMAP_ARG_QUOTED);
        imap_scanner_free(s);
}

/* ---------------------------------------------------------------- recovery */

Test(imap_scanner, skip_line_recovery) {
        Script sc = client;
        sc.skip_on_error = true;
        expect_scan(&sc, "a LOGIN \"us\0er\" pw\r\nb NOOP\r\n",
                    "ERROR@11 -EBADMSG \"NUL byte in command\"\n"
                    "LINE@28 bytes=8: ATOM\"b\" ATOM\"NOOP\"\n"
                    "END@28 line_start\n");
        /* an error found on the LF itself: that LF ends the skipped line */
        expect_scan(&sc, "a X {abc}\r\nb X {99999}\r\nc NOOP\r\n",
                    "ERROR@10 -EBADMSG \"Invalid literal\"\n"
                    "ERROR@23 -EFBIG \"Literal too big\"\n"
                    "LINE@32 bytes=8: ATOM\"c\" ATOM\"NOOP\"\n"
                    "END@32 line_start\n");
        /* skipping ignores literals and limits */
        sc.limits.max_line = 10;
        expect_scan(&sc, "a 0123456789 {3}\r\nb\r\n",
                    "ERROR@10 -EMSGSIZE \"Line too long\"\n"
                    "LINE@21 bytes=3: ATOM\"b\"\n"
                    "END@21 line_start\n");
}

Test(imap_scanner, reset_clears_error_and_partial_line) {
        ImapScanner *s;
        size_t n;

        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &default_limits, &s), 0);
        cr_assert_str_eq(imap_scanner_error_text(s), "");
        cr_assert_eq(imap_scanner_feed(s, S("a NOOP\r\0"), &n), -EBADMSG);
        cr_assert_eq(n, 7);
        cr_assert_eq(imap_scanner_error(s), IMAP_SCAN_ERR_CR_WITHOUT_LF);
        cr_assert_str_eq(imap_scanner_error_text(s), "CR without LF");
        cr_assert_eq(imap_scanner_feed(s, S("b NOOP\r\n"), &n), -EBADMSG);
        cr_assert_eq(n, 0);
        imap_scanner_reset(s);
        cr_assert(imap_scanner_at_line_start(s));
        cr_assert_eq(imap_scanner_error(s), IMAP_SCAN_OK);
        cr_assert_eq(imap_scanner_feed(s, S("b NOOP\r\n"), &n), IMAP_SCAN_LINE);
        cr_assert_eq(n, 8);
        cr_assert_eq(imap_scanner_line(s)->n_args, 2);
        imap_scanner_free(s);
}

/* ---------------------------------------------------------------- API edges */

Test(imap_scanner, partial_line_at_literal_event) {
        ImapScanner *s;
        size_t n;
        uint64_t size;
        unsigned flags;

        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &default_limits, &s), 0);
        cr_assert_eq(imap_scanner_partial_line(s)->n_args, 0);
        cr_assert_eq(imap_scanner_feed(s, S("a APPEND INBOX {500}\r\nxyz"), &n), IMAP_SCAN_LITERAL);
        cr_assert_eq(n, 22);
        imap_scanner_literal(s, &size, &flags);
        cr_assert_eq(size, 500);
        cr_assert_eq(flags, 0);
        const ImapLine *p = imap_scanner_partial_line(s);
        cr_assert_eq(p->n_args, 3, "the announced literal is not yet among the args");
        cr_assert(imap_arg_is(&p->args[1], "append"));
        cr_assert_eq(p->n_literals, 0);
        cr_assert_eq(p->line_bytes, 22);
        cr_assert(!imap_scanner_at_line_start(s));
        cr_assert_eq(imap_scanner_literal_remaining(s), 500);
        cr_assert_eq(imap_scanner_feed(s, (const uint8_t *) "xyz", 3, &n), IMAP_SCAN_NEED_MORE);
        cr_assert_eq(imap_scanner_literal_remaining(s), 497);
        imap_scanner_free(s);
}

Test(imap_scanner, new_rejects_bad_limits) {
        ImapScanner *s = NULL;
        ImapScanLimits lim = default_limits;

        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, NULL, &s), -EINVAL);
        lim.max_line = 0;
        cr_assert_eq(imap_scanner_new(IMAP_SCAN_CLIENT, &lim, &s), -EINVAL);
        cr_assert_eq(imap_scanner_new((ImapScanMode) 7, &default_limits, &s), -EINVAL);
        cr_assert_null(s, "ret is written only on success");
        cr_assert_null(imap_scanner_free(NULL));
}

Test(imap_scanner, arg_is_only_for_atoms_and_quoted) {
        ImapArg a = { .type = IMAP_ARG_LITERAL, .str = "LOGIN", .len = 5, .full_len = 5 };

        cr_assert(!imap_arg_is(&a, "LOGIN"));
        a.type = IMAP_ARG_QUOTED;
        cr_assert(imap_arg_is(&a, "login"));
        a.type = IMAP_ARG_ATOM;
        cr_assert(imap_arg_is(&a, "LoGiN"));
        cr_assert(!imap_arg_is(&a, "LOGINX"));
        cr_assert(!imap_arg_is(NULL, "LOGIN"));
}

Test(imap_scanner, long_generated_command_equivalence) {
        /* a realistic mix, checked the three ways */
        static const char in[] = "A1 LOGIN {5+}\r\nalice \"p\\\\w\\\"d\"\r\n"
                                 "A2 APPEND Sent (\\Seen $Label) \"01-Jan-2024 00:00:00 +0000\" ~{12}\r\n"
                                 "Hi\0\r\nthere\xff\xfe\r\n"
                                 "A3 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)])\r\n"
                                 "A4 LOGOUT\r\n";
        char *log = scan_checked_buf(&client, in, sizeof(in) - 1);
        cr_assert(strstr(log, "LITERAL~\"Hi\\x00\\x0d\\x0athere\\xff\\xfe\""));
        cr_assert(strstr(log, "ATOM\"A4\" ATOM\"LOGOUT\"\nEND@"));
        free(log);
}
