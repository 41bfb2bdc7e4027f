/*
 * tls.c -- TLS to the backend: credentials, client sessions, and the relay
 * that lets a TLS connection be lent like a plain one.
 *
 * SYNOPSIS
 *	int tls_init(Broker *b);
 *	int tls_session_new(Broker *b, int fd, gnutls_session_t *ret);
 *	void tls_describe_error(Broker *b, gnutls_session_t s, int err, char *why, size_t whysize);
 *	int tls_relay_start(Broker *b, gnutls_session_t s, int net_fd, int *ret_fd);
 *	void tls_done(Broker *b);
 * DESCRIPTION
 *	Credentials: the trust store (tls_ca_file / tls_ca_path, else the
 *	system store, ~15 ms), the optional client certificate and the
 *	priority string are loaded once per broker: at start-up when
 *	server_tls asks for TLS or a tls_* file is named (a bad file stops the
 *	broker there), else on first need (a server saying LOGINDISABLED).
 *	Sessions never load any of it: they never see TLS at all.
 *	Each session checks the certificate during the handshake (chain and
 *	name: tls_server_name, else server_hostname, also sent as SNI unless
 *	it is an IP address) unless tls_verify_server is no.
 *
 *	Relay: a GnuTLS session cannot travel with its fd, so a TLS backend
 *	connection stays here. tls_relay_start() makes a socketpair, keeps one
 *	end and the TLS stream, and returns the other end, which the pool
 *	treats exactly like a plain TCP connection: it is lent, checked in
 *	(SO_COOKIE of that end), watched while idle (what the server says is
 *	relayed to it: EOF, "* BYE"), logged out and closed. The relay copies
 *	plaintext both ways, non-blocking, through one bounded buffer per
 *	direction (RELAY_BUF): a full buffer stops reading on the other side
 *	(backpressure both ways), and each wake-up moves at most RELAY_BUDGET
 *	bytes so one busy connection cannot starve the event loop; records
 *	GnuTLS has already decrypted (gnutls_record_check_pending) are
 *	drained without waiting for the socket. When the pair end is closed
 *	(checked in dirty, expired, session gone) the relay forwards what was
 *	written to it (e.g. LOGOUT), sends close_notify and closes the TCP
 *	connection; when the server side ends, it delivers what it has and
 *	closes its end, so the holder of the other end sees EOF.
 * SECURITY
 *	Verification is on by default; a failure is logged with GnuTLS's own
 *	explanation and the login fails. No plaintext is kept after it is
 *	written on; buffers are wiped before they are freed.
 * ERRORS
 *	0 or -errno; GnuTLS codes are converted (-EIO, -ENOMEM, -EINVAL).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "fd-util.h"
#include "log.h"
#include "tls-policy.h"

#define RELAY_BUF 16384              /* one TLS record */
#define RELAY_BUDGET (256u * 1024u)  /* bytes moved per wake-up before yielding */
#define PRIORITY_MAX 1024

typedef struct RelayBuf {
        uint8_t *data; /* NULL while empty: an idle relay holds no buffer */
        size_t pos, len;
} RelayBuf;

struct TlsRelay {
        Broker *broker;
        gnutls_session_t tls;
        int net_fd;                     /* TCP to the server */
        int pair_fd;                    /* our end of the socketpair */
        sd_event_source *net_io, *pair_io, *defer, *timer;
        RelayBuf down;                  /* server -> pair */
        RelayBuf up;                    /* pair -> server */
        bool up_again;                  /* GnuTLS holds a record after GNUTLS_E_AGAIN */
        bool net_want_write;            /* GnuTLS wants the socket writable (recv or bye) */
        bool net_eof;                   /* the server side ended (EOF, close_notify, error) */
        bool pair_eof;                  /* the pair end was closed */
        TlsRelay *next, *prev;
};

static void relay_buf_clear(RelayBuf *rb) {
        if (rb->data) {
                explicit_bzero(rb->data, RELAY_BUF);
                free(rb->data);
        }
        *rb = (RelayBuf) {};
}

static bool relay_buf_empty(const RelayBuf *rb) {
        return rb->pos >= rb->len;
}

/* ---- credentials ---- */

