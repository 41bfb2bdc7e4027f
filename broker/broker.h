/*
 * broker.h -- types shared by the broker's modules.
 *
 *	main.c     start-up, signals, the sd-event loop
 *	pool.c     idle authenticated backend connections, expiry, limits
 *	backend.c  new backend connections: resolve, connect, greeting, LOGIN
 *	peer.c     session peers on the broker socket: hello, checkout, checkin
 *	resolve.c  asynchronous getaddrinfo feeding the event loop
 *	stats.c    counters and peaks (imapproxyctl stats, STATUS=)
 *	tls.c      backend TLS: credentials, sessions, the relay for lent TLS connections
 *	admin.c    imapproxyctl peers: stats, list, flush, trace
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <gnutls/gnutls.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "imap-scanner.h"
#include "ipc.h"
#include "stats.h"

#define VERIFIER_SIZE 32 /* HMAC-SHA256 */

typedef struct Broker Broker;
typedef struct Conn Conn;
typedef struct Peer Peer;
typedef struct BackendJob BackendJob;
typedef struct Resolve Resolve;
typedef struct TlsRelay TlsRelay;
typedef struct AdminPeer AdminPeer;
struct addrinfo;
struct ucred;

/* Interned capability string: many connections share one copy. */
typedef struct Caps {
        unsigned refcount;
        char text[];
} Caps;
Caps *caps_intern(Broker *b, const char *text);
Caps *caps_ref(Caps *c);
Caps *caps_unref(Caps *c);

typedef enum ConnState {
        CONN_IDLE,   /* in the pool, fd watched */
        CONN_LENT,   /* fd is with a session; we hold no copy */
        CONN_DETACHED, /* in no list and no counter: about to be freed */
        _CONN_STATE_MAX,
} ConnState;

/* An authenticated backend connection the broker accounts for. */
struct Conn {
        Broker *broker;
        ConnState state;
        int fd;                         /* -EBADF while lent */
        uint64_t cookie;                /* SO_COOKIE: the same socket must come back */
        uint64_t ticket;                /* lease ticket while lent */
        Peer *peer;                     /* borrower while lent */
        sd_event_source *io;            /* idle watch */
        uint64_t created_usec, idle_since_usec;
        unsigned uses;
        uint64_t tls_profile;           /* 0: plain TCP; else the TLS profile it was made under (relayed) */
        bool no_reuse;                  /* flushed while lent: close it when it comes back */
        bool traced;                    /* lent with IPC_LEASE_F_TRACE */
        Caps *caps;                     /* post-login capabilities */
        uint8_t verifier[VERIFIER_SIZE];
        Conn *bucket_next, *bucket_prev; /* pool hash chain (idle only) */
        Conn *idle_next, *idle_prev;     /* global idle list, oldest first */
        char user[IPC_USER_MAX];         /* authentication identity */
        char authzid[IPC_USER_MAX];      /* authorisation identity, "" if none */
        char backend[IPC_BACKEND_MAX];   /* server address:port, for imapproxyctl list */
};

typedef enum PeerState {
        PEER_NEW,
        PEER_READY,
        PEER_PENDING,
        PEER_LEASED,
        PEER_ADMIN,
        PEER_HELLO_WAIT, /* session hello held until the start-up probe has the capabilities */
        _PEER_STATE_MAX,
} PeerState;

/* One connection on the broker socket: a session, or imapproxyctl (admin). */
struct Peer {
        Broker *broker;
        int fd;
        sd_event_source *io;
        pid_t pid;
        uid_t uid;
        gid_t gid;
        PeerState state;
        IpcRole role;            /* 0 until hello */
        bool traced;             /* a lease of this session was lent with IPC_LEASE_F_TRACE */
        BackendJob *job;
        Conn *lease;
        AdminPeer *admin;        /* role admin only */
        char user[IPC_USER_MAX]; /* of the last checkout, for logs and traces */
        char client[IPC_ADDR_MAX]; /* the session's client address, "" if unknown, for logs */
        char pidtext[16];          /* IMAPPROXY_SESSION_PID= */
        Peer *next, *prev;
};


struct Broker {
        sd_event *event;
        Config cfg;
        const char *config_path;
        char backend_name[300];          /* "host:port", IMAPPROXY_BACKEND= of log lines */

        int listen_fd;
        bool listen_fd_inherited;
        sd_event_source *listen_source;
        gid_t allowed_gid;
        bool allowed_gid_set;
        gid_t admin_gid;                 /* admin_group */
        bool admin_gid_set;
        uint64_t start_usec;
#define HMAC_KEY_SIZE 32

        uint8_t *hmac_key; /* HMAC_KEY_SIZE bytes from secret_alloc(): pool keys and the shared
                            * secret check; with a core and the pool's digests, passwords
                            * could be tested offline, so it stays out of dumps */
        uint64_t next_ticket;

        /* pool */
        Conn **buckets;
        size_t n_buckets;
        Conn *idle_head, *idle_tail;
        sd_event_source *expiry_timer;
        unsigned n_idle, n_lent, n_pending; /* n_pending: backend logins under way */

