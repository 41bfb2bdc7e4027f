/*
 * peer.c -- session processes talking to the broker over its socket.
 *
 * SYNOPSIS
 *	int peer_listen(Broker *b);
 *	void peer_close_all(Broker *b);
 * DESCRIPTION
 *	Accepts sessions (and imapproxyctl, see admin.c) on the broker socket (an inherited LISTEN_FDS socket,
 *	or one we bind at broker_socket), checks SO_PEERCRED (root, our own
 *	uid, or broker_socket_group), and runs each peer's small state machine:
 *	  NEW --hello--> READY --checkout--> PENDING --> LEASED --checkin--> READY
 *	(PENDING only while a fresh backend login is under way.) One request
 *	at a time per peer. A peer that sends anything out of order or
 *	malformed is dropped alone; a peer that goes away holding a lease
 *	takes the connection with it: the broker never reuses it.
 * LIMITS
 *	At start the soft RLIMIT_NOFILE is raised to the hard one. Peers are
 *	capped at max_peers = that limit minus the pool's share (cache_size,
 *	at most half) minus FD_RESERVE, so that sessions can never take the
 *	fds that backend connections need. A peer beyond the cap, or one that
 *	arrives when the process is out of fds anyway (EMFILE/ENFILE: the
 *	spare reserve_fd is given up for the accept() and taken back), is
 *	accepted and closed at once: its session answers LOGIN with NO
 *	[UNAVAILABLE]. The listener never spins on a connection it cannot
 *	accept: without the spare it is paused for LISTEN_RETRY_USEC.
 * SECURITY
 *	The pool key comes from compute_verifier() over the credentials the
 *	peer sent; the peer's checkin is accepted only for its own ticket and
 *	only with the very socket it was lent (SO_COOKIE).
 */
#include <errno.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <grp.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "broker.h"
#include "fd-util.h"
#include "ipc.h"
#include "log.h"

static const char *const peer_state_names[_PEER_STATE_MAX] = {
        [PEER_NEW] = "new", [PEER_READY] = "ready", [PEER_PENDING] = "pending", [PEER_LEASED] = "leased",
        [PEER_ADMIN] = "admin", [PEER_HELLO_WAIT] = "hello-wait",
};

/* How long a session's hello may wait for the broker's first look at the
 * backend (well inside the session's own 5 s hello timeout). */
#define HELLO_WAIT_MAX_USEC (2000 * 1000ULL)
static_assert(ELEMENTSOF(peer_state_names) == _PEER_STATE_MAX, "peer state names");

static void peer_enter_state(Peer *p, PeerState s) {
        log_debug("session %d: %s -> %s", (int) p->pid, peer_state_names[p->state], peer_state_names[s]);
        p->state = s;
}

static void peer_free(Peer *p) {
        Broker *b = p->broker;

        if (p->job) {
                backend_job_cancel(p->job);
                p->job = NULL;
        }
        if (p->lease) {
                /* It left with the session: never reuse, we have no fd anyway. */
                log_info("session %d went away holding the connection of %s: not reused", (int) p->pid,
                         p->lease->user);
                b->stats.dirty++;
                pool_conn_free(p->lease, false);
                p->lease = NULL;
        }
        if (p->admin)
                admin_peer_free(p);
        p->io = sd_event_source_disable_unref(p->io);
        p->fd = safe_close(p->fd);
        if (p->prev)
                p->prev->next = p->next;
        else
                b->peers = p->next;
        if (p->next)
                p->next->prev = p->prev;
        if (p->role != IPC_ROLE_ADMIN)
                b->n_peers--;
        free(p);
        broker_update_status(b);
}

static int peer_send_fail(Peer *p, IpcFailStatus status, const char *text) {
        struct ipc_checkout_fail m = { .status = status };
        snprintf(m.text, sizeof(m.text), "%s", text);
        return ipc_send(p->fd, IPC_CHECKOUT_FAIL, &m, sizeof(m), -EBADF);
}

