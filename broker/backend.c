/*
 * backend.c -- making new authenticated backend connections.
 *
 * SYNOPSIS
 *	int backend_job_start(Broker *b, const struct ipc_checkout *req, const uint8_t verifier[],
 *	                      BackendDoneFn done, void *userdata, BackendJob **ret);
 *	void backend_job_cancel(BackendJob *j);
 * DESCRIPTION
 *	One job per new connection, an explicit state machine driven by the
 *	event loop (never blocking it):
 *	  RESOLVE -> CONNECT [-> TLS] -> GREETING [-> CAPA_PRE] [-> STARTTLS -> TLS -> CAPA_PRE]
 *	          [-> PREAUTH] [-> ID] -> LOGIN [-> CAPA_POST]
 *	TLS comes right after CONNECT with server_tls implicit; STARTTLS
 *	follows tls_policy_next() (server_tls starttls, or a server saying
 *	LOGINDISABLED): the capabilities are asked for again under TLS, and
 *	only those are used and published. A TLS connection is handed over
 *	as one end of the relay's socketpair (tls.c), so that the pool and the
 *	session see it like a plain one.
 *	The name is resolved for every new connection (IPv4 and IPv6, or as
 *	ipversion_only says), each address is tried in turn (rotated with
 *	dns_rr), each phase has backend_timeout. LOGIN sends user and password
 *	as quoted strings when they are plain 7-bit text, else as literals
 *	(LITERAL+ when the server offers it, else synchronising, waiting for
 *	"+"): never pasted raw. Server responses go through the IMAP scanner in
 *	server mode. A probe job (user NULL) only learns the greeting's
 *	capabilities and logs out.
 *	On success the done callback gets a lent Conn with the post-login
 *	capabilities; on NO/BAD it gets the server's resp-text (with its
 *	response code) to relay; on any other failure IPC_FAIL_UNAVAILABLE.
 *	The job is freed after the callback returns.
 * SECURITY
 *	The LOGIN command (it contains the password) lives in one buffer,
 *	wiped as soon as it is sent; it and the job (which holds the password
 *	until the command is built) are secret_alloc() pages, left out of core
 *	dumps (MADV_DONTDUMP). Backend text is sanitised before logging.
 */
#include <errno.h>
#include <gnutls/gnutls.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "capability.h"
#include "fd-util.h"
#include "log.h"
#include "secret.h"
#include "tls-policy.h"

#define BACKEND_INBUF 16384 /* one TLS record */
#define BACKEND_MAX_LINE 65536
#define LOGIN_SYNC_MAX 2

typedef enum BackendPhase {
        PHASE_RESOLVE,
        PHASE_CONNECT,
        PHASE_TLS,
        PHASE_GREETING,
        PHASE_CAPA_PRE,
        PHASE_STARTTLS,
        PHASE_PREAUTH,
        PHASE_ID,
        PHASE_LOGIN,
        PHASE_CAPA_POST,
        PHASE_LOGOUT, /* probe only */
        _PHASE_MAX,
} BackendPhase;

static const char *const phase_names[_PHASE_MAX] = {
        [PHASE_RESOLVE] = "resolve",    [PHASE_CONNECT] = "connect",     [PHASE_GREETING] = "greeting",
        [PHASE_TLS] = "TLS handshake",  [PHASE_STARTTLS] = "starttls",
        [PHASE_CAPA_PRE] = "capability", [PHASE_PREAUTH] = "preauth_command", [PHASE_ID] = "id",
        [PHASE_LOGIN] = "login",          [PHASE_CAPA_POST] = "capability",
        [PHASE_LOGOUT] = "logout",
};
static_assert(ELEMENTSOF(phase_names) == _PHASE_MAX, "phase name table");

struct BackendJob {
        Broker *broker;
        BackendPhase phase;
        bool probe;
        char user[IPC_USER_MAX];
        uint8_t verifier[VERIFIER_SIZE];
        BackendDoneFn done;
        void *userdata;

        Resolve *resolve;
        struct addrinfo *ai_list, *ai_cur, *ai_try; /* ai_cur: next to try; ai_try: being tried */
        unsigned ai_left;

        int fd;
        sd_event_source *io, *timer;
        ImapScanner *scanner;
        gnutls_session_t tls;            /* once TLS is up (or being set up) */
        bool tls_again;                  /* GnuTLS holds a record after GNUTLS_E_AGAIN */
        bool starttls;                   /* STARTTLS was sent (TLS came after the greeting) */
        char caps_pre[IPC_CAPS_MAX];     /* this connection's pre-login capabilities */

        char *out;          /* pending output (may hold the password) */
        size_t out_len, out_pos, out_size;
        size_t sync_at[LOGIN_SYNC_MAX]; /* offsets in out where we wait for "+" */
        unsigned n_sync, sync_next;
        bool wait_continuation;

        char caps_post[IPC_CAPS_MAX];
        bool have_caps_post;
        char authzid[IPC_USER_MAX];
        char password[IPC_PASSWORD_MAX]; /* until the LOGIN command is built */
        char client_addr[IPC_ADDR_MAX], local_addr[IPC_ADDR_MAX];
        unsigned client_port, local_port;
        char *client_id;                 /* validated "(...)" or NULL */
};

static void job_enter_phase(BackendJob *j, BackendPhase p);

