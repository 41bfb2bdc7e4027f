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
 *	HELLO{version}              ->
 *	                            <-    HELLO_REPLY{version, pre-login caps}
 *	CHECKOUT{user,authzid,pass,addrs,id} ->
 *	                            <-    CHECKOUT_OK{ticket, caps} + fd
 *	                                | CHECKOUT_FAIL{status, text}
 *	CHECKIN{ticket,state} + fd  ->    (no reply; the session may exit)
 *
 * SECURITY
 *	The broker builds the pool key from the user, authzid and password it
 *	receives (HMAC), never from anything else a session says; a session can
 *	only get a connection for credentials it already holds. client_id is
 *	re-validated by the broker before it is sent to a backend.
 */
#pragma once

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#define IPC_PROTO_VERSION 2 /* bump on ANY change to a type, payload or limit below */

/* Field limits (bytes including the terminating NUL). */
#define IPC_USER_MAX 256
#define IPC_PASSWORD_MAX 2048
#define IPC_ADDR_MAX 64
#define IPC_CAPS_MAX 2048
#define IPC_TEXT_MAX 1024
#define IPC_ID_MAX 4096

/*        type                 name             payload                       fd */
#define IPC_MESSAGES(X)                                                                           \
        X(IPC_HELLO,           "hello",         struct ipc_hello,             0)                  \
        X(IPC_HELLO_REPLY,     "hello-reply",   struct ipc_hello_reply,       0)                  \
        X(IPC_CHECKOUT,        "checkout",      struct ipc_checkout,          0)                  \
        X(IPC_CHECKOUT_OK,     "checkout-ok",   struct ipc_checkout_ok,       1)                  \
        X(IPC_CHECKOUT_FAIL,   "checkout-fail", struct ipc_checkout_fail,     0)                  \
        X(IPC_CHECKIN,         "checkin",       struct ipc_checkin,           1)

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

struct ipc_hello {
        uint32_t version; /* IPC_PROTO_VERSION */
        uint32_t reserved; /* 0 */
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

/* Largest message on the wire; receivers use a buffer one byte larger so an
 * oversized datagram is detected (MSG_TRUNC) rather than cut. */
#define IPC_MSG_MAX (sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout) > sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout_ok) \
                             ? sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout)                                                  \
                             : sizeof(struct ipc_hdr) + sizeof(struct ipc_checkout_ok))

/* Default broker socket. Config key broker_socket overrides it. */
#ifndef IPC_DEFAULT_SOCKET
#define IPC_DEFAULT_SOCKET "/run/imapproxy/broker.sock"
#endif
