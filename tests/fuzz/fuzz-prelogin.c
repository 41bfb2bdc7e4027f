/*
 * fuzz-prelogin.c -- libFuzzer target for session/prelogin.c (the client
 * before login: bytes in, replies out)
 *
 * DESCRIPTION
 *	The session's pre-login dialogue is prelogin_feed(): it talks to the
 *	client through client_write() and to the broker through
 *	broker_checkout(). This harness links prelogin.c, sasl.c, caps.c, trace.c
 *	with its own versions of those two (main.c and broker.c are not
 *	linked), so the production code runs unchanged.
 *
 *	Input: byte 0 chooses the set-up (forward_client_id, login_max_failures
 *	1-4, a small or the default max_prelogin_line), byte 1 more of it (bit
 *	0: STARTTLS offered, bit 1: login_requires_tls, bit 2: TLS already
 *	active) and the seed of the chunk sizes, the rest is what the client
 *	sends. The stub broker answers a
 *	checkout by the password's first byte: 'g' lends a connection, 'b'
 *	BAD, 'u' UNAVAILABLE, 'e' unreachable (-ECONNREFUSED), anything else
 *	NO. login_failure_delay is 0 (no sleeping).
 *
 *	The input is fed twice, whole and in uneven chunks, and both runs must
 *	produce the same transcript (replies, broker calls, result, and the
 *	offset at which a login ended the dialogue). Invariants: *ret_used <=
 *	len, 0 consumes everything, replies are whole CRLF lines without NUL,
 *	bare CR or bare LF, each starting with "* ", "+ " or a tag; the broker
 *	never sees an empty user or an over-long field; nothing is fed after
 *	a login, STARTTLS or -ECONNRESET. Any violation abort()s. FUZZ_PRELOGIN_TRACE=1
 *	in the environment prints the replies (replay-prelogin FILE).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "macro.h"
#include "session.h"
#include "fuzz-check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Transcript of one run: replies and broker calls, in order, hashed; the
 * reply bytes are checked as they come. */
typedef struct Transcript {
        uint64_t hash;
        size_t out_bytes;
        unsigned checkouts;
        bool trace; /* FUZZ_PRELOGIN_TRACE=1: print the replies of the whole-input run */
} Transcript;

static Transcript *cur;

static uint64_t mix_bytes(uint64_t h, const void *p, size_t n) {
        const unsigned char *b = p;
        for (size_t i = 0; i < n; i++) {
                h ^= b[i];
                h *= 1099511628211ull; /* FNV-1a prime */
        }
        return h;
}

/* One composed reply: one or more whole lines. */
int client_write(Session *s, const char *buf, size_t len) {
        (void) s;
        CHECK(cur);
        CHECK(len >= 2);
        CHECK(buf[len - 2] == '\r' && buf[len - 1] == '\n');
        CHECK(memchr(buf, '\0', len) == NULL);
        size_t start = 0;
        for (size_t i = 0; i < len; i++) {
                if (buf[i] == '\r')
                        CHECK(i + 1 < len && buf[i + 1] == '\n');
                if (buf[i] == '\n') {
                        CHECK(i > 0 && buf[i - 1] == '\r');
                        CHECK(i - start >= 3); /* "X Y\r" at least: "+ \r\n" is the shortest */
                        CHECK(buf[start] != ' ');
                        CHECK(memchr(buf + start, ' ', i - start) != NULL);
                        start = i + 1;
                }
        }
        if (getenv("FUZZ_PRELOGIN_TRACE") && cur->trace)
                fprintf(stderr, "S: %.*s", (int) len, buf);
        cur->hash = mix_bytes(cur->hash, buf, len);
        cur->out_bytes += len;
        CHECK(cur->out_bytes < 64u << 20); /* replies are bounded by what was sent */
        return 0;
}

int broker_checkout(Session *s, const char *user, const char *authzid, const char *password, uint32_t flags,
                    struct ipc_checkout_fail *ret_fail) {
        CHECK(cur);
        CHECK(flags == 0); /* IPC_CHECKOUT_F_FRESH is the relay's (a reused connection that died) */
        size_t ul = strlen(user), zl = strlen(authzid), pl = strlen(password);
        CHECK(ul > 0 && ul < IPC_USER_MAX);
        CHECK(zl < IPC_USER_MAX);
        CHECK(pl < IPC_PASSWORD_MAX);
        CHECK(strcmp(user, authzid) != 0); /* the same identity is sent as "" */
        cur->checkouts++;
        cur->hash = mix_bytes(cur->hash, "checkout", 8);
        cur->hash = mix_bytes(cur->hash, user, ul + 1);
        cur->hash = mix_bytes(cur->hash, authzid, zl + 1);
        cur->hash = mix_bytes(cur->hash, password, pl + 1);
        cur->hash = mix_bytes(cur->hash, s->client_id, strlen(s->client_id) + 1);

        memset(ret_fail, 0, sizeof(*ret_fail));
        switch (password[0]) {
        case 'g':
                s->backend_fd = -EBADF; /* no real connection: prelogin only passes it on */
                s->ticket = 1;
                s->reused = pl > 1 && password[1] == 'r';
                snprintf(s->postlogin_caps, sizeof(s->postlogin_caps), "%s",
                         "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT LITERAL+ COMPRESS=DEFLATE");
                snprintf(s->user, sizeof(s->user), "%s", user);
                return 0;
        case 'e':
                return -ECONNREFUSED;
        case 'b':
                ret_fail->status = IPC_FAIL_BAD;
                snprintf(ret_fail->text, sizeof(ret_fail->text), "Invalid arguments.");
                return 1;
        case 'u':
                ret_fail->status = IPC_FAIL_UNAVAILABLE;
                snprintf(ret_fail->text, sizeof(ret_fail->text), "[UNAVAILABLE] Too many connections.");
                return 1;
        default:
                ret_fail->status = IPC_FAIL_NO;
                snprintf(ret_fail->text, sizeof(ret_fail->text), "[AUTHENTICATIONFAILED] Authentication failed.");
                return 1;
        }
}