static void job_free(BackendJob *j) {
        if (!j)
                return;
        resolve_cancel(j->resolve);
        if (j->ai_list)
                freeaddrinfo(j->ai_list);
        j->io = sd_event_source_disable_unref(j->io);
        j->timer = sd_event_source_disable_unref(j->timer);
        if (j->tls)
                gnutls_deinit(j->tls);
        j->fd = safe_close(j->fd);
        imap_scanner_free(j->scanner);
        secret_free(j->out, j->out_size);
        explicit_bzero(j->password, sizeof(j->password));
        explicit_bzero(j->verifier, sizeof(j->verifier));
        free(j->client_id);
        j->broker->n_pending--;
        secret_free(j, sizeof(*j));
}

/* Finish: hand the result to the owner, then free. */
static void job_finish(BackendJob *j, int error, IpcFailStatus status, const char *text) {
        Broker *b = j->broker;
        Conn *c = NULL;

        if (error == 0 && !j->probe) {
                int fd = j->fd;
                uint64_t profile = 0;
                char backend[IPC_BACKEND_MAX];
                conn_describe_backend(j->fd, backend, sizeof(backend)); /* the TCP end, before any relay */
                if (j->tls) {
                        /* The TLS stream stays here; the pool gets our socketpair end. */
                        j->io = sd_event_source_disable_unref(j->io);
                        error = tls_relay_start(b, j->tls, j->fd, &fd);
                        if (error == 0) {
                                j->tls = NULL;
                                j->fd = -EBADF;
                                profile = b->tls_profile;
                        }
                }
                Caps *caps = error == 0 ? caps_intern(b, j->caps_post) : NULL;
                if (caps)
                        c = conn_new_lent(b, fd, j->user, j->authzid, j->verifier, caps, profile);
                caps_unref(caps);
                if (c) {
                        snprintf(c->backend, sizeof(c->backend), "%.70s%s", backend, profile ? " tls" : "");
                        j->fd = -EBADF; /* now owned by the Conn */
                        b->stats.backend_logins++;
                } else {
                        if (fd != j->fd)
                                safe_close(fd); /* the relay notices and closes the TLS side */
                        if (error == 0)
                                error = -ENOMEM;
                }
        }
        if (error < 0 && status == 0) {
                status = IPC_FAIL_UNAVAILABLE;
                text = "[UNAVAILABLE] Backend server not available, try again later.";
        }
        if (status == IPC_FAIL_NO || status == IPC_FAIL_BAD)
                b->stats.login_failures++;
        else if (status == IPC_FAIL_UNAVAILABLE)
                b->stats.backend_errors++;

        j->io = sd_event_source_disable_unref(j->io);
        j->timer = sd_event_source_disable_unref(j->timer);
        if (j->done)
                j->done(j->userdata, error, c, status, text);
        job_free(j);
}

static void job_fail(BackendJob *j, int error, const char *why) {
        log_struct(LOG_WARNING, IMAPPROXY_MSGID_BACKEND_UNREACHABLE,
                   LOG_FIELDS({ "IMAPPROXY_BACKEND", j->broker->backend_name },
                              { "IMAPPROXY_USER", j->probe ? NULL : j->user }),
                   "backend %s: %s failed for %s: %s", j->broker->backend_name, phase_names[j->phase],
                   j->probe ? "(probe)" : j->user, why);
        job_finish(j, error < 0 ? error : -EIO, 0, NULL);
}

static int job_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        BackendJob *j = userdata;
        job_fail(j, -ETIMEDOUT, "timed out");
        return 0;
}

static void job_arm_timer(BackendJob *j) {
        uint64_t when = now_usec() + (uint64_t) j->broker->cfg.backend_timeout * 1000000ULL;
        if (j->timer) {
                (void) sd_event_source_set_time(j->timer, when);
                (void) sd_event_source_set_enabled(j->timer, SD_EVENT_ONESHOT);
        } else
                (void) sd_event_add_time(j->broker->event, &j->timer, CLOCK_MONOTONIC, when, 0, job_on_timer, j);
}

static void job_enter_phase(BackendJob *j, BackendPhase p) {
        log_debug("backend job %s: %s -> %s", j->probe ? "(probe)" : j->user, phase_names[j->phase], phase_names[p]);
        j->phase = p;
        job_arm_timer(j);
}

/* ---- output ---- */

static int out_reserve(BackendJob *j, size_t more) {
        if (j->out_len + more <= j->out_size)
                return 0;
        size_t n = MAX(j->out_size * 2, j->out_len + more + 256);
        char *p = secret_alloc(n); /* it will hold the password: out of core dumps */
        if (!p)
                return -ENOMEM;
        if (j->out) {
                memcpy(p, j->out, j->out_len);
                secret_free(j->out, j->out_size);
        }
        j->out = p;
        j->out_size = n;
        return 0;
}

static int out_append(BackendJob *j, const char *s, size_t l) {
        int r = out_reserve(j, l);
        if (r < 0)
                return r;
        memcpy(j->out + j->out_len, s, l);
        j->out_len += l;
        return 0;
}

static bool astring_can_quote(const char *s, size_t l) {
        if (l > 1024)
                return false;
        for (size_t i = 0; i < l; i++) {
                unsigned char c = (unsigned char) s[i];
                if (c == 0 || c >= 0x80 || c == '\r' || c == '\n')
                        return false;
        }
        return true;
}

