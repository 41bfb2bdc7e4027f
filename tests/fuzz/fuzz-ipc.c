/*
 * fuzz-ipc.c -- libFuzzer target for the broker wire protocol (common/ipc.c).
 *
 * SYNOPSIS
 *	int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
 * DESCRIPTION
 *	data[0] is a mode byte, data[1..] is one datagram as it would arrive on
 *	the broker socket.
 *	  bit 0  the datagram came with one fd (has_fd for ipc_decode())
 *	  bit 1  also send it over a SOCK_SEQPACKET socketpair with a raw
 *	         sendmsg() (with an fd if bit 0) and check that ipc_recv()
 *	         reaches the same verdict as ipc_decode() and leaks no fd.
 *	Invariants checked for every input:
 *	- ipc_decode() returns 0 or -EPROTO and never touches ret->fd;
 *	- on success the message is exactly what ipc-proto.h allows (size from
 *	  the table, fd presence, NUL in every string, enums in range, reserved
 *	  fields zero, no unknown flags, non-empty user), checked here by an
 *	  independent re-implementation, and re-encoding it gives back the
 *	  input bytes (nothing repaired, nothing dropped);
 *	- on failure no part of the payload is left behind in *ret (it is
 *	  either untouched or wiped: a rejected CHECKOUT leaves no password).
 *	The same file is linked with tests/fuzz/replay-main.c to replay the
 *	corpus in `make check`.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ipc.h"
#include "fuzz-check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MODE_HAS_FD 0x01u
#define MODE_SOCKET 0x02u
#define FD_SENTINEL 0x7eadbeef
#define FILL 0xa5

typedef typeof(((IpcMessage *) 0)->u) Payload;

static bool terminated(const char *s, size_t n) {
        return memchr(s, '\0', n) != NULL;
}
#define TERMINATED(f) terminated((f), sizeof(f))

static bool one_line(const char *s, size_t n) {
        if (!terminated(s, n))
                return false;
        for (size_t i = 0; s[i]; i++)
                if (s[i] == '\r' || s[i] == '\n')
                        return false;
        return true;
}
#define ONE_LINE(f) one_line((f), sizeof(f))

static bool all_bytes(const void *p, size_t n, uint8_t v) {
        const uint8_t *b = p;
        for (size_t i = 0; i < n; i++)
                if (b[i] != v)
                        return false;
        return true;
}

/* What ipc-proto.h says a valid payload is, written out independently of
 * ipc_validate(). */
static bool payload_valid(IpcType t, const Payload *p) {
        switch (t) {
        case IPC_HELLO:
                return p->hello.role == IPC_ROLE_SESSION || p->hello.role == IPC_ROLE_ADMIN;
        case IPC_HELLO_REPLY:
                return (p->hello_reply.flags & ~IPC_HELLO_F_BACKEND_KNOWN) == 0 &&
                       TERMINATED(p->hello_reply.caps);
        case IPC_CHECKOUT:
                return (p->checkout.flags & ~IPC_CHECKOUT_F_FRESH) == 0 && p->checkout.client_port <= 65535 &&
                       TERMINATED(p->checkout.user) && p->checkout.user[0] != '\0' &&
                       TERMINATED(p->checkout.password) && TERMINATED(p->checkout.client_addr);
        case IPC_CHECKOUT_OK:
                return (p->checkout_ok.flags & ~(IPC_LEASE_F_REUSED | IPC_LEASE_F_TRACE)) == 0 &&
                       p->checkout_ok.reserved == 0 &&
                       TERMINATED(p->checkout_ok.caps);
        case IPC_CHECKOUT_FAIL:
                return p->checkout_fail.status >= IPC_FAIL_NO &&
                       p->checkout_fail.status <= IPC_FAIL_UNAVAILABLE && p->checkout_fail.reserved == 0 &&
                       TERMINATED(p->checkout_fail.text);
        case IPC_CHECKIN:
                return (p->checkin.state == IPC_CONN_CLEAN || p->checkin.state == IPC_CONN_DIRTY) &&
                       p->checkin.reserved == 0;
        case IPC_TRACE:
                return p->trace.dir >= IPC_TRACE_CLIENT && p->trace.dir <= IPC_TRACE_PROXY &&
                       (p->trace.flags & ~IPC_TRACE_F_TRUNCATED) == 0 && p->trace.reserved == 0 &&
                       ONE_LINE(p->trace.line);
        case IPC_ADMIN:
                if (p->admin.reserved != 0 || !TERMINATED(p->admin.user))
                        return false;
                if (p->admin.op == IPC_ADMIN_OP_STATS || p->admin.op == IPC_ADMIN_OP_LIST)
                        return p->admin.user[0] == '\0';
                if (p->admin.op == IPC_ADMIN_OP_TRACE)
                        return p->admin.user[0] != '\0';
                return p->admin.op == IPC_ADMIN_OP_FLUSH;
        case IPC_ADMIN_STATS:
                return p->admin_stats.reserved == 0;
        case IPC_ADMIN_CONN:
                return (p->admin_conn.state == IPC_LIST_IDLE || p->admin_conn.state == IPC_LIST_LENT) &&
                       (p->admin_conn.flags & ~(IPC_LIST_F_NO_REUSE | IPC_LIST_F_TRACED)) == 0 &&
                       TERMINATED(p->admin_conn.user) && TERMINATED(p->admin_conn.authzid) &&
                       TERMINATED(p->admin_conn.backend);
        case IPC_ADMIN_DONE:
                return p->admin_done.reserved == 0 && ONE_LINE(p->admin_done.text);
        case IPC_TRACE_EVENT:
                return p->trace_event.dir >= IPC_TRACE_CLIENT && p->trace_event.dir <= IPC_TRACE_PROXY &&
                       (p->trace_event.flags & ~IPC_TRACE_F_TRUNCATED) == 0 && TERMINATED(p->trace_event.user) &&
                       ONE_LINE(p->trace_event.line);
        default:
                return false;
        }
}

