/*
 * imap-scanner.c -- pure, resumable IMAP line/token scanner for client
 * commands and server responses
 *
 * SYNOPSIS
 *	int imap_scanner_new(ImapScanMode mode, const ImapScanLimits *limits, ImapScanner **ret);
 *	int imap_scanner_feed(ImapScanner *s, const uint8_t *buf, size_t len, size_t *ret_consumed);
 *	const ImapLine *imap_scanner_line(const ImapScanner *s);
 *	const ImapLine *imap_scanner_partial_line(const ImapScanner *s);
 *	void imap_scanner_literal(const ImapScanner *s, uint64_t *ret_size, unsigned *ret_flags);
 *	void imap_scanner_reset(ImapScanner *s);
 *	void imap_scanner_skip_line(ImapScanner *s);
 *	void imap_scanner_expect_raw_line(ImapScanner *s);
 * DESCRIPTION
 *	Finds where IMAP lines end (CRLF outside literals) and where literals
 *	are, and decodes the tokens of each line into a fixed capture buffer.
 *	All position state lives in the struct, so input may be split at any
 *	byte: whole, byte by byte or in any chunks, the same events come out
 *	at the same stream offsets with the same args.
 *
 *	Tokens: atom (any run of bytes but SP ( ) " CR LF NUL, 8-bit allowed),
 *	quoted string ("..." with \" and \\ unescaped), literal ({n}, {n+},
 *	{n-}, ~{n}, ~{n+}: a token of exactly that form directly followed by
 *	CRLF, or by a lone LF as Dovecot accepts it), "(" and ")". Tokens need
 *	no separating SP, and runs of SP are accepted. A ")" at depth 0 is an
 *	atom. A "{...}" token not at the end of its line, or not of the digit
 *	form, is an atom; but a malformed one that ends in "}" directly before
 *	the line end is IMAP_SCAN_ERR_BAD_LITERAL, because the peer clearly
 *	meant a literal and we must not guess its framing.
 *
 *	Server mode: when token 0 is any token and token 1 is an atom at depth
 *	0 equal to OK/NO/BAD/BYE/PREAUTH, the rest of the line after one
 *	optional SP is resp-text: an optional "[...]" (one IMAP_ARG_CODE, raw,
 *	ending at the first "]" or at the line end), one optional SP, then the
 *	rest as one IMAP_ARG_TEXT, raw, only if it is not empty. When token 0
 *	is the atom "+" (continuation request), the rest after one optional SP
 *	is one IMAP_ARG_TEXT, raw, only if not empty. No literal detection in
 *	resp-text. Everything else is tokenised like a client command.
 *
 *	Raw-line mode (imap_scanner_expect_raw_line()): the next line without
 *	its CRLF is one IMAP_ARG_TEXT, always present, possibly empty.
 *
 *	Events: IMAP_SCAN_LITERAL right after the CRLF of a literal header;
 *	the next imap_scanner_literal_remaining() bytes fed are the literal's
 *	content (captured as an IMAP_ARG_LITERAL arg once complete), then the
 *	same line goes on. IMAP_SCAN_LINE right after the LF that ends a line.
 *
 *	imap_scanner_partial_line() describes the completed args of the
 *	unfinished line; at an IMAP_SCAN_LITERAL event the announced literal
 *	is NOT yet among them (nor counted in n_literals); its arg is appended
 *	when its last byte has been fed. line_bytes counts bytes consumed so far
 *	(literal header included). After IMAP_SCAN_LINE, and at a line start,
 *	partial_line() is an empty line.
 *
 *	Capture: each stored arg's text is NUL-terminated inside the capture
 *	buffer (limits->capture_size bytes per line, NULs included). An arg
 *	that does not fit keeps what fitted (possibly "") with truncated=true
 *	and full_len its real length. Args beyond limits->max_args are framed
 *	but not stored (args_truncated=true). "(" and ")" list args point to
 *	static "(" / ")" strings and use no capture space.
 * SECURITY
 *	Everything a peer controls is bounded: max_line (checked byte by byte,
 *	so an endless line fails as soon as it exceeds the limit), max_literal
 *	(with an explicit 64-bit overflow check on the digits), max_depth
 *	(counting "("), max_args, capture_size. No recursion, no allocation
 *	after imap_scanner_new(). NUL is rejected outside literals (CVE-2019-
 *	11500 was a NUL in a quoted string). The capture buffer may hold a
 *	password: imap_scanner_wipe() and imap_scanner_free() explicit_bzero it.
 * ERRORS
 *	imap_scanner_feed() returns an ImapScanEvent or -errno: -EMSGSIZE line
 *	too long, -EFBIG literal too big, -ELOOP too deep, -EBADMSG for the
 *	rest. The offending byte is NOT consumed (so that after an error on an
 *	LF, imap_scanner_skip_line() resynchronises on that very LF). Then
 *	every feed returns the same error with nothing consumed until
 *	imap_scanner_reset() or imap_scanner_skip_line(). Never logs, never
 *	exits, no I/O, no globals.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "imap-scanner.h"
#include "macro.h"

typedef enum ScanState {
        ST_LINE_DONE,   /* IMAP_SCAN_LINE returned: the line is cleared at the next feed */
        ST_BETWEEN,     /* between tokens, also at a line start */
        ST_ATOM,        /* inside an atom (perhaps a literal header) */
        ST_QUOTED,      /* inside "..." */
        ST_QUOTED_ESC,  /* after a backslash inside "..." */
        ST_CR,          /* after a CR: LF must follow; see ->pending */
        ST_LITERAL,     /* consuming literal content */
        ST_RESP_SP,     /* server: after OK/NO/... or "+", before the optional SP */
        ST_RESP_TEXT,   /* server: resp-text start, "[" opens a code */
        ST_TEXT_START,  /* text starts here unless the line ends */
        ST_CODE,        /* inside "[...]" */
        ST_AFTER_CODE,  /* after "]", before the optional SP */
        ST_TEXT,        /* text up to the line end */
        ST_RAW_START,   /* raw-line mode, nothing of the line seen yet */
        ST_SKIP,        /* imap_scanner_skip_line(): discarding up to LF */
} ScanState;

