/*
 * ipc.c -- codec and socket I/O for the broker wire protocol.
 *
 * SYNOPSIS
 *	int ipc_encode(IpcType type, const void *payload, size_t len, void *buf, size_t bufsize, size_t *ret_len);
 *	int ipc_decode(const void *buf, size_t len, bool has_fd, IpcMessage *ret);
 *	int ipc_send(int sock, IpcType type, const void *payload, size_t len, int fd);
 *	int ipc_recv(int sock, IpcMessage *ret);
 *	int ipc_send_nowait(int sock, IpcType type, const void *payload, size_t len);
 * DESCRIPTION
 *	ipc_encode()/ipc_decode() are pure: bytes in, message out, and carry
 *	all validation (lengths against the table in ipc-proto.h, fd presence,
 *	NUL inside every string field, enum ranges, reserved fields zero).
 *	ipc_recv() is the only recvmsg() on the broker socket in the project:
 *	MSG_CMSG_CLOEXEC, rejects MSG_TRUNC/MSG_CTRUNC, non-SCM_RIGHTS data and
 *	more than one fd, closes every fd of a rejected message.
 * SECURITY
 *	The peer is untrusted in both directions; nothing is read before its
 *	length is checked. Secrets in a CHECKOUT are wiped by ipc_message_done().
 * ERRORS
 *	0 or -errno; -EPROTO for any malformed message. Never logs, never exits.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fd-util.h"
#include "ipc.h"

typedef struct IpcTypeInfo {
        const char *name;
        size_t size;
        bool fd;
} IpcTypeInfo;

static const IpcTypeInfo ipc_types[_IPC_TYPE_MAX] = {
#define IPC_X_INFO(t, n, p, f) [t] = { n, sizeof(p), f },
        IPC_MESSAGES(IPC_X_INFO)
#undef IPC_X_INFO
};

const char *ipc_type_to_string(IpcType t) {
        if (t <= _IPC_TYPE_NONE || t >= _IPC_TYPE_MAX)
                return "unknown";
        return ipc_types[t].name;
}

size_t ipc_payload_size(IpcType t) {
        if (t <= _IPC_TYPE_NONE || t >= _IPC_TYPE_MAX)
                return 0;
        return ipc_types[t].size;
}

bool ipc_type_carries_fd(IpcType t) {
        if (t <= _IPC_TYPE_NONE || t >= _IPC_TYPE_MAX)
                return false;
        return ipc_types[t].fd;
}

int ipc_encode(IpcType type, const void *payload, size_t payload_len, void *buf, size_t bufsize,
               size_t *ret_len) {
        size_t size = ipc_payload_size(type);
        if (size == 0 || payload_len != size)
                return -EINVAL;
        if (bufsize < sizeof(struct ipc_hdr) + size)
                return -EMSGSIZE;

        struct ipc_hdr h = {
                .type = (uint16_t) type,
                .flags = ipc_type_carries_fd(type) ? IPC_HDR_F_FD : 0,
                .len = (uint32_t) size,
        };
        memcpy(buf, &h, sizeof(h));
        memcpy((uint8_t *) buf + sizeof(h), payload, size);
        *ret_len = sizeof(h) + size;
        return 0;
}

static bool field_terminated(const char *s, size_t size) {
        return memchr(s, '\0', size) != NULL;
}
#define FIELD_OK(f) field_terminated((f), sizeof(f))

/* A one-line text field: terminated, and no CR or LF before the NUL (it is
 * printed as one line by imapproxyctl). */
static bool line_ok(const char *s, size_t size) {
        const char *nul = memchr(s, '\0', size);
        if (!nul)
                return false;
        size_t l = (size_t) (nul - s);
        return !memchr(s, '\r', l) && !memchr(s, '\n', l);
}