/* Append s as an IMAP astring: quoted with escapes, or a literal. */
static int out_append_astring(BackendJob *j, const char *s) {
        size_t l = strlen(s);
        int r;

        if (astring_can_quote(s, l)) {
                r = out_reserve(j, 2 * l + 2);
                if (r < 0)
                        return r;
                j->out[j->out_len++] = '"';
                for (size_t i = 0; i < l; i++) {
                        if (s[i] == '"' || s[i] == '\\')
                                j->out[j->out_len++] = '\\';
                        j->out[j->out_len++] = s[i];
                }
                j->out[j->out_len++] = '"';
                return 0;
        }

        const char *caps = j->caps_pre;
        bool nonsync = capability_list_contains(caps, "LITERAL+") || (capability_list_contains(caps, "LITERAL-") && l <= 4096);
        char hdr[32];
        int n = snprintf(hdr, sizeof(hdr), "{%zu%s}\r\n", l, nonsync ? "+" : "");
        r = out_append(j, hdr, (size_t) n);
        if (r < 0)
                return r;
        if (!nonsync) {
                if (j->n_sync >= LOGIN_SYNC_MAX)
                        return -E2BIG;
                j->sync_at[j->n_sync++] = j->out_len;
        }
        return out_append(j, s, l);
}

static int job_flush(BackendJob *j) {
        size_t limit = j->sync_next < j->n_sync ? j->sync_at[j->sync_next] : j->out_len;

        while (j->out_pos < limit) {
                ssize_t n;
                if (j->tls) {
                        n = j->tls_again ? gnutls_record_send(j->tls, NULL, 0)
                                         : gnutls_record_send(j->tls, j->out + j->out_pos, limit - j->out_pos);
                        if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
                                j->tls_again = true;
                                return sd_event_source_set_io_events(j->io, EPOLLIN | EPOLLOUT);
                        }
                        j->tls_again = false;
                        if (n < 0)
                                return -EIO;
                        j->out_pos += (size_t) n;
                        continue;
                }
                n = send(j->fd, j->out + j->out_pos, limit - j->out_pos, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return sd_event_source_set_io_events(j->io, EPOLLIN | EPOLLOUT);
                        return -errno;
                }
                j->out_pos += (size_t) n;
        }
        if (j->out_pos == j->out_len) {
                explicit_bzero(j->out, j->out_size); /* the password is gone from memory */
                j->out_len = j->out_pos = 0;
                j->n_sync = j->sync_next = 0;
                j->wait_continuation = false;
        } else
                j->wait_continuation = true; /* stopped at a sync literal */
        return sd_event_source_set_io_events(j->io, EPOLLIN);
}

static int job_send(BackendJob *j, const char *cmd) {
        int r = out_append(j, cmd, strlen(cmd));
        if (r < 0)
                return r;
        return job_flush(j);
}

bool proxy_auth_enabled(const Broker *b) {
        return b->cfg.auth_shared_secret && b->cfg.auth_sasl_plain_username && b->cfg.auth_sasl_plain_password;
}

/* AUTHENTICATE PLAIN authzid NUL authcid NUL password, base64, with SASL-IR
 * when offered, else after the server's "+". */
static int out_append_auth_plain(BackendJob *j, const char *authzid, const char *authcid, const char *password) {
        size_t zl = strlen(authzid), cl = strlen(authcid), pl = strlen(password);
        size_t ml = zl + 1 + cl + 1 + pl;
        _cleanup_free_ char *msg = malloc(ml);
        gnutls_datum_t in, out = {};
        int r;

        if (!msg)
                return -ENOMEM;
        memcpy(msg, authzid, zl);
        msg[zl] = '\0';
        memcpy(msg + zl + 1, authcid, cl);
        msg[zl + 1 + cl] = '\0';
        memcpy(msg + zl + 1 + cl + 1, password, pl);
        in = (gnutls_datum_t) { .data = (unsigned char *) msg, .size = (unsigned) ml };
        r = gnutls_base64_encode2(&in, &out);
        explicit_bzero(msg, ml);
        if (r < 0)
                return -ENOMEM;

        bool ir = capability_list_contains(j->caps_pre, "SASL-IR");
        r = out_append(j, ir ? "L AUTHENTICATE PLAIN " : "L AUTHENTICATE PLAIN\r\n", ir ? 21 : 22);
        if (r >= 0 && !ir)
                j->sync_at[j->n_sync++] = j->out_len;
        if (r >= 0)
                r = out_append(j, (const char *) out.data, out.size);
        if (r >= 0)
                r = out_append(j, "\r\n", 2);
        explicit_bzero(out.data, out.size);
        gnutls_free(out.data);
        return r;
}

static int job_send_login(BackendJob *j) {
        Broker *b = j->broker;
        int r;

        if (capability_list_contains(j->caps_pre, "LOGINDISABLED"))
                return -EPERM;
        if (proxy_auth_enabled(b))
                /* The broker checked the shared secret; log in as the client's user
                 * with the configured credentials. */
                r = out_append_auth_plain(j, j->user, b->cfg.auth_sasl_plain_username, b->cfg.auth_sasl_plain_password);
        else if (j->authzid[0])
                r = out_append_auth_plain(j, j->authzid, j->user, j->password);
        else {
                r = out_append(j, "L LOGIN ", 8);
                if (r >= 0)
                        r = out_append_astring(j, j->user);
                if (r >= 0)
                        r = out_append(j, " ", 1);
                if (r >= 0)
                        r = out_append_astring(j, j->password);
                if (r >= 0)
                        r = out_append(j, "\r\n", 2);
        }
        explicit_bzero(j->password, sizeof(j->password));
        if (r < 0)
                return r;
        job_enter_phase(j, PHASE_LOGIN);
        return job_flush(j);
}

