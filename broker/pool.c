/*
 * pool.c -- the broker's cache of idle authenticated backend connections.
 *
 * SYNOPSIS
 *	int pool_checkout(Broker *b, const char *user, const uint8_t verifier[], Conn **ret);
 *	int pool_checkin(Broker *b, Conn *c, int fd);
 *	int pool_make_room(Broker *b);
 * DESCRIPTION
 *	Idle connections are keyed by (user, verifier, TLS profile); the
 *	TLS profile (0 for plain TCP) must match the broker's current one
 *	(conn_tls_ok()). A TLS connection's fd is one end of a socketpair
 *	relayed by tls.c; the pool treats it exactly like a TCP socket. The
 *	verifier is an
 *	HMAC-SHA256 of user and password under a random per-broker key, built
 *	here from what the session sent, compared in constant time. A lent
 *	connection leaves the pool and the broker keeps no copy of its fd
 *	(cf. Postfix scache); the Conn record stays as the lease.
 *	Every idle connection sits on one global list ordered by the time it
 *	became idle: one timer expires the head at exactly
 *	cache_expiration_time, and pool_make_room() evicts the head when
 *	cache_size is reached. Idle fds are watched: EOF, an error, "* BYE" or
 *	anything that is not a complete untagged line closes the connection,
 *	so a connection in an unknown state is never lent.
 *	Reuse is LIFO per user: the most recently returned connection goes out
 *	first, so surplus connections of a user age out.
 * ERRORS
 *	0 or -errno: -ENOENT no idle connection for that key, -EBUSY cache full.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "fd-util.h"
#include "log.h"

#define POOL_INITIAL_BUCKETS 256u
#define IDLE_READ_MAX 4096

Caps *caps_ref(Caps *c) {
        if (c)
                c->refcount++;
        return c;
}

Caps *caps_unref(Caps *c) {
        if (c && --c->refcount == 0)
                free(c);
        return NULL;
}

Caps *caps_intern(Broker *b, const char *text) {
        if (b->caps_cache && strcmp(b->caps_cache->text, text) == 0)
                return caps_ref(b->caps_cache);
        size_t l = strlen(text);
        Caps *c = malloc(sizeof(Caps) + l + 1);
        if (!c)
                return NULL;
        c->refcount = 1;
        memcpy(c->text, text, l + 1);
        caps_unref(b->caps_cache);
        b->caps_cache = caps_ref(c);
        return c;
}

void compute_verifier(const Broker *b, const char *user, const char *authzid, const char *password,
                      uint8_t ret[VERIFIER_SIZE]) {
        gnutls_hmac_hd_t h;
        if (gnutls_hmac_init(&h, GNUTLS_MAC_SHA256, b->hmac_key, HMAC_KEY_SIZE) < 0)
                abort(); /* SHA-256 HMAC is always available: a failure is corruption */
        (void) gnutls_hmac(h, user, strlen(user) + 1); /* the NULs separate the fields */
        (void) gnutls_hmac(h, authzid, strlen(authzid) + 1);
        (void) gnutls_hmac(h, password, strlen(password));
        gnutls_hmac_deinit(h, ret);
}

static bool verifier_equal(const uint8_t *a, const uint8_t *b) {
        uint8_t d = 0;
        for (size_t i = 0; i < VERIFIER_SIZE; i++)
                d |= (uint8_t) (a[i] ^ b[i]);
        return d == 0;
}

static uint64_t hash_user(const char *s) {
        uint64_t h = 1469598103934665603ULL; /* FNV-1a */
        for (; *s; s++) {
                h ^= (unsigned char) *s;
                h *= 1099511628211ULL;
        }
        return h;
}

static size_t bucket_of(const Broker *b, const char *user) {
        return (size_t) (hash_user(user) & (b->n_buckets - 1));
}

unsigned pool_total(const Broker *b) {
        return b->n_idle + b->n_lent + b->n_pending;
}

static void bucket_link(Broker *b, Conn *c) {
        size_t i = bucket_of(b, c->user);
        c->bucket_prev = NULL;
        c->bucket_next = b->buckets[i];
        if (c->bucket_next)
                c->bucket_next->bucket_prev = c;
        b->buckets[i] = c;
}

static void bucket_unlink(Broker *b, Conn *c) {
        if (c->bucket_prev)
                c->bucket_prev->bucket_next = c->bucket_next;
        else
                b->buckets[bucket_of(b, c->user)] = c->bucket_next;
        if (c->bucket_next)
                c->bucket_next->bucket_prev = c->bucket_prev;
        c->bucket_next = c->bucket_prev = NULL;
}