typedef struct Outcome {
        int result;     /* last prelogin_feed() result */
        size_t ended_at; /* absolute offset where the dialogue ended (login/reset), or size */
} Outcome;

static Outcome run(const uint8_t *setup, const uint8_t *data, size_t size, bool chunked, Transcript *t) {
        Session s = { .broker_fd = -EBADF, .backend_fd = -EBADF };
        Prelogin p;
        Outcome o = { .result = 0, .ended_at = size };
        uint32_t rng = setup[1] * 2654435761u + 1;

        CHECK(config_init(&s.cfg) == 0);
        s.cfg.login_failure_delay = 0;
        s.cfg.forward_client_id = setup[0] & 1;
        s.cfg.login_max_failures = 1 + ((setup[0] >> 1) & 3);
        if (setup[0] & 8)
                s.cfg.max_prelogin_line = 64 + (setup[0] >> 4) * 16;
        if (setup[1] & 1)
                CHECK((s.cfg.listen_tls_cert_file = strdup("/nonexistent/cert.pem")) != NULL);
        s.cfg.login_requires_tls = setup[1] & 2;
        s.tls_active = setup[1] & 4;
        snprintf(s.prelogin_caps, sizeof(s.prelogin_caps), "%s",
                 "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN");
        s.prelogin_caps_known = true;

        *t = (Transcript) { .hash = 14695981039346656037ull, .trace = !chunked };
        cur = t;
        CHECK(prelogin_init(&p, &s) == 0);

        size_t off = 0;
        while (off < size) {
                size_t n = size - off;
                if (chunked) {
                        rng = rng * 1103515245u + 12345u;
                        n = MIN(n, (size_t) 1 + (rng >> 16) % 97);
                }
                size_t used = SIZE_MAX;
                int r = prelogin_feed(&p, data + off, n, &used);
                CHECK(used <= n);
                o.result = r;
                if (r == 0) {
                        CHECK(used == n);
                        off += n;
                        continue;
                }
                /* nothing else can fail with these stubs */
                CHECK(r == PRELOGIN_LOGGED_IN || r == PRELOGIN_STARTTLS || r == -ECONNRESET);
                if (r == PRELOGIN_LOGGED_IN)
                        CHECK(t->checkouts > 0 && s.login_failures < s.cfg.login_max_failures);
                if (r == PRELOGIN_STARTTLS)
                        CHECK(!s.tls_active && s.cfg.listen_tls_cert_file);
                o.ended_at = off + used;
                break;
        }
        prelogin_done(&p);
        CHECK(p.sc == NULL);
        cur = NULL;
        config_done(&s.cfg);
        return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const uint8_t no_setup[2] = { 0, 0 };
        const uint8_t *setup = size >= 2 ? data : no_setup;
        const uint8_t *in = size >= 2 ? data + 2 : data;
        size_t n = size >= 2 ? size - 2 : 0;
        Transcript whole, chunks;
        static bool logging_set_up;

        if (!logging_set_up) {
                log_setup("fuzz-prelogin", LOG_TARGET_NULL); /* formatted, never written */
                logging_set_up = true;
        }

        Outcome a = run(setup, in, n, false, &whole);
        Outcome b = run(setup, in, n, true, &chunks);
        if (a.result != b.result || a.ended_at != b.ended_at || whole.hash != chunks.hash ||
            whole.out_bytes != chunks.out_bytes || whole.checkouts != chunks.checkouts) {
                fprintf(stderr, "whole: result %d at %zu, %zu bytes out, %u checkouts; "
                                "chunked: result %d at %zu, %zu bytes out, %u checkouts\n",
                        a.result, a.ended_at, whole.out_bytes, whole.checkouts, b.result, b.ended_at,
                        chunks.out_bytes, chunks.checkouts);
                abort();
        }
        return 0;
}
