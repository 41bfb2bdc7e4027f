/*
 * imap-trace.c -- turn the two byte streams of an IMAP connection into
 * redacted protocol lines for imapproxyctl trace.
 *
 * SYNOPSIS
 *	void imap_trace_init(ImapTrace *t, ImapTraceEmit emit, void *userdata);
 *	void imap_trace_feed(ImapTrace *t, IpcTraceDir dir, const uint8_t *buf, size_t len);
 * DESCRIPTION
 *	Pure: bytes in, lines out through the emit callback; no I/O, no
 *	allocation, fixed-size state. A logical line is a CRLF-terminated
 *	line together with the literals it announces ("{N}", "{N+}", "~{N}"):
 *	literal contents are never kept, they show as "[N bytes]" (message
 *	bodies, APPEND uploads, and a password sent as a literal alike). Only
 *	the first IPC_TRACE_LINE_MAX - 1 printable bytes of a line are kept
 *	(truncated is set); control bytes become '?'.
 *	Redaction of what the client sends:
 *	  tag LOGIN ...             -> "tag LOGIN [redacted]"
 *	  tag AUTHENTICATE mech ir  -> "tag AUTHENTICATE mech [redacted]"; the
 *	                               client lines that follow are SASL
 *	                               responses, shown as "[redacted]", until
 *	                               the server completes that tag.
 *	  a line of one word        -> "[redacted]" (not a command: a SASL
 *	                               response, also one sent after the server
 *	                               refused the AUTHENTICATE; DONE is kept)
 *	Nothing else a client sends after login carries the password.
 * SECURITY
 *	Redaction is decided on the command name, which is always inside the
 *	kept prefix (the tag is at most a line's first bytes); a line whose
 *	command cannot be seen because the tag alone fills the prefix is
 *	redacted whole. The password can therefore not appear in any emitted
 *	line, whether sent as an atom, a quoted string or a literal.
 */
#include <stdio.h>
#include <string.h>

#include "imap-trace.h"
#include "macro.h"

#define REDACTED "[redacted]"

void imap_trace_init(ImapTrace *t, ImapTraceEmit emit, void *userdata) {
        memset(t, 0, sizeof(*t));
        t->emit = emit;
        t->userdata = userdata;
}

static void stream_append(ImapTraceStream *s, const char *p, size_t n) {
        for (size_t i = 0; i < n; i++) {
                if (s->len + 1 >= sizeof(s->line)) {
                        s->truncated = true;
                        return;
                }
                unsigned char c = (unsigned char) p[i];
                s->line[s->len++] = (c < 0x20 || c == 0x7f) ? '?' : (char) c;
        }
}

/* The word at *pos (up to a space), advancing past it and one space. */
static size_t next_word(const char *line, size_t len, size_t *pos, const char **ret) {
        size_t b = *pos, e = b;
        while (e < len && line[e] != ' ')
                e++;
        *ret = line + b;
        *pos = e < len ? e + 1 : e;
        return e - b;
}

/* Client line complete: redact in place. */
static void redact_client(ImapTrace *t, ImapTraceStream *s) {
        const char *tag, *cmd, *mech;
        size_t pos = 0;

        /* A line of one word is no command (DONE ends IDLE): it is a SASL
         * response, even one sent after the server refused AUTHENTICATE. */
        bool one_word = !memchr(s->line, ' ', s->len) && !s->truncated && ascii_strcasecmp_n(s->line, s->len, "DONE") != 0;
        if (t->in_auth || (one_word && s->len > 0)) {
                memcpy(s->line, REDACTED, sizeof(REDACTED));
                s->len = sizeof(REDACTED) - 1;
                s->truncated = false;
                return;
        }
        size_t tl = next_word(s->line, s->len, &pos, &tag);
        size_t cl = next_word(s->line, s->len, &pos, &cmd);
        if (cl == 0 && s->truncated) {
                /* the command is beyond what we kept: it could be LOGIN */
                memcpy(s->line, REDACTED, sizeof(REDACTED));
                s->len = sizeof(REDACTED) - 1;
                s->truncated = false;
                return;
        }
        size_t keep;
        if (ascii_strcasecmp_n(cmd, cl, "LOGIN") == 0)
                keep = (size_t) (cmd - s->line) + cl;
        else if (ascii_strcasecmp_n(cmd, cl, "AUTHENTICATE") == 0) {
                size_t ml = next_word(s->line, s->len, &pos, &mech);
                keep = ml ? (size_t) (mech - s->line) + ml : (size_t) (cmd - s->line) + cl;
                t->in_auth = true;
                size_t n = tl < sizeof(t->auth_tag) - 1 ? tl : sizeof(t->auth_tag) - 1;
                memcpy(t->auth_tag, tag, n);
                t->auth_tag[n] = '\0';
                if (keep >= s->len && !s->truncated)
                        return; /* no initial response */
        } else
                return;
        /* keep + " [redacted]" fits: the command was inside the kept prefix */
        if (keep + 1 + sizeof(REDACTED) > sizeof(s->line))
                keep = sizeof(s->line) - 1 - sizeof(REDACTED);
        s->line[keep] = ' ';
        memcpy(s->line + keep + 1, REDACTED, sizeof(REDACTED));
        s->len = keep + sizeof(REDACTED);
        s->truncated = false;
}

