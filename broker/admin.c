/*
 * admin.c -- imapproxyctl on the broker socket: stats, list, flush, trace.
 *
 * SYNOPSIS
 *	int admin_init(Broker *b);
 *	bool admin_may_connect(const Broker *b, int fd, const struct ucred *cred);
 *	int admin_hello(Peer *p);
 *	int admin_dispatch(Peer *p, IpcMessage *m);
 *	int admin_flush_output(Peer *p);
 *	void admin_peer_free(Peer *p);
 *	bool admin_is_traced(const Broker *b, const char *user);
 *	void admin_trace_forward(Broker *b, const Peer *session, const struct ipc_trace *t);
 * DESCRIPTION
 *	A peer that says HELLO with role admin becomes an admin peer if its
 *	credentials allow it (root, or admin_group as primary or supplementary
 *	group: SO_PEERCRED, SO_PEERGROUPS); otherwise it gets ADMIN_DONE
 *	{EPERM} and is dropped. The broker's own uid is NOT enough: sessions
 *	run under it. An admin peer may send ADMIN requests only (peer.c drops
 *	it for anything else, and drops a session for any ADMIN request).
 *	  stats  one ADMIN_STATS from Broker.stats and the gauges.
 *	  list   one ADMIN_CONN per idle and lent connection, then ADMIN_DONE.
 *	         No secrets: user, authzid, backend, ages, use count.
 *	  flush  logs out the idle connections of one user (or all) and marks
 *	         that user's lent ones no_reuse: pool_checkin() closes them.
 *	  trace  subscribes to one user: leases of that user are lent with
 *	         IPC_LEASE_F_TRACE, their sessions send TRACE lines (already
 *	         redacted), and they are forwarded here as TRACE_EVENTs.
 *	Output to an admin peer never blocks the broker: each admin peer has
 *	a queue of messages written on EPOLLOUT. Replies to requests are
 *	always queued (bounded by what there is to list); trace events are
 *	dropped, and counted, once TRACE_QUEUE_MAX are waiting.
 * SECURITY
 *	Trace lines come from sessions, which are untrusted: the codec checks
 *	them (terminated, no CR/LF), and the user name shown is the broker's
 *	own record of the peer's login, not something the trace message says.
 * ERRORS
 *	0 or -errno; a negative return from admin_hello()/admin_dispatch()
 *	makes peer.c drop the peer.
 */
#include <errno.h>
#include <grp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "fd-util.h"
#include "log.h"

#define TRACE_QUEUE_MAX 256
#define PEER_GROUPS_MAX 256

typedef struct AdminMsg {
        struct AdminMsg *next;
        IpcType type;
        size_t len;
        uint8_t payload[];
} AdminMsg;

struct AdminPeer {
        Peer *peer;
        AdminMsg *q_head, *q_tail;
        unsigned q_len;
        uint64_t dropped;                 /* trace events not queued since the last one sent */
        bool tracing;
        char trace_user[IPC_USER_MAX];
        AdminPeer *next, *prev;
};

int admin_init(Broker *b) {
        b->start_usec = now_usec();
        if (!b->cfg.admin_group)
                return 0;
        struct group *g = getgrnam(b->cfg.admin_group);
        if (!g)
                return log_error_errno(-ENOENT, "admin_group %s: no such group", b->cfg.admin_group);
        if (g->gr_gid == getegid() && geteuid() != 0)
                return log_error_errno(-EINVAL, "admin_group %s is the broker's own group, which sessions run with: "
                                       "name a group of administrators", b->cfg.admin_group);
        b->admin_gid = g->gr_gid;
        b->admin_gid_set = true;
        return 0;
}

/* Is the peer on fd root or in admin_group (primary or supplementary)? */
static bool peer_is_admin(const Broker *b, int fd, const struct ucred *cred) {
        if (cred->uid == 0)
                return true;
        if (!b->admin_gid_set)
                return false;
        if (cred->gid == b->admin_gid)
                return true;
        gid_t groups[PEER_GROUPS_MAX];
        socklen_t l = sizeof(groups);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &l) < 0)
                return false; /* ERANGE: more groups than we look at */
        for (size_t i = 0; i < l / sizeof(gid_t); i++)
                if (groups[i] == b->admin_gid)
                        return true;
        return false;
}

bool admin_may_connect(const Broker *b, int fd, const struct ucred *cred) {
        return peer_is_admin(b, fd, cred);
}

/* ---- output queue ---- */

static void admin_want_output(Peer *p, bool on) {
        (void) sd_event_source_set_io_events(p->io, on ? EPOLLIN | EPOLLOUT : EPOLLIN);
}

int admin_flush_output(Peer *p) {
        AdminPeer *a = p->admin;
        while (a->q_head) {
                AdminMsg *m = a->q_head;
                int r = ipc_send_nowait(p->fd, m->type, m->payload, m->len);
                if (r == -EAGAIN)
                        return 0;
                if (r < 0)
                        return r;
                a->q_head = m->next;
                if (!a->q_head)
                        a->q_tail = NULL;
                a->q_len--;
                free(m);
        }
        admin_want_output(p, false);
        return 0;
}

