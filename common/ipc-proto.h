/*
 * ipc-proto.h -- THE definition of the broker <-> session wire protocol.
 *
 * DESCRIPTION
 *	AF_UNIX SOCK_SEQPACKET: one recvmsg() is one message, carrying at most
 *	one fd by SCM_RIGHTS. A message is struct ipc_hdr followed by exactly
 *	sizeof(payload) bytes; every payload has a fixed size and every string
 *	is a char array that must contain its NUL (checked, never repaired).
 *	Host byte order: same-host Unix socket only. doc/ipc-protocol.md
 *	describes the exchange; this file is the only place types are defined.
 *
 *	session                           broker
 *	HELLO{version, role=session} ->
 *	                            <-    HELLO_REPLY{version, pre-login caps}
 *	CHECKOUT{user,authzid,pass,addrs,id} ->
 *	                            <-    CHECKOUT_OK{ticket, caps} + fd
 *	                                | CHECKOUT_FAIL{status, text}
 *	TRACE{dir,line}             ->    (only after a CHECKOUT_OK with
 *	                                   IPC_LEASE_F_TRACE; no reply)
 *	CHECKIN{ticket,state} + fd  ->    (no reply; the session may exit)
 *
 *	imapproxyctl                      broker
 *	HELLO{version, role=admin}  ->    (SO_PEERCRED: root or admin_group)
 *	                            <-    HELLO_REPLY | ADMIN_DONE{EPERM} and close
 *	ADMIN{op=stats}             ->
 *	                            <-    ADMIN_STATS
 *	ADMIN{op=list}              ->
 *	                            <-    ADMIN_CONN ... ADMIN_DONE{n_idle,n_lent}
 *	ADMIN{op=flush,user}        ->
 *	                            <-    ADMIN_DONE{n_idle closed,n_lent marked}
 *	ADMIN{op=trace,user}        ->
 *	                            <-    ADMIN_DONE, then TRACE_EVENT ... until
 *	                                  the admin closes the connection
 *
 * SECURITY
 *	The broker builds the pool key from the user, authzid and password it
 *	receives (HMAC), never from anything else a session says; a session can
 *	only get a connection for credentials it already holds. client_id is
 *	re-validated by the broker before it is sent to a backend. The admin
 *	role is granted by the uid/groups of the peer (SO_PEERCRED,
 *	SO_PEERGROUPS), never by what it says; a session-role peer that sends
 *	an admin message is dropped. Admin messages carry no secrets: trace
 *	lines are redacted by the session before they are sent.
 */
#pragma once

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#define IPC_PROTO_VERSION 3 /* bump on ANY change to a type, payload or limit below */

/* Field limits (bytes including the terminating NUL). */
#define IPC_USER_MAX 256
#define IPC_PASSWORD_MAX 2048
#define IPC_ADDR_MAX 64
#define IPC_CAPS_MAX 2048
#define IPC_TEXT_MAX 1024
#define IPC_ID_MAX 4096
#define IPC_BACKEND_MAX 80   /* "address:port" or "[v6]:port" of a backend connection */
#define IPC_TRACE_LINE_MAX 512 /* one traced protocol line (prefix), without CRLF */

/*        type                 name             payload                       fd */
#define IPC_MESSAGES(X)                                                                           \
        X(IPC_HELLO,           "hello",         struct ipc_hello,             0)                  \
        X(IPC_HELLO_REPLY,     "hello-reply",   struct ipc_hello_reply,       0)                  \
        X(IPC_CHECKOUT,        "checkout",      struct ipc_checkout,          0)                  \
        X(IPC_CHECKOUT_OK,     "checkout-ok",   struct ipc_checkout_ok,       1)                  \
        X(IPC_CHECKOUT_FAIL,   "checkout-fail", struct ipc_checkout_fail,     0)                  \
        X(IPC_CHECKIN,         "checkin",       struct ipc_checkin,           1)                  \
        X(IPC_TRACE,           "trace",         struct ipc_trace,             0)                  \
        X(IPC_ADMIN,           "admin",         struct ipc_admin,             0)                  \
        X(IPC_ADMIN_STATS,     "admin-stats",   struct ipc_admin_stats,       0)                  \
        X(IPC_ADMIN_CONN,      "admin-conn",    struct ipc_admin_conn,        0)                  \
        X(IPC_ADMIN_DONE,      "admin-done",    struct ipc_admin_done,        0)                  \
        X(IPC_TRACE_EVENT,     "trace-event",   struct ipc_trace_event,       0)

