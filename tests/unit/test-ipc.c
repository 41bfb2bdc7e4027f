/*
 * test-ipc.c -- unit tests for common/ipc.c, the broker <-> session wire protocol.
 *
 * DESCRIPTION
 *	Three layers:
 *	- codec: ipc_encode()/ipc_decode() on buffers, no fds, no sockets;
 *	- transport: every message type over a real socketpair(AF_UNIX,
 *	  SOCK_SEQPACKET), with fds passed by SCM_RIGHTS and used on the far side;
 *	- malformed input: datagrams written with a raw sendmsg() (bypassing
 *	  ipc_send()). Each must give -EPROTO, close every fd that came with it,
 *	  and leave the socket usable for the next valid message.
 *	Every test compares the number of entries in /proc/self/fd before and
 *	after (suite fixture), so an fd leak anywhere fails the test. fds sent
 *	in malformed messages are pipe write ends: once the receiver has closed
 *	its copy, the read end must see EOF, which proves that nothing (not the
 *	receiver, not the socket queue) still holds one.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "fd-util.h"
#include "ipc.h"

/* Linux >= 6.5; not yet in Debian 12's headers. */
#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76
#endif

typedef typeof(((IpcMessage *) 0)->u) Payload;

static const IpcType all_types[] = {
#define X(t, n, p, f) t,
        IPC_MESSAGES(X)
#undef X
};

/* ---- fd accounting ---------------------------------------------------- */

static int count_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        cr_assert_not_null(d, "opendir(/proc/self/fd): %m");
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n; /* includes the DIR's own fd, the same both times */
}

static bool fd_is_open(int fd) {
        return fcntl(fd, F_GETFD) >= 0;
}

static int fds_before = -1;
static int sess = -EBADF; /* session end of the broker socket */
static int brok = -EBADF; /* broker end */

static void fx_begin(void) {
        int sv[2];

        fds_before = count_fds();
        cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0, "socketpair: %m");
        sess = sv[0];
        brok = sv[1];
}

static void fx_end(void) {
        sess = safe_close(sess);
        brok = safe_close(brok);
        int after = count_fds();
        cr_assert_eq(after, fds_before, "fd leak: %d fds open before the test, %d after", fds_before,
                     after);
}

/* Criterion 2.4 prints a failed assertion in a .fini fixture but still
 * reports the test as passed, so the fd check runs inside the test body. */
#define TEST(suite, name)                                                                         \
        static void suite##_##name##_body(void);                                                  \
        Test(suite, name) {                                                                       \
                fx_begin();                                                                       \
                suite##_##name##_body();                                                          \
                fx_end();                                                                         \
        }                                                                                         \
        static void suite##_##name##_body(void)

static void make_pipe(int p[2]) {
        cr_assert_eq(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0, "pipe2: %m");
}

/* Every write end of the pipe is gone: the read end sees EOF, not EAGAIN. */
static void assert_pipe_orphaned(int rfd) {
        char c;
        ssize_t n = read(rfd, &c, 1);
        cr_assert_eq(n, 0, "a copy of the passed fd is still open somewhere (read: %zd, %s)", n,
                     n < 0 ? strerror(errno) : "data");
}

/* wfd and rfd are two ends of one pipe: a byte written to wfd arrives at rfd. */
static void assert_pipe_works(int wfd, int rfd) {
        char c = 0;
        cr_assert_eq(write(wfd, "x", 1), 1, "write to passed fd: %m");
        cr_assert_eq(read(rfd, &c, 1), 1, "read: %m");
        cr_assert_eq(c, 'x');
}

/* ---- sample messages -------------------------------------------------- */

#define CAPS_PRE "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN"
#define CAPS_POST "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES UNSELECT"

/* A valid payload of type t; returns its size. */
static size_t sample(IpcType t, Payload *p) {
        memset(p, 0, sizeof(*p));
        switch (t) {
        case IPC_HELLO:
                p->hello.version = IPC_PROTO_VERSION;
                p->hello.role = IPC_ROLE_SESSION;
                break;
        case IPC_HELLO_REPLY:
                p->hello_reply.version = IPC_PROTO_VERSION;
                p->hello_reply.flags = IPC_HELLO_F_BACKEND_KNOWN;
                snprintf(p->hello_reply.caps, sizeof(p->hello_reply.caps), "%s", CAPS_PRE);
                break;
        case IPC_CHECKOUT:
                p->checkout.flags = IPC_CHECKOUT_F_FRESH;
                p->checkout.client_port = 54321;
                snprintf(p->checkout.user, sizeof(p->checkout.user), "%s", "alice@example.org");
                snprintf(p->checkout.password, sizeof(p->checkout.password), "%s", "s3cr\"t p\xc3\xa4ssw0rd");
                snprintf(p->checkout.client_addr, sizeof(p->checkout.client_addr), "%s", "2001:db8::1");
                break;
        case IPC_CHECKOUT_OK:
                p->checkout_ok.ticket = 0x0123456789abcdefULL;
                p->checkout_ok.flags = IPC_LEASE_F_REUSED;
                snprintf(p->checkout_ok.caps, sizeof(p->checkout_ok.caps), "%s", CAPS_POST);
                break;
        case IPC_CHECKOUT_FAIL:
                p->checkout_fail.status = IPC_FAIL_NO;
                snprintf(p->checkout_fail.text, sizeof(p->checkout_fail.text), "%s", "[AUTHENTICATIONFAILED] Authentication failed.");
                break;
        case IPC_CHECKIN:
                p->checkin.ticket = 0x0123456789abcdefULL;
                p->checkin.state = IPC_CONN_CLEAN;
                break;
        case IPC_TRACE:
                p->trace.dir = IPC_TRACE_CLIENT;
                p->trace.flags = IPC_TRACE_F_TRUNCATED;
                p->trace.dropped = 3;
                snprintf(p->trace.line, sizeof(p->trace.line), "%s", "a1 LOGIN [redacted]");
                break;
        case IPC_ADMIN:
                p->admin.op = IPC_ADMIN_OP_TRACE;
                snprintf(p->admin.user, sizeof(p->admin.user), "%s", "alice@example.org");
                break;
        case IPC_ADMIN_STATS:
                p->admin_stats.clients = 2;
                p->admin_stats.peak_clients = 7;
                p->admin_stats.logins_total = 10;
                p->admin_stats.reuses_total = 8;
                p->admin_stats.trace_dropped = UINT64_MAX;
                break;
        case IPC_ADMIN_CONN:
                p->admin_conn.state = IPC_LIST_LENT;
                p->admin_conn.flags = IPC_LIST_F_NO_REUSE | IPC_LIST_F_TRACED;
                p->admin_conn.pid = 4242;
                p->admin_conn.age_usec = 12345678;
                snprintf(p->admin_conn.user, sizeof(p->admin_conn.user), "%s", "alice@example.org");
                snprintf(p->admin_conn.backend, sizeof(p->admin_conn.backend), "%s", "[2001:db8::1]:143");
                break;
        case IPC_ADMIN_DONE:
                p->admin_done.n_idle = 2;
                p->admin_done.n_lent = 1;
                snprintf(p->admin_done.text, sizeof(p->admin_done.text), "%s", "2 idle, 1 lent");
                break;
        case IPC_TRACE_EVENT:
                p->trace_event.dir = IPC_TRACE_SERVER;
                p->trace_event.pid = 4242;
                p->trace_event.time_usec = 1700000000000000ULL;
                snprintf(p->trace_event.user, sizeof(p->trace_event.user), "%s", "alice");
                snprintf(p->trace_event.line, sizeof(p->trace_event.line), "%s", "* 1 FETCH (BODY[] {229}[229 bytes])");
                break;
        default:
                cr_assert_fail("no sample for type %d", (int) t);
        }
        return ipc_payload_size(t);
}