static int out_append_quoted(BackendJob *j, const char *s) {
        int r = out_reserve(j, 2 * strlen(s) + 3);
        if (r < 0)
                return r;
        j->out[j->out_len++] = '"';
        for (; *s; s++) {
                if (*s == '"' || *s == '\\')
                        j->out[j->out_len++] = '\\';
                j->out[j->out_len++] = *s;
        }
        j->out[j->out_len++] = '"';
        return 0;
}

/* ID ( client pairs "x-originating-ip" ... ). */
static int job_send_id(BackendJob *j) {
        char num[16];
        int r = out_append(j, "I ID (", 6);
        bool first = true;

        if (r >= 0 && j->client_id && strlen(j->client_id) > 2) {
                r = out_append(j, j->client_id + 1, strlen(j->client_id) - 2); /* without the parentheses */
                first = false;
        }
        const struct {
                const char *key, *addr;
                unsigned port;
        } f[] = {
                { "x-originating-ip", j->client_addr, 0 },
                { "x-originating-port", NULL, j->client_port },
                { "x-connected-ip", j->local_addr, 0 },
                { "x-connected-port", NULL, j->local_port },
        };
        for (size_t i = 0; i < ELEMENTSOF(f) && r >= 0; i++) {
                const char *v = f[i].addr;
                if (!v) {
                        if (f[i].port == 0)
                                continue;
                        snprintf(num, sizeof(num), "%u", f[i].port);
                        v = num;
                }
                if (!*v)
                        continue;
                r = out_append(j, first ? "" : " ", first ? 0 : 1);
                first = false;
                if (r >= 0)
                        r = out_append_quoted(j, f[i].key);
                if (r >= 0)
                        r = out_append(j, " ", 1);
                if (r >= 0)
                        r = out_append_quoted(j, v);
        }
        if (r >= 0)
                r = out_append(j, ")\r\n", 3);
        if (r < 0)
                return r;
        job_enter_phase(j, PHASE_ID);
        return job_flush(j);
}

static void set_prelogin_caps(Broker *b, const char *caps);
static bool logindisabled_noted;

/* After the greeting and capabilities: TLS if needed, the optional steps,
 * then login. Only capabilities that hold for the login are published. */
static int job_advance(BackendJob *j) {
        Broker *b = j->broker;
        int r;

        if (j->phase <= PHASE_CAPA_PRE) {
                switch (tls_policy_next(config_server_tls(&b->cfg), j->tls != NULL, j->caps_pre)) {
                case TLS_STEP_STARTTLS:
                        if (config_server_tls(&b->cfg) == SERVER_TLS_NONE && !logindisabled_noted) {
                                logindisabled_noted = true; /* once: it holds for every connection */
                                log_info("backend %s:%s says LOGINDISABLED: using STARTTLS (server_tls none)",
                                         b->cfg.server_hostname, b->cfg.server_port);
                        }
                        j->starttls = true;
                        job_enter_phase(j, PHASE_STARTTLS);
                        return job_send(j, "S STARTTLS\r\n");
                case TLS_STEP_REFUSE_NO_STARTTLS:
                        return -EPROTONOSUPPORT;
                case TLS_STEP_REFUSE_LOGINDISABLED:
                        if (!j->probe)
                                return -EPERM;
                        break; /* sessions show LOGINDISABLED and refuse logins themselves */
                case TLS_STEP_LOGIN:
                default:
                        break;
                }
                set_prelogin_caps(b, j->caps_pre);
        }
        if (j->probe) {
                job_enter_phase(j, PHASE_LOGOUT);
                return job_send(j, "P LOGOUT\r\n");
        }
        if (j->phase < PHASE_PREAUTH && b->cfg.preauth_command) {
                job_enter_phase(j, PHASE_PREAUTH);
                r = out_append(j, "P ", 2);
                if (r >= 0)
                        r = out_append(j, b->cfg.preauth_command, strlen(b->cfg.preauth_command));
                if (r >= 0)
                        r = out_append(j, "\r\n", 2);
                return r < 0 ? r : job_flush(j);
        }
        if (j->phase < PHASE_ID && b->cfg.forward_client_id)
                return job_send_id(j);
        return job_send_login(j);
}

/* ---- input ---- */

/* "[CODE] text" from a status response, for the client. */
static void resp_text_of(const ImapLine *l, char *out, size_t outsize) {
        size_t o = 0;
        out[0] = '\0';
        for (size_t i = 2; i < l->n_args; i++) {
                const ImapArg *a = &l->args[i];
                int n = 0;
                if (a->type == IMAP_ARG_CODE)
                        n = snprintf(out + o, outsize - o, "[%s] ", a->str);
                else if (a->type == IMAP_ARG_TEXT)
                        n = snprintf(out + o, outsize - o, "%s", a->str);
                if (n < 0 || (size_t) n >= outsize - o) {
                        o = outsize - 1;
                        break;
                }
                o += (size_t) n;
        }
        out[o] = '\0';
        while (o > 0 && out[o - 1] == ' ')
                out[--o] = '\0';
        if (o == 0)
                snprintf(out, outsize, "Failed.");
}