static int pool_grow(Broker *b) {
        size_t n = b->n_buckets * 2;
        Conn **nb = calloc(n, sizeof(Conn *));
        if (!nb)
                return -ENOMEM;
        Conn **old = b->buckets;
        size_t oldn = b->n_buckets;
        b->buckets = nb;
        b->n_buckets = n;
        for (size_t i = 0; i < oldn; i++) {
                Conn *c = old[i];
                while (c) {
                        Conn *next = c->bucket_next;
                        bucket_link(b, c);
                        c = next;
                }
        }
        free(old);
        return 0;
}

static void idle_unlink(Broker *b, Conn *c) {
        if (c->idle_prev)
                c->idle_prev->idle_next = c->idle_next;
        else
                b->idle_head = c->idle_next;
        if (c->idle_next)
                c->idle_next->idle_prev = c->idle_prev;
        else
                b->idle_tail = c->idle_prev;
        c->idle_next = c->idle_prev = NULL;
}

static void idle_append(Broker *b, Conn *c) {
        c->idle_next = NULL;
        c->idle_prev = b->idle_tail;
        if (b->idle_tail)
                b->idle_tail->idle_next = c;
        else
                b->idle_head = c;
        b->idle_tail = c;
}

static void expiry_rearm(Broker *b) {
        if (!b->expiry_timer)
                return;
        if (!b->idle_head) {
                (void) sd_event_source_set_enabled(b->expiry_timer, SD_EVENT_OFF);
                return;
        }
        uint64_t when = b->idle_head->idle_since_usec + (uint64_t) b->cfg.cache_expiration_time * 1000000ULL;
        (void) sd_event_source_set_time(b->expiry_timer, when);
        (void) sd_event_source_set_enabled(b->expiry_timer, SD_EVENT_ONESHOT);
}

/* Remove an idle connection from all pool structures (fd stays open). */
static void pool_remove_idle(Broker *b, Conn *c) {
        bool was_head = b->idle_head == c;
        bucket_unlink(b, c);
        idle_unlink(b, c);
        c->io = sd_event_source_disable_unref(c->io);
        b->n_idle--;
        if (was_head)
                expiry_rearm(b);
}

void pool_conn_free(Conn *c, bool logout) {
        if (!c)
                return;
        Broker *b = c->broker;
        if (c->state == CONN_IDLE)
                pool_remove_idle(b, c);
        else if (c->state == CONN_LENT)
                b->n_lent--;
        if (c->fd >= 0 && logout) {
                static const char bye[] = "ZZ LOGOUT\r\n";
                (void) send(c->fd, bye, sizeof(bye) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        c->fd = safe_close(c->fd);
        caps_unref(c->caps);
        explicit_bzero(c->verifier, sizeof(c->verifier));
        free(c);
        broker_update_status(b);
}

/* Read what an idle connection says. Returns 0 if it may stay, <0 to drop. */
static int idle_drain(Conn *c) {
        char buf[IDLE_READ_MAX];

        for (;;) {
                ssize_t n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return 0;
                        return -errno;
                }
                if (n == 0)
                        return -ECONNRESET;
                /* Only complete untagged lines without literals, and no BYE. */
                if (n < 4 || buf[n - 2] != '\r' || buf[n - 1] != '\n')
                        return -EPROTO;
                for (ssize_t i = 0; i < n;) {
                        char *eol = memchr(buf + i, '\n', (size_t) (n - i));
                        size_t l = (size_t) (eol - (buf + i)) + 1;
                        if (l < 4 || buf[i] != '*' || buf[i + 1] != ' ')
                                return -EPROTO;
                        if (l >= 7 && strncasecmp(buf + i + 2, "BYE", 3) == 0)
                                return -ESHUTDOWN;
                        if (buf[i + l - 3] == '}')
                                return -EPROTO; /* a literal: we do not follow it */
                        i += (ssize_t) l;
                }
        }
}

static void log_conn_dead(const Conn *c, int r, const char *when) {
        log_struct(LOG_INFO, IMAPPROXY_MSGID_BACKEND_DEAD,
                   LOG_FIELDS({ "IMAPPROXY_USER", c->user },
                              { "IMAPPROXY_AUTHZID", c->authzid[0] ? c->authzid : NULL },
                              { "IMAPPROXY_CACHE", "dead" },
                              { "IMAPPROXY_BACKEND", c->broker->backend_name }),
                   "backend connection of %s %s (%s)", c->user, when,
                   r == -ESHUTDOWN ? "server said BYE" : r == -EPROTO ? "unexpected data" : strerror(-r));
}

static int idle_on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Conn *c = userdata;
        int r = idle_drain(c);
        if (r < 0) {
                log_conn_dead(c, r, "closed while idle");
                c->broker->stats.dead++;
                pool_conn_free(c, false);
        }
        return 0;
}