/* Header and payload of a valid message, laid out by hand from ipc-proto.h. */
static void sample_parts(IpcType t, struct ipc_hdr *h, Payload *p, size_t *len) {
        size_t size = sample(t, p);

        *h = (struct ipc_hdr) {
                .type = (uint16_t) t,
                .flags = ipc_type_carries_fd(t) ? IPC_HDR_F_FD : 0,
                .len = (uint32_t) size,
        };
        *len = sizeof(*h) + size;
}

/* Serialize header + payload into a datagram of exactly len bytes: shorter
 * cuts, longer pads with zeros. */
static void build(uint8_t *out, size_t outsize, const struct ipc_hdr *h, const Payload *p, size_t len) {
        uint8_t whole[sizeof(*h) + sizeof(*p)];

        cr_assert_leq(len, outsize);
        memcpy(whole, h, sizeof(*h));
        memcpy(whole + sizeof(*h), p, sizeof(*p));
        memset(out, 0, len);
        memcpy(out, whole, MIN(len, sizeof(whole)));
}

/* ---- raw sender (bypasses ipc_send) ----------------------------------- */

typedef struct Control {
        size_t len;
        union {
                struct cmsghdr align;
                uint8_t buf[CMSG_SPACE(sizeof(int) * 16) * 2 + CMSG_SPACE(sizeof(struct ucred))];
        } u;
} Control;

static void ctl_add(Control *c, int type, const void *data, size_t size) {
        cr_assert_leq(c->len + CMSG_SPACE(size), sizeof(c->u.buf));
        struct cmsghdr *h = (struct cmsghdr *) (c->u.buf + c->len);
        memset(h, 0, CMSG_SPACE(size));
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = type;
        h->cmsg_len = CMSG_LEN(size);
        memcpy(CMSG_DATA(h), data, size);
        c->len += CMSG_SPACE(size);
}

static void raw_sendmsg(int sock, const void *buf, size_t len, const Control *ctl) {
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

        if (ctl && ctl->len > 0) {
                mh.msg_control = (void *) ctl->u.buf;
                mh.msg_controllen = ctl->len;
        }
        ssize_t n = sendmsg(sock, &mh, MSG_NOSIGNAL);
        cr_assert_eq(n, (ssize_t) len, "raw sendmsg of %zu bytes: %zd (%m)", len, n);
}

/* One datagram with nfds fds in a single SCM_RIGHTS message. */
static void raw_send(int sock, const void *buf, size_t len, const int *fds, size_t nfds) {
        Control ctl = { .len = 0 };

        if (nfds > 0)
                ctl_add(&ctl, SCM_RIGHTS, fds, nfds * sizeof(int));
        raw_sendmsg(sock, buf, len, &ctl);
}

/* ---- receive helpers -------------------------------------------------- */

static void assert_rejected(int sock) {
        IpcMessage m = { .fd = 4242 };

        int r = ipc_recv(sock, &m);
        cr_assert_eq(r, -EPROTO, "ipc_recv: expected -EPROTO, got %d (%s)", r, strerror(-r));
        cr_assert_eq(m.fd, -EBADF);
        cr_assert_eq(m.type, _IPC_TYPE_NONE);
}

/* The socket still works: a valid CHECKIN with an fd goes through. */
static void assert_usable(void) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        int pp[2];

        size_t size = sample(IPC_CHECKIN, &p);
        make_pipe(pp);
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, size, pp[1]), 0);
        cr_assert_eq(ipc_recv(brok, &m), 0, "socket not usable after a rejected message");
        cr_assert_eq(m.type, IPC_CHECKIN);
        cr_assert_eq(memcmp(&m.u.checkin, &p.checkin, size), 0);
        assert_pipe_works(m.fd, pp[0]);
        ipc_message_done(&m);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
}

/* ======================================================================= */
/* codec                                                                   */
/* ======================================================================= */

TEST(codec, type_table_matches_proto_header) {
#define X(t, n, p, f)                                                                             \
        cr_assert_str_eq(ipc_type_to_string(t), n);                                               \
        cr_assert_eq(ipc_payload_size(t), sizeof(p));                                             \
        cr_assert_eq(ipc_type_carries_fd(t), (bool) (f));
        IPC_MESSAGES(X)
#undef X
        const int unknown[] = { _IPC_TYPE_NONE, _IPC_TYPE_MAX, 999, 0xffff, -1 };
        for (size_t i = 0; i < ELEMENTSOF(unknown); i++) {
                IpcType t = (IpcType) unknown[i];
                cr_assert_str_eq(ipc_type_to_string(t), "unknown");
                cr_assert_eq(ipc_payload_size(t), 0);
                cr_assert_eq(ipc_type_carries_fd(t), false);
        }
        cr_assert_eq(ELEMENTSOF(all_types), _IPC_TYPE_MAX - 1);
}

TEST(codec, encode_matches_wire_layout) {
        for (size_t i = 0; i < ELEMENTSOF(all_types); i++) {
                IpcType t = all_types[i];
                uint8_t want[IPC_MSG_MAX], got[IPC_MSG_MAX];
                struct ipc_hdr h;
                Payload p;
                size_t len, got_len = 0;

                sample_parts(t, &h, &p, &len);
                build(want, sizeof(want), &h, &p, len);
                cr_assert_eq(ipc_encode(t, &p, ipc_payload_size(t), got, sizeof(got), &got_len), 0);
                cr_assert_eq(got_len, len, "%s", ipc_type_to_string(t));
                cr_assert_eq(memcmp(got, want, len), 0, "%s", ipc_type_to_string(t));
                cr_assert_leq(len, IPC_MSG_MAX);
        }
}

TEST(codec, round_trip_every_type) {
        for (size_t i = 0; i < ELEMENTSOF(all_types); i++) {
                IpcType t = all_types[i];
                uint8_t buf[IPC_MSG_MAX];
                Payload p;
                size_t len;

                size_t size = sample(t, &p);
                cr_assert_eq(ipc_encode(t, &p, size, buf, sizeof(buf), &len), 0);

                IpcMessage m;
                memset(&m, 0xa5, sizeof(m));
                m.fd = 4242;
                cr_assert_eq(ipc_decode(buf, len, ipc_type_carries_fd(t), &m), 0, "%s",
                             ipc_type_to_string(t));
                cr_assert_eq(m.type, t);
                cr_assert_eq(memcmp(&m.u, &p, size), 0, "%s: payload differs", ipc_type_to_string(t));
                cr_assert_eq(m.fd, 4242, "ipc_decode() must not touch ret->fd");
        }
}

TEST(codec, every_truncation_and_extension_fails) {
        for (size_t i = 0; i < ELEMENTSOF(all_types); i++) {
                IpcType t = all_types[i];
                uint8_t buf[IPC_MSG_MAX + 1];
                Payload p;
                size_t len;

                size_t size = sample(t, &p);
                cr_assert_eq(ipc_encode(t, &p, size, buf, sizeof(buf), &len), 0);
                for (size_t cut = 0; cut < len; cut++) {
                        IpcMessage m = { .fd = -EBADF };
                        cr_assert_eq(ipc_decode(buf, cut, ipc_type_carries_fd(t), &m), -EPROTO,
                                     "%s cut to %zu of %zu bytes was accepted", ipc_type_to_string(t),
                                     cut, len);
                }
                buf[len] = 0;
                IpcMessage m = { .fd = -EBADF };
                cr_assert_eq(ipc_decode(buf, len + 1, ipc_type_carries_fd(t), &m), -EPROTO,
                             "%s with a trailing byte was accepted", ipc_type_to_string(t));
        }
}