        /* peers */
        Peer *peers;
        unsigned n_peers;                /* sessions (and peers that have not said hello yet) */
        AdminPeer *admins;               /* imapproxyctl connections */
        unsigned n_tracers;              /* of them, tracing a user */
        unsigned max_peers;              /* from RLIMIT_NOFILE, leaving fds for the pool */
        int reserve_fd;                  /* spare fd: lets accept() refuse a peer at EMFILE */
        sd_event_source *listen_retry;   /* re-enables the listener after EMFILE without spare */
        uint64_t refusal_logged_usec;    /* last "refusing sessions" warning (rate limit) */

        /* backend */
        Caps *caps_cache;                /* last interned post-login caps */
        char prelogin_caps[IPC_CAPS_MAX];
        bool prelogin_caps_known;
        sd_event_source *hello_wait_timer; /* bounds PEER_HELLO_WAIT */
        unsigned rr_counter;
        int resolve_pipe[2];
        sd_event_source *resolve_source;

        /* backend TLS (tls.c) */
        gnutls_certificate_credentials_t tls_cred; /* loaded once; NULL until needed */
        gnutls_priority_t tls_prio;
        uint64_t tls_profile;            /* identity of the current TLS settings, never 0 once loaded */
        TlsRelay *relays;
        unsigned n_relays;

        Stats stats;
        bool stopping;
};

/* pool.c */
int pool_init(Broker *b);
void pool_done(Broker *b);
unsigned pool_total(const Broker *b);
int pool_checkout(Broker *b, const char *user, const char *authzid, const uint8_t verifier[VERIFIER_SIZE],
                  Conn **ret);
int pool_make_room(Broker *b);
int pool_checkin(Broker *b, Conn *c, int fd);
void pool_return_dirty(Broker *b, Conn *c, int fd);
void pool_conn_free(Conn *c, bool logout);
void pool_drop_user_except(Broker *b, const char *user, const char *authzid, const uint8_t verifier[VERIFIER_SIZE]);
void pool_logout_all(Broker *b);
void pool_config_changed(Broker *b);
unsigned pool_flush(Broker *b, const char *user);
void compute_verifier(const Broker *b, const char *user, const char *authzid, const char *password,
                      uint8_t ret[VERIFIER_SIZE]);
void conn_describe_backend(int fd, char *out, size_t size);
Conn *conn_new_lent(Broker *b, int fd, const char *user, const char *authzid, const uint8_t verifier[VERIFIER_SIZE],
                    Caps *caps, uint64_t tls_profile);

/* backend.c */
typedef void (*BackendDoneFn)(void *userdata, int error, Conn *conn, IpcFailStatus status, const char *text);
int backend_job_start(Broker *b, const struct ipc_checkout *req, const uint8_t verifier[VERIFIER_SIZE],
                      BackendDoneFn done, void *userdata, BackendJob **ret);
bool proxy_auth_enabled(const Broker *b);
void backend_job_cancel(BackendJob *j);
int backend_init(Broker *b);
/* The start-up probe has not finished a first attempt yet. */
bool backend_probe_first_pending(const Broker *b);
void backend_done(Broker *b);

/* resolve.c */
typedef void (*ResolveDoneFn)(void *userdata, int error, struct addrinfo *ai);
int resolve_init(Broker *b);
void resolve_done(Broker *b);
int resolve_start(Broker *b, const char *host, const char *port, int family, ResolveDoneFn done,
                  void *userdata, Resolve **ret);
void resolve_cancel(Resolve *r);

/* listen-tls.c: the sessions' client-TLS files, checked once */
int listen_tls_check(const Config *c);

/* tls.c */
int tls_init(Broker *b);
int tls_session_new(Broker *b, int fd, gnutls_session_t *ret);
void tls_describe_error(Broker *b, gnutls_session_t s, int err, char *why, size_t whysize);
const char *tls_session_describe(gnutls_session_t s, char *buf, size_t size);
int tls_relay_start(Broker *b, gnutls_session_t s, int net_fd, int *ret_fd);
void tls_done(Broker *b);

/* peer.c */
int peer_listen(Broker *b);
void peer_close_all(Broker *b);
/* The start-up probe finished (or gave up): answer the held session hellos. */
void peer_hello_release(Broker *b);

/* admin.c */
int admin_init(Broker *b);
bool admin_may_connect(const Broker *b, int fd, const struct ucred *cred);
int admin_hello(Peer *p);
int admin_dispatch(Peer *p, IpcMessage *m);
int admin_flush_output(Peer *p);
void admin_peer_free(Peer *p);
bool admin_is_traced(const Broker *b, const char *user);
void admin_trace_forward(Broker *b, const Peer *session, const struct ipc_trace *t);

/* main.c */
extern const char *arg_config;
void broker_update_status(Broker *b);
void status_send(Broker *b);

/* reload.c */
int broker_config_read(Config *c, const char *path, char *err, size_t errsize);
void broker_apply_config(Broker *b);
int broker_reload(Broker *b);