/* Send now if nothing is waiting, else queue. -ENOBUFS: a trace event that
 * did not fit (counted by the caller). */
static int admin_send(Peer *p, IpcType type, const void *payload, size_t len, bool droppable) {
        AdminPeer *a = p->admin;
        if (!a->q_head) {
                int r = ipc_send_nowait(p->fd, type, payload, len);
                if (r != -EAGAIN)
                        return r;
        }
        if (droppable && a->q_len >= TRACE_QUEUE_MAX)
                return -ENOBUFS;
        AdminMsg *m = malloc(sizeof(AdminMsg) + len);
        if (!m)
                return -ENOMEM;
        m->next = NULL;
        m->type = type;
        m->len = len;
        memcpy(m->payload, payload, len);
        if (a->q_tail)
                a->q_tail->next = m;
        else
                a->q_head = m;
        a->q_tail = m;
        a->q_len++;
        admin_want_output(p, true);
        return 0;
}

static int admin_done(Peer *p, unsigned status, unsigned n_idle, unsigned n_lent, const char *fmt, ...) _printf_(5, 6);
static int admin_done(Peer *p, unsigned status, unsigned n_idle, unsigned n_lent, const char *fmt, ...) {
        struct ipc_admin_done d = { .status = status, .n_idle = n_idle, .n_lent = n_lent };
        va_list ap;
        va_start(ap, fmt);
        (void) vsnprintf(d.text, sizeof(d.text), fmt, ap);
        va_end(ap);
        return admin_send(p, IPC_ADMIN_DONE, &d, sizeof(d), false);
}

/* ---- requests ---- */

int admin_hello(Peer *p) {
        Broker *b = p->broker;
        struct ucred cred = { .pid = p->pid, .uid = p->uid, .gid = p->gid };

        if (!peer_is_admin(b, p->fd, &cred)) {
                log_warning("imapproxyctl pid %d uid %d refused: not root%s%s", (int) p->pid, (int) p->uid,
                            b->admin_gid_set ? " and not in admin_group " : " (no admin_group configured)",
                            b->admin_gid_set ? b->cfg.admin_group : "");
                struct ipc_admin_done d = { .status = EPERM };
                snprintf(d.text, sizeof(d.text), "permission denied: only root%s%s may administer the broker",
                         b->admin_gid_set ? " and members of admin_group " : "",
                         b->admin_gid_set ? b->cfg.admin_group : "");
                (void) ipc_send_nowait(p->fd, IPC_ADMIN_DONE, &d, sizeof(d));
                return -EPERM;
        }
        AdminPeer *a = calloc(1, sizeof(AdminPeer));
        if (!a)
                return -ENOMEM;
        a->peer = p;
        p->admin = a;
        a->next = b->admins;
        if (a->next)
                a->next->prev = a;
        b->admins = a;
        log_debug("imapproxyctl pid %d uid %d connected", (int) p->pid, (int) p->uid);

        struct ipc_hello_reply rep = { .version = IPC_PROTO_VERSION };
        return admin_send(p, IPC_HELLO_REPLY, &rep, sizeof(rep), false);
}

void admin_peer_free(Peer *p) {
        AdminPeer *a = p->admin;
        Broker *b = p->broker;
        if (!a)
                return;
        if (a->tracing) {
                b->n_tracers--;
                log_info("imapproxyctl pid %d stopped tracing %s", (int) p->pid, a->trace_user);
        }
        while (a->q_head) {
                AdminMsg *m = a->q_head;
                a->q_head = m->next;
                free(m);
        }
        if (a->prev)
                a->prev->next = a->next;
        else
                b->admins = a->next;
        if (a->next)
                a->next->prev = a->prev;
        free(a);
        p->admin = NULL;
}

static int admin_stats(Peer *p) {
        Broker *b = p->broker;
        const Stats *s = &b->stats;
        struct ipc_admin_stats m = {
                .clients = b->n_peers,
                .peak_clients = s->peak_clients,
                .lent = b->n_lent,
                .peak_lent = s->peak_lent,
                .idle = b->n_idle,
                .peak_idle = s->peak_idle,
                .pending = b->n_pending,
                .uptime_usec = now_usec() - b->start_usec,
                .clients_total = s->clients_total,
                .logins_total = s->logins_total,
                .reuses_total = s->reuses_total,
                .backend_logins = s->backend_logins,
                .login_failures = s->login_failures,
                .backend_errors = s->backend_errors,
                .expired = s->expired,
                .dead = s->dead,
                .dirty = s->dirty,
                .flushed = s->flushed,
                .trace_dropped = s->trace_dropped,
        };
        return admin_send(p, IPC_ADMIN_STATS, &m, sizeof(m), false);
}