static int ipc_validate(const IpcMessage *m) {
        switch (m->type) {
        case IPC_HELLO:
                return m->u.hello.role >= IPC_ROLE_SESSION && m->u.hello.role < _IPC_ROLE_MAX ? 0 : -EPROTO;
        case IPC_HELLO_REPLY:
                if (m->u.hello_reply.flags & ~IPC_HELLO_F_BACKEND_KNOWN)
                        return -EPROTO;
                return FIELD_OK(m->u.hello_reply.caps) ? 0 : -EPROTO;
        case IPC_CHECKOUT:
                if (!FIELD_OK(m->u.checkout.user) || !FIELD_OK(m->u.checkout.authzid) ||
                    !FIELD_OK(m->u.checkout.password) || !FIELD_OK(m->u.checkout.client_addr) ||
                    !FIELD_OK(m->u.checkout.local_addr) || !FIELD_OK(m->u.checkout.client_id))
                        return -EPROTO;
                if (m->u.checkout.reserved != 0 || m->u.checkout.local_port > 65535)
                        return -EPROTO;
                if (m->u.checkout.user[0] == '\0')
                        return -EPROTO;
                if (m->u.checkout.flags & ~IPC_CHECKOUT_F_FRESH)
                        return -EPROTO;
                if (m->u.checkout.client_port > 65535)
                        return -EPROTO;
                return 0;
        case IPC_CHECKOUT_OK:
                if (m->u.checkout_ok.reserved != 0 || !FIELD_OK(m->u.checkout_ok.caps))
                        return -EPROTO;
                if (m->u.checkout_ok.flags & ~(IPC_LEASE_F_REUSED | IPC_LEASE_F_TRACE))
                        return -EPROTO;
                return 0;
        case IPC_CHECKOUT_FAIL:
                if (m->u.checkout_fail.reserved != 0 || !FIELD_OK(m->u.checkout_fail.text))
                        return -EPROTO;
                if (m->u.checkout_fail.status == 0 || m->u.checkout_fail.status >= _IPC_FAIL_MAX)
                        return -EPROTO;
                return 0;
        case IPC_CHECKIN:
                if (m->u.checkin.reserved != 0)
                        return -EPROTO;
                if (m->u.checkin.state == 0 || m->u.checkin.state >= _IPC_CONN_STATE_MAX)
                        return -EPROTO;
                return 0;
        case IPC_TRACE:
                if (m->u.trace.reserved != 0 || (m->u.trace.flags & ~IPC_TRACE_F_TRUNCATED))
                        return -EPROTO;
                if (m->u.trace.dir == 0 || m->u.trace.dir >= _IPC_TRACE_DIR_MAX)
                        return -EPROTO;
                return line_ok(m->u.trace.line, sizeof(m->u.trace.line)) ? 0 : -EPROTO;
        case IPC_ADMIN:
                if (m->u.admin.reserved != 0 || !FIELD_OK(m->u.admin.user))
                        return -EPROTO;
                switch (m->u.admin.op) {
                case IPC_ADMIN_OP_STATS:
                case IPC_ADMIN_OP_LIST:
                        return m->u.admin.user[0] == '\0' ? 0 : -EPROTO;
                case IPC_ADMIN_OP_FLUSH:
                        return 0;
                case IPC_ADMIN_OP_TRACE:
                        return m->u.admin.user[0] != '\0' ? 0 : -EPROTO;
                default:
                        return -EPROTO;
                }
        case IPC_ADMIN_STATS:
                return m->u.admin_stats.reserved == 0 ? 0 : -EPROTO;
        case IPC_ADMIN_CONN:
                if (m->u.admin_conn.state == 0 || m->u.admin_conn.state >= _IPC_LIST_STATE_MAX)
                        return -EPROTO;
                if (m->u.admin_conn.flags & ~(IPC_LIST_F_NO_REUSE | IPC_LIST_F_TRACED))
                        return -EPROTO;
                if (!FIELD_OK(m->u.admin_conn.user) || !FIELD_OK(m->u.admin_conn.authzid) ||
                    !FIELD_OK(m->u.admin_conn.backend))
                        return -EPROTO;
                return 0;
        case IPC_ADMIN_DONE:
                if (m->u.admin_done.reserved != 0)
                        return -EPROTO;
                return line_ok(m->u.admin_done.text, sizeof(m->u.admin_done.text)) ? 0 : -EPROTO;
        case IPC_TRACE_EVENT:
                if (m->u.trace_event.flags & ~IPC_TRACE_F_TRUNCATED)
                        return -EPROTO;
                if (m->u.trace_event.dir == 0 || m->u.trace_event.dir >= _IPC_TRACE_DIR_MAX)
                        return -EPROTO;
                if (!FIELD_OK(m->u.trace_event.user))
                        return -EPROTO;
                return line_ok(m->u.trace_event.line, sizeof(m->u.trace_event.line)) ? 0 : -EPROTO;
        default:
                return -EPROTO;
        }
}

int ipc_decode(const void *buf, size_t len, bool has_fd, IpcMessage *ret) {
        struct ipc_hdr h;

        if (len < sizeof(h))
                return -EPROTO;
        memcpy(&h, buf, sizeof(h));

        size_t size = ipc_payload_size((IpcType) h.type);
        if (size == 0)
                return -EPROTO; /* unknown type */
        if (h.len != size || len != sizeof(h) + size)
                return -EPROTO;
        bool want_fd = ipc_type_carries_fd((IpcType) h.type);
        if ((h.flags & ~IPC_HDR_F_FD) != 0)
                return -EPROTO;
        if (!!(h.flags & IPC_HDR_F_FD) != want_fd || has_fd != want_fd)
                return -EPROTO;

        ret->type = (IpcType) h.type;
        memcpy(&ret->u, (const uint8_t *) buf + sizeof(h), size);
        int r = ipc_validate(ret);
        if (r < 0) {
                explicit_bzero(&ret->u, sizeof(ret->u));
                ret->type = _IPC_TYPE_NONE;
        }
        return r;
}