/* Is the atom being scanned a literal header "~{123+}"? */
typedef enum LitState {
        LIT_START,      /* nothing seen yet */
        LIT_NONE,       /* an ordinary atom */
        LIT_TILDE,      /* "~" */
        LIT_OPEN,       /* "{" or "~{" */
        LIT_DIGITS,     /* "{1" ... */
        LIT_SIGN,       /* "{1+" or "{1-" */
        LIT_CLOSED,     /* "{1}": a literal header if the line ends now */
        LIT_BAD,        /* starts with "{" but is not a literal header */
        LIT_BAD_CLOSED, /* the same, ending in "}": BAD_LITERAL if the line ends now */
} LitState;

typedef enum Pending {
        PENDING_NONE,    /* CRLF ends the line */
        PENDING_LITERAL, /* CRLF ends a literal header */
        PENDING_BAD,     /* CRLF ends a malformed literal header */
} Pending;

struct ImapScanner {
        ImapScanMode mode;
        ImapScanLimits limits;
        ScanState state;
        ImapScanError error;
        bool raw_next;          /* enter raw-line mode at the next line start */

        /* the current line; cur.n_args, cur.line_bytes, ... are the live counters */
        ImapLine cur;
        ImapArg *args;          /* limits.max_args entries */
        char *cap;              /* limits.capture_size bytes */
        size_t cap_used;        /* bytes of cap holding finished args (NULs included) */
        unsigned depth;
        size_t n_tokens;        /* tokens of this line, stored or not */
        bool resp_code;         /* ST_RESP_SP: a "[code]" may follow */
        Pending pending;

        /* the token being scanned */
        size_t tok_len;         /* captured at cap + cap_used */
        uint64_t tok_full;      /* real length */
        bool tok_trunc;
        char kw[8];             /* server: first bytes of tokens 0 and 1 */

        /* literal header being scanned */
        LitState lit;
        uint64_t lit_value;
        bool lit_overflow;
        unsigned lit_flags_acc;

        /* the announced literal */
        uint64_t lit_size;
        unsigned lit_flags;
        uint64_t lit_remaining;
};