/* Hand c to the peer. On failure the connection is closed (never reused). */
static int peer_lend(Peer *p, Conn *c, bool reused) {
        Broker *b = p->broker;
        struct ipc_checkout_ok m = { .flags = reused ? IPC_LEASE_F_REUSED : 0 };
        int r;

        c->ticket = ++b->next_ticket;
        c->peer = p;
        /* Tracing is decided per lease: a trace started later sees the
         * user's next login, not one already in progress. */
        c->traced = b->n_tracers > 0 && admin_is_traced(b, c->user);
        if (c->traced) {
                m.flags |= IPC_LEASE_F_TRACE;
                p->traced = true;
        }
        snprintf(m.caps, sizeof(m.caps), "%s", c->caps ? c->caps->text : "");
        m.ticket = c->ticket;
        r = ipc_send(p->fd, IPC_CHECKOUT_OK, &m, sizeof(m), c->fd);
        if (r < 0) {
                pool_conn_free(c, true);
                return r;
        }
        c->fd = -EBADF; /* ipc_send closed our copy: the session owns it now */
        p->lease = c;
        b->stats.logins_total++;
        if (reused)
                b->stats.reuses_total++;
        peer_enter_state(p, PEER_LEASED);
        /* One line per login would be the busiest log of a webmail host: hits
         * are counted (STATUS=) and logged at debug level; misses at info. */
        log_struct(reused ? LOG_DEBUG : LOG_INFO, reused ? IMAPPROXY_MSGID_LOGIN_CACHED : IMAPPROXY_MSGID_LOGIN_NEW,
                   LOG_FIELDS({ "IMAPPROXY_USER", c->user },
                              { "IMAPPROXY_AUTHZID", c->authzid[0] ? c->authzid : NULL },
                              { "IMAPPROXY_CLIENT", p->client[0] ? p->client : NULL },
                              { "IMAPPROXY_CACHE", reused ? "hit" : "miss" },
                              { "IMAPPROXY_BACKEND", b->backend_name },
                              { "IMAPPROXY_SESSION_PID", p->pidtext }),
                   "login %s: %s (session %d)", c->user, reused ? "cache hit" : "new backend connection",
                   (int) p->pid);
        broker_update_status(b);
        return 0;
}

static void peer_on_backend_done(void *userdata, int error, Conn *c, IpcFailStatus status, const char *text) {
        Peer *p = userdata;
        Broker *b = p->broker;
        int r;

        p->job = NULL;
        if (error == 0 && c) {
                pool_drop_user_except(b, c->user, c->authzid, c->verifier);
                r = peer_lend(p, c, false);
        } else {
                if (status == IPC_FAIL_NO || status == IPC_FAIL_BAD) {
                        char clean[256];
                        log_struct(LOG_NOTICE, IMAPPROXY_MSGID_LOGIN_FAILED,
                                   LOG_FIELDS({ "IMAPPROXY_USER", p->user },
                                              { "IMAPPROXY_CLIENT", p->client[0] ? p->client : NULL },
                                              { "IMAPPROXY_BACKEND", b->backend_name },
                                              { "IMAPPROXY_SESSION_PID", p->pidtext }),
                                   "login %s failed: %s", p->user,
                                   log_sanitize(text, strlen(text), clean, sizeof(clean)));
                }
                peer_enter_state(p, PEER_READY);
                r = peer_send_fail(p, status, text);
        }
        if (r < 0) {
                log_warning_errno(r, "session %d: cannot answer: %m", (int) p->pid);
                peer_free(p);
        }
}

/* Full-length, constant-time comparison: HMACs of both under our key. */
static bool secret_equal(const Broker *b, const char *given, const char *secret) {
        uint8_t x[VERIFIER_SIZE], y[VERIFIER_SIZE], d = 0;
        if (gnutls_hmac_fast(GNUTLS_MAC_SHA256, b->hmac_key, HMAC_KEY_SIZE, given, strlen(given), x) < 0 ||
            gnutls_hmac_fast(GNUTLS_MAC_SHA256, b->hmac_key, HMAC_KEY_SIZE, secret, strlen(secret), y) < 0)
                return false;
        for (size_t i = 0; i < VERIFIER_SIZE; i++)
                d |= (uint8_t) (x[i] ^ y[i]);
        explicit_bzero(x, sizeof(x));
        explicit_bzero(y, sizeof(y));
        return d == 0;
}

