/*
 * prelogin.c -- the client before it has logged in.
 *
 * SYNOPSIS
 *	int prelogin_run(Session *s);
 *	int prelogin_init(Prelogin *p, Session *s);
 *	int prelogin_feed(Prelogin *p, const uint8_t *buf, size_t len, size_t *ret_used);
 *	void prelogin_done(Prelogin *p);
 * DESCRIPTION
 *	Reads client bytes until the pre-login deadline (client_prelogin_timeout
 *	from the start, however busy the client is: a slow-loris client is cut
 *	off like a silent one) and hands them to prelogin_feed(), which scans
 *	them with the
 *	client-mode IMAP scanner under the small pre-login limits, and answers
 *	CAPABILITY, NOOP, ID, LOGOUT, STARTTLS, LOGIN and AUTHENTICATE (PLAIN
 *	with or without SASL-IR, LOGIN) itself; any other command gets a
 *	tagged BAD. STARTTLS (offered only with listen_tls_cert_file, and not
 *	on TLS already) gets its tagged OK and ends the dialogue: the bytes the
 *	client sent after it are dropped with the scanner, and the caller
 *	starts TLS. Under login_requires_tls, LOGIN and AUTHENTICATE before
 *	TLS get NO [PRIVACYREQUIRED].
 *	Synchronising literals get "+" only within the limits. A login asks
 *	the broker for a connection; on success the bytes the client pipelined
 *	after it are kept in s->pending for the relay. A failed login is
 *	answered no sooner than login_failure_delay after it was received,
 *	and login_max_failures of them end the connection. ID parameters are
 *	kept, re-serialised, for the broker to forward (forward_client_id).
 *	Every composed reply goes out in one write. prelogin_feed() does no
 *	I/O of its own: replies go through client_write(), logins through
 *	broker_checkout(), so tests/fuzz/fuzz-prelogin.c runs it with its own
 *	versions of those two.
 * SECURITY
 *	The password exists in the scanner's capture buffer and on the stack
 *	only for the duration of the checkout; both are wiped. After a login on
 *	a reused connection one copy stays in the Session until the backend
 *	has answered the client's first bytes (relay.c: a connection that died
 *	in the pool is replaced by a fresh login), then it is wiped too.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "fd-util.h"
#include "log.h"
#include "session.h"

#define READ_CHUNK 4096
#define TAG_MAX PRELOGIN_TAG_MAX
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

/* A failed login: wait out the delay, count it, answer. -ECONNRESET ends the
 * connection after too many. */
static int login_failed(Prelogin *p, const char *tag, const char *status, const char *text) {
        Session *s = p->s;
        uint64_t due = p->cmd_start_usec + (uint64_t) s->cfg.login_failure_delay * 1000ULL, now = now_usec();
        if (due > now) {
                struct timespec ts = { .tv_sec = (time_t) ((due - now) / 1000000ULL),
                                       .tv_nsec = (long) ((due - now) % 1000000ULL) * 1000L };
                while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                        ;
        }
        s->login_failures++;
        if (s->login_failures >= s->cfg.login_max_failures) {
                (void) reply(s, "%s %s %s\r\n* BYE Too many invalid authentication attempts.\r\n", tag, status, text);
                return -ECONNRESET;
        }
        return reply(s, "%s %s %s\r\n", tag, status, text);
}