/* Byte classes: which bytes end a run in each state. */
#define C_ATOM_STOP 0x1u   /* SP ( ) " CR LF NUL */
#define C_QUOTED_STOP 0x2u /* " \ CR LF NUL */
#define C_TEXT_STOP 0x4u   /* CR LF NUL */
#define C_CODE_STOP 0x8u   /* ] CR LF NUL */

static const uint8_t byte_class[256] = {
        ['\0'] = C_ATOM_STOP | C_QUOTED_STOP | C_TEXT_STOP | C_CODE_STOP,
        ['\r'] = C_ATOM_STOP | C_QUOTED_STOP | C_TEXT_STOP | C_CODE_STOP,
        ['\n'] = C_ATOM_STOP | C_QUOTED_STOP | C_TEXT_STOP | C_CODE_STOP,
        [' '] = C_ATOM_STOP,
        ['('] = C_ATOM_STOP,
        [')'] = C_ATOM_STOP,
        ['"'] = C_ATOM_STOP | C_QUOTED_STOP,
        ['\\'] = C_QUOTED_STOP,
        [']'] = C_CODE_STOP,
};

static const struct {
        const char *text;
        int errnum;
} scan_errors[] = {
        [IMAP_SCAN_OK] = { "", 0 },
        [IMAP_SCAN_ERR_LINE_TOO_LONG] = { "Line too long", EMSGSIZE },
        [IMAP_SCAN_ERR_LITERAL_TOO_BIG] = { "Literal too big", EFBIG },
        [IMAP_SCAN_ERR_NUL] = { "NUL byte in command", EBADMSG },
        [IMAP_SCAN_ERR_CR_WITHOUT_LF] = { "CR without LF", EBADMSG },
        [IMAP_SCAN_ERR_BAD_QUOTED] = { "Invalid quoted string", EBADMSG },
        [IMAP_SCAN_ERR_TOO_DEEP] = { "Too deep nesting", ELOOP },
        [IMAP_SCAN_ERR_BAD_LITERAL] = { "Invalid literal", EBADMSG },
};
static_assert(ELEMENTSOF(scan_errors) == _IMAP_SCAN_ERROR_MAX, "scan_errors[] out of sync");

static const ImapLine empty_line = {};

static size_t span(const uint8_t *p, size_t n, unsigned stop) {
        size_t k = 0;

        while (k < n && !(byte_class[p[k]] & stop))
                k++;
        return k;
}

static int fail(ImapScanner *s, ImapScanError e) {
        s->error = e;
        return -scan_errors[e].errnum;
}

static void line_begin(ImapScanner *s) {
        s->cur = (ImapLine) { .args = s->args };
        s->cap_used = 0;
        s->depth = 0;
        s->n_tokens = 0;
        s->pending = PENDING_NONE;
        s->lit_remaining = 0;
        s->state = s->raw_next ? ST_RAW_START : ST_BETWEEN;
        s->raw_next = false;
}

static size_t cap_room(const ImapScanner *s) {
        /* content bytes an arg starting now may capture (one byte kept for its NUL) */
        return s->cap_used < s->limits.capture_size ? s->limits.capture_size - s->cap_used - 1 : 0;
}

static void tok_begin(ImapScanner *s) {
        s->tok_len = 0;
        s->tok_full = 0;
        s->tok_trunc = false;
}

static void tok_take(ImapScanner *s, const uint8_t *p, size_t n) {
        s->tok_full += n;
        if (s->cur.n_args >= s->limits.max_args)
                return; /* will not be stored: framing only */

        size_t k = MIN(n, cap_room(s) - s->tok_len);
        if (k > 0) {
                memcpy(s->cap + s->cap_used + s->tok_len, p, k);
                s->tok_len += k;
        }
        if (k < n)
                s->tok_trunc = true;
}

static ImapArg *arg_new(ImapScanner *s, ImapArgType type) {
        s->n_tokens++;
        if (s->cur.n_args >= s->limits.max_args) {
                s->cur.args_truncated = true;
                return NULL;
        }
        ImapArg *a = &s->args[s->cur.n_args++];
        *a = (ImapArg) { .type = type, .depth = s->depth };
        return a;
}

