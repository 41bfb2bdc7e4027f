/*
 * fuzz-imap-scanner.c -- libFuzzer target for common/imap-scanner.c
 *
 * DESCRIPTION
 *	The input is an IMAP byte stream (the corpus holds plain client
 *	commands and server responses). It is scanned in both modes with tight
 *	and with roomy limits, each time three ways: whole, in uneven chunks
 *	derived from the input, and (up to 1 KiB) one byte at a time. Every run must produce
 *	the same event digest (the scanner is resumable at any byte), and every
 *	event must satisfy the API invariants: consumed <= len, NEED_MORE
 *	consumes everything, errors are sticky and consume nothing, args are
 *	NUL-terminated within the capture budget, line_bytes <= max_line.
 *	The driver reacts like the session does: skip_line() after an error,
 *	raw-line mode after AUTHENTICATE/IDLE, reset() on a large sync literal.
 *	Any violation abort()s.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imap-scanner.h"
#include "macro.h"
#include "fuzz-check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const ImapScanLimits tight = {
        .max_line = 48, .max_literal = 40, .max_depth = 2, .capture_size = 20, .max_args = 5,
};
static const ImapScanLimits roomy = {
        .max_line = 4096, .max_literal = 1 << 20, .max_depth = 16,
        .capture_size = 1024, .max_args = 64,
};

static uint64_t mix(uint64_t h, uint64_t v) {
        h ^= v;
        h *= 1099511628211ull; /* FNV-1a prime */
        return h;
}

static uint64_t mix_bytes(uint64_t h, const char *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                h = mix(h, (unsigned char) p[i]);
        return h;
}

static uint64_t digest_line(uint64_t h, const ImapLine *l, const ImapScanLimits *lim) {
        size_t captured = 0;

        CHECK(l->n_args <= lim->max_args);
        h = mix(h, l->n_args);
        h = mix(h, l->args_truncated);
        h = mix(h, l->line_bytes);
        h = mix(h, l->n_literals);
        for (size_t i = 0; i < l->n_args; i++) {
                const ImapArg *a = &l->args[i];

                CHECK(a->type < _IMAP_ARG_TYPE_MAX);
                CHECK(a->str);
                CHECK(a->str[a->len] == '\0');
                CHECK(a->len <= a->full_len);
                CHECK(a->truncated == (a->len < a->full_len));
                if (a->type != IMAP_ARG_LIST_START && a->type != IMAP_ARG_LIST_END && a->len > 0)
                        captured += a->len + 1; /* in the capture buffer, with its NUL */
                if (a->type != IMAP_ARG_LITERAL)
                        CHECK(a->full_len <= lim->max_line);
                h = mix(h, a->type);
                h = mix(h, a->depth);
                h = mix(h, a->len);
                h = mix(h, a->full_len);
                h = mix(h, a->literal_flags);
                h = mix_bytes(h, a->str, a->len);
                (void) imap_arg_is(a, "LOGIN");
        }
        CHECK(captured <= lim->capture_size);
        return h;
}

/* chunking: 0 whole, 1 byte by byte, 2 uneven chunks derived from the data */
static uint64_t run(ImapScanMode mode, const ImapScanLimits *lim, const uint8_t *data, size_t size,
                    int chunking) {
        ImapScanner *s;
        uint64_t h = 14695981039346656037ull;
        size_t pos = 0, k = 0, errors = 0;

        CHECK(imap_scanner_new(mode, lim, &s) == 0);

        while (pos < size) {
                size_t chunk = size - pos;
                if (chunking == 1)
                        chunk = 1;
                else if (chunking == 2) {
                        /* not inside MIN(): it evaluates its arguments twice */
                        size_t want = (size_t) (data[k++ % size] % 23) + 1;
                        chunk = MIN(chunk, want);
                }
                size_t end = pos + chunk;

                for (;;) {
                        size_t n = SIZE_MAX;
                        int r = imap_scanner_feed(s, data + pos, end - pos, &n);

                        CHECK(n <= end - pos);
                        pos += n;
                        if (r == IMAP_SCAN_NEED_MORE) {
                                CHECK(pos == end);
                                break;
                        }
                        h = mix(h, (uint64_t) (int64_t) r);
                        h = mix(h, pos);
                        if (r < 0) {
                                size_t n2 = SIZE_MAX;
                                CHECK(imap_scanner_error(s) != IMAP_SCAN_OK);
                                CHECK(imap_scanner_error_text(s)[0] != '\0');
                                CHECK(imap_scanner_feed(s, data + pos, end - pos, &n2) == r);
                                CHECK(n2 == 0);
                                CHECK(!imap_scanner_at_line_start(s));
                                if (++errors > 64)
                                        goto done;
                                imap_scanner_skip_line(s);
                                continue;
                        }
                        if (r == IMAP_SCAN_LITERAL) {
                                uint64_t lsize;
                                unsigned flags;
                                const ImapLine *p = imap_scanner_partial_line(s);

                                imap_scanner_literal(s, &lsize, &flags);
                                CHECK(lsize <= lim->max_literal);
                                CHECK(imap_scanner_literal_remaining(s) == lsize);
                                CHECK(p->line_bytes <= lim->max_line);
                                h = mix(h, lsize);
                                h = mix(h, flags);
                                h = digest_line(h, p, lim);
                                /* the session refuses big sync literals from clients */
                                if (mode == IMAP_SCAN_CLIENT && !(flags & IMAP_LITERAL_NONSYNC) &&
                                    lsize > 20)
                                        imap_scanner_reset(s);
                                continue;
                        }
                        CHECK(r == IMAP_SCAN_LINE);
                        const ImapLine *l = imap_scanner_line(s);
                        CHECK(l->line_bytes <= lim->max_line);
                        CHECK(imap_scanner_at_line_start(s));
                        CHECK(imap_scanner_partial_line(s)->n_args == 0);
                        h = digest_line(h, l, lim);
                        if (mode == IMAP_SCAN_CLIENT && l->n_args >= 2 &&
                            (imap_arg_is(&l->args[1], "AUTHENTICATE") ||
                             imap_arg_is(&l->args[1], "IDLE")))
                                imap_scanner_expect_raw_line(s);
                        if (l->n_args >= 1 && imap_arg_is(&l->args[0], "WIPE"))
                                imap_scanner_wipe(s);
                }
        }
done:
        h = mix(h, imap_scanner_at_line_start(s));
        h = mix(h, imap_scanner_literal_remaining(s));
        imap_scanner_free(s);
        return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const ImapScanMode modes[] = { IMAP_SCAN_CLIENT, IMAP_SCAN_SERVER };
        static const ImapScanLimits *const limits[] = { &tight, &roomy };

        if (size > 64 * 1024)
                return 0;
        for (size_t m = 0; m < 2; m++)
                for (size_t l = 0; l < 2; l++) {
                        uint64_t whole = run(modes[m], limits[l], data, size, 0);
                        CHECK(run(modes[m], limits[l], data, size, 2) == whole);
                        /* byte by byte is half the cost of an execution: only
                         * for inputs up to 1 KiB (most of the corpus); the
                         * 1..23-byte chunks above split larger ones anywhere */
                        if (size <= 1024)
                                CHECK(run(modes[m], limits[l], data, size, 1) == whole);
                }
        return 0;
}
