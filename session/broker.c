/*
 * broker.c -- the session's side of the broker protocol.
 *
 * SYNOPSIS
 *	int broker_hello(Session *s);
 *	int broker_checkout(Session *s, const char *user, const char *authzid,
 *	                    const char *password, uint32_t flags,
 *	                    struct ipc_checkout_fail *ret_fail);
 *	int broker_checkin(Session *s, bool clean);
 * DESCRIPTION
 *	Synchronous request/response over the broker socket with a bounded
 *	wait. The broker is optional to the point of a clean refusal: when it
 *	cannot be reached the session still greets (with a minimal capability
 *	list) and answers LOGIN with NO [UNAVAILABLE]. A LOGIN finds the broker
 *	again when it was restarted after the greeting (one reconnection).
 * ERRORS
 *	0, 1 (checkout refused: *ret_fail filled), or -errno.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include "fd-util.h"
#include "ipc.h"
#include "log.h"
#include "session.h"

#define HELLO_TIMEOUT_MS 5000

static int broker_wait(Session *s, int timeout_ms, IpcMessage *ret) {
        struct pollfd p = { .fd = s->broker_fd, .events = POLLIN };
        int r;

        do
                r = poll(&p, 1, timeout_ms);
        while (r < 0 && errno == EINTR);
        if (r < 0)
                return -errno;
        if (r == 0)
                return -ETIMEDOUT;
        return ipc_recv(s->broker_fd, ret);
}

static void broker_disconnect(Session *s) {
        s->broker_fd = safe_close(s->broker_fd);
}

int broker_hello(Session *s) {
        struct ipc_hello h = { .version = IPC_PROTO_VERSION, .role = IPC_ROLE_SESSION };
        IpcMessage m;
        int r;

        if (s->broker_fd < 0) {
                r = ipc_connect(s->cfg.broker_socket, &s->broker_fd);
                if (r < 0) {
                        s->broker_fd = -EBADF;
                        return log_warning_errno(r, "cannot reach the broker at %s: %m", s->cfg.broker_socket);
                }
        }
        r = ipc_send(s->broker_fd, IPC_HELLO, &h, sizeof(h), -EBADF);
        if (r >= 0)
                r = broker_wait(s, HELLO_TIMEOUT_MS, &m);
        if (r >= 0 && m.type != IPC_HELLO_REPLY)
                r = -EPROTO;
        if (r < 0) {
                broker_disconnect(s);
                return log_warning_errno(r, "broker hello failed: %m");
        }
        if (m.u.hello_reply.flags & IPC_HELLO_F_BACKEND_KNOWN) {
                snprintf(s->prelogin_caps, sizeof(s->prelogin_caps), "%s", m.u.hello_reply.caps);
                s->prelogin_caps_known = true;
        }
        ipc_message_done(&m);
        return 0;
}

int broker_checkout(Session *s, const char *user, const char *authzid, const char *password, uint32_t flags,
                    struct ipc_checkout_fail *ret_fail) {
        struct ipc_checkout req = {};
        IpcMessage m;
        int r;

        if (s->broker_fd < 0) {
                r = broker_hello(s);
                if (r < 0)
                        return r;
        }
        size_t ul = strlen(user), zl = strlen(authzid), pl = strlen(password);
        if (ul == 0 || ul >= sizeof(req.user) || zl >= sizeof(req.authzid) || pl >= sizeof(req.password))
                return -E2BIG;
        memcpy(req.user, user, ul + 1);
        memcpy(req.authzid, authzid, zl + 1);
        memcpy(req.password, password, pl + 1);
        req.flags = flags;
        snprintf(req.client_addr, sizeof(req.client_addr), "%s", s->client_addr);
        req.client_port = s->client_port;
        snprintf(req.local_addr, sizeof(req.local_addr), "%s", s->local_addr);
        req.local_port = s->local_port;
        snprintf(req.client_id, sizeof(req.client_id), "%s", s->client_id);

        r = ipc_send(s->broker_fd, IPC_CHECKOUT, &req, sizeof(req), -EBADF);
        if (r == -EPIPE || r == -ECONNRESET || r == -ENOTCONN) {
                /* The broker we said hello to is gone (crashed or restarted while
                 * the client was greeted): say hello to the one there now, once. */
                log_info("broker connection lost before LOGIN: reconnecting");
                broker_disconnect(s);
                r = broker_hello(s);
                if (r >= 0)
                        r = ipc_send(s->broker_fd, IPC_CHECKOUT, &req, sizeof(req), -EBADF);
        }
        explicit_bzero(&req, sizeof(req));
        if (r < 0) {
                broker_disconnect(s);
                return r;
        }
        /* The broker bounds its own backend work by backend_timeout. */
        r = broker_wait(s, (int) (s->cfg.backend_timeout + 10) * 1000, &m);
        if (r < 0) {
                broker_disconnect(s);
                return r;
        }
        switch (m.type) {
        case IPC_CHECKOUT_OK:
                s->backend_fd = TAKE_FD(m.fd);
                s->ticket = m.u.checkout_ok.ticket;
                s->reused = !!(m.u.checkout_ok.flags & IPC_LEASE_F_REUSED);
                snprintf(s->postlogin_caps, sizeof(s->postlogin_caps), "%s", m.u.checkout_ok.caps);
                snprintf(s->user, sizeof(s->user), "%s", user);
                if (m.u.checkout_ok.flags & IPC_LEASE_F_TRACE)
                        (void) trace_start(s);
                r = 0;
                break;
        case IPC_CHECKOUT_FAIL:
                *ret_fail = m.u.checkout_fail;
                r = 1;
                break;
        default:
                broker_disconnect(s);
                r = -EPROTO;
        }
        ipc_message_done(&m);
        return r;
}

int broker_checkin(Session *s, bool clean) {
        struct ipc_checkin c = { .ticket = s->ticket, .state = clean ? IPC_CONN_CLEAN : IPC_CONN_DIRTY };
        int r;

        if (s->backend_fd < 0)
                return 0;
        if (s->broker_fd < 0) {
                s->backend_fd = safe_close(s->backend_fd); /* nobody to give it to */
                return -ENOTCONN;
        }
        r = ipc_send(s->broker_fd, IPC_CHECKIN, &c, sizeof(c), s->backend_fd);
        if (r < 0) {
                log_info_errno(r, "cannot return the backend connection to the broker (%m): closing it");
                s->backend_fd = safe_close(s->backend_fd);
                return r;
        }
        s->backend_fd = -EBADF; /* ipc_send closed our copy */
        return 0;
}

void session_retry_disarm(Session *s) {
        if (!s->retry_armed)
                return;
        explicit_bzero(s->retry_password, sizeof(s->retry_password));
        explicit_bzero(s->retry_authzid, sizeof(s->retry_authzid));
        s->retry_armed = false;
}