TEST(codec, fd_presence_must_match_table) {
        for (size_t i = 0; i < ELEMENTSOF(all_types); i++) {
                IpcType t = all_types[i];
                uint8_t buf[IPC_MSG_MAX];
                IpcMessage m = { .fd = -EBADF };
                Payload p;
                size_t len;

                size_t size = sample(t, &p);
                cr_assert_eq(ipc_encode(t, &p, size, buf, sizeof(buf), &len), 0);
                cr_assert_eq(ipc_decode(buf, len, !ipc_type_carries_fd(t), &m), -EPROTO, "%s",
                             ipc_type_to_string(t));
        }
}

TEST(codec, encode_errors) {
        uint8_t buf[IPC_MSG_MAX];
        size_t len = 777;
        Payload p;

        size_t size = sample(IPC_CHECKOUT, &p);
        cr_assert_eq(ipc_encode(IPC_CHECKOUT, &p, size - 1, buf, sizeof(buf), &len), -EINVAL);
        cr_assert_eq(ipc_encode(IPC_CHECKOUT, &p, size + 1, buf, sizeof(buf), &len), -EINVAL);
        cr_assert_eq(ipc_encode(_IPC_TYPE_NONE, &p, 0, buf, sizeof(buf), &len), -EINVAL);
        cr_assert_eq(ipc_encode(_IPC_TYPE_MAX, &p, size, buf, sizeof(buf), &len), -EINVAL);
        cr_assert_eq(ipc_encode(IPC_CHECKOUT, &p, size, buf, sizeof(struct ipc_hdr) + size - 1, &len),
                     -EMSGSIZE);
        cr_assert_eq(len, 777, "ret_len written on failure");
        cr_assert_eq(ipc_encode(IPC_CHECKOUT, &p, size, buf, sizeof(struct ipc_hdr) + size, &len), 0);
        cr_assert_eq(len, sizeof(struct ipc_hdr) + size);
}

TEST(codec, largest_message_is_ipc_msg_max) {
        size_t biggest = 0;
        for (size_t i = 0; i < ELEMENTSOF(all_types); i++)
                biggest = MAX(biggest, sizeof(struct ipc_hdr) + ipc_payload_size(all_types[i]));
        cr_assert_eq(biggest, IPC_MSG_MAX);
}

TEST(codec, rejected_checkout_leaves_no_password) {
        uint8_t buf[IPC_MSG_MAX];
        Payload p;
        size_t len;

        size_t size = sample(IPC_CHECKOUT, &p);
        p.checkout.user[0] = '\0'; /* invalid, but the password is there */
        cr_assert_eq(ipc_encode(IPC_CHECKOUT, &p, size, buf, sizeof(buf), &len), 0);

        IpcMessage m = { .fd = -EBADF };
        cr_assert_eq(ipc_decode(buf, len, false, &m), -EPROTO);
        cr_assert_eq(m.type, _IPC_TYPE_NONE);
        cr_assert_null(memmem(&m.u, sizeof(m.u), "s3cr", 4), "password left in a rejected message");
        explicit_bzero(buf, sizeof(buf));
}

TEST(codec, message_done_wipes_password_and_closes_fd) {
        uint8_t buf[IPC_MSG_MAX];
        Payload p;
        size_t len;
        int pp[2];

        size_t size = sample(IPC_CHECKOUT, &p);
        cr_assert_eq(ipc_encode(IPC_CHECKOUT, &p, size, buf, sizeof(buf), &len), 0);
        IpcMessage m = { .fd = -EBADF };
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        cr_assert_str_eq(m.u.checkout.password, p.checkout.password);

        make_pipe(pp);
        m.fd = pp[1];
        ipc_message_done(&m);
        cr_assert_eq(m.fd, -EBADF);
        cr_assert_eq(m.type, _IPC_TYPE_NONE);
        for (size_t i = 0; i < sizeof(m.u); i++)
                cr_assert_eq(((const uint8_t *) &m.u)[i], 0, "byte %zu of the payload not wiped", i);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);

        ipc_message_done(&m); /* idempotent */
        ipc_message_done(NULL);
}

/* ======================================================================= */
/* transport: round trips                                                  */
/* ======================================================================= */

/* Send one sample of type t from `from` to `to` with ipc_send(); for types
 * that carry an fd, pass a pipe write end and check that the sender's copy
 * is closed and the receiver's copy is usable. */
static void round_trip(IpcType t, int from, int to) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        int pp[2] = { -EBADF, -EBADF };

        size_t size = sample(t, &p);
        if (ipc_type_carries_fd(t)) {
                make_pipe(pp);
                cr_assert_eq(ipc_send(from, t, &p, size, pp[1]), 0);
                cr_assert(!fd_is_open(pp[1]), "ipc_send() did not close the sender's copy");
        } else
                cr_assert_eq(ipc_send(from, t, &p, size, -EBADF), 0);

        cr_assert_eq(ipc_recv(to, &m), 0, "%s", ipc_type_to_string(t));
        cr_assert_eq(m.type, t);
        cr_assert_eq(memcmp(&m.u, &p, size), 0, "%s: payload differs", ipc_type_to_string(t));
        if (ipc_type_carries_fd(t)) {
                cr_assert_geq(m.fd, 0);
                int fl = fcntl(m.fd, F_GETFD);
                cr_assert(fl >= 0 && (fl & FD_CLOEXEC), "received fd is not close-on-exec");
                assert_pipe_works(m.fd, pp[0]);
        } else
                cr_assert_eq(m.fd, -EBADF);
        ipc_message_done(&m);
        if (pp[0] >= 0) {
                assert_pipe_orphaned(pp[0]);
                safe_close(pp[0]);
        }
}

TEST(ipc, round_trip_hello) {
        round_trip(IPC_HELLO, sess, brok);
}
TEST(ipc, round_trip_hello_reply) {
        round_trip(IPC_HELLO_REPLY, brok, sess);
}
TEST(ipc, round_trip_checkout) {
        round_trip(IPC_CHECKOUT, sess, brok);
}
TEST(ipc, round_trip_checkout_ok_with_fd) {
        round_trip(IPC_CHECKOUT_OK, brok, sess);
}
TEST(ipc, round_trip_checkout_fail) {
        round_trip(IPC_CHECKOUT_FAIL, brok, sess);
}
TEST(ipc, round_trip_checkin_with_fd) {
        round_trip(IPC_CHECKIN, sess, brok);
}
TEST(ipc, round_trip_trace) {
        round_trip(IPC_TRACE, sess, brok);
}
TEST(ipc, round_trip_admin) {
        round_trip(IPC_ADMIN, sess, brok);
}
TEST(ipc, round_trip_admin_stats) {
        round_trip(IPC_ADMIN_STATS, brok, sess);
}
TEST(ipc, round_trip_admin_conn) {
        round_trip(IPC_ADMIN_CONN, brok, sess);
}
TEST(ipc, round_trip_admin_done) {
        round_trip(IPC_ADMIN_DONE, brok, sess);
}
TEST(ipc, round_trip_trace_event) {
        round_trip(IPC_TRACE_EVENT, brok, sess);
}