static void tok_emit(ImapScanner *s, ImapArgType type, unsigned literal_flags) {
        ImapArg *a = arg_new(s, type);
        if (!a)
                return;

        if (s->cap_used < s->limits.capture_size) {
                a->str = s->cap + s->cap_used;
                s->cap[s->cap_used + s->tok_len] = '\0';
                s->cap_used += s->tok_len + 1;
        } else
                a->str = "";
        a->len = s->tok_len;
        a->full_len = s->tok_full;
        a->truncated = s->tok_trunc;
        a->literal_flags = literal_flags;
}

static void list_emit(ImapScanner *s, ImapArgType type) {
        ImapArg *a = arg_new(s, type);
        if (!a)
                return;
        a->str = type == IMAP_ARG_LIST_START ? "(" : ")";
        a->len = a->full_len = 1;
}

static void lit_step(ImapScanner *s, uint8_t b) {
        switch (s->lit) {
        case LIT_START:
                s->lit = b == '{' ? LIT_OPEN : b == '~' ? LIT_TILDE : LIT_NONE;
                s->lit_value = 0;
                s->lit_overflow = false;
                s->lit_flags_acc = b == '~' ? IMAP_LITERAL_BINARY : 0;
                break;
        case LIT_NONE:
                break;
        case LIT_TILDE:
                s->lit = b == '{' ? LIT_OPEN : LIT_NONE;
                break;
        case LIT_OPEN:
        case LIT_DIGITS:
                if (b >= '0' && b <= '9') {
                        unsigned d = b - '0';
                        if (s->lit_value > (UINT64_MAX - d) / 10)
                                s->lit_overflow = true;
                        else
                                s->lit_value = s->lit_value * 10 + d;
                        s->lit = LIT_DIGITS;
                } else if (s->lit == LIT_DIGITS && (b == '+' || b == '-')) {
                        s->lit_flags_acc |= IMAP_LITERAL_NONSYNC;
                        if (b == '-')
                                s->lit_flags_acc |= IMAP_LITERAL_MINUS;
                        s->lit = LIT_SIGN;
                } else if (s->lit == LIT_DIGITS && b == '}')
                        s->lit = LIT_CLOSED;
                else
                        s->lit = b == '}' ? LIT_BAD_CLOSED : LIT_BAD;
                break;
        case LIT_SIGN:
                s->lit = b == '}' ? LIT_CLOSED : LIT_BAD;
                break;
        case LIT_CLOSED:
        case LIT_BAD:
        case LIT_BAD_CLOSED:
                s->lit = b == '}' ? LIT_BAD_CLOSED : LIT_BAD;
                break;
        }
}

static void atom_take(ImapScanner *s, const uint8_t *p, size_t n) {
        if (s->lit != LIT_NONE)
                for (size_t k = 0; k < n && s->lit != LIT_NONE; k++)
                        lit_step(s, p[k]);
        if (s->mode == IMAP_SCAN_SERVER && s->n_tokens < 2 && s->tok_full < sizeof(s->kw)) {
                size_t k = MIN(n, sizeof(s->kw) - (size_t) s->tok_full);
                memcpy(s->kw + s->tok_full, p, k);
        }
        tok_take(s, p, n);
}

/* Server: is the atom just scanned (token 0 or 1) equal to keyword? */
static bool kw_is(const ImapScanner *s, const char *keyword) {
        return s->tok_full <= sizeof(s->kw) && ascii_strcasecmp_n(s->kw, s->tok_full, keyword) == 0;
}

static int line_end(ImapScanner *s) {
        s->state = ST_LINE_DONE;
        return IMAP_SCAN_LINE;
}

static void literal_finish(ImapScanner *s) {
        tok_emit(s, IMAP_ARG_LITERAL, s->lit_flags);
        s->cur.n_literals++;
        s->state = ST_BETWEEN;
}