static int expiry_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        uint64_t ttl = (uint64_t) b->cfg.cache_expiration_time * 1000000ULL;

        while (b->idle_head && b->idle_head->idle_since_usec + ttl <= usec) {
                Conn *c = b->idle_head;
                log_struct(LOG_INFO, IMAPPROXY_MSGID_CACHE_EXPIRED,
                           LOG_FIELDS({ "IMAPPROXY_USER", c->user },
                                      { "IMAPPROXY_AUTHZID", c->authzid[0] ? c->authzid : NULL },
                                      { "IMAPPROXY_CACHE", "expired" },
                                      { "IMAPPROXY_BACKEND", b->backend_name }),
                           "backend connection of %s expired after %u s idle", c->user,
                           b->cfg.cache_expiration_time);
                b->stats.expired++;
                pool_conn_free(c, true);
        }
        expiry_rearm(b);
        return 0;
}

int pool_init(Broker *b) {
        int r;
        b->n_buckets = POOL_INITIAL_BUCKETS;
        b->buckets = calloc(b->n_buckets, sizeof(Conn *));
        if (!b->buckets)
                return -ENOMEM;
        r = sd_event_add_time(b->event, &b->expiry_timer, CLOCK_MONOTONIC, UINT64_MAX, 0, expiry_on_timer, b);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(b->expiry_timer, SD_EVENT_OFF);
        return 0;
}

void pool_logout_all(Broker *b) {
        while (b->idle_head)
                pool_conn_free(b->idle_head, true);
}

void pool_done(Broker *b) {
        pool_logout_all(b);
        b->expiry_timer = sd_event_source_disable_unref(b->expiry_timer);
        free(b->buckets);
        b->buckets = NULL;
        caps_unref(b->caps_cache);
        b->caps_cache = NULL;
}

static uint64_t socket_cookie(int fd) {
        uint64_t cookie = 0;
        socklen_t l = sizeof(cookie);
        if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &l) < 0)
                return 0;
        return cookie;
}

/* "address:port" of the server end, for imapproxyctl list. */
void conn_describe_backend(int fd, char *out, size_t size) {
        struct sockaddr_storage ss;
        socklen_t l = sizeof(ss);
        char host[INET6_ADDRSTRLEN] = "?";
        unsigned port = 0;

        out[0] = '\0';
        if (getpeername(fd, (struct sockaddr *) &ss, &l) < 0)
                return;
        if (ss.ss_family == AF_INET) {
                const struct sockaddr_in *s4 = (const struct sockaddr_in *) &ss;
                (void) inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
                port = ntohs(s4->sin_port);
                snprintf(out, size, "%s:%u", host, port);
        } else if (ss.ss_family == AF_INET6) {
                const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *) &ss;
                (void) inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
                port = ntohs(s6->sin6_port);
                snprintf(out, size, "[%s]:%u", host, port);
        } else
                snprintf(out, size, "local");
}

Conn *conn_new_lent(Broker *b, int fd, const char *user, const char *authzid, const uint8_t verifier[VERIFIER_SIZE],
                    Caps *caps, uint64_t tls_profile) {
        Conn *c = calloc(1, sizeof(Conn));
        if (!c)
                return NULL;
        c->broker = b;
        c->state = CONN_LENT;
        c->fd = fd;
        c->cookie = socket_cookie(fd);
        c->created_usec = now_usec();
        c->caps = caps_ref(caps);
        c->tls_profile = tls_profile;
        memcpy(c->verifier, verifier, VERIFIER_SIZE);
        snprintf(c->user, sizeof(c->user), "%s", user);
        snprintf(c->authzid, sizeof(c->authzid), "%s", authzid);
        conn_describe_backend(fd, c->backend, sizeof(c->backend));
        b->n_lent++;
        stats_note_lent(&b->stats, b->n_lent);
        return c;
}

/* A plain connection may only be lent while plain connections are allowed; a
 * TLS one only under the TLS profile (trust, name, client certificate,
 * priority) it was verified with. */
static bool conn_tls_ok(const Broker *b, const Conn *c) {
        if (c->tls_profile == 0)
                return config_server_tls(&b->cfg) == SERVER_TLS_NONE;
        return c->tls_profile == b->tls_profile;
}

static bool conn_is(const Conn *c, const char *user, const char *authzid) {
        return strcmp(c->user, user) == 0 && strcmp(c->authzid, authzid) == 0;
}

int pool_checkout(Broker *b, const char *user, const char *authzid, const uint8_t verifier[VERIFIER_SIZE],
                  Conn **ret) {
        Conn *c = b->buckets[bucket_of(b, user)];

        while (c) {
                Conn *next = c->bucket_next;
                if (conn_is(c, user, authzid) && conn_tls_ok(b, c) && verifier_equal(c->verifier, verifier)) {
                        /* Never lend a dead one: look at what arrived since the last wake-up. */
                        int r = idle_drain(c);
                        if (r < 0) {
                                log_conn_dead(c, r, "found dead at checkout");
                                b->stats.dead++;
                                pool_conn_free(c, false);
                        } else {
                                pool_remove_idle(b, c);
                                c->state = CONN_LENT;
                                c->uses++;
                                b->n_lent++;
                                stats_note_lent(&b->stats, b->n_lent);
                                *ret = c;
                                return 0;
                        }
                }
                c = next;
        }
        return -ENOENT;
}

