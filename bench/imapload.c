/*
 * imapload.c -- IMAP load generator imitating stateless webmail.
 *
 * SYNOPSIS
 *	imapload -p PORT [-H ADDR] [-m MODE] [-c CONC] [-r REQUESTS] [-d SECONDS]
 *	         [-n USERS] [-b BASE] [-u USERFMT] [-w PASSFMT] [-S] [-s SEED]
 *	         [-e MESSAGES] [-V] [-t TIMEOUT_MS] [-U PEAKFILE] [-O SAMPLEFILE]
 *	         [-k] [-q]
 *
 * DESCRIPTION
 *	Modes (-m):
 *	  webmail  (default) one page view per request on a new TCP connection:
 *	           greeting, CAPABILITY, LOGIN, SELECT INBOX, UID FETCH 1:* (FLAGS),
 *	           FETCH 1:20 (ENVELOPE), LOGOUT, close.
 *	  login    greeting, LOGIN, LOGOUT, close (fills a proxy's pool).
 *	  greet    connect, wait for the first byte of the greeting, close:
 *	           the latency is connect() to first byte.
 *	  bigfetch one connection (-c is ignored): LOGIN, SELECT INBOX, then
 *	           -r times FETCH 1 BODY.PEEK[] (timed alone), CRC-32 of the
 *	           literal computed after the clock stops; LOGOUT.
 *	Users are USERFMT/PASSFMT with "%d" replaced by BASE+1..BASE+USERS
 *	(BASE defaults to 0), picked at random per request (seeded,
 *	reproducible) or in order with -S.
 *	Every tagged response must be OK; anything else, a timeout, an EOF or a
 *	failed verification is an error (counted; the first few are described
 *	on stderr). -e N checks that SELECT reports N messages and that both
 *	FETCHes return the right number of responses; -V checks that every
 *	ENVELOPE names the logged-in user (imapfixture's "Test message I for
 *	USER" subjects), which catches a proxy lending the wrong connection.
 *	Every command goes out in one write; sockets have TCP_NODELAY; every
 *	wait is bounded by -t milliseconds (default 10000).
 *
 *	Output: a human summary, or with -k "key=value" lines for scripts.
 *	-U FILE writes "USER PEAK" lines: the peak number of simultaneous
 *	connections per user seen by this run. -O FILE writes every sample,
 *	one per line: request latency in ms, or MB/s per FETCH (bigfetch).
 * EXIT STATUS
 *	0 when every request succeeded, 1 when any failed, 2 on usage errors.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 4096
#define RBUF_SIZE 65536
#define MAX_RESPONSE (256u << 20) /* one logical response (line + literals) */
#define MAX_ERRORS_SHOWN 10

typedef enum Mode { MODE_WEBMAIL, MODE_LOGIN, MODE_GREET, MODE_BIGFETCH } Mode;

typedef enum Phase {
        PH_CONNECT, /* connect + greeting */
        PH_CAPA,
        PH_LOGIN,
        PH_SELECT,
        PH_UIDFETCH,
        PH_ENVFETCH,
        PH_LOGOUT, /* LOGOUT .. tagged OK, close */
        N_PHASES,
} Phase;

static const char *const phase_names[N_PHASES] = {
        "connect+greeting", "capability", "login", "select", "uid_fetch_flags", "fetch_envelope", "logout",
};
static const char *const phase_keys[N_PHASES] = {
        "connect", "capability", "login", "select", "uidfetch", "envfetch", "logout",
};

typedef enum ErrKind { E_CONNECT, E_TIMEOUT, E_EOF, E_PROTO, E_NO, E_VERIFY, N_ERRKINDS } ErrKind;
static const char *const err_names[N_ERRKINDS] = { "connect", "timeout", "eof", "protocol", "not_ok", "verify" };

/* ------------------------------------------------------------------ options */

static struct {
        struct sockaddr_in addr;
        Mode mode;
        unsigned conc;
        uint64_t requests; /* 0 = unlimited (then -d is required) */
        double duration;   /* seconds, 0 = unlimited */
        unsigned users;
        const char *userfmt, *passfmt;
        bool sequential;
        uint64_t seed;
        long expect_msgs; /* -1: do not check */
        bool verify_user;
        int timeout_ms;
        unsigned user_base;
        const char *peakfile, *samplefile;
        bool keyvalue, quiet;
} opt = {
        .mode = MODE_WEBMAIL, .conc = 16, .users = 100, .userfmt = "user%d", .passfmt = "pw%d",
        .seed = 1, .expect_msgs = -1, .timeout_ms = 10000,
};

/* ------------------------------------------------------------------ shared state */

static atomic_uint_fast64_t next_request;
static double deadline_stop; /* monotonic seconds; 0 = none */
static atomic_uint_fast64_t err_counts[N_ERRKINDS];
static atomic_uint errors_shown;
static atomic_uint_fast64_t reused_logins;
static atomic_int *user_active, *user_peak;
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;

typedef struct Sample {
        double total;
        double phase[N_PHASES];
} Sample;