/* Copy capabilities from a CODE "CAPABILITY a b c" or untagged args. */
static bool caps_from_code(const ImapArg *a, char *out, size_t outsize) {
        if (a->type != IMAP_ARG_CODE || a->truncated || a->len < 11 || strncasecmp(a->str, "CAPABILITY", 10) != 0 ||
            (a->str[10] != ' ' && a->str[10] != '\0'))
                return false;
        const char *p = a->str + 10;
        while (*p == ' ')
                p++;
        snprintf(out, outsize, "%s", p);
        return true;
}

static bool caps_from_untagged(const ImapLine *l, char *out, size_t outsize) {
        if (l->n_args < 2 || !imap_arg_is(&l->args[1], "CAPABILITY"))
                return false;
        size_t o = 0;
        out[0] = '\0';
        for (size_t i = 2; i < l->n_args; i++) {
                const ImapArg *a = &l->args[i];
                if (a->type != IMAP_ARG_ATOM || a->truncated)
                        continue;
                if (o + a->len + 2 > outsize)
                        break;
                if (o > 0)
                        out[o++] = ' ';
                memcpy(out + o, a->str, a->len);
                o += a->len;
                out[o] = '\0';
        }
        return true;
}

static bool is_status(const ImapArg *a, const char *s) {
        return a->type == IMAP_ARG_ATOM && imap_arg_is(a, s);
}

static void set_prelogin_caps(Broker *b, const char *caps) {
        snprintf(b->prelogin_caps, sizeof(b->prelogin_caps), "%s", caps);
        b->prelogin_caps_known = true;
}

/* Returns 1 when the job finished (and is freed), 0 to continue, <0 to fail. */
static int job_handle_line(BackendJob *j, const ImapLine *l) {
        Broker *b = j->broker;
        char text[IPC_TEXT_MAX];

        if (l->n_args < 1)
                return -EPROTO;
        const ImapArg *tag = &l->args[0];
        bool untagged = tag->type == IMAP_ARG_ATOM && tag->len == 1 && tag->str[0] == '*';
        bool cont = tag->type == IMAP_ARG_ATOM && tag->len == 1 && tag->str[0] == '+';

        if (untagged && l->n_args >= 2 && is_status(&l->args[1], "BYE") && j->phase != PHASE_LOGOUT) {
                resp_text_of(l, text, sizeof(text));
                char clean[256];
                log_warning("backend said BYE during %s: %s", phase_names[j->phase],
                            log_sanitize(text, strlen(text), clean, sizeof(clean)));
                return -ECONNRESET;
        }

        switch (j->phase) {
        case PHASE_GREETING:
                if (!untagged || l->n_args < 2 || !is_status(&l->args[1], "OK"))
                        return -EPROTO;
                if (l->n_args >= 3 && caps_from_code(&l->args[2], j->caps_pre, sizeof(j->caps_pre)))
                        ;
                else {
                        job_enter_phase(j, PHASE_CAPA_PRE);
                        return job_send(j, "C CAPABILITY\r\n");
                }
                return job_advance(j);

        case PHASE_CAPA_PRE:
                if (untagged) {
                        (void) caps_from_untagged(l, j->caps_pre, sizeof(j->caps_pre));
                        return 0;
                }
                if (!imap_arg_is(tag, "C") || l->n_args < 2 || !is_status(&l->args[1], "OK"))
                        return -EPROTO;
                return job_advance(j);

        case PHASE_STARTTLS: {
                if (untagged)
                        return 0;
                if (!imap_arg_is(tag, "S") || l->n_args < 2)
                        return -EPROTO;
                if (!is_status(&l->args[1], "OK")) {
                        resp_text_of(l, text, sizeof(text));
                        char clean[256];
                        log_warning("backend refused STARTTLS: %s", log_sanitize(text, strlen(text), clean, sizeof(clean)));
                        return -EPROTONOSUPPORT;
                }
                int r = tls_session_new(b, j->fd, &j->tls);
                if (r < 0)
                        return r;
                j->caps_pre[0] = '\0'; /* what was said before TLS does not count (RFC 9051 6.2.1) */
                job_enter_phase(j, PHASE_TLS);
                return 0;
        }

        case PHASE_PREAUTH:
                if (untagged)
                        return 0;
                if (!imap_arg_is(tag, "P") || l->n_args < 2)
                        return -EPROTO;
                if (!is_status(&l->args[1], "OK")) {
                        resp_text_of(l, text, sizeof(text));
                        char clean[256];
                        log_warning("backend refused preauth_command: %s",
                                    log_sanitize(text, strlen(text), clean, sizeof(clean)));
                        return -EREMOTEIO;
                }
                return job_advance(j);

        case PHASE_ID:
                if (untagged)
                        return 0; /* the server's own * ID */
                if (!imap_arg_is(tag, "I") || l->n_args < 2)
                        return -EPROTO;
                return job_advance(j); /* a refused ID does not stop the login */

        case PHASE_LOGIN:
                if (cont) {
                        if (!j->wait_continuation)
                                return -EPROTO;
                        j->sync_next++;
                        return job_flush(j);
                }
                if (untagged) {
                        if (caps_from_untagged(l, j->caps_post, sizeof(j->caps_post)))
                                j->have_caps_post = true;
                        return 0;
                }
                if (!imap_arg_is(tag, "L") || l->n_args < 2)
                        return -EPROTO;
                if (is_status(&l->args[1], "OK")) {
                        if (l->n_args >= 3 && caps_from_code(&l->args[2], j->caps_post, sizeof(j->caps_post)))
                                j->have_caps_post = true;
                        if (!j->have_caps_post) {
                                job_enter_phase(j, PHASE_CAPA_POST);
                                return job_send(j, "C CAPABILITY\r\n");
                        }
                        return 1;
                }
                if (is_status(&l->args[1], "NO") || is_status(&l->args[1], "BAD")) {
                        resp_text_of(l, text, sizeof(text));
                        job_finish(j, -EACCES, is_status(&l->args[1], "NO") ? IPC_FAIL_NO : IPC_FAIL_BAD, text);
                        return 2;
                }
                return -EPROTO;

        case PHASE_CAPA_POST:
                if (untagged) {
                        if (caps_from_untagged(l, j->caps_post, sizeof(j->caps_post)))
                                j->have_caps_post = true;
                        return 0;
                }
                if (!imap_arg_is(tag, "C") || l->n_args < 2 || !is_status(&l->args[1], "OK"))
                        return -EPROTO;
                return 1;

        case PHASE_LOGOUT:
                if (untagged)
                        return 0;
                return 1;

        default:
                return -EPROTO;
        }
}

