/*
 * prelogin.c -- the client before it has logged in.
 *
 * SYNOPSIS
 *	int prelogin_run(Session *s);
 * DESCRIPTION
 *	Reads client bytes with the pre-login timeout, scans them with the
 *	client-mode IMAP scanner under the small pre-login limits, and answers
 *	CAPABILITY, NOOP, ID, LOGOUT and LOGIN itself; any other command gets a
 *	tagged BAD. Synchronising literals get "+" only within the limits.
 *	LOGIN asks the broker for a connection; on success the bytes the client
 *	pipelined after LOGIN are kept in s->pending for the relay.
 *	Every composed reply goes out in one write.
 * SECURITY
 *	The password exists in the scanner's capture buffer and on the stack
 *	only for the duration of the checkout; both are wiped.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fd-util.h"
#include "log.h"
#include "session.h"

#define READ_CHUNK 4096
#define TAG_MAX 256
#define REPLY_MAX (IPC_CAPS_MAX + IPC_TEXT_MAX + 2 * TAG_MAX + 256)

static int reply(Session *s, const char *fmt, ...) _printf_(2, 3);
static int reply(Session *s, const char *fmt, ...) {
        char buf[REPLY_MAX];
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        if (n < 0)
                return -EIO;
        if ((size_t) n >= sizeof(buf))
                return -E2BIG; /* cannot happen: tags and texts are bounded */
        return client_write(s, buf, (size_t) n);
}

static bool tag_valid(const ImapArg *a) {
        if (a->type != IMAP_ARG_ATOM || a->truncated || a->len == 0 || a->len > TAG_MAX || a->depth != 0)
                return false;
        for (size_t i = 0; i < a->len; i++) {
                unsigned char c = (unsigned char) a->str[i];
                if (c <= 0x20 || c >= 0x7f || strchr("(){%*\"\\+", c))
                        return false;
        }
        return true;
}

static bool is_astring(const ImapArg *a) {
        return (a->type == IMAP_ARG_ATOM || a->type == IMAP_ARG_QUOTED || a->type == IMAP_ARG_LITERAL) &&
               !a->truncated && a->depth == 0 && memchr(a->str, '\0', a->len) == NULL;
}

static int do_login(Session *s, const char *tag, const ImapLine *l) {
        struct ipc_checkout_fail fail;
        char caps[IPC_CAPS_MAX];
        int r;

        if (l->n_args != 4 || !is_astring(&l->args[2]) || !is_astring(&l->args[3]))
                return reply(s, "%s BAD Invalid arguments to LOGIN.\r\n", tag);
        if (l->args[2].len >= IPC_USER_MAX || l->args[3].len >= IPC_PASSWORD_MAX || l->args[2].len == 0)
                return reply(s, "%s NO [LIMIT] User name or password too long.\r\n", tag);

        r = broker_checkout(s, l->args[2].str, l->args[3].str, &fail);
        if (r < 0) {
                log_warning_errno(r, "login %s: broker not available: %m", l->args[2].str);
                return reply(s, "%s NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n", tag);
        }
        if (r == 1) {
                const char *status = fail.status == IPC_FAIL_BAD ? "BAD" : "NO";
                return reply(s, "%s %s %s\r\n", tag, status, fail.text);
        }
        caps_filter(s->postlogin_caps, false, caps, sizeof(caps));
        r = reply(s, "%s%s OK [CAPABILITY %s] Logged in\r\n",
                  s->reused ? "* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\n" : "", tag, caps);
        if (r < 0)
                return r;
        return 1;
}