/* The edges of what the admin messages allow. */
TEST(codec, admin_edges_accepted) {
        uint8_t buf[IPC_MSG_MAX];
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        size_t len;

        /* FLUSH with no user means everyone */
        sample(IPC_ADMIN, &p);
        p.admin.op = IPC_ADMIN_OP_FLUSH;
        p.admin.user[0] = '\0';
        cr_assert_eq(ipc_encode(IPC_ADMIN, &p, sizeof(p.admin), buf, sizeof(buf), &len), 0);
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        /* STATS and LIST with no user */
        p.admin.op = IPC_ADMIN_OP_STATS;
        cr_assert_eq(ipc_encode(IPC_ADMIN, &p, sizeof(p.admin), buf, sizeof(buf), &len), 0);
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        p.admin.op = IPC_ADMIN_OP_LIST;
        cr_assert_eq(ipc_encode(IPC_ADMIN, &p, sizeof(p.admin), buf, sizeof(buf), &len), 0);
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        /* a trace line of the full length; a CR after the NUL does not count */
        sample(IPC_TRACE, &p);
        memset(p.trace.line, 'x', sizeof(p.trace.line) - 1);
        p.trace.line[sizeof(p.trace.line) - 1] = '\0';
        cr_assert_eq(ipc_encode(IPC_TRACE, &p, sizeof(p.trace), buf, sizeof(buf), &len), 0);
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        sample(IPC_TRACE, &p);
        p.trace.line[sizeof(p.trace.line) - 2] = '\r';
        cr_assert_eq(ipc_encode(IPC_TRACE, &p, sizeof(p.trace), buf, sizeof(buf), &len), 0);
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        /* both hello roles */
        sample(IPC_HELLO, &p);
        p.hello.role = IPC_ROLE_ADMIN;
        cr_assert_eq(ipc_encode(IPC_HELLO, &p, sizeof(p.hello), buf, sizeof(buf), &len), 0);
        cr_assert_eq(ipc_decode(buf, len, false, &m), 0);
        cr_assert_eq(m.u.hello.role, IPC_ROLE_ADMIN);
}

/* ipc_send_nowait() never blocks: a full socket gives -EAGAIN, and what
 * was queued before is intact. */
TEST(ipc, send_nowait_full_socket) {
        Payload p;
        size_t size = sample(IPC_TRACE_EVENT, &p);
        int r = 0, sent = 0;
        int sz = 4096;

        cr_assert_eq(setsockopt(brok, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz)), 0);
        while (sent < 100000 && (r = ipc_send_nowait(brok, IPC_TRACE_EVENT, &p, size)) == 0)
                sent++;
        cr_assert_eq(r, -EAGAIN, "ipc_send_nowait: %d after %d messages", r, sent);
        cr_assert_gt(sent, 0);
        for (int i = 0; i < sent; i++) {
                IpcMessage m = { .fd = -EBADF };
                cr_assert_eq(ipc_recv(sess, &m), 0);
                cr_assert_eq(m.type, IPC_TRACE_EVENT);
                ipc_message_done(&m);
        }
        cr_assert_eq(ipc_send_nowait(brok, IPC_TRACE_EVENT, &p, size), 0, "space again after reading");
        IpcMessage m = { .fd = -EBADF };
        cr_assert_eq(ipc_recv(sess, &m), 0);
        ipc_message_done(&m);
        /* a message that carries an fd cannot go this way */
        cr_assert_eq(ipc_send_nowait(brok, IPC_CHECKOUT_OK, &p, ipc_payload_size(IPC_CHECKOUT_OK)), -EINVAL);
}

TEST(ipc, round_trip_extreme_values) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;

        /* strings filling their field up to the last byte before the NUL */
        size_t size = sample(IPC_CHECKOUT, &p);
        p.checkout.flags = 0;
        p.checkout.client_port = 65535;
        memset(p.checkout.user, 'u', sizeof(p.checkout.user) - 1);
        memset(p.checkout.password, 'p', sizeof(p.checkout.password) - 1);
        memset(p.checkout.client_addr, 'a', sizeof(p.checkout.client_addr) - 1);
        cr_assert_eq(ipc_send(sess, IPC_CHECKOUT, &p, size, -EBADF), 0);
        cr_assert_eq(ipc_recv(brok, &m), 0);
        cr_assert_eq(memcmp(&m.u.checkout, &p.checkout, size), 0);
        ipc_message_done(&m);

        /* the other ends of each range */
        size = sample(IPC_CHECKOUT_FAIL, &p);
        p.checkout_fail.status = IPC_FAIL_UNAVAILABLE;
        p.checkout_fail.text[0] = '\0';
        cr_assert_eq(ipc_send(brok, IPC_CHECKOUT_FAIL, &p, size, -EBADF), 0);
        cr_assert_eq(ipc_recv(sess, &m), 0);
        cr_assert_eq(m.u.checkout_fail.status, IPC_FAIL_UNAVAILABLE);
        ipc_message_done(&m);

        size = sample(IPC_HELLO, &p);
        p.hello.version = UINT32_MAX; /* version is the application's to check, not the codec's */
        cr_assert_eq(ipc_send(sess, IPC_HELLO, &p, size, -EBADF), 0);
        cr_assert_eq(ipc_recv(brok, &m), 0);
        cr_assert_eq(m.u.hello.version, UINT32_MAX);
        ipc_message_done(&m);
}

/* The whole exchange, with a stream socketpair standing in for the backend
 * TCP connection: the lent fd reaches the session, is used there, and comes
 * back to the broker, and at each step exactly one process holds it. */
TEST(ipc, full_exchange_lends_and_returns_backend) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        int be[2]; /* be[0]: broker's backend connection; be[1]: the "IMAP server" */
        char line[32] = "";

        cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, be), 0);

        cr_assert_eq(ipc_send(sess, IPC_HELLO, &p, sample(IPC_HELLO, &p), -EBADF), 0);
        cr_assert_eq(ipc_recv(brok, &m), 0);
        cr_assert_eq(m.type, IPC_HELLO);
        ipc_message_done(&m);
        cr_assert_eq(ipc_send(brok, IPC_HELLO_REPLY, &p, sample(IPC_HELLO_REPLY, &p), -EBADF), 0);
        cr_assert_eq(ipc_recv(sess, &m), 0);
        cr_assert_eq(m.type, IPC_HELLO_REPLY);
        ipc_message_done(&m);

        cr_assert_eq(ipc_send(sess, IPC_CHECKOUT, &p, sample(IPC_CHECKOUT, &p), -EBADF), 0);
        explicit_bzero(&p, sizeof(p));
        cr_assert_eq(ipc_recv(brok, &m), 0);
        cr_assert_eq(m.type, IPC_CHECKOUT);
        ipc_message_done(&m);

        /* lend */
        cr_assert_eq(ipc_send(brok, IPC_CHECKOUT_OK, &p, sample(IPC_CHECKOUT_OK, &p), be[0]), 0);
        cr_assert(!fd_is_open(be[0]), "broker kept a copy of the lent connection");
        cr_assert_eq(ipc_recv(sess, &m), 0);
        cr_assert_eq(m.type, IPC_CHECKOUT_OK);
        int lent = m.fd;
        m.fd = -EBADF;
        ipc_message_done(&m);
        cr_assert_eq(write(lent, "a1 NOOP\r\n", 9), 9);
        cr_assert_eq(read(be[1], line, sizeof(line)), 9);
        cr_assert_eq(memcmp(line, "a1 NOOP\r\n", 9), 0);

        /* return */
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), lent), 0);
        cr_assert(!fd_is_open(lent), "session kept a copy of the returned connection");
        cr_assert_eq(ipc_recv(brok, &m), 0);
        cr_assert_eq(m.type, IPC_CHECKIN);
        cr_assert_eq(m.u.checkin.state, IPC_CONN_CLEAN);
        cr_assert_eq(write(m.fd, "a2 LOGOUT\r\n", 11), 11);
        cr_assert_eq(read(be[1], line, sizeof(line)), 11);
        ipc_message_done(&m);

        /* the broker closed it: the server sees EOF */
        cr_assert_eq(read(be[1], line, sizeof(line)), 0);
        safe_close(be[1]);
}