typedef enum IpcType {
        _IPC_TYPE_NONE = 0, /* never on the wire */
#define IPC_X_ENUM(t, n, p, f) t,
        IPC_MESSAGES(IPC_X_ENUM)
#undef IPC_X_ENUM
        _IPC_TYPE_MAX,
} IpcType;

struct ipc_hdr {
        uint16_t type;  /* IpcType */
        uint16_t flags; /* IPC_HDR_F_*: must agree with the table and the ancillary data */
        uint32_t len;   /* payload bytes; must equal sizeof(payload of type) */
};
#define IPC_HDR_F_FD 0x0001u
static_assert(sizeof(struct ipc_hdr) == 8, "wire change: bump IPC_PROTO_VERSION");

typedef enum IpcRole {
        IPC_ROLE_SESSION = 1, /* imapproxy-session: hello, checkout, trace, checkin */
        IPC_ROLE_ADMIN = 2,   /* imapproxyctl: admin requests only */
        _IPC_ROLE_MAX,
} IpcRole;

struct ipc_hello {
        uint32_t version; /* IPC_PROTO_VERSION */
        uint32_t role;    /* IpcRole */
};
static_assert(sizeof(struct ipc_hello) == 8, "wire change: bump IPC_PROTO_VERSION");

#define IPC_HELLO_F_BACKEND_KNOWN 0x1u /* caps came from a real backend greeting */
struct ipc_hello_reply {
        uint32_t version;
        uint32_t flags;              /* IPC_HELLO_F_* */
        char caps[IPC_CAPS_MAX];     /* backend's pre-login capabilities, space separated, unfiltered */
};
static_assert(sizeof(struct ipc_hello_reply) == 8 + IPC_CAPS_MAX, "wire change: bump IPC_PROTO_VERSION");

#define IPC_CHECKOUT_F_FRESH 0x1u /* do not reuse a pooled connection */
struct ipc_checkout {
        uint32_t flags;                    /* IPC_CHECKOUT_F_* */
        uint32_t client_port;              /* 0 if unknown */
        uint32_t local_port;               /* the proxy's port the client reached; 0 if unknown */
        uint32_t reserved;                 /* 0 */
        char user[IPC_USER_MAX];           /* authentication identity, as the client meant it (decoded) */
        char authzid[IPC_USER_MAX];        /* authorisation identity; "" when none or equal to user */
        char password[IPC_PASSWORD_MAX];   /* secret: wiped by both sides after use */
        char client_addr[IPC_ADDR_MAX];    /* numeric address, "" if unknown */
        char local_addr[IPC_ADDR_MAX];     /* numeric address, "" if unknown */
        char client_id[IPC_ID_MAX];        /* client's ID parameter list re-serialised as "(...)", or "" */
};
static_assert(sizeof(struct ipc_checkout) ==
                      16 + 2 * IPC_USER_MAX + IPC_PASSWORD_MAX + 2 * IPC_ADDR_MAX + IPC_ID_MAX,
              "wire change: bump IPC_PROTO_VERSION");

#define IPC_LEASE_F_REUSED 0x1u /* connection came from the pool (else: fresh login) */
#define IPC_LEASE_F_TRACE 0x2u  /* the user is traced: send TRACE messages until the session ends */
struct ipc_checkout_ok {
        uint64_t ticket;         /* names this lease in CHECKIN */
        uint32_t flags;          /* IPC_LEASE_F_* */
        uint32_t reserved;       /* 0 */
        char caps[IPC_CAPS_MAX]; /* backend's post-login capabilities, unfiltered */
};
static_assert(sizeof(struct ipc_checkout_ok) == 16 + IPC_CAPS_MAX, "wire change: bump IPC_PROTO_VERSION");