static int peer_on_checkout(Peer *p, struct ipc_checkout *m) {
        Broker *b = p->broker;
        uint8_t verifier[VERIFIER_SIZE];
        Conn *c;
        int r;

        snprintf(p->user, sizeof(p->user), "%s", m->user);
        snprintf(p->client, sizeof(p->client), "%s", m->client_addr);
        if (proxy_auth_enabled(b) &&
            (m->authzid[0] != '\0' || !secret_equal(b, m->password, b->cfg.auth_shared_secret))) {
                log_struct(LOG_NOTICE, IMAPPROXY_MSGID_LOGIN_FAILED,
                           LOG_FIELDS({ "IMAPPROXY_USER", p->user },
                                      { "IMAPPROXY_CLIENT", p->client[0] ? p->client : NULL },
                                      { "IMAPPROXY_SESSION_PID", p->pidtext }),
                           "login %s failed: not the shared secret (auth_shared_secret)", p->user);
                b->stats.login_failures++;
                return peer_send_fail(p, IPC_FAIL_NO, "[AUTHENTICATIONFAILED] Authentication failed.");
        }
        compute_verifier(b, m->user, m->authzid, m->password, verifier);

        if (!(m->flags & IPC_CHECKOUT_F_FRESH) && !b->stopping) {
                r = pool_checkout(b, m->user, m->authzid, verifier, &c);
                if (r == 0)
                        return peer_lend(p, c, true);
        }
        if (b->stopping)
                return peer_send_fail(p, IPC_FAIL_UNAVAILABLE, "[UNAVAILABLE] Proxy is shutting down, try again later.");

        r = pool_make_room(b);
        if (r < 0) {
                log_warning("login %s refused: cache_size (%u) backend connections are all in use", m->user,
                            b->cfg.cache_size);
                return peer_send_fail(p, IPC_FAIL_UNAVAILABLE, "[UNAVAILABLE] Too many connections, try again later.");
        }
        peer_enter_state(p, PEER_PENDING);
        r = backend_job_start(b, m, verifier, peer_on_backend_done, p, &p->job);
        explicit_bzero(verifier, sizeof(verifier));
        if (r < 0) {
                peer_enter_state(p, PEER_READY);
                log_warning_errno(r, "cannot start backend login: %m");
                return peer_send_fail(p, IPC_FAIL_UNAVAILABLE, "[UNAVAILABLE] Internal error, try again later.");
        }
        return 0;
}

static int peer_hello_reply(Peer *p) {
        Broker *b = p->broker;
        struct ipc_hello_reply rep = { .version = IPC_PROTO_VERSION };

        if (b->prelogin_caps_known) {
                rep.flags |= IPC_HELLO_F_BACKEND_KNOWN;
                snprintf(rep.caps, sizeof(rep.caps), "%s", b->prelogin_caps);
        }
        peer_enter_state(p, PEER_READY);
        return ipc_send(p->fd, IPC_HELLO_REPLY, &rep, sizeof(rep), -EBADF);
}

void peer_hello_release(Broker *b) {
        b->hello_wait_timer = sd_event_source_disable_unref(b->hello_wait_timer);
        for (Peer *p = b->peers, *next; p; p = next) {
                next = p->next;
                if (p->state == PEER_HELLO_WAIT && peer_hello_reply(p) < 0)
                        peer_free(p);
        }
}

static int hello_wait_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        log_info("backend %s not probed after %llu ms: greeting sessions with a minimal capability list",
                 b->backend_name, (unsigned long long) (HELLO_WAIT_MAX_USEC / 1000));
        peer_hello_release(b);
        return 0;
}