/* 0 when the handshake is under way, 1 when done, <0 on failure (why says it). */
static int job_handshake(BackendJob *j, char *why, size_t whysize) {
        int r = gnutls_handshake(j->tls);
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
                (void) sd_event_source_set_io_events(j->io, gnutls_record_get_direction(j->tls) ? EPOLLOUT : EPOLLIN);
                return 0;
        }
        if (r < 0) {
                tls_describe_error(j->broker, j->tls, r, why, whysize);
                return r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR ? -EKEYREJECTED : -EPROTO;
        }
        char desc[128];
        log_debug("backend job %s: TLS up: %s", j->probe ? "(probe)" : j->user,
                  tls_session_describe(j->tls, desc, sizeof(desc)));
        (void) sd_event_source_set_io_events(j->io, EPOLLIN);
        if (!j->starttls) {
                job_enter_phase(j, PHASE_GREETING); /* implicit TLS: the greeting comes now */
                return 1;
        }
        job_enter_phase(j, PHASE_CAPA_PRE);
        r = job_send(j, "C CAPABILITY\r\n");
        if (r < 0) {
                snprintf(why, whysize, "%s", strerror(-r));
                return r;
        }
        return 1;
}

/* One read: >0 bytes, 0 end of stream, -EAGAIN, or -errno (why says it). */
static ssize_t job_recv(BackendJob *j, uint8_t *buf, size_t size, char *why, size_t whysize) {
        ssize_t n;

        if (j->tls) {
                n = gnutls_record_recv(j->tls, buf, size);
                if (n >= 0)
                        return n;
                if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
                        return -EAGAIN;
                if (n == GNUTLS_E_PREMATURE_TERMINATION)
                        return 0;
                snprintf(why, whysize, "TLS: %s", gnutls_strerror((int) n));
                return -EIO;
        }
        n = recv(j->fd, buf, size, MSG_DONTWAIT);
        if (n >= 0)
                return n;
        if (errno == EAGAIN || errno == EINTR)
                return -EAGAIN;
        snprintf(why, whysize, "%s", strerror(errno));
        return -errno;
}

/* Feeds what was read to the scanner and the phase logic. 1 when the job is
 * gone (finished or failed), 0 to go on. */
static int job_feed(BackendJob *j, const uint8_t *buf, size_t n) {
        size_t off = 0;
        int r;

        while (off < n) {
                size_t used = 0;
                r = imap_scanner_feed(j->scanner, buf + off, n - off, &used);
                off += used;
                if (r < 0) {
                        char why[128];
                        snprintf(why, sizeof(why), "bad response: %s", imap_scanner_error_text(j->scanner));
                        job_fail(j, r, why);
                        return 1;
                }
                if (r != IMAP_SCAN_LINE)
                        continue;
                r = job_handle_line(j, imap_scanner_line(j->scanner));
                if (r < 0) {
                        job_fail(j, r, r == -EPERM ? "server says LOGINDISABLED and offers no STARTTLS: not logging in"
                                       : r == -EPROTONOSUPPORT ? "TLS is required (server_tls) but the server does not "
                                                                 "offer STARTTLS: not logging in"
                                       : r == -ECONNRESET ? "server said BYE"
                                       : r == -EREMOTEIO ? "preauth_command refused" : "unexpected response");
                        return 1;
                }
                if (r == 2)
                        return 1; /* finished with NO/BAD, freed */
                if (r == 1) {
                        if (off != n || (j->tls && gnutls_record_check_pending(j->tls) > 0)) {
                                job_fail(j, -EPROTO, "unexpected data after login");
                                return 1;
                        }
                        job_finish(j, 0, 0, NULL);
                        return 1;
                }
                if (j->phase == PHASE_TLS) {
                        /* Bytes after the STARTTLS answer were sent in clear
                         * before TLS: an injection attempt (CVE-2011-0411 style). */
                        if (off != n) {
                                job_fail(j, -EPROTO, "data after the STARTTLS response");
                                return 1;
                        }
                        (void) sd_event_source_set_io_events(j->io, EPOLLOUT); /* start the handshake */
                        return 0;
                }
        }
        return 0;
}