TEST(ipc, many_messages_queued_stay_separate) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;

        for (uint64_t i = 0; i < 32; i++) {
                size_t size = sample(IPC_CHECKOUT_OK, &p);
                p.checkout_ok.ticket = i;
                int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                cr_assert_geq(fd, 0);
                cr_assert_eq(ipc_send(brok, IPC_CHECKOUT_OK, &p, size, fd), 0);
        }
        for (uint64_t i = 0; i < 32; i++) {
                cr_assert_eq(ipc_recv(sess, &m), 0);
                cr_assert_eq(m.u.checkout_ok.ticket, i);
                cr_assert_geq(m.fd, 0);
                ipc_message_done(&m);
        }
}

/* ======================================================================= */
/* transport: ipc_send() argument checks and errors                        */
/* ======================================================================= */

TEST(ipc, send_fd_on_fdless_type_is_einval_and_keeps_fd) {
        Payload p;
        int pp[2];

        make_pipe(pp);
        for (size_t i = 0; i < ELEMENTSOF(all_types); i++) {
                IpcType t = all_types[i];
                if (ipc_type_carries_fd(t))
                        continue;
                cr_assert_eq(ipc_send(sess, t, &p, sample(t, &p), pp[1]), -EINVAL, "%s",
                             ipc_type_to_string(t));
                cr_assert(fd_is_open(pp[1]), "fd closed although ipc_send() failed");
        }
        safe_close(pp[1]);
        assert_pipe_orphaned(pp[0]); /* nothing was queued on the socket */
        safe_close(pp[0]);

        cr_assert_eq(fd_set_nonblock(brok, true), 0);
        IpcMessage m = { .fd = -EBADF };
        cr_assert_eq(ipc_recv(brok, &m), -EAGAIN, "something was sent");
}

TEST(ipc, send_without_fd_on_fd_type_is_einval) {
        Payload p;

        cr_assert_eq(ipc_send(brok, IPC_CHECKOUT_OK, &p, sample(IPC_CHECKOUT_OK, &p), -EBADF), -EINVAL);
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), -1), -EINVAL);
}

TEST(ipc, send_bad_type_or_length_is_einval) {
        Payload p;
        int pp[2];

        size_t size = sample(IPC_CHECKOUT, &p);
        cr_assert_eq(ipc_send(sess, IPC_CHECKOUT, &p, size - 1, -EBADF), -EINVAL);
        cr_assert_eq(ipc_send(sess, _IPC_TYPE_NONE, &p, size, -EBADF), -EINVAL);
        cr_assert_eq(ipc_send(sess, (IpcType) 999, &p, size, -EBADF), -EINVAL);
        make_pipe(pp);
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p) + 1, pp[1]), -EINVAL);
        cr_assert(fd_is_open(pp[1]));
        safe_close(pp[1]);
        safe_close(pp[0]);
}

TEST(ipc, send_to_closed_peer_is_epipe_and_keeps_fd) {
        Payload p;
        int pp[2];

        brok = safe_close(brok);
        cr_assert_eq(ipc_send(sess, IPC_HELLO, &p, sample(IPC_HELLO, &p), -EBADF), -EPIPE);
        make_pipe(pp);
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), pp[1]), -EPIPE);
        cr_assert(fd_is_open(pp[1]), "fd closed although ipc_send() failed");
        safe_close(pp[1]);
        safe_close(pp[0]);
}

/* ======================================================================= */
/* transport: receive edge cases                                           */
/* ======================================================================= */

TEST(ipc, peer_closed_is_econnreset) {
        IpcMessage m = { .fd = -EBADF };

        sess = safe_close(sess);
        cr_assert_eq(ipc_recv(brok, &m), -ECONNRESET);
        cr_assert_eq(ipc_recv(brok, &m), -ECONNRESET); /* and stays so */
        cr_assert_eq(m.fd, -EBADF);
}

TEST(ipc, queued_message_is_delivered_before_econnreset) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        int pp[2];

        make_pipe(pp);
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), pp[1]), 0);
        sess = safe_close(sess); /* session exits right after CHECKIN */
        cr_assert_eq(ipc_recv(brok, &m), 0);
        assert_pipe_works(m.fd, pp[0]);
        ipc_message_done(&m);
        cr_assert_eq(ipc_recv(brok, &m), -ECONNRESET);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
}

TEST(ipc, peer_closed_with_unread_data_is_econnreset) {
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        int pp[2];

        /* The broker lends an fd; the session dies without reading it. The
         * fd in flight is released by the kernel with the socket. */
        make_pipe(pp);
        cr_assert_eq(ipc_send(brok, IPC_CHECKOUT_OK, &p, sample(IPC_CHECKOUT_OK, &p), pp[1]), 0);
        sess = safe_close(sess);
        cr_assert_eq(ipc_recv(brok, &m), -ECONNRESET);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
}

TEST(ipc, nonblocking_empty_socket_is_eagain) {
        IpcMessage m = { .fd = -EBADF };

        cr_assert_eq(fd_set_nonblock(brok, true), 0);
        cr_assert_eq(ipc_recv(brok, &m), -EAGAIN);
        cr_assert_eq(m.fd, -EBADF);
        cr_assert_eq(m.type, _IPC_TYPE_NONE);
        assert_usable();
}

/* XXX: on SOCK_SEQPACKET recvmsg() returns 0 both for an empty datagram and
 * at EOF; ipc_recv() cannot tell them apart and reports -ECONNRESET. Either
 * way the receiver drops the peer, which is what a malformed message costs. */
TEST(ipc, empty_datagram_reads_as_econnreset) {
        IpcMessage m = { .fd = -EBADF };

        raw_send(sess, "", 0, NULL, 0);
        cr_assert_eq(ipc_recv(brok, &m), -ECONNRESET);
        cr_assert_eq(m.fd, -EBADF);
        assert_usable();
}

TEST(ipc_bad, empty_datagram_with_fd) {
        int pp[2];

        make_pipe(pp);
        raw_send(sess, "", 0, &pp[1], 1);
        safe_close(pp[1]);
        assert_rejected(brok);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
        assert_usable();
}

/* ======================================================================= */
/* malformed messages: header, length, payload                             */
/* ======================================================================= */

typedef void (*Mutator)(struct ipc_hdr *h, Payload *p, size_t *len);

/* Start from a valid message of type t, apply mutate, send it raw with nfds
 * pipe write ends (-1: as many as the table says), and check that both the
 * pure decoder and ipc_recv() reject it, that every fd is closed, and that
 * the socket still works. */