static bool is_ip_literal(const char *s) {
        unsigned char buf[sizeof(struct in6_addr)];
        return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

static const char *tls_name(const Broker *b) {
        return b->cfg.tls_server_name ?: b->cfg.server_hostname;
}

static uint64_t fnv_add(uint64_t h, const char *s) {
        for (s = s ?: ""; *s; s++) {
                h ^= (unsigned char) *s;
                h *= 1099511628211ULL;
        }
        h ^= 0xff; /* field separator */
        h *= 1099511628211ULL;
        return h;
}

/* Everything that decides whom we trust and how: a pooled TLS connection is
 * only lent again under the same profile. */
static uint64_t profile_id(const Broker *b, const char *priority) {
        uint64_t h = 1469598103934665603ULL;
        h = fnv_add(h, b->cfg.server_hostname);
        h = fnv_add(h, tls_name(b));
        h = fnv_add(h, b->cfg.tls_verify_server ? "verify" : "noverify");
        h = fnv_add(h, b->cfg.tls_ca_file);
        h = fnv_add(h, b->cfg.tls_ca_path);
        h = fnv_add(h, b->cfg.tls_cert_file);
        h = fnv_add(h, b->cfg.tls_key_file);
        h = fnv_add(h, priority);
        return h ?: 1; /* 0 means plain */
}

static int tls_load(Broker *b) {
        gnutls_certificate_credentials_t cred = NULL;
        gnutls_priority_t prio = NULL;
        char priority[PRIORITY_MAX];
        const char *errpos = NULL;
        int r;

        if (b->tls_cred)
                return 0;
        r = tls_priority_build(b->cfg.tls_ciphers, b->cfg.tls_no_tlsv1, b->cfg.tls_no_tlsv1_1, b->cfg.tls_no_tlsv1_2,
                               priority, sizeof(priority));
        if (r < 0)
                return log_error_errno(r, "tls_ciphers: priority string too long");
        r = gnutls_priority_init(&prio, priority, &errpos);
        if (r < 0) {
                log_error("tls_ciphers: invalid GnuTLS priority string '%s' at '%s' (GnuTLS syntax, e.g. "
                          "NORMAL:-VERS-TLS1.0, not OpenSSL's cipher list)", priority, errpos ?: "?");
                return -EINVAL;
        }
        if (gnutls_certificate_allocate_credentials(&cred) < 0) {
                gnutls_priority_deinit(prio);
                return -ENOMEM;
        }
        unsigned long long t0 = now_usec();
        int n = 0;
        if (b->cfg.tls_ca_file) {
                r = gnutls_certificate_set_x509_trust_file(cred, b->cfg.tls_ca_file, GNUTLS_X509_FMT_PEM);
                if (r <= 0) {
                        log_error("tls_ca_file %s: %s", b->cfg.tls_ca_file,
                                  r < 0 ? gnutls_strerror(r) : "no certificate in it");
                        goto fail;
                }
                n += r;
        }
        if (b->cfg.tls_ca_path) {
                r = gnutls_certificate_set_x509_trust_dir(cred, b->cfg.tls_ca_path, GNUTLS_X509_FMT_PEM);
                if (r <= 0) {
                        log_error("tls_ca_path %s: %s", b->cfg.tls_ca_path,
                                  r < 0 ? gnutls_strerror(r) : "no certificate in it");
                        goto fail;
                }
                n += r;
        }
        if (!b->cfg.tls_ca_file && !b->cfg.tls_ca_path) {
                r = gnutls_certificate_set_x509_system_trust(cred);
                if (r < 0) {
                        log_error("system trust store: %s", gnutls_strerror(r));
                        goto fail;
                }
                n += r;
        }
        if (b->cfg.tls_cert_file) {
                const char *key = b->cfg.tls_key_file ?: b->cfg.tls_cert_file;
                r = gnutls_certificate_set_x509_key_file(cred, b->cfg.tls_cert_file, key, GNUTLS_X509_FMT_PEM);
                if (r < 0) {
                        log_error("tls_cert_file %s / tls_key_file %s: %s", b->cfg.tls_cert_file, key,
                                  gnutls_strerror(r));
                        goto fail;
                }
        }
        b->tls_cred = cred;
        b->tls_prio = prio;
        b->tls_profile = profile_id(b, priority);
        log_info("backend TLS: %d trusted CA certificates loaded in %.1f ms; priority %s; %s %s%s", n,
                 (double) (now_usec() - t0) / 1000.0, priority,
                 b->cfg.tls_verify_server ? "verifying the certificate for" : "NOT verifying the certificate of",
                 tls_name(b), b->cfg.tls_cert_file ? "; with a client certificate" : "");
        return 0;
fail:
        gnutls_certificate_free_credentials(cred);
        gnutls_priority_deinit(prio);
        return -EINVAL;
}

int tls_init(Broker *b) {
        if (config_server_tls(&b->cfg) == SERVER_TLS_NONE && !b->cfg.tls_ca_file && !b->cfg.tls_ca_path &&
            !b->cfg.tls_cert_file && !b->cfg.tls_ciphers)
                return 0; /* loaded if a server ever says LOGINDISABLED */
        return tls_load(b);
}

int tls_session_new(Broker *b, int fd, gnutls_session_t *ret) {
        gnutls_session_t s = NULL;
        const char *name = tls_name(b);
        int r;

        r = tls_load(b);
        if (r < 0)
                return r;
        if (gnutls_init(&s, GNUTLS_CLIENT | GNUTLS_NONBLOCK) < 0)
                return -ENOMEM;
        if (gnutls_priority_set(s, b->tls_prio) < 0 ||
            gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, b->tls_cred) < 0) {
                gnutls_deinit(s);
                return -EINVAL;
        }
        if (!is_ip_literal(name) && gnutls_server_name_set(s, GNUTLS_NAME_DNS, name, strlen(name)) < 0) {
                gnutls_deinit(s);
                return -EINVAL;
        }
        if (b->cfg.tls_verify_server)
                gnutls_session_set_verify_cert(s, name, 0);
        gnutls_handshake_set_timeout(s, 0); /* the job's backend_timeout applies */
        gnutls_transport_set_int(s, fd);
        *ret = s;
        return 0;
}