static int login_with(Prelogin *p, const char *tag, const char *user, const char *authzid, const char *password) {
        Session *s = p->s;
        struct ipc_checkout_fail fail;
        char caps[IPC_CAPS_MAX];
        int r;

        if (strlen(user) >= IPC_USER_MAX || strlen(authzid) >= IPC_USER_MAX || strlen(password) >= IPC_PASSWORD_MAX ||
            !*user)
                return login_failed(p, tag, "NO", "[LIMIT] User name or password too long.");
        if (strcmp(authzid, user) == 0)
                authzid = ""; /* the same identity: one pool entry with LOGIN */
        log_set_context("IMAPPROXY_USER", user);

        r = broker_checkout(s, user, authzid, password, 0, &fail);
        if (r < 0) {
                log_warning_errno(r, "login %s: broker not available: %m", user);
                return reply(s, "%s NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n", tag);
        }
        if (r == 1) {
                if (fail.status == IPC_FAIL_UNAVAILABLE)
                        return reply(s, "%s NO %s\r\n", tag, fail.text);
                return login_failed(p, tag, fail.status == IPC_FAIL_BAD ? "BAD" : "NO", fail.text);
        }
        if (s->reused) {
                /* sizes checked above */
                memcpy(s->retry_password, password, strlen(password) + 1);
                memcpy(s->retry_authzid, authzid, strlen(authzid) + 1);
                s->retry_armed = true;
        }
        caps_filter(s->postlogin_caps, 0, caps, sizeof(caps));
        TRACE_NOTE(s, "%.64s logged in as %s (credentials not shown): %s", tag, user, s->reused ? "cache hit" : "new backend connection");
        r = reply(s, "%s%s OK [CAPABILITY %s] Logged in\r\n",
                  s->reused ? "* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\n" : "", tag, caps);
        if (r < 0)
                return r;
        return 1;
}

static int do_login(Prelogin *p, const char *tag, const ImapLine *l) {
        if (l->n_args != 4 || !is_astring(&l->args[2]) || !is_astring(&l->args[3]))
                return reply(p->s, "%s BAD Invalid arguments to LOGIN.\r\n", tag);
        return login_with(p, tag, l->args[2].str, "", l->args[3].str);
}