static int peer_dispatch(Peer *p, IpcMessage *m) {
        Broker *b = p->broker;

        switch (m->type) {
        case IPC_HELLO: {
                int r;
                if (p->state != PEER_NEW)
                        return -EPROTO;
                if (m->u.hello.version != IPC_PROTO_VERSION) {
                        log_warning("%s %d speaks protocol %u, we speak %u: mixed installation?",
                                    m->u.hello.role == IPC_ROLE_ADMIN ? "imapproxyctl" : "session", (int) p->pid,
                                    m->u.hello.version, IPC_PROTO_VERSION);
                        return -EPROTONOSUPPORT;
                }
                p->role = m->u.hello.role;
                if (p->role == IPC_ROLE_ADMIN) {
                        b->n_peers--; /* imapproxyctl is not a client */
                        peer_enter_state(p, PEER_ADMIN);
                        return admin_hello(p);
                }
                stats_note_clients(&b->stats, b->n_peers);
                b->stats.clients_total++;
                if (backend_probe_first_pending(b)) {
                        /* Just started (typically by this very session's
                         * socket activation): the greeting should show the
                         * backend's capabilities, not a minimal list. */
                        if (!b->hello_wait_timer) {
                                r = sd_event_add_time_relative(b->event, &b->hello_wait_timer, CLOCK_MONOTONIC,
                                                               HELLO_WAIT_MAX_USEC, 0, hello_wait_on_timer, b);
                                if (r < 0)
                                        return peer_hello_reply(p);
                        }
                        peer_enter_state(p, PEER_HELLO_WAIT);
                        return 0;
                }
                return peer_hello_reply(p);
        }
        case IPC_CHECKOUT:
                if (p->state != PEER_READY)
                        return -EPROTO;
                return peer_on_checkout(p, &m->u.checkout);

        case IPC_CHECKIN: {
                if (p->state != PEER_LEASED || !p->lease || m->u.checkin.ticket != p->lease->ticket)
                        return -EPROTO;
                Conn *c = TAKE_PTR(p->lease);
                int fd = TAKE_FD(m->fd);
                peer_enter_state(p, PEER_READY);
                if (m->u.checkin.state == IPC_CONN_CLEAN) {
                        int r = pool_checkin(b, c, fd);
                        if (r == -EPERM) {
                                log_warning("session %d returned a socket it was not lent: dropping", (int) p->pid);
                                b->stats.dirty++;
                                pool_conn_free(c, false);
                                return -EPROTO;
                        }
                        return 0;
                }
                b->stats.dirty++;
                log_debug("connection of %s returned dirty: logging out", c->user);
                pool_return_dirty(b, c, fd);
                return 0;
        }
        case IPC_TRACE:
                /* Only from a session that was asked to trace (IPC_LEASE_F_TRACE);
                 * lines may still come after its checkin (the final BYE). */
                if (p->role != IPC_ROLE_SESSION || !p->traced)
                        return -EPROTO;
                admin_trace_forward(b, p, &m->u.trace);
                return 0;
        case IPC_ADMIN:
                if (p->state != PEER_ADMIN)
                        return -EPROTO; /* a session may never send an admin request */
                return admin_dispatch(p, m);
        default:
                return -EPROTO;
        }
}

static int peer_on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Peer *p = userdata;
        IpcMessage m;
        int r;

        if (p->admin && (revents & EPOLLOUT)) {
                r = admin_flush_output(p);
                if (r < 0)
                        goto drop;
        }
        if (!(revents & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                return 0;
        for (;;) {
                r = ipc_recv(p->fd, &m);
                if (r == -EAGAIN)
                        return 0;
                if (r < 0)
                        break;
                r = peer_dispatch(p, &m);
                ipc_message_done(&m);
                if (r < 0)
                        break;
        }
drop:
        if (r != -ECONNRESET)
                log_warning_errno(r, "%s %d: dropping: %m", p->role == IPC_ROLE_ADMIN ? "imapproxyctl" : "session",
                                  (int) p->pid);
        peer_free(p);
        return 0;
}

#define FD_RESERVE 64                   /* sd-event, logging, resolver, TLS, listeners */
#define LISTEN_RETRY_USEC (250 * 1000ULL)
#define REFUSAL_LOG_INTERVAL_USEC (10 * 1000000ULL)

static void peer_refused(Broker *b, const char *why) {
        uint64_t now = now_usec();
        b->stats.peers_refused++;
        if (b->refusal_logged_usec == 0 || now - b->refusal_logged_usec >= REFUSAL_LOG_INTERVAL_USEC) {
                log_warning("refusing sessions: %s (%u sessions connected, %llu refused so far)", why, b->n_peers,
                            (unsigned long long) b->stats.peers_refused);
                b->refusal_logged_usec = now;
        }
}

static int listen_on_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        b->listen_retry = sd_event_source_disable_unref(b->listen_retry);
        if (b->reserve_fd < 0)
                b->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        (void) sd_event_source_set_enabled(b->listen_source, SD_EVENT_ON);
        return 0;
}