void pool_drop_user_except(Broker *b, const char *user, const char *authzid, const uint8_t verifier[VERIFIER_SIZE]) {
        Conn *c = b->buckets[bucket_of(b, user)];
        while (c) {
                Conn *next = c->bucket_next;
                if (conn_is(c, user, authzid) && !verifier_equal(c->verifier, verifier)) {
                        log_info("dropping idle connection of %s: the password changed", user);
                        pool_conn_free(c, true);
                }
                c = next;
        }
}

/* imapproxyctl flush: log out the idle connections of user ("" = all). */
unsigned pool_flush(Broker *b, const char *user) {
        unsigned n = 0;
        Conn *c = b->idle_head;
        while (c) {
                Conn *next = c->idle_next;
                if (user[0] == '\0' || strcmp(c->user, user) == 0) {
                        b->stats.flushed++;
                        n++;
                        pool_conn_free(c, true);
                }
                c = next;
        }
        return n;
}

int pool_make_room(Broker *b) {
        if (pool_total(b) < b->cfg.cache_size)
                return 0;
        if (!b->idle_head)
                return -EBUSY;
        log_debug("cache_size %u reached: closing the oldest idle connection (%s)", b->cfg.cache_size,
                  b->idle_head->user);
        pool_conn_free(b->idle_head, true);
        return 0;
}

/* A connection that came back dirty: log it out and close it, but only
 * write to it if it is the socket we lent. */
void pool_return_dirty(Broker *b, Conn *c, int fd) {
        (void) b;
        bool ours = c->cookie == 0 || socket_cookie(fd) == c->cookie;
        c->fd = fd;
        pool_conn_free(c, ours);
}

int pool_checkin(Broker *b, Conn *c, int fd) {
        int r;

        assert(c->state == CONN_LENT);
        if (c->cookie != 0 && socket_cookie(fd) != c->cookie) {
                safe_close(fd);
                return -EPERM; /* not the socket we lent */
        }
        c->fd = fd;
        c->peer = NULL;
        c->ticket = 0;
        b->n_lent--;
        c->state = CONN_DETACHED;

        if (b->cfg.cache_expiration_time == 0 || b->stopping) {
                pool_conn_free(c, true);
                return 0;
        }
        if (c->no_reuse) {
                log_info("connection of %s returned after imapproxyctl flush: logging out", c->user);
                b->stats.flushed++;
                pool_conn_free(c, true);
                return 0;
        }
        if (b->n_idle + 1 > b->n_buckets && b->n_buckets < (1u << 24))
                (void) pool_grow(b);

        /* At most max_idle_per_user idle connections per identity: the
         * oldest of them goes (the pool tracks each user's real peak). */
        unsigned same = 0;
        Conn *oldest = NULL;
        for (Conn *o = b->buckets[bucket_of(b, c->user)]; o; o = o->bucket_next)
                if (conn_is(o, c->user, c->authzid)) {
                        same++;
                        if (!oldest || o->idle_since_usec < oldest->idle_since_usec)
                                oldest = o;
                }
        if (same >= b->cfg.max_idle_per_user && oldest) {
                log_debug("max_idle_per_user %u reached for %s: closing its oldest idle connection",
                          b->cfg.max_idle_per_user, c->user);
                pool_conn_free(oldest, true);
        }

        c->idle_since_usec = now_usec();
        bucket_link(b, c);
        idle_append(b, c);
        c->state = CONN_IDLE;
        b->n_idle++;
        stats_note_idle(&b->stats, b->n_idle);
        r = sd_event_add_io(b->event, &c->io, fd, EPOLLIN | EPOLLRDHUP, idle_on_io, c);
        if (r < 0) {
                pool_conn_free(c, true);
                return r;
        }
        if (b->idle_head == c)
                expiry_rearm(b);
        /* Something may already be waiting (a BYE sent while it was lent). */
        r = idle_drain(c);
        if (r < 0) {
                log_conn_dead(c, r, "dead when it came back");
                b->stats.dead++;
                pool_conn_free(c, false);
                return 0;
        }
        broker_update_status(b);
        return 0;
}

/* After a reload: a smaller cache_size closes the oldest idle connections
 * now; a new cache_expiration_time applies to the connections already idle
 * (counted from when each became idle). */
void pool_config_changed(Broker *b) {
        while (pool_total(b) > b->cfg.cache_size && b->idle_head)
                pool_conn_free(b->idle_head, true);
        expiry_rearm(b);
}
