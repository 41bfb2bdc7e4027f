/*
 * imap-scanner.h -- pure, resumable IMAP line/token scanner (client commands
 * and server responses). See imap-scanner.c for the full description.
 *
 * Usage (relay):
 *	for (;;) {
 *		r = imap_scanner_feed(s, buf + off, len - off, &n);
 *		if (r < 0) -> error, imap_scanner_error_text(s)
 *		off += n;
 *		if (r == IMAP_SCAN_NEED_MORE) break;          (all of buf consumed)
 *		if (r == IMAP_SCAN_LITERAL) -> imap_scanner_literal(s, ...)
 *		if (r == IMAP_SCAN_LINE)    -> imap_scanner_line(s)
 *	}
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum ImapScanMode {
        IMAP_SCAN_CLIENT, /* commands: tag SP command [args] CRLF */
        IMAP_SCAN_SERVER, /* responses: "*" / tag / "+"; resp-text after OK/NO/BAD/BYE/PREAUTH */
} ImapScanMode;

typedef struct ImapScanLimits {
        size_t max_line;      /* bytes of one line excluding literal contents, CRLF included */
        uint64_t max_literal; /* largest literal size accepted */
        unsigned max_depth;   /* '(' nesting */
        size_t capture_size;  /* bytes of token text kept per line (all args together) */
        unsigned max_args;    /* tokens kept per line */
} ImapScanLimits;

typedef enum ImapArgType {
        IMAP_ARG_ATOM,       /* any atom-ish token: tag, "*", "+", NIL, numbers, \Flags, BODY[..]<..> */
        IMAP_ARG_QUOTED,     /* content unescaped */
        IMAP_ARG_LITERAL,    /* content of {n} / {n+} / {n-} / ~{n} */
        IMAP_ARG_LIST_START, /* "(" */
        IMAP_ARG_LIST_END,   /* ")" */
        IMAP_ARG_CODE,       /* server: text between [ and ] of a resp-text-code, raw */
        IMAP_ARG_TEXT,       /* server: resp-text / continuation text; raw-line mode: the line */
        _IMAP_ARG_TYPE_MAX,
} ImapArgType;

#define IMAP_LITERAL_NONSYNC 0x1u /* {n+} (LITERAL+) or {n-} (LITERAL-): no continuation */
#define IMAP_LITERAL_MINUS 0x2u   /* {n-} */
#define IMAP_LITERAL_BINARY 0x4u  /* ~{n} (BINARY) */

typedef struct ImapArg {
        ImapArgType type;
        unsigned depth;       /* list nesting at which the arg stands (0 = top level) */
        const char *str;      /* captured bytes, NUL-terminated, valid until the next feed */
        size_t len;           /* captured length */
        uint64_t full_len;    /* real length (may exceed len when truncated) */
        bool truncated;       /* not all of it fitted in the capture buffer */
        unsigned literal_flags; /* IMAP_LITERAL_* for IMAP_ARG_LITERAL */
} ImapArg;

typedef struct ImapLine {
        const ImapArg *args;
        size_t n_args;
        bool args_truncated;  /* more tokens than max_args (the rest were framed, not kept) */
        size_t line_bytes;    /* bytes excluding literal contents, CRLF included */
        unsigned n_literals;
} ImapLine;

typedef enum ImapScanEvent {
        IMAP_SCAN_NEED_MORE = 0, /* all input consumed, no event */
        IMAP_SCAN_LITERAL = 1,   /* stopped right after a literal header's CRLF */
        IMAP_SCAN_LINE = 2,      /* a whole line (with its literals) ended with CRLF */
} ImapScanEvent;

typedef enum ImapScanError {
        IMAP_SCAN_OK = 0,
        IMAP_SCAN_ERR_LINE_TOO_LONG,    /* -EMSGSIZE */
        IMAP_SCAN_ERR_LITERAL_TOO_BIG,  /* -EFBIG (also for a size that overflows 64 bits) */
        IMAP_SCAN_ERR_NUL,              /* -EBADMSG: NUL byte outside a literal */
        IMAP_SCAN_ERR_CR_WITHOUT_LF,    /* -EBADMSG */
        IMAP_SCAN_ERR_BAD_QUOTED,       /* -EBADMSG: CR/LF inside a quoted string, bad escape */
        IMAP_SCAN_ERR_TOO_DEEP,         /* -ELOOP: nesting beyond max_depth */
        IMAP_SCAN_ERR_BAD_LITERAL,      /* -EBADMSG: malformed "{...}" followed by CRLF */
        _IMAP_SCAN_ERROR_MAX,
} ImapScanError;

typedef struct ImapScanner ImapScanner;

/* Allocates everything up front (no allocation while scanning). 0 or -ENOMEM/-EINVAL. */
int imap_scanner_new(ImapScanMode mode, const ImapScanLimits *limits, ImapScanner **ret);
/* Wipes the capture buffer (it may have held a password) and frees. Accepts NULL; returns NULL. */
ImapScanner *imap_scanner_free(ImapScanner *s);

/* Scans at most len bytes. Returns an ImapScanEvent (>= 0) or -errno on a
 * protocol error (see ImapScanError); *ret_consumed is always set and is
 * <= len. After an error every feed returns the same error until
 * imap_scanner_reset() or imap_scanner_skip_line(). Resumable at any byte
 * boundary: splitting the input differently yields the same events. */
int imap_scanner_feed(ImapScanner *s, const uint8_t *buf, size_t len, size_t *ret_consumed);

/* Valid after IMAP_SCAN_LINE until the next feed/reset. */
const ImapLine *imap_scanner_line(const ImapScanner *s);
/* Valid after IMAP_SCAN_LITERAL: the literal just announced. For a sync
 * literal in client mode the caller decides whether to send "+ ..." (then
 * keeps feeding: the next size bytes are the literal) or refuse it (then
 * imap_scanner_reset(): the client starts a new command). */
void imap_scanner_literal(const ImapScanner *s, uint64_t *ret_size, unsigned *ret_flags);
/* The args scanned so far in the current, unfinished line (e.g. the tag and
 * command name when a literal is announced). */
const ImapLine *imap_scanner_partial_line(const ImapScanner *s);

/* Back to the start of a line, dropping any partial line and error. */
void imap_scanner_reset(ImapScanner *s);
/* Clear the error and discard input up to and including the next LF (no
 * literal processing), then continue at a line start. */
void imap_scanner_skip_line(ImapScanner *s);
/* The next line is raw text (AUTHENTICATE data, IDLE's DONE): reported as
 * one IMAP_ARG_TEXT arg, no tokenising, still bounded by max_line. Only at
 * a line start. */
void imap_scanner_expect_raw_line(ImapScanner *s);

bool imap_scanner_at_line_start(const ImapScanner *s); /* no partial line pending */
uint64_t imap_scanner_literal_remaining(const ImapScanner *s); /* bytes left in the current literal */
ImapScanError imap_scanner_error(const ImapScanner *s);
const char *imap_scanner_error_text(const ImapScanner *s); /* human text for a BAD, "" if none */

/* Wipe the capture buffer now (after a LOGIN line was handled). */
void imap_scanner_wipe(ImapScanner *s);

/* Case-insensitive ASCII compare of an arg with a NUL-terminated keyword. */
bool imap_arg_is(const ImapArg *a, const char *keyword);