/* accept() failed with EMFILE/ENFILE: take the waiting connection with the
 * spare fd and close it, so that it does not wake us again at once. Without
 * a spare, pause the listener. */
static void listen_out_of_fds(Broker *b, int fd, int error) {
        peer_refused(b, error == -ENFILE ? "system file table full (ENFILE)" : "out of file descriptors (EMFILE)");
        if (b->reserve_fd >= 0) {
                b->reserve_fd = safe_close(b->reserve_fd);
                int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (cfd >= 0)
                        safe_close(cfd);
                b->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (b->reserve_fd >= 0)
                        return;
                b->reserve_fd = -EBADF;
        }
        (void) sd_event_source_set_enabled(b->listen_source, SD_EVENT_OFF);
        if (!b->listen_retry &&
            sd_event_add_time_relative(b->event, &b->listen_retry, CLOCK_MONOTONIC, LISTEN_RETRY_USEC, 0,
                                       listen_on_retry, b) < 0)
                (void) sd_event_source_set_enabled(b->listen_source, SD_EVENT_ON); /* better busy than deaf */
}

static bool peer_allowed(Broker *b, int fd, const struct ucred *cred) {
        if (cred->uid == 0 || cred->uid == geteuid())
                return true;
        if (b->allowed_gid_set && cred->gid == b->allowed_gid)
                return true;
        return admin_may_connect(b, fd, cred); /* an administrator (admin_group) */
}

static int listen_on_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Broker *b = userdata;

        for (;;) {
                int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (cfd < 0) {
                        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                                return 0;
                        if (errno == EMFILE || errno == ENFILE) {
                                listen_out_of_fds(b, fd, -errno);
                                return 0;
                        }
                        log_warning_errno(-errno, "accept on broker socket: %m");
                        return 0;
                }
                if (b->n_peers >= b->max_peers) {
                        peer_refused(b, "max_peers reached (RLIMIT_NOFILE)");
                        safe_close(cfd);
                        continue;
                }
                struct ucred cred;
                socklen_t l = sizeof(cred);
                if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &l) < 0 || !peer_allowed(b, cfd, &cred)) {
                        log_warning("refusing broker connection from pid %d uid %d: not a session or an administrator", (int) cred.pid,
                                    (int) cred.uid);
                        safe_close(cfd);
                        continue;
                }
                Peer *p = calloc(1, sizeof(Peer));
                if (!p) {
                        safe_close(cfd);
                        continue;
                }
                p->broker = b;
                p->fd = cfd;
                p->pid = cred.pid;
                (void) snprintf(p->pidtext, sizeof(p->pidtext), "%d", (int) cred.pid);
                p->uid = cred.uid;
                p->gid = cred.gid;
                p->state = PEER_NEW;
                int r = sd_event_add_io(b->event, &p->io, cfd, EPOLLIN, peer_on_io, p);
                if (r < 0) {
                        safe_close(cfd);
                        free(p);
                        continue;
                }
                p->next = b->peers;
                if (p->next)
                        p->next->prev = p;
                b->peers = p;
                b->n_peers++; /* counts against max_peers from now: hello or not */
        }
}

static int bind_broker_socket(Broker *b) {
        const char *path = b->cfg.broker_socket;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        size_t l = strlen(path);
        int r;

        if (l == 0 || l >= sizeof(sa.sun_path))
                return log_error_errno(-EINVAL, "broker_socket %s: path too long", path);
        memcpy(sa.sun_path, path, l + 1);

        /* A live broker already there? Then do not steal its socket. */
        int probe;
        if (ipc_connect(path, &probe) == 0) {
                safe_close(probe);
                return log_error_errno(-EADDRINUSE, "broker_socket %s: another broker is running", path);
        }

        _cleanup_free_ char *dir = strdup(path);
        if (!dir)
                return -ENOMEM;
        char *slash = strrchr(dir, '/');
        if (slash && slash != dir) {
                *slash = '\0';
                if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                        return log_error_errno(-errno, "mkdir %s: %m", dir);
        }

        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(-errno, "socket: %m");
        (void) unlink(path);
        mode_t old = umask(0117);
        r = bind(fd, (struct sockaddr *) &sa, (socklen_t) (offsetof(struct sockaddr_un, sun_path) + l + 1));
        umask(old);
        if (r < 0)
                return log_error_errno(-errno, "bind %s: %m", path);
        if (b->allowed_gid_set && chown(path, (uid_t) -1, b->allowed_gid) < 0)
                return log_error_errno(-errno, "chown %s: %m", path);
        if (listen(fd, SOMAXCONN) < 0)
                return log_error_errno(-errno, "listen %s: %m", path);
        b->listen_fd = TAKE_FD(fd);
        return 0;
}