typedef enum IpcFailStatus {
        IPC_FAIL_NO = 1,          /* backend said NO: relay text */
        IPC_FAIL_BAD = 2,         /* backend said BAD: relay text */
        IPC_FAIL_UNAVAILABLE = 3, /* backend unreachable, timed out, or broker full */
        _IPC_FAIL_MAX,
} IpcFailStatus;

struct ipc_checkout_fail {
        uint32_t status;           /* IpcFailStatus */
        uint32_t reserved;         /* 0 */
        char text[IPC_TEXT_MAX];   /* resp-text for the client, with its [CODE], no CRLF */
};
static_assert(sizeof(struct ipc_checkout_fail) == 8 + IPC_TEXT_MAX, "wire change: bump IPC_PROTO_VERSION");

typedef enum IpcConnState {
        IPC_CONN_CLEAN = 1, /* authenticated, unselected, no command outstanding: reusable */
        IPC_CONN_DIRTY = 2, /* anything else: the broker logs it out and closes it */
        _IPC_CONN_STATE_MAX,
} IpcConnState;

struct ipc_checkin {
        uint64_t ticket;     /* from CHECKOUT_OK */
        uint32_t state;      /* IpcConnState */
        uint32_t reserved;   /* 0 */
};
static_assert(sizeof(struct ipc_checkin) == 16, "wire change: bump IPC_PROTO_VERSION");

typedef enum IpcTraceDir {
        IPC_TRACE_CLIENT = 1, /* client -> server (as the client sent it, redacted) */
        IPC_TRACE_SERVER = 2, /* server -> client */
        IPC_TRACE_PROXY = 3,  /* something the proxy itself did or said */
        _IPC_TRACE_DIR_MAX,
} IpcTraceDir;

#define IPC_TRACE_F_TRUNCATED 0x1u /* the line was longer: only its first bytes are here */
struct ipc_trace {
        uint32_t dir;                     /* IpcTraceDir */
        uint32_t flags;                   /* IPC_TRACE_F_* */
        uint32_t dropped;                 /* lines the session dropped just before this one */
        uint32_t reserved;                /* 0 */
        char line[IPC_TRACE_LINE_MAX];    /* redacted, no CR/LF, control bytes replaced */
};
static_assert(sizeof(struct ipc_trace) == 16 + IPC_TRACE_LINE_MAX, "wire change: bump IPC_PROTO_VERSION");

typedef enum IpcAdminOp {
        IPC_ADMIN_OP_STATS = 1, /* -> ADMIN_STATS */
        IPC_ADMIN_OP_LIST = 2,  /* -> ADMIN_CONN per connection, then ADMIN_DONE */
        IPC_ADMIN_OP_FLUSH = 3, /* user "" = everyone -> ADMIN_DONE */
        IPC_ADMIN_OP_TRACE = 4, /* user required -> ADMIN_DONE, then TRACE_EVENTs */
        _IPC_ADMIN_OP_MAX,
} IpcAdminOp;

struct ipc_admin {
        uint32_t op;               /* IpcAdminOp */
        uint32_t reserved;         /* 0 */
        char user[IPC_USER_MAX];   /* FLUSH: "" or a user; TRACE: a user (not ""); else "" */
};
static_assert(sizeof(struct ipc_admin) == 8 + IPC_USER_MAX, "wire change: bump IPC_PROTO_VERSION");