static void conn_to_wire(const Conn *c, uint64_t now, struct ipc_admin_conn *m) {
        memset(m, 0, sizeof(*m));
        m->state = c->state == CONN_IDLE ? IPC_LIST_IDLE : IPC_LIST_LENT;
        m->flags = (c->no_reuse ? IPC_LIST_F_NO_REUSE : 0) | (c->traced ? IPC_LIST_F_TRACED : 0);
        m->pid = c->state == CONN_LENT && c->peer ? (uint32_t) c->peer->pid : 0;
        m->uses = c->uses;
        m->age_usec = now - c->created_usec;
        m->idle_usec = c->state == CONN_IDLE ? now - c->idle_since_usec : 0;
        snprintf(m->user, sizeof(m->user), "%s", c->user);
        snprintf(m->authzid, sizeof(m->authzid), "%s", c->authzid);
        snprintf(m->backend, sizeof(m->backend), "%s", c->backend);
}

static int admin_list(Peer *p) {
        Broker *b = p->broker;
        uint64_t now = now_usec();
        struct ipc_admin_conn m;
        unsigned n_idle = 0, n_lent = 0;
        int r;

        for (Conn *c = b->idle_head; c; c = c->idle_next) {
                conn_to_wire(c, now, &m);
                r = admin_send(p, IPC_ADMIN_CONN, &m, sizeof(m), false);
                if (r < 0)
                        return r;
                n_idle++;
        }
        for (Peer *s = b->peers; s; s = s->next) {
                if (!s->lease)
                        continue;
                conn_to_wire(s->lease, now, &m);
                r = admin_send(p, IPC_ADMIN_CONN, &m, sizeof(m), false);
                if (r < 0)
                        return r;
                n_lent++;
        }
        return admin_done(p, 0, n_idle, n_lent, "%u idle, %u lent", n_idle, n_lent);
}

static int admin_flush(Peer *p, const char *user) {
        Broker *b = p->broker;
        unsigned n_idle = pool_flush(b, user), n_lent = 0;

        for (Peer *s = b->peers; s; s = s->next)
                if (s->lease && !s->lease->no_reuse && (user[0] == '\0' || strcmp(s->lease->user, user) == 0)) {
                        s->lease->no_reuse = true;
                        n_lent++;
                }
        log_info("imapproxyctl flush %s: %u idle connections logged out, %u lent ones will not be pooled again",
                 user[0] ? user : "(all users)", n_idle, n_lent);
        broker_update_status(b);
        return admin_done(p, 0, n_idle, n_lent, "%u idle connections logged out; %u lent connections will be closed when their sessions end",
                          n_idle, n_lent);
}

static int admin_trace(Peer *p, const char *user) {
        Broker *b = p->broker;
        AdminPeer *a = p->admin;

        if (a->tracing)
                return -EPROTO; /* one trace per connection */
        a->tracing = true;
        snprintf(a->trace_user, sizeof(a->trace_user), "%s", user);
        b->n_tracers++;
        log_info("imapproxyctl pid %d uid %d traces %s", (int) p->pid, (int) p->uid, user);
        return admin_done(p, 0, 0, 0, "tracing %s from its next login", user);
}

int admin_dispatch(Peer *p, IpcMessage *m) {
        const struct ipc_admin *q = &m->u.admin;

        if (p->admin->tracing)
                return -EPROTO; /* a tracing connection only listens */
        switch (q->op) {
        case IPC_ADMIN_OP_STATS:
                return admin_stats(p);
        case IPC_ADMIN_OP_LIST:
                return admin_list(p);
        case IPC_ADMIN_OP_FLUSH:
                return admin_flush(p, q->user);
        case IPC_ADMIN_OP_TRACE:
                return admin_trace(p, q->user);
        default:
                return -EPROTO;
        }
}

/* ---- tracing ---- */

bool admin_is_traced(const Broker *b, const char *user) {
        for (const AdminPeer *a = b->admins; a; a = a->next)
                if (a->tracing && strcmp(a->trace_user, user) == 0)
                        return true;
        return false;
}

void admin_trace_forward(Broker *b, const Peer *session, const struct ipc_trace *t) {
        struct ipc_trace_event ev = {
                .dir = t->dir,
                .flags = t->flags,
                .pid = (uint32_t) session->pid,
        };
        struct timespec ts;
        bool first = true;

        if (b->n_tracers == 0)
                return;
        for (AdminPeer *a = b->admins; a; a = a->next) {
                if (!a->tracing || strcmp(a->trace_user, session->user) != 0)
                        continue;
                if (first) {
                        (void) clock_gettime(CLOCK_REALTIME, &ts);
                        ev.time_usec = (uint64_t) ts.tv_sec * 1000000ULL + (uint64_t) ts.tv_nsec / 1000ULL;
                        snprintf(ev.user, sizeof(ev.user), "%s", session->user);
                        memcpy(ev.line, t->line, sizeof(ev.line));
                        first = false;
                }
                uint64_t d = a->dropped + t->dropped;
                ev.dropped = d > UINT32_MAX ? UINT32_MAX : (uint32_t) d;
                int r = admin_send(a->peer, IPC_TRACE_EVENT, &ev, sizeof(ev), true);
                if (r < 0) {
                        a->dropped++;
                        b->stats.trace_dropped++;
                } else
                        a->dropped = 0;
        }
        if (t->dropped)
                b->stats.trace_dropped += t->dropped;
}