/* Raise the soft fd limit to the hard one and derive max_peers. */
static void peer_limits(Broker *b) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
                rl = (struct rlimit) { .rlim_cur = 1024, .rlim_max = 1024 };
        if (rl.rlim_cur < rl.rlim_max) {
                rlim_t want = rl.rlim_max == RLIM_INFINITY ? 1u << 20 : rl.rlim_max;
                struct rlimit nrl = { .rlim_cur = want, .rlim_max = rl.rlim_max };
                if (setrlimit(RLIMIT_NOFILE, &nrl) == 0)
                        rl.rlim_cur = want;
        }
        uint64_t nofile = rl.rlim_cur == RLIM_INFINITY ? 1u << 20 : (uint64_t) rl.rlim_cur;
        uint64_t pool = MIN((uint64_t) b->cfg.cache_size, nofile / 2);
        uint64_t peers = nofile > pool + FD_RESERVE + 16 ? nofile - pool - FD_RESERVE : 16;
        b->max_peers = (unsigned) MIN(peers, (uint64_t) UINT_MAX);
        if (pool < b->cfg.cache_size)
                log_warning("RLIMIT_NOFILE %llu is too low for cache_size %u: backend connections will fail "
                            "with EMFILE before the pool is full (raise LimitNOFILE=)",
                            (unsigned long long) nofile, b->cfg.cache_size);
        log_debug("RLIMIT_NOFILE %llu: up to %u sessions", (unsigned long long) nofile, b->max_peers);
}

int peer_listen(Broker *b) {
        int r, n;

        peer_limits(b);
        b->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (b->reserve_fd < 0)
                b->reserve_fd = -EBADF;

        if (b->cfg.broker_socket_group) {
                struct group *g = getgrnam(b->cfg.broker_socket_group);
                if (!g)
                        return log_error_errno(-ENOENT, "broker_socket_group %s: no such group", b->cfg.broker_socket_group);
                b->allowed_gid = g->gr_gid;
                b->allowed_gid_set = true;
        }

        n = sd_listen_fds(true);
        if (n > 1)
                return log_error_errno(-EINVAL, "expected one inherited socket, got %d", n);
        if (n == 1) {
                if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_SEQPACKET, 1, NULL, 0) <= 0)
                        return log_error_errno(-EINVAL, "inherited socket is not a listening AF_UNIX SOCK_SEQPACKET socket");
                b->listen_fd = SD_LISTEN_FDS_START;
                b->listen_fd_inherited = true;
                (void) fd_set_nonblock(b->listen_fd, true);
                (void) fd_set_cloexec(b->listen_fd, true);
        } else {
                r = bind_broker_socket(b);
                if (r < 0)
                        return r;
        }
        return sd_event_add_io(b->event, &b->listen_source, b->listen_fd, EPOLLIN, listen_on_accept, b);
}

void peer_close_all(Broker *b) {
        b->listen_retry = sd_event_source_disable_unref(b->listen_retry);
        b->reserve_fd = safe_close(b->reserve_fd);
        b->listen_source = sd_event_source_disable_unref(b->listen_source);
        if (b->listen_fd >= 0 && !b->listen_fd_inherited)
                (void) unlink(b->cfg.broker_socket);
        b->listen_fd = safe_close(b->listen_fd);
        b->hello_wait_timer = sd_event_source_disable_unref(b->hello_wait_timer);
        while (b->peers)
                peer_free(b->peers);
}