typedef struct Worker {
        pthread_t thread;
        unsigned id;
        uint64_t rng;
        Sample *samples;
        size_t n_samples, cap_samples;
        uint64_t errors;
        /* bigfetch */
        double *mbps;
        size_t n_mbps;
        uint64_t big_bytes;
        uint32_t big_crc;
        bool big_crc_consistent;
} Worker;

static double now_s(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        fputs("imapload: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
        exit(2);
}

/* "%d" in tmpl replaced by n (no printf with a runtime format). */
static void expand(const char *tmpl, unsigned n, char *out, size_t size) {
        const char *p = strstr(tmpl, "%d");
        if (!p) {
                snprintf(out, size, "%s", tmpl);
                return;
        }
        snprintf(out, size, "%.*s%u%s", (int) (p - tmpl), tmpl, n, p + 2);
}

/* IMAP quoted string. */
static void quote(const char *s, char *out, size_t size) {
        size_t o = 0;
        if (size < 3) {
                out[0] = 0;
                return;
        }
        out[o++] = '"';
        for (; *s && o + 3 < size; s++) {
                if (*s == '"' || *s == '\\')
                        out[o++] = '\\';
                out[o++] = *s;
        }
        out[o++] = '"';
        out[o] = 0;
}

static uint64_t xorshift(uint64_t *s) {
        uint64_t x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return *s = x;
}

/* ------------------------------------------------------------------ CRC-32 (IEEE, as zlib.crc32) */

static uint32_t crc_table[256];

static void crc_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int k = 0; k < 8; k++)
                        c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
                crc_table[i] = c;
        }
}

static uint32_t crc32_buf(const uint8_t *p, size_t n) {
        uint32_t c = 0xFFFFFFFFu;
        while (n--)
                c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------------ connection */

typedef struct Conn {
        int fd;
        char rbuf[RBUF_SIZE];
        size_t rpos, rlen;
        char *resp; /* current logical response, NUL-terminated, CRLFs kept inside literals only */
        size_t resplen, respcap;
        size_t lit_off, lit_len; /* the largest literal of the current response */
        char last[160];          /* start of the last response, for error messages */
} Conn;

static int conn_reserve(Conn *c, size_t need) {
        if (need + 1 <= c->respcap)
                return 0;
        if (need + 1 > MAX_RESPONSE)
                return -E2BIG;
        size_t cap = c->respcap ? c->respcap : 4096;
        while (cap < need + 1)
                cap *= 2;
        char *p = realloc(c->resp, cap);
        if (!p)
                return -ENOMEM;
        c->resp = p;
        c->respcap = cap;
        return 0;
}

static int wait_fd(int fd, short ev, double deadline) {
        for (;;) {
                double left = deadline - now_s();
                if (left <= 0)
                        return -ETIMEDOUT;
                struct pollfd p = { .fd = fd, .events = ev };
                int r = poll(&p, 1, (int) (left * 1000) + 1);
                if (r > 0)
                        return 0;
                if (r < 0 && errno != EINTR)
                        return -errno;
        }
}

static int conn_open(Conn *c, double deadline) {
        c->rpos = c->rlen = 0;
        c->last[0] = 0;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
                return -errno;
        int one = 1;
        (void) setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(c->fd, (const struct sockaddr *) &opt.addr, sizeof(opt.addr)) < 0) {
                if (errno != EINPROGRESS)
                        return -errno;
                int r = wait_fd(c->fd, POLLOUT, deadline);
                if (r < 0)
                        return r;
                int err = 0;
                socklen_t l = sizeof(err);
                if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
                        return -errno;
                if (err)
                        return -err;
        }
        return 0;
}

static void conn_close(Conn *c) {
        if (c->fd >= 0)
                close(c->fd);
        c->fd = -1;
}

/* Read more into rbuf (compacting first). 0, -ETIMEDOUT, -EPIPE on EOF, -errno. */
static int conn_fill(Conn *c, double deadline) {
        if (c->rpos > 0) {
                memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
                c->rlen -= c->rpos;
                c->rpos = 0;
        }
        if (c->rlen == sizeof(c->rbuf))
                return -ENOBUFS;
        for (;;) {
                ssize_t n = recv(c->fd, c->rbuf + c->rlen, sizeof(c->rbuf) - c->rlen, 0);
                if (n > 0) {
                        c->rlen += (size_t) n;
                        return 0;
                }
                if (n == 0)
                        return -EPIPE;
                if (errno == EINTR)
                        continue;
                if (errno != EAGAIN)
                        return -errno;
                int r = wait_fd(c->fd, POLLIN, deadline);
                if (r < 0)
                        return r;
        }
}