static int check_decode(const uint8_t *msg, size_t len, bool has_fd, IpcMessage *m) {
        memset(m, FILL, sizeof(*m));
        m->fd = FD_SENTINEL;

        int r = ipc_decode(msg, len, has_fd, m);
        CHECK(r == 0 || r == -EPROTO);
        CHECK(m->fd == FD_SENTINEL);
        if (r < 0) {
                CHECK(all_bytes(&m->u, sizeof(m->u), FILL) || all_bytes(&m->u, sizeof(m->u), 0));
                return r;
        }

        struct ipc_hdr h;
        CHECK(len >= sizeof(h));
        memcpy(&h, msg, sizeof(h));
        CHECK(m->type > _IPC_TYPE_NONE && m->type < _IPC_TYPE_MAX);
        CHECK(h.type == m->type);
        size_t psize = ipc_payload_size(m->type);
        CHECK(psize > 0 && h.len == psize && len == sizeof(h) + psize && len <= IPC_MSG_MAX);
        CHECK(ipc_type_carries_fd(m->type) == has_fd);
        CHECK(h.flags == (has_fd ? IPC_HDR_F_FD : 0));
        CHECK(payload_valid(m->type, (const Payload *) &m->u));

        uint8_t again[IPC_MSG_MAX];
        size_t again_len = 0;
        CHECK(ipc_encode(m->type, &m->u, psize, again, sizeof(again), &again_len) == 0);
        CHECK(again_len == len && memcmp(again, msg, len) == 0);
        return 0;
}

/* ---- socket mode ------------------------------------------------------ */

static int sock_pair[2] = { -1, -1 };
static int devnull = -1;

static int probe_lowest_free_fd(void) {
        int fd = fcntl(devnull, F_DUPFD_CLOEXEC, 0);
        CHECK(fd >= 0);
        (void) close(fd);
        return fd;
}

static void socket_setup(void) {
        if (devnull >= 0)
                return;
        devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        CHECK(devnull >= 0);
        CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sock_pair) == 0);
}

static void check_recv(const uint8_t *msg, size_t len, bool has_fd, int decode_r, const IpcMessage *dm) {
        if (len > 65536)
                return; /* beyond what a socket buffer takes in one datagram */
        socket_setup();
        /* The received fd takes the lowest free number: if it leaked, the
         * lowest free number afterwards differs. */
        int lowest_free = probe_lowest_free_fd();

        struct iovec iov = { .iov_base = (void *) msg, .iov_len = len };
        union {
                struct cmsghdr align;
                uint8_t buf[CMSG_SPACE(sizeof(int))];
        } ctl;
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        if (has_fd) {
                memset(&ctl, 0, sizeof(ctl));
                mh.msg_control = &ctl;
                mh.msg_controllen = sizeof(ctl);
                struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(c), &devnull, sizeof(int));
        }
        CHECK(sendmsg(sock_pair[0], &mh, MSG_NOSIGNAL) == (ssize_t) len);

        IpcMessage m;
        int r = ipc_recv(sock_pair[1], &m);
        if (len == 0 && !has_fd)
                CHECK(r == -ECONNRESET); /* SEQPACKET: an empty datagram reads as EOF */
        else
                CHECK(r == decode_r);
        if (r == 0) {
                CHECK(m.type == dm->type);
                CHECK(memcmp(&m.u, &dm->u, ipc_payload_size(m.type)) == 0);
                CHECK(has_fd ? m.fd >= 0 : m.fd == -EBADF);
        } else {
                CHECK(m.fd == -EBADF);
                CHECK(m.type == _IPC_TYPE_NONE);
        }
        ipc_message_done(&m);

        CHECK(probe_lowest_free_fd() == lowest_free); /* nothing leaked */
        CHECK(ipc_recv(sock_pair[1], &m) == -EAGAIN);  /* one datagram, consumed whole */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size < 1)
                return 0;

        unsigned mode = data[0];
        bool has_fd = mode & MODE_HAS_FD;
        const uint8_t *msg = data + 1;
        size_t len = size - 1;
        IpcMessage m;

        int r = check_decode(msg, len, has_fd, &m);
        if (mode & MODE_SOCKET)
                check_recv(msg, len, has_fd, r, &m);
        explicit_bzero(&m, sizeof(m));
        return 0;
}