static int job_on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        BackendJob *j = userdata;
        uint8_t buf[BACKEND_INBUF];
        char why[512];
        int r;

        if (j->phase == PHASE_TLS) {
                r = job_handshake(j, why, sizeof(why));
                if (r < 0) {
                        job_fail(j, r, why);
                        return 0;
                }
                if (r == 0)
                        return 0;
                /* done: records may already be decrypted and waiting, read now */
        } else if (revents & EPOLLOUT) {
                r = job_flush(j);
                if (r < 0) {
                        job_fail(j, r, strerror(-r));
                        return 0;
                }
        }

        for (;;) {
                ssize_t n = job_recv(j, buf, sizeof(buf), why, sizeof(why));
                if (n == -EAGAIN)
                        return 0;
                if (n < 0) {
                        job_fail(j, (int) n, why);
                        return 0;
                }
                if (n == 0) {
                        if (j->phase == PHASE_LOGOUT)
                                job_finish(j, 0, 0, NULL);
                        else
                                job_fail(j, -ECONNRESET, "connection closed by the server");
                        return 0;
                }
                if (job_feed(j, buf, (size_t) n))
                        return 0;
                if (j->phase == PHASE_TLS)
                        return 0;
        }
}

/* ---- connecting ---- */

static void job_connect_next(BackendJob *j);

static int job_on_connected(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        BackendJob *j = userdata;
        int err = 0;
        socklen_t l = sizeof(err);

        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
                err = errno;
        if (err != 0) {
                char host[NI_MAXHOST] = "?";
                (void) getnameinfo(j->ai_try->ai_addr, j->ai_try->ai_addrlen, host, sizeof(host), NULL, 0, NI_NUMERICHOST);
                log_info("backend %s port %s: connect: %s", host, j->broker->cfg.server_port, strerror(err));
                j->io = sd_event_source_disable_unref(j->io);
                j->fd = safe_close(j->fd);
                job_connect_next(j);
                return 0;
        }
        j->io = sd_event_source_disable_unref(j->io);
        bool implicit = config_server_tls(&j->broker->cfg) == SERVER_TLS_IMPLICIT;
        int r = sd_event_add_io(j->broker->event, &j->io, j->fd, implicit ? EPOLLOUT : EPOLLIN, job_on_io, j);
        if (r < 0) {
                job_fail(j, r, "sd_event_add_io");
                return 0;
        }
        if (implicit) {
                r = tls_session_new(j->broker, j->fd, &j->tls);
                if (r < 0) {
                        job_fail(j, r, "cannot set up TLS");
                        return 0;
                }
                job_enter_phase(j, PHASE_TLS); /* the first EPOLLOUT starts the handshake */
                return 0;
        }
        job_enter_phase(j, PHASE_GREETING);
        return 0;
}

static void job_connect_next(BackendJob *j) {
        Broker *b = j->broker;

        while (j->ai_left > 0) {
                struct addrinfo *ai = j->ai_cur;
                j->ai_left--;
                j->ai_cur = ai->ai_next ? ai->ai_next : j->ai_list; /* wrap: dns_rr may start mid-list */

                int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
                if (fd < 0)
                        continue;
                (void) fd_set_nodelay(fd);
                /* The socket keeps these when it is lent: a session on a dead
                 * link gets ETIMEDOUT too. */
                if (b->cfg.backend_link_timeout > 0)
                        (void) fd_set_link_timeout(fd, b->cfg.backend_link_timeout);
                else if (b->cfg.send_tcp_keepalives)
                        (void) fd_set_keepalive(fd);
                j->fd = fd;
                int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
                if (r < 0 && errno != EINPROGRESS) {
                        j->fd = safe_close(j->fd);
                        continue;
                }
                j->ai_try = ai;
                r = sd_event_add_io(b->event, &j->io, fd, EPOLLOUT, job_on_connected, j);
                if (r < 0) {
                        job_fail(j, r, "sd_event_add_io");
                        return;
                }
                job_enter_phase(j, PHASE_CONNECT);
                return;
        }
        job_fail(j, -EHOSTUNREACH, "no address could be connected");
}

static void job_on_resolved(void *userdata, int error, struct addrinfo *ai) {
        BackendJob *j = userdata;
        j->resolve = NULL;
        if (error < 0 || !ai) {
                job_fail(j, -EHOSTUNREACH, "cannot resolve server_hostname");
                return;
        }
        j->ai_list = ai;
        unsigned n = 0;
        for (struct addrinfo *p = ai; p; p = p->ai_next)
                n++;
        j->ai_left = n;
        j->ai_cur = ai;
        if (j->broker->cfg.dns_rr && n > 1) {
                unsigned skip = j->broker->rr_counter++ % n;
                for (unsigned i = 0; i < skip; i++)
                        j->ai_cur = j->ai_cur->ai_next;
        }
        job_connect_next(j);
}

/* The session's ID text, re-checked: "(" ... ")" that scans as one line
 * without literals, so it cannot smuggle a command or desynchronise us. */