/* b ends the atom being scanned; b itself is not consumed unless *ret_n says so. */
static int atom_end(ImapScanner *s, uint8_t b, size_t *ret_n) {
        if ((b == '\r' || b == '\n') && (s->lit == LIT_CLOSED || s->lit == LIT_BAD_CLOSED)) {
                /* "{5}" at the line end: the CRLF decides (an LF is handled in ST_CR) */
                s->pending = s->lit == LIT_CLOSED ? PENDING_LITERAL : PENDING_BAD;
                s->state = ST_CR;
                *ret_n = b == '\r';
                return 0;
        }

        size_t idx = s->n_tokens;
        tok_emit(s, IMAP_ARG_ATOM, 0);
        s->state = ST_BETWEEN;

        if (s->mode == IMAP_SCAN_SERVER && s->depth == 0 && b != '\r' && b != '\n') {
                if (idx == 0 && kw_is(s, "+")) {
                        s->resp_code = false;
                        s->state = ST_RESP_SP;
                } else if (idx == 1 && (kw_is(s, "OK") || kw_is(s, "NO") || kw_is(s, "BAD") ||
                                        kw_is(s, "BYE") || kw_is(s, "PREAUTH"))) {
                        s->resp_code = true;
                        s->state = ST_RESP_SP;
                }
        }
        return 0;
}

/* b is an LF after a CR (or directly after a literal header). */
static int line_feed(ImapScanner *s, size_t *ret_n) {
        switch (s->pending) {
        case PENDING_NONE:
                *ret_n = 1;
                return line_end(s);
        case PENDING_BAD:
                return fail(s, IMAP_SCAN_ERR_BAD_LITERAL);
        case PENDING_LITERAL:
                break;
        }

        if (s->lit_overflow || s->lit_value > s->limits.max_literal)
                return fail(s, IMAP_SCAN_ERR_LITERAL_TOO_BIG);
        *ret_n = 1;
        s->pending = PENDING_NONE;
        s->lit_size = s->lit_remaining = s->lit_value;
        s->lit_flags = s->lit_flags_acc;
        tok_begin(s);
        s->state = ST_LITERAL;
        return IMAP_SCAN_LITERAL;
}

/* Scans non-literal bytes p[0..lim), lim >= 1 and within max_line. Returns 0
 * to go on, an event, or -errno; *ret_n is what was consumed (0 on error). */