static void run_bad_case(IpcType t, Mutator mutate, int nfds) {
        static uint8_t wire[64 * 1024];
        struct ipc_hdr h;
        Payload p;
        size_t len;
        int rfd[8], wfd[8];

        sample_parts(t, &h, &p, &len);
        mutate(&h, &p, &len);
        build(wire, sizeof(wire), &h, &p, len);
        if (nfds < 0)
                nfds = ipc_type_carries_fd(t) ? 1 : 0;
        cr_assert_leq(nfds, 8);

        if (nfds <= 1) {
                IpcMessage m = { .fd = -EBADF };
                cr_assert_eq(ipc_decode(wire, len, nfds == 1, &m), -EPROTO, "ipc_decode() accepted it");
        }

        for (int i = 0; i < nfds; i++) {
                int pp[2];
                make_pipe(pp);
                rfd[i] = pp[0];
                wfd[i] = pp[1];
        }
        raw_send(sess, wire, len, wfd, (size_t) nfds);
        for (int i = 0; i < nfds; i++)
                safe_close(wfd[i]);

        assert_rejected(brok);
        for (int i = 0; i < nfds; i++) {
                assert_pipe_orphaned(rfd[i]);
                safe_close(rfd[i]);
        }
        assert_usable();
}

#define BAD_CASE(name, type, nfds, ...)                                                           \
        static void mutate_##name(struct ipc_hdr *h, Payload *p, size_t *len) {                   \
                (void) h;                                                                         \
                (void) p;                                                                         \
                (void) len;                                                                       \
                __VA_ARGS__;                                                                      \
        }                                                                                         \
        TEST(ipc_bad, name) {                                                                     \
                run_bad_case(type, mutate_##name, nfds);                                          \
        }

/* header and length */
BAD_CASE(truncated_header_1, IPC_HELLO, 0, *len = 1)
BAD_CASE(truncated_header_7, IPC_HELLO, 0, *len = sizeof(struct ipc_hdr) - 1)
BAD_CASE(truncated_header_with_fd, IPC_CHECKIN, 1, *len = 4)
BAD_CASE(header_only, IPC_HELLO, 0, *len = sizeof(struct ipc_hdr))
BAD_CASE(header_only_len_0, IPC_HELLO, 0, h->len = 0; *len = sizeof(struct ipc_hdr))
BAD_CASE(header_only_checkin, IPC_CHECKIN, 1, *len = sizeof(struct ipc_hdr))
BAD_CASE(oversized_len, IPC_HELLO, 0, h->len = UINT32_MAX)
BAD_CASE(oversized_len_checkout, IPC_CHECKOUT, 0, h->len = 0x80000000u)
BAD_CASE(len_one_more_than_payload, IPC_CHECKIN, 1, h->len += 1)
BAD_CASE(len_one_less_than_payload, IPC_CHECKOUT_FAIL, 0, h->len -= 1)
BAD_CASE(len_and_datagram_one_short, IPC_CHECKOUT_OK, 1, h->len -= 1; *len -= 1)
BAD_CASE(datagram_one_longer_than_len, IPC_HELLO, 0, *len += 1)
BAD_CASE(datagram_one_shorter_than_len, IPC_CHECKOUT, 0, *len -= 1)
BAD_CASE(len_of_another_type, IPC_HELLO, 0, h->len = sizeof(struct ipc_checkin);
         *len = sizeof(struct ipc_hdr) + sizeof(struct ipc_checkin))
/* A valid CHECKOUT is exactly IPC_MSG_MAX bytes: anything beyond must not be
 * cut off silently and the prefix accepted. */
BAD_CASE(datagram_ipc_msg_max_plus_1, IPC_CHECKOUT, 0, *len = IPC_MSG_MAX + 1)
BAD_CASE(datagram_ipc_msg_max_plus_2, IPC_CHECKOUT, 0, *len = IPC_MSG_MAX + 2)
BAD_CASE(datagram_4k, IPC_CHECKOUT, 0, *len = 4096)
BAD_CASE(datagram_64k, IPC_CHECKOUT, 0, *len = 64 * 1024)
BAD_CASE(datagram_64k_with_fd, IPC_CHECKIN, 1, *len = 64 * 1024)
BAD_CASE(datagram_64k_len_matching, IPC_CHECKOUT, 0, h->len = 64 * 1024 - sizeof(struct ipc_hdr);
         *len = 64 * 1024)

/* type */
BAD_CASE(type_0, IPC_HELLO, 0, h->type = 0)
BAD_CASE(type_999, IPC_HELLO, 0, h->type = 999)
BAD_CASE(type_max, IPC_HELLO, 0, h->type = _IPC_TYPE_MAX)
BAD_CASE(type_ffff, IPC_HELLO, 0, h->type = 0xffff)
BAD_CASE(type_0_with_fd, IPC_CHECKIN, 1, h->type = 0)
BAD_CASE(type_999_with_fd, IPC_CHECKIN, 1, h->type = 999)

/* header flags against the table and the ancillary data */
BAD_CASE(flag_fd_on_fdless_type_without_fd, IPC_HELLO, 0, h->flags = IPC_HDR_F_FD)
BAD_CASE(flag_fd_on_fdless_type_with_fd, IPC_CHECKOUT, 1, h->flags = IPC_HDR_F_FD)
BAD_CASE(no_flag_on_checkin_with_fd, IPC_CHECKIN, 1, h->flags = 0)
BAD_CASE(no_flag_on_checkout_ok_with_fd, IPC_CHECKOUT_OK, 1, h->flags = 0)
BAD_CASE(no_flag_no_fd_on_checkin, IPC_CHECKIN, 0, h->flags = 0)
BAD_CASE(unknown_flag_bit, IPC_HELLO, 0, h->flags = 0x0002)
BAD_CASE(unknown_flag_bit_high, IPC_CHECKIN, 1, h->flags |= 0x8000)

/* fd presence */
BAD_CASE(fd_on_hello, IPC_HELLO, 1, )
BAD_CASE(fd_on_hello_reply, IPC_HELLO_REPLY, 1, )
BAD_CASE(fd_on_checkout, IPC_CHECKOUT, 1, )
BAD_CASE(fd_on_checkout_fail, IPC_CHECKOUT_FAIL, 1, )
BAD_CASE(missing_fd_checkout_ok, IPC_CHECKOUT_OK, 0, )
BAD_CASE(missing_fd_checkin, IPC_CHECKIN, 0, )
BAD_CASE(two_fds_checkin, IPC_CHECKIN, 2, )
BAD_CASE(two_fds_checkout_ok, IPC_CHECKOUT_OK, 2, )
BAD_CASE(two_fds_hello, IPC_HELLO, 2, )
BAD_CASE(four_fds_checkin, IPC_CHECKIN, 4, )
BAD_CASE(eight_fds_checkin, IPC_CHECKIN, 8, ) /* more than ipc_recv() has room for: MSG_CTRUNC */

/* unterminated strings, one per string field */
BAD_CASE(unterminated_hello_reply_caps, IPC_HELLO_REPLY, -1,
         memset(p->hello_reply.caps, 'C', sizeof(p->hello_reply.caps)))
BAD_CASE(unterminated_checkout_user, IPC_CHECKOUT, -1,
         memset(p->checkout.user, 'u', sizeof(p->checkout.user)))
BAD_CASE(unterminated_checkout_password, IPC_CHECKOUT, -1,
         memset(p->checkout.password, 'p', sizeof(p->checkout.password)))
BAD_CASE(unterminated_checkout_client_addr, IPC_CHECKOUT, -1,
         memset(p->checkout.client_addr, 'a', sizeof(p->checkout.client_addr)))
BAD_CASE(unterminated_checkout_ok_caps, IPC_CHECKOUT_OK, -1,
         memset(p->checkout_ok.caps, 'C', sizeof(p->checkout_ok.caps)))
BAD_CASE(unterminated_checkout_fail_text, IPC_CHECKOUT_FAIL, -1,
         memset(p->checkout_fail.text, 't', sizeof(p->checkout_fail.text)))

/* field values */
BAD_CASE(empty_user, IPC_CHECKOUT, -1, p->checkout.user[0] = '\0')
BAD_CASE(checkout_unknown_flag, IPC_CHECKOUT, -1, p->checkout.flags |= 0x2)
BAD_CASE(checkout_port_65536, IPC_CHECKOUT, -1, p->checkout.client_port = 65536)
BAD_CASE(hello_reply_unknown_flag, IPC_HELLO_REPLY, -1, p->hello_reply.flags |= 0x80000000u)
BAD_CASE(checkout_ok_unknown_flag, IPC_CHECKOUT_OK, -1, p->checkout_ok.flags |= 0x4)
BAD_CASE(checkin_state_0, IPC_CHECKIN, -1, p->checkin.state = 0)
BAD_CASE(checkin_state_3, IPC_CHECKIN, -1, p->checkin.state = 3)
BAD_CASE(checkin_state_max, IPC_CHECKIN, -1, p->checkin.state = UINT32_MAX)
BAD_CASE(fail_status_0, IPC_CHECKOUT_FAIL, -1, p->checkout_fail.status = 0)
BAD_CASE(fail_status_4, IPC_CHECKOUT_FAIL, -1, p->checkout_fail.status = 4)
BAD_CASE(fail_status_max, IPC_CHECKOUT_FAIL, -1, p->checkout_fail.status = UINT32_MAX)

/* reserved fields */
BAD_CASE(hello_role_0, IPC_HELLO, -1, p->hello.role = 0)
BAD_CASE(hello_role_3, IPC_HELLO, -1, p->hello.role = 3)

/* the admin and trace messages (IPC_PROTO_VERSION 3) */
BAD_CASE(fd_on_admin, IPC_ADMIN, 1, )
BAD_CASE(fd_on_trace, IPC_TRACE, 1, )
BAD_CASE(fd_on_trace_event, IPC_TRACE_EVENT, 1, )
BAD_CASE(admin_op_0, IPC_ADMIN, -1, p->admin.op = 0)
BAD_CASE(admin_op_5, IPC_ADMIN, -1, p->admin.op = 5)
BAD_CASE(admin_reserved, IPC_ADMIN, -1, p->admin.reserved = 1)
BAD_CASE(admin_trace_without_user, IPC_ADMIN, -1, p->admin.user[0] = '\0')
BAD_CASE(admin_stats_with_user, IPC_ADMIN, -1, p->admin.op = IPC_ADMIN_OP_STATS)
BAD_CASE(admin_list_with_user, IPC_ADMIN, -1, p->admin.op = IPC_ADMIN_OP_LIST)
BAD_CASE(unterminated_admin_user, IPC_ADMIN, -1, memset(p->admin.user, 'u', sizeof(p->admin.user)))
BAD_CASE(trace_dir_0, IPC_TRACE, -1, p->trace.dir = 0)
BAD_CASE(trace_dir_4, IPC_TRACE, -1, p->trace.dir = 4)
BAD_CASE(trace_unknown_flag, IPC_TRACE, -1, p->trace.flags |= 0x2)
BAD_CASE(trace_reserved, IPC_TRACE, -1, p->trace.reserved = 1)
BAD_CASE(trace_line_with_lf, IPC_TRACE, -1, p->trace.line[3] = '\n')
BAD_CASE(trace_line_with_cr, IPC_TRACE, -1, p->trace.line[0] = '\r')
BAD_CASE(unterminated_trace_line, IPC_TRACE, -1, memset(p->trace.line, 'l', sizeof(p->trace.line)))
BAD_CASE(admin_stats_reserved, IPC_ADMIN_STATS, -1, p->admin_stats.reserved = 1)
BAD_CASE(admin_conn_state_0, IPC_ADMIN_CONN, -1, p->admin_conn.state = 0)
BAD_CASE(admin_conn_state_3, IPC_ADMIN_CONN, -1, p->admin_conn.state = 3)
BAD_CASE(admin_conn_unknown_flag, IPC_ADMIN_CONN, -1, p->admin_conn.flags |= 0x4)
BAD_CASE(unterminated_admin_conn_user, IPC_ADMIN_CONN, -1, memset(p->admin_conn.user, 'u', sizeof(p->admin_conn.user)))
BAD_CASE(unterminated_admin_conn_authzid, IPC_ADMIN_CONN, -1,
         memset(p->admin_conn.authzid, 'z', sizeof(p->admin_conn.authzid)))
BAD_CASE(unterminated_admin_conn_backend, IPC_ADMIN_CONN, -1,
         memset(p->admin_conn.backend, 'b', sizeof(p->admin_conn.backend)))
BAD_CASE(admin_done_reserved, IPC_ADMIN_DONE, -1, p->admin_done.reserved = 1)
BAD_CASE(admin_done_text_with_lf, IPC_ADMIN_DONE, -1, p->admin_done.text[1] = '\n')
BAD_CASE(unterminated_admin_done_text, IPC_ADMIN_DONE, -1,
         memset(p->admin_done.text, 't', sizeof(p->admin_done.text)))
BAD_CASE(trace_event_dir_0, IPC_TRACE_EVENT, -1, p->trace_event.dir = 0)
BAD_CASE(trace_event_unknown_flag, IPC_TRACE_EVENT, -1, p->trace_event.flags = 0x10)
BAD_CASE(trace_event_line_with_lf, IPC_TRACE_EVENT, -1, p->trace_event.line[5] = '\n')
BAD_CASE(unterminated_trace_event_user, IPC_TRACE_EVENT, -1,
         memset(p->trace_event.user, 'u', sizeof(p->trace_event.user)))
BAD_CASE(unterminated_trace_event_line, IPC_TRACE_EVENT, -1,
         memset(p->trace_event.line, 'l', sizeof(p->trace_event.line)))
BAD_CASE(checkout_ok_reserved, IPC_CHECKOUT_OK, -1, p->checkout_ok.reserved = 0x80000000u)
BAD_CASE(checkout_fail_reserved, IPC_CHECKOUT_FAIL, -1, p->checkout_fail.reserved = 1)
BAD_CASE(checkin_reserved, IPC_CHECKIN, -1, p->checkin.reserved = 1)

/* ======================================================================= */
/* malformed messages: ancillary data                                      */
/* ======================================================================= */

TEST(ipc_bad, two_fds_in_two_cmsgs) {
        uint8_t buf[IPC_MSG_MAX];
        Control ctl = { .len = 0 };
        Payload p;
        size_t len;
        int a[2], b[2];

        cr_assert_eq(ipc_encode(IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), buf, sizeof(buf), &len), 0);
        make_pipe(a);
        make_pipe(b);
        ctl_add(&ctl, SCM_RIGHTS, &a[1], sizeof(int));
        ctl_add(&ctl, SCM_RIGHTS, &b[1], sizeof(int));
        raw_sendmsg(sess, buf, len, &ctl);
        safe_close(a[1]);
        safe_close(b[1]);
        assert_rejected(brok);
        assert_pipe_orphaned(a[0]);
        assert_pipe_orphaned(b[0]);
        safe_close(a[0]);
        safe_close(b[0]);
        assert_usable();
}