static bool client_id_valid(const char *text) {
        size_t l = strlen(text);
        ImapScanLimits lim = { .max_line = IPC_ID_MAX + 16, .max_literal = 0, .max_depth = 2,
                               .capture_size = 64, .max_args = 4 };
        ImapScanner *sc = NULL;
        size_t used;
        bool ok = false;

        if (l < 2 || text[0] != '(' || text[l - 1] != ')' || strpbrk(text, "\r\n"))
                return false;
        if (imap_scanner_new(IMAP_SCAN_CLIENT, &lim, &sc) < 0)
                return false;
        if (imap_scanner_feed(sc, (const uint8_t *) "I ID ", 5, &used) == IMAP_SCAN_NEED_MORE &&
            imap_scanner_feed(sc, (const uint8_t *) text, l, &used) == IMAP_SCAN_NEED_MORE && used == l &&
            imap_scanner_feed(sc, (const uint8_t *) "\r\n", 2, &used) == IMAP_SCAN_LINE)
                ok = imap_scanner_line(sc)->n_literals == 0;
        imap_scanner_free(sc);
        return ok;
}

int backend_job_start(Broker *b, const struct ipc_checkout *req, const uint8_t verifier[VERIFIER_SIZE],
                      BackendDoneFn done, void *userdata, BackendJob **ret) {
        ImapScanLimits lim = {
                .max_line = BACKEND_MAX_LINE,
                .max_literal = BACKEND_MAX_LINE,
                .max_depth = 16,
                .capture_size = 16384,
                .max_args = 512,
        };
        int r;

        BackendJob *j = secret_alloc(sizeof(BackendJob)); /* zeroed; holds the password */
        if (!j)
                return -ENOMEM;
        j->broker = b;
        j->fd = -EBADF;
        j->done = done;
        j->userdata = userdata;
        j->probe = !req;
        b->n_pending++;
        if (req) {
                snprintf(j->user, sizeof(j->user), "%s", req->user);
                snprintf(j->authzid, sizeof(j->authzid), "%s", req->authzid);
                snprintf(j->password, sizeof(j->password), "%s", req->password);
                snprintf(j->client_addr, sizeof(j->client_addr), "%s", req->client_addr);
                snprintf(j->local_addr, sizeof(j->local_addr), "%s", req->local_addr);
                j->client_port = req->client_port;
                j->local_port = req->local_port;
                memcpy(j->verifier, verifier, VERIFIER_SIZE);
                if (req->client_id[0]) {
                        if (client_id_valid(req->client_id))
                                j->client_id = strdup(req->client_id);
                        else
                                log_warning("session sent an invalid ID parameter list for %s: not forwarded", j->user);
                }
        }
        r = imap_scanner_new(IMAP_SCAN_SERVER, &lim, &j->scanner);
        if (r < 0) {
                job_free(j);
                return r;
        }

        int family = b->cfg.ipversion_only == 4 ? AF_INET : b->cfg.ipversion_only == 6 ? AF_INET6 : AF_UNSPEC;
        j->phase = PHASE_RESOLVE;
        job_arm_timer(j);
        *ret = j;
        r = resolve_start(b, b->cfg.server_hostname, b->cfg.server_port, family, job_on_resolved, j, &j->resolve);
        if (r < 0) {
                *ret = NULL;
                job_free(j);
                return r;
        }
        return 0;
}

void backend_job_cancel(BackendJob *j) {
        if (!j)
                return;
        j->done = NULL;
        job_free(j);
}

/* ---- start-up probe: learn the pre-login capabilities ---- */

static sd_event_source *probe_timer;
static BackendJob *probe_job;
static unsigned probe_failures;

bool backend_probe_first_pending(const Broker *b) {
        return !b->prelogin_caps_known && probe_failures == 0 && !b->stopping;
}

static void probe_done(void *userdata, int error, Conn *c, IpcFailStatus status, const char *text) {
        Broker *b = userdata;
        probe_job = NULL;
        if (probe_failures == 0)
                peer_hello_release(b); /* success or not: the held hellos wait no longer */
        if (b->prelogin_caps_known) {
                char clean[256];
                log_info("backend %s:%s capabilities: %s", b->cfg.server_hostname, b->cfg.server_port,
                         log_sanitize(b->prelogin_caps, strlen(b->prelogin_caps), clean, sizeof(clean)));
                return;
        }
        /* Try again later; sessions greet with a minimal list meanwhile.
         * Every 5 s for the first half minute, then doubling up to 5 min: a
         * server that keeps failing (a certificate that does not verify)
         * must not fill the log. */
        probe_failures++;
        unsigned delay = probe_failures <= 6 ? 5u : MIN(5u << MIN(probe_failures - 6, 6u), 300u);
        (void) sd_event_source_set_time(probe_timer, now_usec() + (uint64_t) delay * 1000000ULL);
        (void) sd_event_source_set_enabled(probe_timer, SD_EVENT_ONESHOT);
}

static int probe_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        if (b->prelogin_caps_known || probe_job || b->stopping)
                return 0;
        int r = backend_job_start(b, NULL, NULL, probe_done, b, &probe_job);
        if (r < 0)
                log_warning_errno(r, "cannot start backend probe: %m");
        return 0;
}

int backend_init(Broker *b) {
        return sd_event_add_time(b->event, &probe_timer, CLOCK_MONOTONIC, 0, 0, probe_on_timer, b);
}

void backend_done(Broker *b) {
        backend_job_cancel(probe_job);
        probe_job = NULL;
        probe_timer = sd_event_source_disable_unref(probe_timer);
}