void tls_describe_error(Broker *b, gnutls_session_t s, int err, char *why, size_t whysize) {
        if (err == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
                gnutls_datum_t out = {};
                unsigned status = gnutls_session_get_verify_cert_status(s);
                if (gnutls_certificate_verification_status_print(status, gnutls_certificate_type_get(s), &out, 0) >= 0) {
                        snprintf(why, whysize, "TLS certificate verification failed for %s: %s", tls_name(b),
                                 (const char *) out.data);
                        gnutls_free(out.data);
                        return;
                }
        }
        snprintf(why, whysize, "TLS handshake failed: %s", gnutls_strerror(err));
}

const char *tls_session_describe(gnutls_session_t s, char *buf, size_t size) {
        char *d = gnutls_session_get_desc(s);
        snprintf(buf, size, "%s", d ?: "TLS");
        gnutls_free(d);
        return buf;
}

/* ---- relay ---- */

static void relay_free(TlsRelay *r) {
        Broker *b = r->broker;

        r->net_io = sd_event_source_disable_unref(r->net_io);
        r->pair_io = sd_event_source_disable_unref(r->pair_io);
        r->defer = sd_event_source_disable_unref(r->defer);
        r->timer = sd_event_source_disable_unref(r->timer);
        if (r->tls)
                gnutls_deinit(r->tls);
        r->net_fd = safe_close(r->net_fd);
        r->pair_fd = safe_close(r->pair_fd);
        relay_buf_clear(&r->down);
        relay_buf_clear(&r->up);
        if (r->prev)
                r->prev->next = r->next;
        else
                b->relays = r->next;
        if (r->next)
                r->next->prev = r->prev;
        b->n_relays--;
        free(r);
}

static bool gnutls_again(ssize_t n) {
        return n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED;
}

/* A transport error says why the link died (ETIMEDOUT after
 * backend_link_timeout, ECONNRESET): GnuTLS alone only says "pull". */
static void relay_log_error(ssize_t n, int saved_errno) {
        if ((n == GNUTLS_E_PULL_ERROR || n == GNUTLS_E_PUSH_ERROR) && saved_errno > 0 && saved_errno != EAGAIN)
                log_info("backend TLS connection: %s (%s)", gnutls_strerror((int) n), strerror(saved_errno));
        else
                log_info("backend TLS connection: %s", gnutls_strerror((int) n));
}