/* A valid message, but the receiver gets SCM_CREDENTIALS along with it. */
static void send_with_creds(IpcType t, int *pp) {
        uint8_t buf[IPC_MSG_MAX];
        Control ctl = { .len = 0 };
        struct ucred uc = { .pid = getpid(), .uid = getuid(), .gid = getgid() };
        Payload p;
        size_t len;

        cr_assert_eq(ipc_encode(t, &p, sample(t, &p), buf, sizeof(buf), &len), 0);
        ctl_add(&ctl, SCM_CREDENTIALS, &uc, sizeof(uc));
        if (pp)
                ctl_add(&ctl, SCM_RIGHTS, &pp[1], sizeof(int));
        raw_sendmsg(sess, buf, len, &ctl);
}

static void set_passcred(int sock, int on) {
        cr_assert_eq(setsockopt(sock, SOL_SOCKET, SO_PASSCRED, &on, sizeof(on)), 0, "SO_PASSCRED: %m");
}

TEST(ipc_bad, scm_credentials) {
        set_passcred(brok, 1);
        send_with_creds(IPC_HELLO, NULL);
        assert_rejected(brok);
        set_passcred(brok, 0);
        assert_usable();
}

TEST(ipc_bad, scm_credentials_with_fd) {
        int pp[2];

        make_pipe(pp);
        set_passcred(brok, 1);
        send_with_creds(IPC_CHECKIN, pp);
        safe_close(pp[1]);
        assert_rejected(brok);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
        set_passcred(brok, 0);
        assert_usable();
}