static int ipc_send_flags(int sock, IpcType type, const void *payload, size_t payload_len, int fd, int flags) {
        uint8_t buf[IPC_MSG_MAX];
        size_t len;
        int r;

        if (ipc_type_carries_fd(type) != (fd >= 0))
                return -EINVAL;
        r = ipc_encode(type, payload, payload_len, buf, sizeof(buf), &len);
        if (r < 0)
                return r;

        struct iovec iov = { .iov_base = buf, .iov_len = len };
        union {
                struct cmsghdr cmsg;
                uint8_t space[CMSG_SPACE(sizeof(int))];
        } control;
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        if (fd >= 0) {
                memset(&control, 0, sizeof(control));
                mh.msg_control = &control;
                mh.msg_controllen = sizeof(control);
                struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(c), &fd, sizeof(int));
        }

        ssize_t n;
        do
                n = sendmsg(sock, &mh, MSG_NOSIGNAL | flags);
        while (n < 0 && errno == EINTR);
        explicit_bzero(buf, len);
        if (n < 0)
                return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        if ((size_t) n != len)
                return -EIO; /* cannot happen on SOCK_SEQPACKET */
        if (fd >= 0)
                (void) safe_close(fd); /* ownership moved to the peer */
        return 0;
}

int ipc_send(int sock, IpcType type, const void *payload, size_t payload_len, int fd) {
        return ipc_send_flags(sock, type, payload, payload_len, fd, 0);
}

int ipc_send_nowait(int sock, IpcType type, const void *payload, size_t payload_len) {
        return ipc_send_flags(sock, type, payload, payload_len, -EBADF, MSG_DONTWAIT);
}

/* SCM_PIDFD (Linux >= 6.5) carries an fd too: the kernel installs a pidfd of
 * the sender, after SCM_RIGHTS, whenever the receiving socket has
 * SO_PASSPIDFD set. Not in Debian 12's headers yet. */
#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

static bool cmsg_carries_fds(const struct cmsghdr *c) {
        return c->cmsg_level == SOL_SOCKET && (c->cmsg_type == SCM_RIGHTS || c->cmsg_type == SCM_PIDFD);
}

static void close_cmsg_fds(struct msghdr *mh) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
                if (!cmsg_carries_fds(c))
                        continue;
                size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < n; i++) {
                        int fd;
                        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                        (void) safe_close(fd);
                }
        }
}

int ipc_recv(int sock, IpcMessage *ret) {
        uint8_t buf[IPC_MSG_MAX + 1];
        union {
                struct cmsghdr cmsg;
                uint8_t space[CMSG_SPACE(sizeof(int) * 4)]; /* room to see (and close) extra fds */
        } control;
        struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = &control,
                .msg_controllen = sizeof(control),
        };
        ssize_t n;
        int r, fd = -EBADF, nfds = 0;

        ret->type = _IPC_TYPE_NONE;
        ret->fd = -EBADF;

        do
                n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return errno == EAGAIN || errno == EWOULDBLOCK ? -EAGAIN : -errno;

        if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
                close_cmsg_fds(&mh);
                r = -EPROTO;
                goto out;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
                        /* XXX: would close the fds of an SCM_RIGHTS seen earlier in
                         * this loop a second time. Cannot happen today: the kernel
                         * puts SCM_CREDENTIALS/SCM_SECURITY before SCM_RIGHTS, and an
                         * SCM_PIDFD after it does not fit in `control` (MSG_CTRUNC). */
                        close_cmsg_fds(&mh);
                        r = -EPROTO;
                        goto out;
                }
                size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k; i++) {
                        int f;
                        memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                        if (nfds++ == 0)
                                fd = f;
                        else
                                (void) safe_close(f);
                }
        }
        if (nfds > 1) {
                fd = safe_close(fd);
                r = -EPROTO;
                goto out;
        }
        if (n == 0 && nfds == 0) {
                r = -ECONNRESET; /* orderly shutdown: SEQPACKET gives 0 only at EOF */
                goto out;
        }

        r = ipc_decode(buf, (size_t) n, fd >= 0, ret);
        if (r < 0) {
                fd = safe_close(fd);
                goto out;
        }
        ret->fd = fd;
        fd = -EBADF;
out:
        explicit_bzero(buf, sizeof(buf));
        return r;
}

void ipc_message_done(IpcMessage *m) {
        if (!m)
                return;
        m->fd = safe_close(m->fd);
        explicit_bzero(&m->u, sizeof(m->u));
        m->type = _IPC_TYPE_NONE;
}

int ipc_connect(const char *path, int *ret_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        size_t l = strlen(path);
        if (l == 0 || l >= sizeof(sa.sun_path))
                return -EINVAL;
        memcpy(sa.sun_path, path, l + 1);

        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, (socklen_t) (offsetof(struct sockaddr_un, sun_path) + l + 1)) < 0) {
                int r = -errno;
                safe_close(fd);
                return r;
        }
        *ret_fd = fd;
        return 0;
}