struct ipc_admin_stats {
        uint32_t clients, peak_clients;  /* sessions connected now / at most */
        uint32_t lent, peak_lent;        /* backend connections lent to sessions */
        uint32_t idle, peak_idle;        /* backend connections idle in the pool */
        uint32_t pending;                /* backend logins under way */
        uint32_t reserved;               /* 0 */
        uint64_t uptime_usec;
        uint64_t clients_total;          /* sessions that said hello */
        uint64_t logins_total;           /* connections lent */
        uint64_t reuses_total;           /* ... of them from the pool */
        uint64_t backend_logins;         /* fresh backend logins that succeeded */
        uint64_t login_failures;         /* refused logins (NO/BAD, not the shared secret) */
        uint64_t backend_errors;         /* backend unreachable, timed out, garbled */
        uint64_t expired;                /* idle connections closed after cache_expiration_time */
        uint64_t dead;                   /* idle connections the server closed */
        uint64_t dirty;                  /* connections not reusable when returned */
        uint64_t flushed;                /* closed by ADMIN flush */
        uint64_t trace_dropped;          /* trace lines dropped (slow readers) */
};
static_assert(sizeof(struct ipc_admin_stats) == 32 + 12 * 8, "wire change: bump IPC_PROTO_VERSION");

typedef enum IpcConnListState {
        IPC_LIST_IDLE = 1, /* in the pool */
        IPC_LIST_LENT = 2, /* with a session */
        _IPC_LIST_STATE_MAX,
} IpcConnListState;

#define IPC_LIST_F_NO_REUSE 0x1u /* flushed while lent: closed when returned */
#define IPC_LIST_F_TRACED 0x2u   /* its session sends a trace */
struct ipc_admin_conn {
        uint32_t state;                 /* IpcConnListState */
        uint32_t flags;                 /* IPC_LIST_F_* */
        uint32_t pid;                   /* borrowing session (lent), else 0 */
        uint32_t uses;                  /* times lent from the pool */
        uint64_t age_usec;              /* since the backend login */
        uint64_t idle_usec;             /* since it was returned (idle), else 0 */
        char user[IPC_USER_MAX];
        char authzid[IPC_USER_MAX];
        char backend[IPC_BACKEND_MAX];  /* server address:port */
};
static_assert(sizeof(struct ipc_admin_conn) == 32 + 2 * IPC_USER_MAX + IPC_BACKEND_MAX,
              "wire change: bump IPC_PROTO_VERSION");

struct ipc_admin_done {
        uint32_t status;          /* 0, or a positive errno (EPERM: not an administrator) */
        uint32_t n_idle;          /* LIST: idle listed; FLUSH: idle closed */
        uint32_t n_lent;          /* LIST: lent listed; FLUSH: lent marked not to be pooled again */
        uint32_t reserved;        /* 0 */
        char text[IPC_TEXT_MAX];  /* human-readable, no CRLF */
};
static_assert(sizeof(struct ipc_admin_done) == 16 + IPC_TEXT_MAX, "wire change: bump IPC_PROTO_VERSION");

struct ipc_trace_event {
        uint32_t dir;                   /* IpcTraceDir */
        uint32_t flags;                 /* IPC_TRACE_F_* */
        uint32_t pid;                   /* the session */
        uint32_t dropped;               /* lines dropped before this one (session and broker) */
        uint64_t time_usec;             /* CLOCK_REALTIME when the broker got it */
        char user[IPC_USER_MAX];
        char line[IPC_TRACE_LINE_MAX];
};
static_assert(sizeof(struct ipc_trace_event) == 24 + IPC_USER_MAX + IPC_TRACE_LINE_MAX,
              "wire change: bump IPC_PROTO_VERSION");

/* Largest message on the wire; receivers use a buffer one byte larger so an
 * oversized datagram is detected (MSG_TRUNC) rather than cut. */
#define IPC_MSG_MAX (sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout) > sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout_ok) \
                             ? sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout)                                                  \
                             : sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout_ok))

/* Default broker socket. Config key broker_socket overrides it. */
#ifndef IPC_DEFAULT_SOCKET
#define IPC_DEFAULT_SOCKET "/run/imapproxy/broker.sock"
#endif
