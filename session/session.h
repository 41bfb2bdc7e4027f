/*
 * session.h -- types shared by the session's modules.
 *
 *	main.c      start-up: arguments, config, client socket, broker hello, greeting
 *	prelogin.c  the client before login: commands answered locally, LOGIN
 *	relay.c     after login: relaying both ways, LOGOUT, returning the connection
 *	caps.c      capability lists as the client sees them
 *	broker.c    talking to the broker (hello, checkout, checkin)
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "imap-scanner.h"
#include "ipc-proto.h"

typedef struct Session {
        Config cfg;
        int client_in, client_out; /* the same socket twice, except odd inetd set-ups */
        int broker_fd;             /* -EBADF if the broker is unreachable */
        int backend_fd;            /* after login */
        uint64_t ticket;           /* lease ticket */
        bool reused;

        char client_addr[IPC_ADDR_MAX];
        unsigned client_port;

        char prelogin_caps[IPC_CAPS_MAX]; /* backend's, unfiltered */
        bool prelogin_caps_known;
        char postlogin_caps[IPC_CAPS_MAX];
        char user[IPC_USER_MAX];          /* logged-in user, for logs */
        char client_id[IPC_ID_MAX];       /* the client's ID parameters for the backend, or "" */
        char local_addr[IPC_ADDR_MAX];
        unsigned local_port;

        /* bytes read from the client before login that belong to the relay */
        uint8_t *pending;
        size_t pending_len;
} Session;

/* caps.c: the backend's list minus what the proxy cannot pass through, plus ours. */
void caps_filter(const char *backend_caps, bool prelogin, char *out, size_t outsize);

/* broker.c */
int broker_hello(Session *s);
int broker_checkout(Session *s, const char *user, const char *authzid, const char *password,
                    struct ipc_checkout_fail *ret_fail);
int broker_checkin(Session *s, bool clean);

/* sasl.c: base64 via GnuTLS loaded on demand; SASL PLAIN message split */
int sasl_b64_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *ret_len);
int sasl_plain_split(const char *msg, size_t len, char *authzid, char *authcid, char *password);

/* prelogin.c: returns 1 when logged in (backend_fd set), 0 when the client
 * logged out or went away, <0 on error. */
int prelogin_run(Session *s);

/* relay.c: returns when the session is over. */
int relay_run(Session *s);

/* main.c */
int client_write(Session *s, const char *buf, size_t len);
