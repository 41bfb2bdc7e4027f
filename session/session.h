/*
 * session.h -- types shared by the session's modules.
 *
 *	main.c      start-up: arguments, config, client socket, broker hello, greeting
 *	prelogin.c  the client before login: commands answered locally, LOGIN
 *	relay.c     after login: relaying both ways, LOGOUT, returning the connection
 *	caps.c      capability lists as the client sees them
 *	broker.c    talking to the broker (hello, checkout, checkin)
 *	tls.c       client TLS (GnuTLS): only in imapproxy-session-tls, built
 *	            from the same sources with -DSESSION_TLS
 *	trace.c     redacted protocol lines for imapproxyctl trace
 */
#pragma once

#include <stdbool.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include "config.h"
#include "imap-scanner.h"
#include "ipc-proto.h"
#include "macro.h"

typedef struct Session {
        Config cfg;
        int client_in, client_out; /* the same socket twice, except odd inetd set-ups */
        int broker_fd;             /* -EBADF if the broker is unreachable */
        int backend_fd;            /* after login */
        uint64_t ticket;           /* lease ticket */
        bool reused;

        /* A reused connection may have died in the pool just before it was
         * lent (doveadm kick, server restart) without the broker seeing it
         * yet. Until the backend has answered anything, the relay can still
         * log in afresh and replay the client's bytes: for that short time
         * the session keeps the credentials here (wiped by
         * session_retry_disarm()). */
        bool retry_armed;
        char retry_authzid[IPC_USER_MAX];
        char retry_password[IPC_PASSWORD_MAX];

        char client_addr[IPC_ADDR_MAX];
        unsigned client_port;

        char prelogin_caps[IPC_CAPS_MAX]; /* backend's, unfiltered */
        bool prelogin_caps_known;
        char postlogin_caps[IPC_CAPS_MAX];
        char user[IPC_USER_MAX];          /* logged-in user, for logs */
        char client_id[IPC_ID_MAX];       /* the client's ID parameters for the backend, or "" */
        char local_addr[IPC_ADDR_MAX];
        unsigned local_port;

        struct SessionTrace *trace; /* non-NULL only while imapproxyctl traces this user */

        /* bytes read from the client before login that belong to the relay */
        uint8_t *pending;
        size_t pending_len;

        unsigned login_failures;   /* failed logins so far (carried over STARTTLS) */
        bool tls_active;           /* the client talks TLS (always false in imapproxy-session) */
#ifdef SESSION_TLS
        void *tls;                 /* gnutls_session_t once the handshake is done, else NULL */
#endif
} Session;

/* Capability list flags for caps_filter(). */
enum {
        CAPS_PRELOGIN = 1u << 0,      /* add the proxy's AUTH= mechanisms (or LOGINDISABLED) */
        CAPS_STARTTLS = 1u << 1,      /* add STARTTLS */
        CAPS_LOGINDISABLED = 1u << 2, /* no login now: LOGINDISABLED, no AUTH= */
};

/* caps.c: the backend's list minus what the proxy cannot pass through, plus ours. */
void caps_filter(const char *backend_caps, unsigned flags, char *out, size_t outsize);
/* The pre-login list for this client now (STARTTLS, login_requires_tls). */
void caps_prelogin(const Session *s, char *out, size_t outsize);
bool session_starttls_available(const Session *s);
bool session_login_allowed(const Session *s);

/* broker.c */
int broker_hello(Session *s);
int broker_checkout(Session *s, const char *user, const char *authzid, const char *password,
                    uint32_t flags, struct ipc_checkout_fail *ret_fail);
void session_retry_disarm(Session *s);
int broker_checkin(Session *s, bool clean);

/* sasl.c: base64 via GnuTLS loaded on demand; SASL PLAIN message split */
int sasl_b64_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *ret_len);
int sasl_plain_split(const char *msg, size_t len, char *authzid, char *authcid, char *password);