static int scan_step(ImapScanner *s, const uint8_t *p, size_t lim, size_t *ret_n) {
        uint8_t b = p[0];
        size_t n;

        *ret_n = 0;
        switch (s->state) {
        case ST_BETWEEN:
                switch (b) {
                case ' ':
                        for (n = 1; n < lim && p[n] == ' '; n++)
                                ;
                        *ret_n = n;
                        return 0;
                case '\r':
                        s->pending = PENDING_NONE;
                        s->state = ST_CR;
                        *ret_n = 1;
                        return 0;
                case '\n':
                        *ret_n = 1;
                        return line_end(s);
                case '\0':
                        return fail(s, IMAP_SCAN_ERR_NUL);
                case '"':
                        tok_begin(s);
                        s->state = ST_QUOTED;
                        *ret_n = 1;
                        return 0;
                case '(':
                        if (s->depth >= s->limits.max_depth)
                                return fail(s, IMAP_SCAN_ERR_TOO_DEEP);
                        list_emit(s, IMAP_ARG_LIST_START);
                        s->depth++;
                        *ret_n = 1;
                        return 0;
                case ')':
                        if (s->depth > 0) {
                                s->depth--;
                                list_emit(s, IMAP_ARG_LIST_END);
                        } else { /* lenient: a stray ")" is an atom */
                                tok_begin(s);
                                tok_take(s, p, 1);
                                tok_emit(s, IMAP_ARG_ATOM, 0);
                        }
                        *ret_n = 1;
                        return 0;
                default:
                        tok_begin(s);
                        s->lit = LIT_START;
                        s->state = ST_ATOM;
                        return 0;
                }

        case ST_ATOM:
                n = span(p, lim, C_ATOM_STOP);
                if (n == 0)
                        return atom_end(s, b, ret_n);
                atom_take(s, p, n);
                *ret_n = n;
                return 0;

        case ST_QUOTED:
                n = span(p, lim, C_QUOTED_STOP);
                if (n > 0) {
                        tok_take(s, p, n);
                        *ret_n = n;
                        return 0;
                }
                switch (b) {
                case '"':
                        tok_emit(s, IMAP_ARG_QUOTED, 0);
                        s->state = ST_BETWEEN;
                        *ret_n = 1;
                        return 0;
                case '\\':
                        s->state = ST_QUOTED_ESC;
                        *ret_n = 1;
                        return 0;
                case '\0':
                        return fail(s, IMAP_SCAN_ERR_NUL);
                default: /* CR, LF */
                        return fail(s, IMAP_SCAN_ERR_BAD_QUOTED);
                }

        case ST_QUOTED_ESC:
                if (b == '"' || b == '\\') {
                        tok_take(s, p, 1);
                        s->state = ST_QUOTED;
                        *ret_n = 1;
                        return 0;
                }
                return fail(s, b == '\0' ? IMAP_SCAN_ERR_NUL : IMAP_SCAN_ERR_BAD_QUOTED);

        case ST_CR:
                if (b != '\n')
                        return fail(s, IMAP_SCAN_ERR_CR_WITHOUT_LF);
                return line_feed(s, ret_n);

        case ST_RESP_SP:
                if (b == '\r' || b == '\n') {
                        s->state = ST_BETWEEN;
                        return 0;
                }
                s->state = s->resp_code ? ST_RESP_TEXT : ST_TEXT_START;
                *ret_n = b == ' ';
                return 0;

        case ST_RESP_TEXT:
                if (b == '[') {
                        tok_begin(s);
                        s->state = ST_CODE;
                        *ret_n = 1;
                        return 0;
                }
                s->state = ST_TEXT_START;
                return 0;

        case ST_AFTER_CODE:
                s->state = ST_TEXT_START;
                *ret_n = b == ' ';
                return 0;

        case ST_TEXT_START:
                switch (b) {
                case '\r':
                        s->pending = PENDING_NONE;
                        s->state = ST_CR;
                        *ret_n = 1;
                        return 0;
                case '\n':
                        *ret_n = 1;
                        return line_end(s);
                case '\0':
                        return fail(s, IMAP_SCAN_ERR_NUL);
                default:
                        tok_begin(s);
                        s->state = ST_TEXT;
                        return 0;
                }

        case ST_RAW_START:
                tok_begin(s);
                s->state = ST_TEXT;
                return 0;

        case ST_TEXT:
        case ST_CODE:
                n = span(p, lim, s->state == ST_TEXT ? C_TEXT_STOP : C_CODE_STOP);
                if (n > 0) {
                        tok_take(s, p, n);
                        *ret_n = n;
                        return 0;
                }
                if (b == '\0')
                        return fail(s, IMAP_SCAN_ERR_NUL);
                tok_emit(s, s->state == ST_TEXT ? IMAP_ARG_TEXT : IMAP_ARG_CODE, 0);
                *ret_n = 1;
                if (b == ']') {
                        s->state = ST_AFTER_CODE;
                        return 0;
                }
                if (b == '\n')
                        return line_end(s);
                s->pending = PENDING_NONE;
                s->state = ST_CR;
                return 0;

        case ST_LINE_DONE:
        case ST_LITERAL:
        case ST_SKIP:
                break;
        }
        assert(!"unreachable scanner state");
        return fail(s, IMAP_SCAN_ERR_BAD_LITERAL);
}

int imap_scanner_feed(ImapScanner *s, const uint8_t *buf, size_t len, size_t *ret_consumed) {
        size_t i = 0;
        int r = IMAP_SCAN_NEED_MORE;

        assert(s);
        assert(buf || len == 0);
        assert(ret_consumed);

        if (s->error != IMAP_SCAN_OK) {
                *ret_consumed = 0;
                return -scan_errors[s->error].errnum;
        }
        if (s->state == ST_LINE_DONE)
                line_begin(s);
        if (s->state == ST_LITERAL && s->lit_remaining == 0)
                literal_finish(s); /* a zero-length literal */

        while (i < len) {
                const uint8_t *p = buf + i;
                size_t left = len - i, n;

                if (s->state == ST_LITERAL) {
                        /* bulk: capture what fits, skip the rest */
                        n = (size_t) MIN((uint64_t) left, s->lit_remaining);
                        tok_take(s, p, n);
                        s->lit_remaining -= n;
                        i += n;
                        if (s->lit_remaining == 0)
                                literal_finish(s);
                        continue;
                }
                if (s->state == ST_SKIP) {
                        const uint8_t *lf = memchr(p, '\n', left);
                        if (!lf) {
                                i = len;
                                break;
                        }
                        i += (size_t) (lf - p) + 1;
                        line_begin(s);
                        continue;
                }

                if (s->cur.line_bytes >= s->limits.max_line) {
                        r = fail(s, IMAP_SCAN_ERR_LINE_TOO_LONG);
                        break;
                }
                r = scan_step(s, p, MIN(left, s->limits.max_line - s->cur.line_bytes), &n);
                i += n;
                s->cur.line_bytes += n;
                if (r != 0)
                        break;
        }

        *ret_consumed = i;
        return r;
}