/* SO_PASSCRED on the receiver alone: the kernel attaches credentials to
 * every message, even ones sent by ipc_send(). */
TEST(ipc_bad, implicit_scm_credentials_with_fd) {
        Payload p;
        int pp[2];

        make_pipe(pp);
        set_passcred(brok, 1);
        cr_assert_eq(ipc_send(sess, IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), pp[1]), 0);
        assert_rejected(brok);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
        set_passcred(brok, 0);
        assert_usable();
}

/* SO_PASSPIDFD (Linux >= 6.5) makes the kernel install a pidfd of the
 * sender with every message, as an SCM_PIDFD control message that comes
 * after SCM_RIGHTS. It is not SCM_RIGHTS, so the message is rejected, but
 * the pidfd is an fd like any other and must be closed too. */
static bool set_passpidfd(int sock, int on) {
        if (setsockopt(sock, SOL_SOCKET, SO_PASSPIDFD, &on, sizeof(on)) < 0) {
                cr_assert(errno == ENOPROTOOPT || errno == EINVAL, "SO_PASSPIDFD: %m");
                return false;
        }
        return true;
}

TEST(ipc_bad, scm_pidfd) {
        Payload p;

        if (!set_passpidfd(brok, 1))
                cr_skip_test("SO_PASSPIDFD not supported by this kernel");
        cr_assert_eq(ipc_send(sess, IPC_HELLO, &p, sample(IPC_HELLO, &p), -EBADF), 0);
        assert_rejected(brok);
        set_passpidfd(brok, 0);
        assert_usable();
}

TEST(ipc_bad, scm_pidfd_with_fds) {
        Payload p;
        uint8_t buf[IPC_MSG_MAX];
        size_t len;

        if (!set_passpidfd(brok, 1))
                cr_skip_test("SO_PASSPIDFD not supported by this kernel");
        cr_assert_eq(ipc_encode(IPC_CHECKIN, &p, sample(IPC_CHECKIN, &p), buf, sizeof(buf), &len), 0);
        for (size_t nfds = 1; nfds <= 5; nfds++) {
                int rfd[5], wfd[5];
                for (size_t i = 0; i < nfds; i++) {
                        int pp[2];
                        make_pipe(pp);
                        rfd[i] = pp[0];
                        wfd[i] = pp[1];
                }
                raw_send(sess, buf, len, wfd, nfds);
                for (size_t i = 0; i < nfds; i++)
                        safe_close(wfd[i]);
                assert_rejected(brok);
                for (size_t i = 0; i < nfds; i++) {
                        assert_pipe_orphaned(rfd[i]);
                        safe_close(rfd[i]);
                }
        }
        set_passpidfd(brok, 0);
        assert_usable();
}

/* A burst of malformed messages of every kind, then a valid one. */
TEST(ipc_bad, burst_then_valid) {
        uint8_t buf[IPC_MSG_MAX];
        Payload p;
        size_t len;
        int pp[2];

        make_pipe(pp);
        int two[2] = { pp[1], pp[1] };
        for (int i = 0; i < 50; i++) {
                IpcType t = all_types[(size_t) i % ELEMENTSOF(all_types)];
                cr_assert_eq(ipc_encode(t, &p, sample(t, &p), buf, sizeof(buf), &len), 0);
                buf[i % 8] ^= 0x40; /* corrupt one header byte */
                raw_send(sess, buf, len, two, (size_t) (i % 3));
        }
        safe_close(pp[1]);
        for (int i = 0; i < 50; i++)
                assert_rejected(brok);
        assert_pipe_orphaned(pp[0]);
        safe_close(pp[0]);
        assert_usable();
}

/* ======================================================================= */
/* ipc_connect()                                                           */
/* ======================================================================= */

TEST(ipc, connect) {
        char dir[] = "/tmp/test-ipc-XXXXXX", path[64];
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        IpcMessage m = { .fd = -EBADF };
        Payload p;
        int fd = -EBADF;

        cr_assert_not_null(mkdtemp(dir));
        snprintf(path, sizeof(path), "%s/broker.sock", dir);
        cr_assert_lt(strlen(path), sizeof(sa.sun_path));
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        int l = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        cr_assert_geq(l, 0);
        cr_assert_eq(bind(l, (struct sockaddr *) &sa, sizeof(sa)), 0, "bind: %m");
        cr_assert_eq(listen(l, 1), 0);

        cr_assert_eq(ipc_connect(path, &fd), 0);
        int fl = fcntl(fd, F_GETFD);
        cr_assert(fl >= 0 && (fl & FD_CLOEXEC));
        int a = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        cr_assert_geq(a, 0);
        cr_assert_eq(ipc_send(fd, IPC_HELLO, &p, sample(IPC_HELLO, &p), -EBADF), 0);
        cr_assert_eq(ipc_recv(a, &m), 0);
        cr_assert_eq(m.type, IPC_HELLO);
        ipc_message_done(&m);

        safe_close(a);
        safe_close(fd);
        safe_close(l);
        unlink(path);
        cr_assert_eq(ipc_connect(path, &fd), -ENOENT);
        rmdir(dir);
}

TEST(ipc, connect_bad_path) {
        char longpath[200];
        int fd = 4242;

        memset(longpath, 'x', sizeof(longpath) - 1);
        longpath[sizeof(longpath) - 1] = '\0';
        cr_assert_eq(ipc_connect("", &fd), -EINVAL);
        cr_assert_eq(ipc_connect(longpath, &fd), -EINVAL);
        cr_assert_eq(ipc_connect("/nonexistent/dir/broker.sock", &fd), -ENOENT);
        cr_assert_eq(fd, 4242, "ret_fd written on failure");
}