/* prelogin.c: returns PRELOGIN_LOGGED_IN (backend_fd set), PRELOGIN_STARTTLS
 * (tagged OK sent, everything the client sent after STARTTLS dropped: the
 * caller starts TLS), 0 when the client logged out or went away, <0 on error.
 * It is prelogin_feed() over what the client sends: a pure step (replies
 * through client_write(), logins through broker_checkout()) that
 * tests/fuzz/fuzz-prelogin.c drives with its own versions of those two.
 * prelogin_feed() returns 0 (more; all of buf used), PRELOGIN_LOGGED_IN or
 * PRELOGIN_STARTTLS (*ret_used bytes were the pre-login dialogue, the rest is
 * not), -ECONNRESET (end the connection: LOGOUT, too many failures, line too
 * long) or another -errno. */
enum { PRELOGIN_LOGGED_IN = 1, PRELOGIN_STARTTLS = 2 };

typedef enum AuthStep {
        AUTH_NONE,
        AUTH_PLAIN_WAIT, /* "+ " sent, waiting for the PLAIN message */
        AUTH_LOGIN_USER, /* "+ Username:" sent */
        AUTH_LOGIN_PASS, /* "+ Password:" sent */
} AuthStep;

#define PRELOGIN_TAG_MAX 256

typedef struct Prelogin {
        Session *s;
        ImapScanner *sc;
        AuthStep auth;
        char auth_tag[PRELOGIN_TAG_MAX + 1];
        char auth_user[IPC_USER_MAX];
        uint64_t cmd_start_usec;
} Prelogin;

int prelogin_init(Prelogin *p, Session *s);
int prelogin_feed(Prelogin *p, const uint8_t *buf, size_t len, size_t *ret_used);
void prelogin_done(Prelogin *p);
int prelogin_run(Session *s);

/* relay.c: returns when the session is over. */
int relay_run(Session *s);

/* trace.c: imapproxyctl trace. The hooks cost one pointer test when the
 * user is not traced. */
int trace_start(Session *s);
void trace_feed(Session *s, IpcTraceDir dir, const void *buf, size_t len);
void trace_note(Session *s, const char *fmt, ...) _printf_(2, 3);
#define TRACE_BYTES(s, dir, buf, len)                                                             \
        do {                                                                                      \
                if (_unlikely_((s)->trace))                                                       \
                        trace_feed((s), (dir), (buf), (len));                                     \
        } while (0)
#define TRACE_NOTE(s, ...)                                                                        \
        do {                                                                                      \
                if (_unlikely_((s)->trace))                                                       \
                        trace_note((s), __VA_ARGS__);                                             \
        } while (0)

/* main.c */
int client_write(Session *s, const char *buf, size_t len);

#ifdef SESSION_TLS
/* tls.c: client TLS over s->client_in/client_out. tls_setup() once per
 * process (credentials, priorities, ticket key); the rest per client. */
int tls_setup(const Config *cfg);
int tls_check(const Config *cfg); /* would tls_setup() succeed? (fork server, SIGHUP) */
void tls_ticket_key_refresh(const Config *cfg); /* --fork-server: before each fork */
int tls_handshake(Session *s);
ssize_t tls_recv(Session *s, void *buf, size_t len);
ssize_t tls_send(Session *s, const void *buf, size_t len);
int tls_write_all(Session *s, const void *buf, size_t len, int timeout_ms);
bool tls_pending(const Session *s);
void tls_end(Session *s);
int tls_write_ticket_key(const char *path);
#endif

/* Client I/O. In imapproxy-session these are the plain system calls (the
 * hot path pays nothing for TLS); in imapproxy-session-tls they go through
 * GnuTLS once the handshake is done. Both return bytes or -errno
 * (-EAGAIN: try again after poll). */
static inline ssize_t client_recv(Session *s, void *buf, size_t len) {
#ifdef SESSION_TLS
        if (s->tls)
                return tls_recv(s, buf, len);
#endif
        ssize_t n = read(s->client_in, buf, len);
        return n < 0 ? -errno : n;
}

static inline ssize_t client_send(Session *s, const void *buf, size_t len) {
#ifdef SESSION_TLS
        if (s->tls)
                return tls_send(s, buf, len);
#endif
        ssize_t n = send(s->client_out, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == ENOTSOCK)
                n = write(s->client_out, buf, len);
        return n < 0 ? -errno : n;
}

/* Client bytes already read from the socket but not yet returned by
 * client_recv() (decrypted TLS records): poll() cannot see them. */
static inline bool client_pending(const Session *s) {
#ifdef SESSION_TLS
        if (s->tls)
                return tls_pending(s);
#endif
        (void) s;
        return false;
}
