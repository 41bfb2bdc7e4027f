/*
 * main.c -- imapproxy-session: one IMAP client, from greeting to goodbye.
 *
 * DESCRIPTION
 *	Started once per client connection by the launcher with the client
 *	socket on fd 0/1 (inetd style: xinetd, systemd-socket-activate --inetd,
 *	StandardInput=socket) or as LISTEN_FDS fd 3 (systemd Accept=yes).
 *	Reads the configuration, says hello to the broker (which tells us the
 *	backend's capabilities), greets the client, runs the pre-login
 *	dialogue and then the relay. Links libc only: this is the hottest path
 *	of the product (every webmail page view execs it), so no libsystemd
 *	(sd_listen_fds() is a few lines of environment parsing) and no GnuTLS.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fd-util.h"
#include "log.h"
#include "session.h"

static const char *arg_config = SYSCONFDIR "/imapproxy.conf";
static bool arg_config_explicit;
static const char *arg_broker_socket;

int client_write(Session *s, const char *buf, size_t len) {
        /* Composed replies go out in one write (with TCP_NODELAY: one segment). */
        return fd_write_all(s->client_out, buf, len, 30000);
}

/* sd_listen_fds() semantics without libsystemd. Returns the count (0 or 1). */
static int listen_fds(void) {
        const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
        char *end;
        if (!pid || !fds)
                return 0;
        unsigned long p = strtoul(pid, &end, 10);
        if (*end || p != (unsigned long) getpid())
                return 0;
        unsigned long n = strtoul(fds, &end, 10);
        if (*end)
                return 0;
        (void) unsetenv("LISTEN_PID");
        (void) unsetenv("LISTEN_FDS");
        (void) unsetenv("LISTEN_FDNAMES");
        return (int) MIN(n, 1UL);
}

static void sockaddr_text(const struct sockaddr_storage *ss, char *addr, size_t size, unsigned *ret_port) {
        if (ss->ss_family == AF_INET) {
                const struct sockaddr_in *in = (const struct sockaddr_in *) ss;
                (void) inet_ntop(AF_INET, &in->sin_addr, addr, (socklen_t) size);
                *ret_port = ntohs(in->sin_port);
        } else if (ss->ss_family == AF_INET6) {
                const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) ss;
                (void) inet_ntop(AF_INET6, &in6->sin6_addr, addr, (socklen_t) size);
                *ret_port = ntohs(in6->sin6_port);
        }
}

static void client_address(Session *s) {
        struct sockaddr_storage ss;
        socklen_t l = sizeof(ss);
        const char *ra = getenv("REMOTE_ADDR"), *rp = getenv("REMOTE_PORT");

        if (ra && *ra) {
                snprintf(s->client_addr, sizeof(s->client_addr), "%s", ra);
                s->client_port = rp ? (unsigned) strtoul(rp, NULL, 10) : 0;
        } else if (getpeername(s->client_in, (struct sockaddr *) &ss, &l) == 0)
                sockaddr_text(&ss, s->client_addr, sizeof(s->client_addr), &s->client_port);
        l = sizeof(ss);
        if (getsockname(s->client_in, (struct sockaddr *) &ss, &l) == 0)
                sockaddr_text(&ss, s->local_addr, sizeof(s->local_addr), &s->local_port);
        if (s->client_port > 65535)
                s->client_port = 0;
}

static void config_warn(void *userdata, const char *msg) {
        (void) userdata;
        log_debug("%s", msg); /* the broker reports these; sessions stay quiet */
}

static int parse_argv(int argc, char **argv) {
        static const struct option opts[] = {
                { "config", required_argument, NULL, 'f' },
                { "broker-socket", required_argument, NULL, 's' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        int c;
        while ((c = getopt_long(argc, argv, "f:s:h", opts, NULL)) >= 0) {
                switch (c) {
                case 'f':
                        arg_config = optarg;
                        arg_config_explicit = true;
                        break;
                case 's':
                        arg_broker_socket = optarg;
                        break;
                case 'h':
                        printf("Usage: imapproxy-session [-f CONFIG] [-s BROKER_SOCKET]\n"
                               "Serves one IMAP client on fd 0/1 (inetd) or LISTEN_FDS fd 3.\n");
                        exit(EXIT_SUCCESS);
                default:
                        return -EINVAL;
                }
        }
        return optind < argc ? -EINVAL : 0;
}

int main(int argc, char **argv) {
        Session session = { .broker_fd = -EBADF, .backend_fd = -EBADF };
        Session *s = &session;
        char err[512], caps[IPC_CAPS_MAX], greeting[IPC_CAPS_MAX + 128];
        int r;

        log_setup("imapproxy-session", LOG_TARGET_AUTO);
        (void) signal(SIGPIPE, SIG_IGN);
        if (parse_argv(argc, argv) < 0)
                return 2;

        if (listen_fds() == 1)
                s->client_in = s->client_out = 3;
        else {
                s->client_in = STDIN_FILENO;
                s->client_out = STDOUT_FILENO;
                struct stat a, b;
                if (fstat(0, &a) == 0 && fstat(1, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
                        s->client_out = STDIN_FILENO; /* one socket: use one fd */
        }
        (void) fd_set_nodelay(s->client_out);

        r = config_init(&s->cfg);
        if (r >= 0) {
                r = config_load_file(&s->cfg, arg_config, config_warn, NULL, err, sizeof(err));
                if (r == -ENOENT && !arg_config_explicit)
                        r = 0; /* no config file: defaults */
                else if (r < 0)
                        log_error("%s", err);
        }
        if (r < 0) {
                static const char bye[] = "* BYE [UNAVAILABLE] Proxy misconfigured.\r\n";
                (void) client_write(s, bye, sizeof(bye) - 1);
                return 1;
        }
        log_set_facility(s->cfg.syslog_facility);
        if (!getenv("IMAPPROXY_LOG_LEVEL"))
                log_set_max_level(s->cfg.syslog_prioritymask);
        if (arg_broker_socket) {
                free(s->cfg.broker_socket);
                s->cfg.broker_socket = strdup(arg_broker_socket);
                if (!s->cfg.broker_socket)
                        return 1;
        }
        client_address(s);

        (void) broker_hello(s); /* unreachable: greet anyway, LOGIN gets NO [UNAVAILABLE] */

        caps_filter(s->prelogin_caps, true, caps, sizeof(caps));
        int n = snprintf(greeting, sizeof(greeting), "* OK [CAPABILITY %s] IMAP proxy ready.\r\n", caps);
        if (n < 0 || (size_t) n >= sizeof(greeting) || client_write(s, greeting, (size_t) n) < 0)
                return 0;

        r = prelogin_run(s);
        if (r == 1) {
                r = relay_run(s);
                (void) broker_checkin(s, false); /* no-op unless the relay failed to return it */
        }
        if (s->pending) {
                explicit_bzero(s->pending, s->pending_len);
                free(s->pending);
        }
        s->broker_fd = safe_close(s->broker_fd);
        config_done(&s->cfg);
        return r < 0 ? 1 : 0;
}