int imap_scanner_new(ImapScanMode mode, const ImapScanLimits *limits, ImapScanner **ret) {
        ImapScanner *s;

        assert(ret);

        if (!limits || limits->max_line == 0 ||
            (mode != IMAP_SCAN_CLIENT && mode != IMAP_SCAN_SERVER))
                return -EINVAL;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->mode = mode;
        s->limits = *limits;
        if (limits->max_args > 0) {
                s->args = calloc(limits->max_args, sizeof(ImapArg));
                if (!s->args)
                        goto fail;
        }
        if (limits->capture_size > 0) {
                s->cap = calloc(1, limits->capture_size);
                if (!s->cap)
                        goto fail;
        }
        imap_scanner_reset(s);

        *ret = s;
        return 0;

fail:
        imap_scanner_free(s);
        return -ENOMEM;
}

ImapScanner *imap_scanner_free(ImapScanner *s) {
        if (!s)
                return NULL;
        imap_scanner_wipe(s);
        free(s->cap);
        free(s->args);
        free(s);
        return NULL;
}

const ImapLine *imap_scanner_line(const ImapScanner *s) {
        assert(s);
        return &s->cur;
}

const ImapLine *imap_scanner_partial_line(const ImapScanner *s) {
        assert(s);
        return s->state == ST_LINE_DONE ? &empty_line : &s->cur;
}

void imap_scanner_literal(const ImapScanner *s, uint64_t *ret_size, unsigned *ret_flags) {
        assert(s);
        if (ret_size)
                *ret_size = s->lit_size;
        if (ret_flags)
                *ret_flags = s->lit_flags;
}

void imap_scanner_reset(ImapScanner *s) {
        assert(s);
        s->error = IMAP_SCAN_OK;
        s->raw_next = false;
        s->lit_size = 0;
        s->lit_flags = 0;
        line_begin(s);
}

void imap_scanner_skip_line(ImapScanner *s) {
        assert(s);
        s->error = IMAP_SCAN_OK;
        s->raw_next = false;
        line_begin(s);
        s->state = ST_SKIP;
}

void imap_scanner_expect_raw_line(ImapScanner *s) {
        assert(s);
        /* XXX: silently ignored in the middle of a line; callers check at_line_start() */
        if (!imap_scanner_at_line_start(s))
                return;
        if (s->state == ST_LINE_DONE)
                s->raw_next = true; /* keep the finished line readable until the next feed */
        else
                s->state = ST_RAW_START;
}

bool imap_scanner_at_line_start(const ImapScanner *s) {
        assert(s);
        if (s->error != IMAP_SCAN_OK)
                return false;
        return s->state == ST_LINE_DONE ||
               ((s->state == ST_BETWEEN || s->state == ST_RAW_START) && s->cur.line_bytes == 0);
}

uint64_t imap_scanner_literal_remaining(const ImapScanner *s) {
        assert(s);
        return s->state == ST_LITERAL ? s->lit_remaining : 0;
}

ImapScanError imap_scanner_error(const ImapScanner *s) {
        assert(s);
        return s->error;
}

const char *imap_scanner_error_text(const ImapScanner *s) {
        assert(s);
        return scan_errors[s->error].text;
}

void imap_scanner_wipe(ImapScanner *s) {
        if (!s)
                return;
        explicit_bzero_safe(s->cap, s->limits.capture_size);
        explicit_bzero_safe(s->kw, sizeof(s->kw));
}

bool imap_arg_is(const ImapArg *a, const char *keyword) {
        if (!a || !keyword || a->truncated || !a->str)
                return false;
        if (a->type != IMAP_ARG_ATOM && a->type != IMAP_ARG_QUOTED)
                return false;
        return ascii_strcasecmp_n(a->str, a->len, keyword) == 0;
}