static int conn_send(Conn *c, const char *buf, size_t len, double deadline) {
        while (len > 0) {
                ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
                if (n > 0) {
                        buf += n;
                        len -= (size_t) n;
                        continue;
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno != EAGAIN)
                        return -errno;
                int r = wait_fd(c->fd, POLLOUT, deadline);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Literal announced at the end of a line "...{N}" or "...{N+}"; -1 if none. */
static long long literal_at_end(const char *line, size_t len) {
        if (len < 3 || line[len - 1] != '}')
                return -1;
        size_t i = len - 1;
        if (i > 0 && line[i - 1] == '+')
                i--;
        size_t end = i;
        while (i > 0 && line[i - 1] >= '0' && line[i - 1] <= '9')
                i--;
        if (i == end || i == 0 || line[i - 1] != '{')
                return -1;
        long long v = 0;
        for (size_t k = i; k < end; k++) {
                v = v * 10 + (line[k] - '0');
                if (v > (long long) MAX_RESPONSE)
                        return (long long) MAX_RESPONSE + 1;
        }
        return v;
}

/* One logical response: a line, with any literals and their continuation
 * lines, into c->resp (without the final CRLF). */
static int read_response(Conn *c, double deadline) {
        int r;
        c->resplen = 0;
        c->lit_len = c->lit_off = 0;
        if ((r = conn_reserve(c, 256)) < 0)
                return r;
        for (;;) {
                /* one line segment */
                char *eol;
                for (;;) {
                        eol = memmem(c->rbuf + c->rpos, c->rlen - c->rpos, "\r\n", 2);
                        if (eol)
                                break;
                        if (c->rlen - c->rpos == sizeof(c->rbuf))
                                return -ENOBUFS; /* a line longer than 64 KiB: not expected here */
                        if ((r = conn_fill(c, deadline)) < 0)
                                return r;
                }
                size_t seg = (size_t) (eol - (c->rbuf + c->rpos));
                if ((r = conn_reserve(c, c->resplen + seg)) < 0)
                        return r;
                memcpy(c->resp + c->resplen, c->rbuf + c->rpos, seg);
                long long lit = literal_at_end(c->resp + c->resplen, seg);
                c->resplen += seg;
                c->resp[c->resplen] = 0;
                c->rpos += seg + 2;
                if (lit < 0)
                        break;
                if (lit > (long long) MAX_RESPONSE)
                        return -E2BIG;
                /* the literal: copy what is buffered, then recv straight into resp */
                size_t want = (size_t) lit;
                if ((r = conn_reserve(c, c->resplen + want + 2)) < 0)
                        return r;
                size_t off = c->resplen;
                size_t have = c->rlen - c->rpos;
                size_t take = have < want ? have : want;
                memcpy(c->resp + c->resplen, c->rbuf + c->rpos, take);
                c->rpos += take;
                c->resplen += take;
                while (c->resplen - off < want) {
                        ssize_t n = recv(c->fd, c->resp + c->resplen, want - (c->resplen - off), 0);
                        if (n > 0) {
                                c->resplen += (size_t) n;
                                continue;
                        }
                        if (n == 0)
                                return -EPIPE;
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                return -errno;
                        if ((r = wait_fd(c->fd, POLLIN, deadline)) < 0)
                                return r;
                }
                if (want >= c->lit_len) {
                        c->lit_off = off;
                        c->lit_len = want;
                }
                c->resp[c->resplen] = 0;
        }
        snprintf(c->last, sizeof(c->last), "%.*s", (int) (c->resplen < 150 ? c->resplen : 150), c->resp);
        for (char *p = c->last; *p; p++)
                if (*p == '\r' || *p == '\n')
                        *p = ' ';
        return 0;
}

/* ------------------------------------------------------------------ requests */

typedef struct Req {
        Worker *w;
        Conn *c;
        unsigned user_no;
        char user[128], pass[128];
        double deadline;
        /* what the untagged responses said */
        long exists;
        unsigned fetches;
        unsigned env_ok;
        bool capability_seen, reuse_seen, bye_seen;
        Phase phase;
} Req;

static void report_error(Req *q, ErrKind kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void report_error(Req *q, ErrKind kind, const char *fmt, ...) {
        atomic_fetch_add(&err_counts[kind], 1);
        q->w->errors++;
        if (opt.quiet || atomic_fetch_add(&errors_shown, 1) >= MAX_ERRORS_SHOWN)
                return;
        char msg[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        pthread_mutex_lock(&err_lock);
        fprintf(stderr, "imapload: error (%s) user %s, phase %s: %s; last response: %s\n", err_names[kind],
                q->user, q->phase < N_PHASES ? phase_names[q->phase] : "?", msg, q->c->last);
        pthread_mutex_unlock(&err_lock);
}

static ErrKind io_kind(int r) {
        return r == -ETIMEDOUT ? E_TIMEOUT : r == -EPIPE || r == -ECONNRESET ? E_EOF : E_PROTO;
}

static void inspect_untagged(Req *q) {
        const char *s = q->c->resp;
        if (strncmp(s, "* ", 2) != 0)
                return;
        if (strncasecmp(s, "* CAPABILITY ", 13) == 0)
                q->capability_seen = true;
        else if (strncasecmp(s, "* BYE", 5) == 0)
                q->bye_seen = true;
        else if (strstr(s, "[XPROXYREUSE]"))
                q->reuse_seen = true;
        char *end;
        long n = strtol(s + 2, &end, 10);
        if (end == s + 2)
                return;
        if (strncasecmp(end, " EXISTS", 7) == 0)
                q->exists = n;
        else if (strncasecmp(end, " FETCH ", 7) == 0) {
                q->fetches++;
                if (q->phase == PH_ENVFETCH && opt.verify_user) {
                        char needle[160];
                        snprintf(needle, sizeof(needle), " for %s\"", q->user);
                        if (strstr(end, needle))
                                q->env_ok++;
                }
        }
}

/* Send "TAG CMD\r\n" in one write, read to the tagged response, require OK. */
static int command(Req *q, const char *tag, const char *cmd) {
        char line[1024];
        int n = snprintf(line, sizeof(line), "%s %s\r\n", tag, cmd);
        if (n < 0 || (size_t) n >= sizeof(line)) {
                report_error(q, E_PROTO, "command too long");
                return -1;
        }
        int r = conn_send(q->c, line, (size_t) n, q->deadline);
        if (r < 0) {
                report_error(q, io_kind(r), "send %s: %s", tag, strerror(-r));
                return -1;
        }
        size_t tl = strlen(tag);
        for (;;) {
                r = read_response(q->c, q->deadline);
                if (r < 0) {
                        report_error(q, io_kind(r), "reading response to %s: %s", tag, strerror(-r));
                        return -1;
                }
                const char *s = q->c->resp;
                if (strncmp(s, tag, tl) == 0 && s[tl] == ' ') {
                        if (strncasecmp(s + tl + 1, "OK", 2) != 0 || (s[tl + 3] != ' ' && s[tl + 3] != 0)) {
                                report_error(q, E_NO, "%s not OK", tag);
                                return -1;
                        }
                        return 0;
                }
                if (s[0] == '+') {
                        report_error(q, E_PROTO, "unexpected continuation");
                        return -1;
                }
                inspect_untagged(q);
        }
}

static int greeting(Req *q, bool full) {
        int r = full ? read_response(q->c, q->deadline) : conn_fill(q->c, q->deadline);
        if (r < 0) {
                report_error(q, io_kind(r), "greeting: %s", strerror(-r));
                return -1;
        }
        const char *s = full ? q->c->resp : q->c->rbuf;
        if (full && strncasecmp(s, "* OK", 4) != 0) {
                report_error(q, E_PROTO, "bad greeting");
                return -1;
        }
        if (!full && s[0] != '*') {
                report_error(q, E_PROTO, "bad first byte");
                return -1;
        }
        return 0;
}

/* u: 0-based user index */
static void user_enter(unsigned u) {
        if (!user_active)
                return;
        int a = atomic_fetch_add(&user_active[u], 1) + 1;
        int p = atomic_load(&user_peak[u]);
        while (a > p && !atomic_compare_exchange_weak(&user_peak[u], &p, a))
                ;
}

static void user_leave(unsigned u) {
        if (user_active)
                atomic_fetch_sub(&user_active[u], 1);
}

static void add_sample(Worker *w, const Sample *s) {
        if (w->n_samples == w->cap_samples) {
                size_t cap = w->cap_samples ? w->cap_samples * 2 : 1024;
                Sample *p = realloc(w->samples, cap * sizeof(*p));
                if (!p)
                        die("out of memory");
                w->samples = p;
                w->cap_samples = cap;
        }
        w->samples[w->n_samples++] = *s;
}

/* One page view (or login, or greeting probe). */
static void one_request(Worker *w, Conn *c, unsigned user_idx) {
        unsigned user_no = opt.user_base + user_idx + 1;
        Req q = { .w = w, .c = c, .user_no = user_no, .exists = -1 };
        char cmd[600], qu[260], qp[260];
        Sample s = { 0 };
        bool ok = false;

        expand(opt.userfmt, user_no, q.user, sizeof(q.user));
        expand(opt.passfmt, user_no, q.pass, sizeof(q.pass));
        q.deadline = now_s() + opt.timeout_ms / 1000.0; /* per phase: reset below */
        user_enter(user_idx);

        double t0 = now_s(), t = t0, t1;
#define PHASE_START(p)                                                   \
        do {                                                             \
                q.phase = (p);                                           \
                q.deadline = now_s() + opt.timeout_ms / 1000.0;          \
        } while (0)
#define PHASE_END(p)                                                     \
        do {                                                             \
                t1 = now_s();                                            \
                s.phase[p] = t1 - t;                                     \
                t = t1;                                                  \
        } while (0)

        PHASE_START(PH_CONNECT);
        c->fd = -1;
        int r = conn_open(c, q.deadline);
        if (r < 0) {
                report_error(&q, r == -ETIMEDOUT ? E_TIMEOUT : E_CONNECT, "connect: %s", strerror(-r));
                goto out;
        }
        if (greeting(&q, opt.mode != MODE_GREET) < 0)
                goto out;
        PHASE_END(PH_CONNECT);
        if (opt.mode == MODE_GREET) {
                conn_close(c);
                ok = true;
                goto out;
        }

        if (opt.mode == MODE_WEBMAIL) {
                PHASE_START(PH_CAPA);
                if (command(&q, "a1", "CAPABILITY") < 0)
                        goto out;
                if (!q.capability_seen) {
                        report_error(&q, E_VERIFY, "no untagged CAPABILITY");
                        goto out;
                }
                PHASE_END(PH_CAPA);
        }

        PHASE_START(PH_LOGIN);
        quote(q.user, qu, sizeof(qu));
        quote(q.pass, qp, sizeof(qp));
        snprintf(cmd, sizeof(cmd), "LOGIN %s %s", qu, qp);
        if (command(&q, "a2", cmd) < 0)
                goto out;
        PHASE_END(PH_LOGIN);
        if (q.reuse_seen)
                atomic_fetch_add(&reused_logins, 1);

        if (opt.mode == MODE_WEBMAIL) {
                PHASE_START(PH_SELECT);
                if (command(&q, "a3", "SELECT INBOX") < 0)
                        goto out;
                if (q.exists < 0 || (opt.expect_msgs >= 0 && q.exists != opt.expect_msgs)) {
                        report_error(&q, E_VERIFY, "SELECT said %ld EXISTS, expected %ld", q.exists,
                                     opt.expect_msgs);
                        goto out;
                }
                PHASE_END(PH_SELECT);

                PHASE_START(PH_UIDFETCH);
                q.fetches = 0;
                if (command(&q, "a4", "UID FETCH 1:* (FLAGS)") < 0)
                        goto out;
                if (q.fetches != (unsigned) q.exists) {
                        report_error(&q, E_VERIFY, "UID FETCH 1:* gave %u responses for %ld messages", q.fetches,
                                     q.exists);
                        goto out;
                }
                PHASE_END(PH_UIDFETCH);

                PHASE_START(PH_ENVFETCH);
                q.fetches = 0;
                q.env_ok = 0;
                /* the first page of the message list, as webmail asks for it */
                unsigned want = q.exists < 20 ? (unsigned) q.exists : 20;
                if (want == 0) {
                        report_error(&q, E_VERIFY, "empty INBOX: nothing to FETCH");
                        goto out;
                }
                snprintf(cmd, sizeof(cmd), "FETCH 1:%u (ENVELOPE)", want);
                if (command(&q, "a5", cmd) < 0)
                        goto out;
                if (q.fetches != want) {
                        report_error(&q, E_VERIFY, "FETCH 1:%u gave %u responses", want, q.fetches);
                        goto out;
                }
                if (opt.verify_user && q.env_ok != want) {
                        report_error(&q, E_VERIFY, "%u of %u envelopes do not name user %s", want - q.env_ok,
                                     want, q.user);
                        goto out;
                }
                PHASE_END(PH_ENVFETCH);
        }

        PHASE_START(PH_LOGOUT);
        if (command(&q, "a6", "LOGOUT") < 0)
                goto out;
        if (!q.bye_seen) {
                report_error(&q, E_VERIFY, "LOGOUT without * BYE");
                goto out;
        }
        conn_close(c);
        PHASE_END(PH_LOGOUT);
        ok = true;
out:
        conn_close(c);
        user_leave(user_idx);
        if (ok) {
                s.total = t - t0;
                add_sample(w, &s);
        }
#undef PHASE_START
#undef PHASE_END
}

static void bigfetch(Worker *w, Conn *c) {
        Req q = { .w = w, .c = c, .user_no = 1, .exists = -1 };
        char cmd[600], qu[260], qp[260], tag[32];

        expand(opt.userfmt, opt.user_base + 1, q.user, sizeof(q.user));
        expand(opt.passfmt, opt.user_base + 1, q.pass, sizeof(q.pass));
        q.phase = PH_CONNECT;
        q.deadline = now_s() + opt.timeout_ms / 1000.0;
        c->fd = -1;
        int r = conn_open(c, q.deadline);
        if (r < 0) {
                report_error(&q, E_CONNECT, "connect: %s", strerror(-r));
                return;
        }
        if (greeting(&q, true) < 0)
                goto out;
        q.phase = PH_LOGIN;
        quote(q.user, qu, sizeof(qu));
        quote(q.pass, qp, sizeof(qp));
        snprintf(cmd, sizeof(cmd), "LOGIN %s %s", qu, qp);
        if (command(&q, "b1", cmd) < 0)
                goto out;
        q.phase = PH_SELECT;
        if (command(&q, "b2", "SELECT INBOX") < 0)
                goto out;
        w->mbps = calloc(opt.requests ? opt.requests : 1, sizeof(double));
        if (!w->mbps)
                die("out of memory");
        w->big_crc_consistent = true;
        q.phase = PH_ENVFETCH;
        for (uint64_t i = 0; i < (opt.requests ? opt.requests : 1); i++) {
                snprintf(tag, sizeof(tag), "f%" PRIu64, i);
                size_t tl = strlen(tag);
                size_t lit_len = 0;
                uint32_t crc = 0;
                char line[64];
                int n = snprintf(line, sizeof(line), "%s FETCH 1 BODY.PEEK[]\r\n", tag);
                q.deadline = now_s() + opt.timeout_ms / 1000.0;
                double t0 = now_s(), t1 = 0;
                if ((r = conn_send(c, line, (size_t) n, q.deadline)) < 0) {
                        report_error(&q, io_kind(r), "send: %s", strerror(-r));
                        goto out;
                }
                for (;;) {
                        if ((r = read_response(c, q.deadline)) < 0) {
                                report_error(&q, io_kind(r), "read: %s", strerror(-r));
                                goto out;
                        }
                        if (strncmp(c->resp, tag, tl) == 0 && c->resp[tl] == ' ') {
                                t1 = now_s();
                                if (strncasecmp(c->resp + tl + 1, "OK", 2) != 0) {
                                        report_error(&q, E_NO, "FETCH not OK");
                                        goto out;
                                }
                                break;
                        }
                        if (c->lit_len > 0) {
                                /* checksum outside the timed part: stop the clock meanwhile */
                                double p0 = now_s();
                                lit_len = c->lit_len;
                                crc = crc32_buf((const uint8_t *) c->resp + c->lit_off, c->lit_len);
                                t0 += now_s() - p0;
                        }
                }
                if (lit_len == 0) {
                        report_error(&q, E_VERIFY, "FETCH returned no literal");
                        goto out;
                }
                w->mbps[w->n_mbps++] = (double) lit_len / (t1 - t0) / 1e6;
                if (i > 0 && (crc != w->big_crc || lit_len != w->big_bytes))
                        w->big_crc_consistent = false;
                w->big_bytes = lit_len;
                w->big_crc = crc;
        }
        q.phase = PH_LOGOUT;
        q.deadline = now_s() + opt.timeout_ms / 1000.0;
        (void) command(&q, "b9", "LOGOUT");
out:
        conn_close(c);
}

static void *worker_main(void *arg) {
        Worker *w = arg;
        Conn *c = calloc(1, sizeof(*c));
        if (!c)
                die("out of memory");
        c->fd = -1;
        if (opt.mode == MODE_BIGFETCH) {
                bigfetch(w, c);
        } else {
                for (;;) {
                        if (deadline_stop > 0 && now_s() >= deadline_stop)
                                break;
                        uint64_t idx = atomic_fetch_add(&next_request, 1);
                        if (opt.requests && idx >= opt.requests)
                                break;
                        unsigned u = opt.sequential ? (unsigned) (idx % opt.users)
                                                    : (unsigned) (xorshift(&w->rng) % opt.users);
                        uint64_t before = w->errors;
                        one_request(w, c, u);
                        if (w->errors != before && c->last[0] == 0)
                                usleep(5000); /* refused/timed out before any answer: do not spin */
                }
        }
        free(c->resp);
        free(c);
        return NULL;
}

/* ------------------------------------------------------------------ statistics */

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;
        return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array. */
static double pct(const double *v, size_t n, double p) {
        if (n == 0)
                return 0;
        size_t k = (size_t) (p / 100.0 * (double) n + 0.999999);
        if (k < 1)
                k = 1;
        if (k > n)
                k = n;
        return v[k - 1];
}

static double mean(const double *v, size_t n) {
        double s = 0;
        for (size_t i = 0; i < n; i++)
                s += v[i];
        return n ? s / (double) n : 0;
}

static void write_samples(const char *path, const double *v, size_t n) {
        FILE *f = fopen(path, "we");
        if (!f)
                die("%s: %s", path, strerror(errno));
        for (size_t i = 0; i < n; i++)
                fprintf(f, "%.4f\n", v[i]);
        if (fclose(f) != 0)
                die("%s: %s", path, strerror(errno));
}

static void usage(void) {
        fprintf(stderr,
                "usage: imapload -p PORT [-H ADDR] [-m webmail|login|greet|bigfetch] [-c CONC]\n"
                "                [-r REQUESTS] [-d SECONDS] [-n USERS] [-b BASE] [-u USERFMT] [-w PASSFMT] [-S]\n"
                "                [-s SEED] [-e MESSAGES] [-V] [-t TIMEOUT_MS] [-U PEAKFILE] [-O SAMPLEFILE]\n"
                "                [-k] [-q]\n");
        exit(2);
}

static unsigned long long num(const char *s, const char *what) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (errno || end == s || *end)
                die("bad %s: %s", what, s);
        return v;
}

int main(int argc, char **argv) {
        const char *host = "127.0.0.1";
        long port = -1;
        int ch;

        while ((ch = getopt(argc, argv, "H:p:m:c:r:d:n:b:u:w:Ss:e:Vt:U:O:kqh")) >= 0) {
                switch (ch) {
                case 'H': host = optarg; break;
                case 'p': port = (long) num(optarg, "port"); break;
                case 'm':
                        if (!strcmp(optarg, "webmail")) opt.mode = MODE_WEBMAIL;
                        else if (!strcmp(optarg, "login")) opt.mode = MODE_LOGIN;
                        else if (!strcmp(optarg, "greet")) opt.mode = MODE_GREET;
                        else if (!strcmp(optarg, "bigfetch")) opt.mode = MODE_BIGFETCH;
                        else die("unknown mode %s", optarg);
                        break;
                case 'c': opt.conc = (unsigned) num(optarg, "concurrency"); break;
                case 'r': opt.requests = num(optarg, "requests"); break;
                case 'd': opt.duration = strtod(optarg, NULL); break;
                case 'n': opt.users = (unsigned) num(optarg, "users"); break;
                case 'b': opt.user_base = (unsigned) num(optarg, "user base"); break;
                case 'u': opt.userfmt = optarg; break;
                case 'w': opt.passfmt = optarg; break;
                case 'S': opt.sequential = true; break;
                case 's': opt.seed = num(optarg, "seed"); break;
                case 'e': opt.expect_msgs = (long) num(optarg, "messages"); break;
                case 'V': opt.verify_user = true; break;
                case 't': opt.timeout_ms = (int) num(optarg, "timeout"); break;
                case 'U': opt.peakfile = optarg; break;
                case 'O': opt.samplefile = optarg; break;
                case 'k': opt.keyvalue = true; break;
                case 'q': opt.quiet = true; break;
                default: usage();
                }
        }
        if (optind != argc || port <= 0 || port > 65535)
                usage();
        if (opt.conc < 1 || opt.conc > MAX_THREADS || opt.users < 1 || opt.timeout_ms < 1)
                die("bad -c, -n or -t");
        if (!opt.requests && opt.duration <= 0 && opt.mode != MODE_BIGFETCH)
                die("give -r REQUESTS and/or -d SECONDS");
        if (opt.mode == MODE_BIGFETCH)
                opt.conc = 1;
        opt.addr.sin_family = AF_INET;
        opt.addr.sin_port = htons((uint16_t) port);
        if (inet_pton(AF_INET, host, &opt.addr.sin_addr) != 1)
                die("-H wants an IPv4 address: %s", host);
        signal(SIGPIPE, SIG_IGN);
        crc_init();
        if (opt.peakfile) {
                user_active = calloc(opt.users, sizeof(*user_active));
                user_peak = calloc(opt.users, sizeof(*user_peak));
                if (!user_active || !user_peak)
                        die("out of memory");
        }

        Worker *workers = calloc(opt.conc, sizeof(*workers));
        if (!workers)
                die("out of memory");
        double t_start = now_s();
        if (opt.duration > 0)
                deadline_stop = t_start + opt.duration;
        for (unsigned i = 0; i < opt.conc; i++) {
                workers[i].id = i;
                workers[i].rng = (opt.seed * 0x9E3779B97F4A7C15ull) ^ ((uint64_t) (i + 1) * 0xD1B54A32D192ED03ull);
                if (!workers[i].rng)
                        workers[i].rng = 1;
                pthread_attr_t attr;
                pthread_attr_init(&attr);
                pthread_attr_setstacksize(&attr, 256 * 1024);
                int r = pthread_create(&workers[i].thread, &attr, worker_main, &workers[i]);
                pthread_attr_destroy(&attr);
                if (r)
                        die("pthread_create: %s", strerror(r));
        }
        for (unsigned i = 0; i < opt.conc; i++)
                pthread_join(workers[i].thread, NULL);
        double elapsed = now_s() - t_start;

        uint64_t errors = 0;
        for (int k = 0; k < N_ERRKINDS; k++)
                errors += atomic_load(&err_counts[k]);

        if (opt.mode == MODE_BIGFETCH) {
                Worker *w = &workers[0];
                qsort(w->mbps, w->n_mbps, sizeof(double), cmp_double);
                double med = pct(w->mbps, w->n_mbps, 50);
                if (opt.samplefile)
                        write_samples(opt.samplefile, w->mbps, w->n_mbps);
                if (!w->big_crc_consistent) {
                        fprintf(stderr, "imapload: FETCH results differ between repetitions\n");
                        errors++;
                }
                if (opt.keyvalue)
                        printf("mode=bigfetch errors=%" PRIu64 " fetches=%zu bytes=%" PRIu64
                               " crc32=%08x mbps_median=%.1f mbps_min=%.1f mbps_max=%.1f\n",
                               errors, w->n_mbps, w->big_bytes, w->big_crc, med,
                               w->n_mbps ? w->mbps[0] : 0, w->n_mbps ? w->mbps[w->n_mbps - 1] : 0);
                else
                        printf("bigfetch: %zu fetches of %" PRIu64 " bytes, crc32 %08x, median %.1f MB/s "
                               "(min %.1f, max %.1f), errors %" PRIu64 "\n",
                               w->n_mbps, w->big_bytes, w->big_crc, med, w->n_mbps ? w->mbps[0] : 0,
                               w->n_mbps ? w->mbps[w->n_mbps - 1] : 0, errors);
                free(w->mbps);
                free(workers);
                return errors ? 1 : 0;
        }

        size_t n = 0;
        for (unsigned i = 0; i < opt.conc; i++)
                n += workers[i].n_samples;
        double *tot = calloc(n ? n : 1, sizeof(double));
        double *ph[N_PHASES];
        for (int p = 0; p < N_PHASES; p++)
                if (!(ph[p] = calloc(n ? n : 1, sizeof(double))))
                        die("out of memory");
        if (!tot)
                die("out of memory");
        size_t k = 0;
        for (unsigned i = 0; i < opt.conc; i++)
                for (size_t j = 0; j < workers[i].n_samples; j++, k++) {
                        tot[k] = workers[i].samples[j].total * 1000;
                        for (int p = 0; p < N_PHASES; p++)
                                ph[p][k] = workers[i].samples[j].phase[p] * 1000;
                }
        qsort(tot, n, sizeof(double), cmp_double);
        for (int p = 0; p < N_PHASES; p++)
                qsort(ph[p], n, sizeof(double), cmp_double);
        double rps = elapsed > 0 ? (double) n / elapsed : 0;
        static const char *const mode_names[] = { "webmail", "login", "greet", "bigfetch" };
        int nph = opt.mode == MODE_WEBMAIL ? N_PHASES : 1;

        if (opt.keyvalue) {
                printf("mode=%s ok=%zu errors=%" PRIu64 " elapsed_s=%.3f rps=%.2f reused=%" PRIu64 "\n",
                       mode_names[opt.mode], n, errors, elapsed, rps, (uint64_t) atomic_load(&reused_logins));
                printf("lat_mean_ms=%.3f lat_p50_ms=%.3f lat_p90_ms=%.3f lat_p99_ms=%.3f lat_max_ms=%.3f\n",
                       mean(tot, n), pct(tot, n, 50), pct(tot, n, 90), pct(tot, n, 99), n ? tot[n - 1] : 0);
                for (int p = 0; p < nph; p++) {
                        if (opt.mode == MODE_LOGIN && p != PH_CONNECT)
                                continue;
                        printf("phase_%s_mean_ms=%.3f phase_%s_p50_ms=%.3f phase_%s_p99_ms=%.3f\n", phase_keys[p],
                               mean(ph[p], n), phase_keys[p], pct(ph[p], n, 50), phase_keys[p],
                               pct(ph[p], n, 99));
                }
                printf("errors_by_kind");
                for (int e = 0; e < N_ERRKINDS; e++)
                        printf(" err_%s=%" PRIu64, err_names[e], (uint64_t) atomic_load(&err_counts[e]));
                printf("\n");
        } else {
                printf("%s: %zu ok, %" PRIu64 " errors in %.2f s, concurrency %u: %.1f req/s", mode_names[opt.mode],
                       n, errors, elapsed, opt.conc, rps);
                if (opt.mode != MODE_GREET)
                        printf(", %" PRIu64 " logins reused", (uint64_t) atomic_load(&reused_logins));
                printf("\nlatency ms: mean %.2f  p50 %.2f  p90 %.2f  p99 %.2f  max %.2f\n", mean(tot, n),
                       pct(tot, n, 50), pct(tot, n, 90), pct(tot, n, 99), n ? tot[n - 1] : 0);
                if (opt.mode == MODE_WEBMAIL) {
                        printf("%-18s %9s %9s %9s\n", "phase (ms)", "mean", "p50", "p99");
                        for (int p = 0; p < N_PHASES; p++)
                                printf("%-18s %9.3f %9.3f %9.3f\n", phase_names[p], mean(ph[p], n),
                                       pct(ph[p], n, 50), pct(ph[p], n, 99));
                }
                if (errors) {
                        printf("errors:");
                        for (int e = 0; e < N_ERRKINDS; e++)
                                if (atomic_load(&err_counts[e]))
                                        printf(" %s=%" PRIu64, err_names[e], (uint64_t) atomic_load(&err_counts[e]));
                        printf("\n");
                }
        }
        if (opt.samplefile)
                write_samples(opt.samplefile, tot, n);
        if (opt.peakfile) {
                FILE *f = fopen(opt.peakfile, "we");
                if (!f)
                        die("%s: %s", opt.peakfile, strerror(errno));
                char u[128];
                for (unsigned i = 0; i < opt.users; i++) {
                        expand(opt.userfmt, opt.user_base + i + 1, u, sizeof(u));
                        fprintf(f, "%s %d\n", u, atomic_load(&user_peak[i]));
                }
                fclose(f);
        }
        for (unsigned i = 0; i < opt.conc; i++) {
                free(workers[i].samples);
                free(workers[i].mbps);
        }
        free(workers);
        free(tot);
        for (int p = 0; p < N_PHASES; p++)
                free(ph[p]);
        return errors ? 1 : 0;
}