/* Returns 1 logged in, 0 continue, -ECONNRESET on LOGOUT, <0 error. */
static int handle_line(Session *s, ImapScanner *sc, const ImapLine *l) {
        char caps[IPC_CAPS_MAX];
        char tag[TAG_MAX + 1];

        if (l->n_args == 0)
                return 0; /* an empty line is not a command: ignore it, as servers do */
        if (!tag_valid(&l->args[0]))
                return reply(s, "* BAD Invalid tag.\r\n");
        memcpy(tag, l->args[0].str, l->args[0].len);
        tag[l->args[0].len] = '\0';
        if (l->n_args < 2 || l->args[1].type != IMAP_ARG_ATOM)
                return reply(s, "%s BAD Missing command.\r\n", tag);
        const ImapArg *cmd = &l->args[1];

        if (imap_arg_is(cmd, "LOGIN")) {
                int r = do_login(s, tag, l);
                imap_scanner_wipe(sc);
                return r;
        }
        if (imap_arg_is(cmd, "CAPABILITY")) {
                caps_filter(s->prelogin_caps, true, caps, sizeof(caps));
                return reply(s, "* CAPABILITY %s\r\n%s OK Capability completed.\r\n", caps, tag);
        }
        if (imap_arg_is(cmd, "NOOP"))
                return reply(s, "%s OK NOOP completed.\r\n", tag);
        if (imap_arg_is(cmd, "ID"))
                return reply(s, "* ID NIL\r\n%s OK ID completed.\r\n", tag);
        if (imap_arg_is(cmd, "LOGOUT")) {
                (void) reply(s, "* BYE Logging out\r\n%s OK Logout completed.\r\n", tag);
                return -ECONNRESET;
        }
        if (imap_arg_is(cmd, "AUTHENTICATE"))
                return reply(s, "%s NO [CANNOT] Unsupported authentication mechanism.\r\n", tag);
        if (imap_arg_is(cmd, "STARTTLS"))
                return reply(s, "%s BAD STARTTLS is not available.\r\n", tag);
        return reply(s, "%s BAD Please log in first.\r\n", tag);
}

static int error_reply(Session *s, ImapScanner *sc) {
        const ImapLine *pl = imap_scanner_partial_line(sc);
        const char *text = imap_scanner_error_text(sc);
        if (pl && pl->n_args > 0 && tag_valid(&pl->args[0]))
                return reply(s, "%.*s BAD %s.\r\n", (int) pl->args[0].len, pl->args[0].str, text);
        return reply(s, "* BAD %s.\r\n", text);
}

int prelogin_run(Session *s) {
        ImapScanLimits lim = {
                .max_line = s->cfg.max_prelogin_line,
                .max_literal = IPC_PASSWORD_MAX,
                .max_depth = 3,
                .capture_size = s->cfg.max_prelogin_line + IPC_PASSWORD_MAX + IPC_USER_MAX,
                .max_args = 64,
        };
        ImapScanner *sc = NULL;
        uint8_t buf[READ_CHUNK];
        int r;

        r = imap_scanner_new(IMAP_SCAN_CLIENT, &lim, &sc);
        if (r < 0)
                return r;

        for (;;) {
                struct pollfd p = { .fd = s->client_in, .events = POLLIN };
                r = poll(&p, 1, (int) s->cfg.client_prelogin_timeout * 1000);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r == 0) {
                        (void) reply(s, "* BYE Disconnected for inactivity.\r\n");
                        r = 0;
                        break;
                }
                ssize_t n = read(s->client_in, buf, sizeof(buf));
                if (n < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (n <= 0) {
                        r = 0;
                        break;
                }

                size_t off = 0;
                r = 0;
                while (off < (size_t) n && r == 0) {
                        size_t used = 0;
                        int ev = imap_scanner_feed(sc, buf + off, (size_t) n - off, &used);
                        off += used;
                        if (ev == -EMSGSIZE) {
                                (void) error_reply(s, sc);
                                (void) reply(s, "* BYE Line too long.\r\n");
                                r = -ECONNRESET;
                        } else if (ev == -EFBIG) {
                                /* No "+": a synchronising client sends nothing more of
                                 * this command (a non-synchronising one sends bytes we
                                 * read as new commands: they get BAD). The scanner stops
                                 * before the header's end: drop the rest of the line. */
                                r = error_reply(s, sc);
                                imap_scanner_skip_line(sc);
                        } else if (ev < 0) {
                                r = error_reply(s, sc);
                                imap_scanner_skip_line(sc);
                        } else if (ev == IMAP_SCAN_LITERAL) {
                                uint64_t size;
                                unsigned flags;
                                imap_scanner_literal(sc, &size, &flags);
                                if (!(flags & IMAP_LITERAL_NONSYNC))
                                        r = reply(s, "+ Ready for literal data\r\n");
                        } else if (ev == IMAP_SCAN_LINE)
                                r = handle_line(s, sc, imap_scanner_line(sc));
                }
                if (r == 1) {
                        /* Logged in: what the client sent after LOGIN is the relay's. */
                        size_t rest = (size_t) n - off;
                        if (rest > 0) {
                                s->pending = malloc(rest);
                                if (!s->pending)
                                        r = -ENOMEM;
                                else {
                                        memcpy(s->pending, buf + off, rest);
                                        s->pending_len = rest;
                                }
                        }
                }
                explicit_bzero(buf, (size_t) n); /* it may have held a password */
                if (r != 0)
                        break;
        }
        imap_scanner_free(sc);
        if (r == -ECONNRESET)
                return 0;
        return r;
}
