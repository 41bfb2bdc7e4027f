/*
 * resolve.c -- backend name resolution that never blocks the event loop.
 *
 * SYNOPSIS
 *	int resolve_start(Broker *b, const char *host, const char *port, int family,
 *	                  ResolveDoneFn done, void *userdata, Resolve **ret);
 *	void resolve_cancel(Resolve *r);
 * DESCRIPTION
 *	A numeric host is resolved at once, a name by glibc's
 *	getaddrinfo_a(); either way the request pointer goes through a pipe
 *	that the loop watches and the callback runs from the loop, never from
 *	inside resolve_start() (the caller's state must not change under it).
 *	A cancelled request stays allocated until glibc is done with it, then
 *	is freed silently.
 *	Owns the pipe and every in-flight request.
 * ERRORS
 *	0 (pending) or -errno.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "fd-util.h"
#include "log.h"

struct Resolve {
        Broker *broker;
        struct gaicb cb;
        struct addrinfo hints;
        ResolveDoneFn done;
        void *userdata;
        bool cancelled;
        bool numeric;       /* resolved in resolve_start(), result in cb.ar_result */
        int numeric_error;
        char *host, *port;
};

static void resolve_free(Resolve *r) {
        if (!r)
                return;
        if (r->cb.ar_result)
                freeaddrinfo(r->cb.ar_result);
        free(r->host);
        free(r->port);
        free(r);
}

/* Runs in a glibc helper thread: only write(2) the pointer. */
static void resolve_notify(union sigval sv) {
        Resolve *r = sv.sival_ptr;
        ssize_t n;
        do
                n = write(r->broker->resolve_pipe[1], &r, sizeof(r));
        while (n < 0 && errno == EINTR);
}

static int resolve_on_pipe(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        for (;;) {
                Resolve *r;
                ssize_t n = read(fd, &r, sizeof(r));
                if (n != (ssize_t) sizeof(r))
                        return 0;
                int e = r->numeric ? r->numeric_error : gai_error(&r->cb);
                if (!r->cancelled) {
                        struct addrinfo *ai = r->cb.ar_result;
                        r->cb.ar_result = NULL;
                        r->done(r->userdata, e == 0 ? 0 : -EHOSTUNREACH, ai);
                }
                resolve_free(r);
        }
}

int resolve_init(Broker *b) {
        if (pipe2(b->resolve_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
                return -errno;
        return sd_event_add_io(b->event, &b->resolve_source, b->resolve_pipe[0], EPOLLIN, resolve_on_pipe, b);
}

void resolve_done(Broker *b) {
        b->resolve_source = sd_event_source_disable_unref(b->resolve_source);
        b->resolve_pipe[0] = safe_close(b->resolve_pipe[0]);
        b->resolve_pipe[1] = safe_close(b->resolve_pipe[1]);
}

static bool host_is_numeric(const char *host) {
        unsigned char buf[sizeof(struct in6_addr)];
        return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

int resolve_start(Broker *b, const char *host, const char *port, int family, ResolveDoneFn done,
                  void *userdata, Resolve **ret) {
        struct addrinfo hints = {
                .ai_family = family,
                .ai_socktype = SOCK_STREAM,
                .ai_protocol = IPPROTO_TCP,
                .ai_flags = AI_ADDRCONFIG,
        };

        *ret = NULL;
        Resolve *r = calloc(1, sizeof(Resolve));
        if (!r)
                return -ENOMEM;
        r->broker = b;
        r->done = done;
        r->userdata = userdata;
        r->hints = hints;
        r->host = strdup(host);
        r->port = strdup(port);
        if (!r->host || !r->port) {
                resolve_free(r);
                return -ENOMEM;
        }
        r->cb.ar_name = r->host;
        r->cb.ar_service = r->port;
        r->cb.ar_request = &r->hints;

        if (host_is_numeric(host)) {
                r->numeric = true;
                r->hints.ai_flags = AI_NUMERICHOST;
                r->numeric_error = getaddrinfo(host, port, &r->hints, &r->cb.ar_result);
                union sigval sv = { .sival_ptr = r };
                resolve_notify(sv); /* the callback runs from the loop */
                *ret = r;
                return 0;
        }

        struct gaicb *list[1] = { &r->cb };
        struct sigevent sev = {
                .sigev_notify = SIGEV_THREAD,
                .sigev_value.sival_ptr = r,
                .sigev_notify_function = resolve_notify,
        };
        int e = getaddrinfo_a(GAI_NOWAIT, list, 1, &sev);
        if (e != 0) {
                resolve_free(r);
                return e == EAI_MEMORY ? -ENOMEM : -EAGAIN;
        }
        *ret = r;
        return 0;
}

void resolve_cancel(Resolve *r) {
        if (r)
                r->cancelled = true; /* freed when glibc reports completion */
}