/* Server line complete: does it end the SASL exchange? */
static void watch_server(ImapTrace *t, const ImapTraceStream *s) {
        size_t l = strlen(t->auth_tag);
        if (t->in_auth && l > 0 && s->len > l && s->line[l] == ' ' && memcmp(s->line, t->auth_tag, l) == 0)
                t->in_auth = false;
}

/* "{N}", "{N+}", "{N-}" at the end of the raw physical line? */
static bool literal_at_end(const ImapTraceStream *s, uint64_t *ret) {
        size_t n = s->tail_len;
        const char *p = s->tail;
        if (n < 3 || p[n - 1] != '}')
                return false;
        size_t e = n - 1;
        if (p[e - 1] == '+' || p[e - 1] == '-')
                e--;
        size_t b = e;
        while (b > 0 && p[b - 1] >= '0' && p[b - 1] <= '9')
                b--;
        if (b == e || b == 0 || p[b - 1] != '{' || e - b > 19)
                return false;
        uint64_t v = 0;
        for (size_t i = b; i < e; i++)
                v = v * 10 + (uint64_t) (p[i] - '0');
        *ret = v;
        return true;
}

static void stream_emit(ImapTrace *t, IpcTraceDir dir, ImapTraceStream *s) {
        s->line[s->len] = '\0';
        if (dir == IPC_TRACE_CLIENT)
                redact_client(t, s);
        else
                watch_server(t, s);
        s->line[s->len] = '\0';
        t->emit(t->userdata, dir, s->line, s->truncated);
        s->len = 0;
        s->truncated = false;
}

static void tail_push(ImapTraceStream *s, char c) {
        if (s->tail_len == sizeof(s->tail)) {
                memmove(s->tail, s->tail + 1, sizeof(s->tail) - 1);
                s->tail_len--;
        }
        s->tail[s->tail_len++] = c;
}

void imap_trace_feed(ImapTrace *t, IpcTraceDir dir, const uint8_t *buf, size_t len) {
        ImapTraceStream *s = dir == IPC_TRACE_CLIENT ? &t->client : &t->server;
        size_t i = 0;

        while (i < len) {
                if (s->literal_left > 0) {
                        size_t take = s->literal_left < len - i ? (size_t) s->literal_left : len - i;
                        s->literal_left -= take;
                        i += take;
                        continue;
                }
                if (s->pending_cr && buf[i] != '\n') {
                        /* the CR that ended the last buffer was a bare CR in the line */
                        stream_append(s, "\r", 1);
                        tail_push(s, '\r');
                }
                s->pending_cr = false;
                const uint8_t *nl = memchr(buf + i, '\n', len - i);
                size_t end = nl ? (size_t) (nl - buf) : len;
                /* the physical line's text (without CR LF); a CR at the end of
                 * the buffer may be the line's end: decided by the next byte */
                size_t text = end - i;
                if (text > 0 && buf[end - 1] == '\r') {
                        text--;
                        s->pending_cr = !nl;
                }
                stream_append(s, (const char *) buf + i, text);
                for (size_t k = 0; k < text; k++)
                        tail_push(s, (char) buf[i + k]);
                i = nl ? end + 1 : end;
                if (!nl)
                        break;
                uint64_t lit;
                if (literal_at_end(s, &lit)) {
                        char note[40];
                        int n = snprintf(note, sizeof(note), "[%llu bytes]", (unsigned long long) lit);
                        stream_append(s, note, (size_t) (n > 0 ? n : 0));
                        s->literal_left = lit;
                        s->tail_len = 0;
                        continue;
                }
                s->tail_len = 0;
                stream_emit(t, dir, s);
        }
}