/* PLAIN message in base64 (from SASL-IR or the continuation line). */
static int auth_plain(Prelogin *p, const char *tag, const char *b64, size_t len) {
        char msg[IPC_USER_MAX * 2 + IPC_PASSWORD_MAX + 4];
        char authzid[IPC_USER_MAX], authcid[IPC_USER_MAX], password[IPC_PASSWORD_MAX];
        size_t n;
        int r;

        r = sasl_b64_decode(b64, len, msg, sizeof(msg), &n);
        if (r < 0) {
                explicit_bzero(msg, sizeof(msg)); /* a partial decode may hold part of a password */
                return reply(p->s, "%s BAD Invalid base64 data in AUTHENTICATE response.\r\n", tag);
        }
        r = sasl_plain_split(msg, n, authzid, authcid, password);
        explicit_bzero(msg, sizeof(msg));
        if (r < 0)
                r = login_failed(p, tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed.");
        else
                r = login_with(p, tag, authcid, authzid, password);
        explicit_bzero(password, sizeof(password));
        return r;
}

/* AUTHENTICATE LOGIN: the user name, then the password, each base64. */
static int auth_login_step(Prelogin *p, const char *b64, size_t len) {
        char buf[IPC_PASSWORD_MAX];
        size_t n;
        int r;

        r = sasl_b64_decode(b64, len, buf, sizeof(buf), &n);
        if (r < 0 || memchr(buf, '\0', n)) {
                explicit_bzero(buf, sizeof(buf)); /* may hold part of a password */
                p->auth = AUTH_NONE;
                return reply(p->s, "%s BAD Invalid base64 data in AUTHENTICATE response.\r\n", p->auth_tag);
        }
        if (p->auth == AUTH_LOGIN_USER) {
                if (n >= sizeof(p->auth_user)) {
                        p->auth = AUTH_NONE;
                        return login_failed(p, p->auth_tag, "NO", "[LIMIT] User name too long.");
                }
                memcpy(p->auth_user, buf, n + 1);
                p->auth = AUTH_LOGIN_PASS;
                imap_scanner_expect_raw_line(p->sc);
                return reply(p->s, "+ UGFzc3dvcmQ6\r\n"); /* "Password:" */
        }
        p->auth = AUTH_NONE;
        r = login_with(p, p->auth_tag, p->auth_user, "", buf);
        explicit_bzero(buf, sizeof(buf));
        return r;
}

static int do_authenticate(Prelogin *p, const char *tag, const ImapLine *l) {
        if (l->n_args < 3 || l->n_args > 4 || l->args[2].type != IMAP_ARG_ATOM ||
            (l->n_args == 4 && (l->args[3].type != IMAP_ARG_ATOM || l->args[3].truncated)))
                return reply(p->s, "%s BAD Invalid arguments to AUTHENTICATE.\r\n", tag);
        bool ir = l->n_args == 4;
        bool plain = imap_arg_is(&l->args[2], "PLAIN"), login = imap_arg_is(&l->args[2], "LOGIN");

        if (!plain && !login)
                return reply(p->s, "%s NO [CANNOT] Unsupported authentication mechanism.\r\n", tag);
        p->cmd_start_usec = now_usec();
        snprintf(p->auth_tag, sizeof(p->auth_tag), "%s", tag);
        if (plain && ir)
                return auth_plain(p, tag, l->args[3].str, l->args[3].len);
        if (plain) {
                p->auth = AUTH_PLAIN_WAIT;
                imap_scanner_expect_raw_line(p->sc);
                return reply(p->s, "+ \r\n");
        }
        if (ir) { /* some clients send the user name as an initial response */
                p->auth = AUTH_LOGIN_USER;
                return auth_login_step(p, l->args[3].str, l->args[3].len);
        }
        p->auth = AUTH_LOGIN_USER;
        imap_scanner_expect_raw_line(p->sc);
        return reply(p->s, "+ VXNlcm5hbWU6\r\n"); /* "Username:" */
}

/* The client's answer to a continuation during AUTHENTICATE. */
static int auth_continue(Prelogin *p, const ImapLine *l) {
        const char *data = l->n_args > 0 ? l->args[0].str : "";
        size_t len = l->n_args > 0 ? l->args[0].len : 0;
        AuthStep step = p->auth;

        if (l->n_args > 0 && l->args[0].truncated) {
                p->auth = AUTH_NONE;
                return reply(p->s, "%s BAD AUTHENTICATE response too long.\r\n", p->auth_tag);
        }
        if (len == 1 && data[0] == '*') {
                p->auth = AUTH_NONE;
                return reply(p->s, "%s BAD Authentication cancelled.\r\n", p->auth_tag);
        }
        if (step == AUTH_PLAIN_WAIT) {
                p->auth = AUTH_NONE;
                return auth_plain(p, p->auth_tag, data, len);
        }
        return auth_login_step(p, data, len);
}

/* ID ( "key" value ... ) | NIL: keep the client's pairs, re-serialised as
 * quoted strings, for the broker; the proxy sets x-originating-* and
 * x-connected-* itself. */
static void id_remember(Session *s, const ImapLine *l) {
        size_t o = 0;
        char *out = s->client_id;
        const size_t size = sizeof(s->client_id);

        out[0] = '\0';
        if (l->n_args < 4 || l->args[2].type != IMAP_ARG_LIST_START)
                return;
        out[o++] = '(';
        for (size_t i = 3; i + 1 < l->n_args; i += 2) {
                const ImapArg *k = &l->args[i], *v = &l->args[i + 1];
                if (k->type == IMAP_ARG_LIST_END || v->type == IMAP_ARG_LIST_END)
                        break;
                if (k->truncated || v->truncated || k->depth != 1 || v->depth != 1 ||
                    (k->type != IMAP_ARG_QUOTED && k->type != IMAP_ARG_ATOM && k->type != IMAP_ARG_LITERAL))
                        continue;
                if (strncasecmp(k->str, "x-originating-", 14) == 0 || strncasecmp(k->str, "x-connected-", 12) == 0)
                        continue;
                bool nil = v->type == IMAP_ARG_ATOM && imap_arg_is(v, "NIL");
                /* worst case every byte escaped, plus quotes and spaces */
                if (o + 2 * (k->len + v->len) + 8 >= size - 1)
                        break;
                const ImapArg *parts[2] = { k, v };
                for (int j = 0; j < 2; j++) {
                        const ImapArg *a = parts[j];
                        if (o > 1)
                                out[o++] = ' ';
                        if (j == 1 && nil) {
                                memcpy(out + o, "NIL", 3);
                                o += 3;
                                continue;
                        }
                        out[o++] = '"';
                        for (size_t c = 0; c < a->len; c++) {
                                char ch = a->str[c];
                                if (ch == '\r' || ch == '\n' || ch == '\0')
                                        ch = ' ';
                                if (ch == '"' || ch == '\\')
                                        out[o++] = '\\';
                                out[o++] = ch;
                        }
                        out[o++] = '"';
                }
        }
        out[o++] = ')';
        out[o] = '\0';
}

/* Returns PRELOGIN_LOGGED_IN, PRELOGIN_STARTTLS, 0 continue, -ECONNRESET to
 * end the connection, <0 error. */
static int handle_line(Prelogin *p, const ImapLine *l) {
        Session *s = p->s;
        char caps[IPC_CAPS_MAX];
        char tag[TAG_MAX + 1];

        if (p->auth != AUTH_NONE)
                return auth_continue(p, l);
        if (l->n_args == 0)
                return 0; /* an empty line is not a command: ignore it, as servers do */
        if (!tag_valid(&l->args[0]))
                return reply(s, "* BAD Invalid tag.\r\n");
        memcpy(tag, l->args[0].str, l->args[0].len);
        tag[l->args[0].len] = '\0';
        if (l->n_args < 2 || l->args[1].type != IMAP_ARG_ATOM)
                return reply(s, "%s BAD Missing command.\r\n", tag);
        const ImapArg *cmd = &l->args[1];

        if ((imap_arg_is(cmd, "LOGIN") || imap_arg_is(cmd, "AUTHENTICATE")) && !session_login_allowed(s)) {
                /* login_requires_tls: LOGINDISABLED is advertised; refuse
                 * before looking at the credentials, and forget them. */
                imap_scanner_wipe(p->sc);
                return reply(s, "%s NO [PRIVACYREQUIRED] Use STARTTLS first: logins require TLS here.\r\n", tag);
        }
        if (imap_arg_is(cmd, "LOGIN")) {
                p->cmd_start_usec = now_usec();
                int r = do_login(p, tag, l);
                imap_scanner_wipe(p->sc);
                return r;
        }
        if (imap_arg_is(cmd, "AUTHENTICATE")) {
                int r = do_authenticate(p, tag, l);
                imap_scanner_wipe(p->sc);
                return r;
        }
        if (imap_arg_is(cmd, "CAPABILITY")) {
                caps_prelogin(s, caps, sizeof(caps));
                return reply(s, "* CAPABILITY %s\r\n%s OK Capability completed.\r\n", caps, tag);
        }
        if (imap_arg_is(cmd, "NOOP"))
                return reply(s, "%s OK NOOP completed.\r\n", tag);
        if (imap_arg_is(cmd, "ID")) {
                if (s->cfg.forward_client_id)
                        id_remember(s, l);
                return reply(s, "* ID NIL\r\n%s OK ID completed.\r\n", tag);
        }
        if (imap_arg_is(cmd, "LOGOUT")) {
                (void) reply(s, "* BYE Logging out\r\n%s OK Logout completed.\r\n", tag);
                return -ECONNRESET;
        }
        if (imap_arg_is(cmd, "STARTTLS")) {
                if (l->n_args != 2)
                        return reply(s, "%s BAD STARTTLS takes no arguments.\r\n", tag);
                if (s->tls_active)
                        return reply(s, "%s BAD TLS is already active.\r\n", tag);
                if (!session_starttls_available(s))
                        return reply(s, "%s BAD STARTTLS is not available.\r\n", tag);
                int r = reply(s, "%s OK Begin TLS negotiation now.\r\n", tag);
                return r < 0 ? r : PRELOGIN_STARTTLS;
        }
        return reply(s, "%s BAD Please log in first.\r\n", tag);
}

static int error_reply(Prelogin *p) {
        Session *s = p->s;
        const ImapLine *pl = imap_scanner_partial_line(p->sc);
        const char *text = imap_scanner_error_text(p->sc);
        if (p->auth != AUTH_NONE) {
                /* The bad line was the answer to our "+": that AUTHENTICATE
                 * is over (else the client's next command would be taken
                 * for its next answer). */
                p->auth = AUTH_NONE;
                return reply(s, "%s BAD %s.\r\n", p->auth_tag, text);
        }
        if (pl && pl->n_args > 0 && tag_valid(&pl->args[0]))
                return reply(s, "%.*s BAD %s.\r\n", (int) pl->args[0].len, pl->args[0].str, text);
        return reply(s, "* BAD %s.\r\n", text);
}

int prelogin_init(Prelogin *p, Session *s) {
        ImapScanLimits lim = {
                .max_line = s->cfg.max_prelogin_line,
                .max_literal = IPC_PASSWORD_MAX,
                .max_depth = 3,
                /* Enough for LOGIN (user, password) and the ID parameters we may
                 * forward (IPC_ID_MAX); longer lines are still framed, only not
                 * kept. Sized small on purpose: it is allocated (and zeroed) at
                 * every session start. */
                .capture_size = IPC_ID_MAX + IPC_PASSWORD_MAX + IPC_USER_MAX + 1024,
                .max_args = 256,
        };

        *p = (Prelogin) { .s = s };
        return imap_scanner_new(IMAP_SCAN_CLIENT, &lim, &p->sc);
}

void prelogin_done(Prelogin *p) {
        p->sc = imap_scanner_free(p->sc);
        explicit_bzero(p->auth_user, sizeof(p->auth_user));
}

int prelogin_feed(Prelogin *p, const uint8_t *buf, size_t len, size_t *ret_used) {
        Session *s = p->s;
        ImapScanner *sc = p->sc;
        size_t off = 0;
        int r = 0;

        while (off < len && r == 0) {
                size_t used = 0;
                int ev = imap_scanner_feed(sc, buf + off, len - off, &used);
                off += used;
                if (ev == -EMSGSIZE) {
                        (void) error_reply(p);
                        (void) reply(s, "* BYE Line too long.\r\n");
                        r = -ECONNRESET;
                } else if (ev == -EFBIG) {
                        /* No "+": a synchronising client sends nothing more of
                         * this command (a non-synchronising one sends bytes we
                         * read as new commands: they get BAD). The scanner stops
                         * before the header's end: drop the rest of the line. */
                        r = error_reply(p);
                        imap_scanner_skip_line(sc);
                } else if (ev < 0) {
                        r = error_reply(p);
                        imap_scanner_skip_line(sc);
                } else if (ev == IMAP_SCAN_LITERAL) {
                        uint64_t size;
                        unsigned flags;
                        imap_scanner_literal(sc, &size, &flags);
                        if (!(flags & IMAP_LITERAL_NONSYNC))
                                r = reply(s, "+ Ready for literal data\r\n");
                } else if (ev == IMAP_SCAN_LINE)
                        r = handle_line(p, imap_scanner_line(sc));
        }
        *ret_used = off;
        return r;
}

int prelogin_run(Session *s) {
        Prelogin pl;
        uint8_t buf[READ_CHUNK];
        int r;

        r = prelogin_init(&pl, s);
        if (r < 0)
                return r;

        /* One deadline for the whole dialogue, not per read: a client that
         * trickles a byte now and then (slow-loris) is cut off as one that
         * sends nothing. */
        uint64_t deadline = now_usec() + (uint64_t) s->cfg.client_prelogin_timeout * 1000000ULL;
        for (;;) {
                if (!client_pending(s)) {
                        struct pollfd p = { .fd = s->client_in, .events = POLLIN };
                        uint64_t now = now_usec();
                        int timeout_ms = now >= deadline ? 0 : (int) ((deadline - now + 999) / 1000);
                        r = timeout_ms > 0 ? poll(&p, 1, timeout_ms) : 0;
                        if (r < 0 && errno == EINTR)
                                continue;
                        if (r == 0) {
                                (void) reply(s, "* BYE Disconnected for inactivity.\r\n");
                                r = 0;
                                break;
                        }
                }
                ssize_t n = client_recv(s, buf, sizeof(buf));
                if (n == -EINTR || n == -EAGAIN)
                        continue;
                if (n <= 0) {
                        r = 0;
                        break;
                }

                size_t off = 0;
                r = prelogin_feed(&pl, buf, (size_t) n, &off);
                if (r == PRELOGIN_STARTTLS) {
                        /* Whatever the client sent after STARTTLS was sent in the
                         * clear and must never be read as a command (the STARTTLS
                         * command injection, CVE-2011-0411 and kin): dropped. */
                        if ((size_t) n > off)
                                log_debug("dropping %zu bytes sent after STARTTLS", (size_t) n - off);
                } else if (r == PRELOGIN_LOGGED_IN) {
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
        prelogin_done(&pl);
        if (r == -ECONNRESET)
                return 0;
        return r;
}