/* Server -> pair. Returns bytes moved. */
static size_t relay_down(TlsRelay *r, size_t budget) {
        size_t moved = 0;

        for (;;) {
                while (!relay_buf_empty(&r->down)) {
                        if (r->pair_eof) {
                                relay_buf_clear(&r->down);
                                break;
                        }
                        ssize_t n = send(r->pair_fd, r->down.data + r->down.pos, r->down.len - r->down.pos,
                                         MSG_NOSIGNAL | MSG_DONTWAIT);
                        if (n < 0) {
                                if (errno == EINTR)
                                        continue;
                                if (errno == EAGAIN)
                                        return moved; /* backpressure: stop reading the server */
                                r->pair_eof = true;
                                relay_buf_clear(&r->down);
                                break;
                        }
                        r->down.pos += (size_t) n;
                        moved += (size_t) n;
                }
                relay_buf_clear(&r->down);
                if (r->net_eof || r->pair_eof || moved >= budget)
                        return moved;

                r->down.data = malloc(RELAY_BUF);
                if (!r->down.data) {
                        r->net_eof = true;
                        return moved;
                }
                ssize_t n = gnutls_record_recv(r->tls, r->down.data, RELAY_BUF);
                int saved_errno = errno;
                if (n > 0) {
                        r->down.len = (size_t) n;
                        continue;
                }
                relay_buf_clear(&r->down);
                if (gnutls_again(n)) {
                        r->net_want_write = gnutls_record_get_direction(r->tls) == 1;
                        return moved;
                }
                if (n == GNUTLS_E_REHANDSHAKE) {
                        /* TLS 1.2 renegotiation: refuse politely, keep the connection. */
                        (void) gnutls_alert_send(r->tls, GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION);
                        continue;
                }
                if (n != 0 && n != GNUTLS_E_PREMATURE_TERMINATION)
                        relay_log_error(n, saved_errno);
                r->net_eof = true;
                return moved;
        }
}

/* Pair -> server. Returns bytes moved. */
static size_t relay_up(TlsRelay *r, size_t budget) {
        size_t moved = 0;

        for (;;) {
                while (!relay_buf_empty(&r->up)) {
                        if (r->net_eof) {
                                relay_buf_clear(&r->up);
                                break;
                        }
                        ssize_t n = r->up_again ? gnutls_record_send(r->tls, NULL, 0)
                                                : gnutls_record_send(r->tls, r->up.data + r->up.pos, r->up.len - r->up.pos);
                        int saved_errno = errno;
                        if (gnutls_again(n)) {
                                r->up_again = true;
                                return moved;
                        }
                        r->up_again = false;
                        if (n < 0) {
                                relay_log_error(n, saved_errno);
                                r->net_eof = true;
                                relay_buf_clear(&r->up);
                                break;
                        }
                        r->up.pos += (size_t) n;
                        moved += (size_t) n;
                }
                relay_buf_clear(&r->up);
                if (r->pair_eof || r->net_eof || moved >= budget)
                        return moved;

                r->up.data = malloc(RELAY_BUF);
                if (!r->up.data) {
                        r->pair_eof = true;
                        return moved;
                }
                size_t max = MIN((size_t) RELAY_BUF, gnutls_record_get_max_size(r->tls));
                ssize_t n = recv(r->pair_fd, r->up.data, max, MSG_DONTWAIT);
                if (n > 0) {
                        r->up.len = (size_t) n;
                        continue;
                }
                relay_buf_clear(&r->up);
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return moved;
                r->pair_eof = true; /* EOF or error: the holder of the other end is done */
                return moved;
        }
}

static void relay_update(TlsRelay *r);

static int relay_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        relay_free(userdata); /* close_notify could not be sent in time: just close */
        return 0;
}

static void relay_run(TlsRelay *r) {
        size_t budget = RELAY_BUDGET, moved;

        do {
                moved = relay_down(r, budget);
                moved += relay_up(r, budget);
                budget = moved >= budget ? 0 : budget - moved;
        } while (moved > 0 && budget > 0);

        /* Done when the server side ended and everything it said was
         * delivered (or nobody listens any more). */
        if (r->net_eof && relay_buf_empty(&r->down)) {
                relay_free(r);
                return;
        }
        /* The pair end is gone and what it wrote went out: close_notify, close. */
        if (r->pair_eof && relay_buf_empty(&r->up)) {
                int n = gnutls_bye(r->tls, GNUTLS_SHUT_WR);
                if (gnutls_again(n)) {
                        r->net_want_write = gnutls_record_get_direction(r->tls) == 1;
                        if (!r->timer)
                                (void) sd_event_add_time_relative(r->broker->event, &r->timer, CLOCK_MONOTONIC,
                                                                  (uint64_t) r->broker->cfg.backend_timeout * 1000000ULL,
                                                                  0, relay_on_timer, r);
                } else {
                        relay_free(r);
                        return;
                }
        }
        if (budget == 0)
                (void) sd_event_source_set_enabled(r->defer, SD_EVENT_ONESHOT);
        relay_update(r);
}

static void set_events(sd_event_source *s, uint32_t events) {
        if (events == 0) {
                (void) sd_event_source_set_enabled(s, SD_EVENT_OFF);
                return;
        }
        (void) sd_event_source_set_io_events(s, events);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ON);
}

static void relay_update(TlsRelay *r) {
        uint32_t net = 0, pair = 0;

        if (!r->net_eof) {
                if (!r->pair_eof && relay_buf_empty(&r->down))
                        net |= EPOLLIN;
                if (r->up_again || r->net_want_write)
                        net |= EPOLLOUT;
                if (r->pair_eof && !r->up_again)
                        net |= r->net_want_write ? EPOLLOUT : EPOLLIN; /* bye in progress */
        }
        if (!r->pair_eof) {
                if (relay_buf_empty(&r->up) && !r->net_eof)
                        pair |= EPOLLIN;
                if (!relay_buf_empty(&r->down))
                        pair |= EPOLLOUT;
        }
        set_events(r->net_io, net);
        set_events(r->pair_io, pair);
}

static int relay_on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        TlsRelay *r = userdata;
        r->net_want_write = false;
        relay_run(r);
        return 0;
}

static int relay_on_defer(sd_event_source *s, void *userdata) {
        relay_run(userdata);
        return 0;
}

int tls_relay_start(Broker *b, gnutls_session_t s, int net_fd, int *ret_fd) {
        int pair[2], r;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, pair) < 0)
                return -errno;
        TlsRelay *t = calloc(1, sizeof(TlsRelay));
        if (!t) {
                safe_close(pair[0]);
                safe_close(pair[1]);
                return -ENOMEM;
        }
        t->broker = b;
        t->tls = s;
        t->net_fd = net_fd;
        t->pair_fd = pair[0];
        t->next = b->relays;
        if (t->next)
                t->next->prev = t;
        b->relays = t;
        b->n_relays++;
        if ((r = sd_event_add_io(b->event, &t->net_io, net_fd, EPOLLIN, relay_on_io, t)) < 0 ||
            (r = sd_event_add_io(b->event, &t->pair_io, pair[0], EPOLLIN, relay_on_io, t)) < 0 ||
            (r = sd_event_add_defer(b->event, &t->defer, relay_on_defer, t)) < 0) {
                t->tls = NULL; /* the caller still owns s and net_fd on failure */
                t->net_fd = -EBADF;
                relay_free(t);
                safe_close(pair[1]);
                return r;
        }
        (void) sd_event_source_set_enabled(t->defer, SD_EVENT_OFF);
        /* Records GnuTLS decrypted already (sent right after the login
         * response) are not signalled by the socket: look now. */
        if (gnutls_record_check_pending(s) > 0)
                (void) sd_event_source_set_enabled(t->defer, SD_EVENT_ONESHOT);
        *ret_fd = pair[1];
        return 0;
}

static void relay_close_now(TlsRelay *r) {
        /* Best effort, never blocking: forward what the pair end wrote (a
         * LOGOUT from the pool), say close_notify, close. */
        r->pair_eof = false;
        (void) relay_up(r, RELAY_BUDGET);
        if (!r->net_eof)
                (void) gnutls_bye(r->tls, GNUTLS_SHUT_WR);
        relay_free(r);
}

void tls_done(Broker *b) {
        while (b->relays)
                relay_close_now(b->relays);
        if (b->tls_cred)
                gnutls_certificate_free_credentials(b->tls_cred);
        if (b->tls_prio)
                gnutls_priority_deinit(b->tls_prio);
        b->tls_cred = NULL;
        b->tls_prio = NULL;
}
