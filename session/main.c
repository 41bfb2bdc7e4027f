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
#include <poll.h>
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
static bool arg_fork_server;
static bool arg_fork_server_child; /* REMOTE_ADDR/REMOTE_PORT describe no client of ours */
static unsigned arg_reexec_after = 1000;

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

        if (ra && *ra && !arg_fork_server_child) {
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
                { "fork-server", no_argument, NULL, 'F' },
                { "reexec-after", required_argument, NULL, 'R' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        int c;
        while ((c = getopt_long(argc, argv, "f:s:hF", opts, NULL)) >= 0) {
                switch (c) {
                case 'f':
                        arg_config = optarg;
                        arg_config_explicit = true;
                        break;
                case 's':
                        arg_broker_socket = optarg;
                        break;
                case 'F':
                        arg_fork_server = true;
                        break;
                case 'R': {
                        char *end;
                        unsigned long v = strtoul(optarg, &end, 10);
                        if (*end || v > 100000000UL)
                                return -EINVAL;
                        arg_reexec_after = (unsigned) v;
                        break;
                }
                case 'h':
                        printf("Usage: imapproxy-session [-f CONFIG] [-s BROKER_SOCKET] [--fork-server [--reexec-after N]]\n"
                               "Serves one IMAP client on fd 0/1 (inetd) or LISTEN_FDS fd 3; with --fork-server,\n"
                               "accepts on the listening socket fd 3 and forks one process per client.\n");
                        exit(EXIT_SUCCESS);
                default:
                        return -EINVAL;
                }
        }
        return optind < argc ? -EINVAL : 0;
}

/* One client, from greeting to goodbye. */
static int session_serve(Session *s) {
        char caps[IPC_CAPS_MAX], greeting[IPC_CAPS_MAX + 128];
        int r;

        (void) fd_set_nodelay(s->client_out);
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
                s->pending = NULL;
        }
        s->broker_fd = safe_close(s->broker_fd);
        return r < 0 ? 1 : 0;
}

/* --fork-server: fd 3 is a listening socket (systemd Accept=no,
 * systemd-socket-activate without -a, xinetd wait = yes). The configuration
 * is read once; every connection gets its own process by fork() alone, with
 * no exec, which is most of a session's start-up cost (bench/README.md). The
 * children of one parent share its address-space layout and stack canary,
 * so the parent re-execs itself every arg_reexec_after connections to get
 * fresh ones; children in flight are not affected. */
static int fork_server_run(Session *s, char **argv) {
        const int lfd = 3;
        int acc = 0;
        socklen_t l = sizeof(acc);
        unsigned served = 0;

        if (getsockopt(lfd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) < 0 || !acc)
                return log_error_errno(-EBADF, "--fork-server needs a listening socket as fd 3 (LISTEN_FDS=1)"), 1;
        (void) fd_set_cloexec(lfd, false); /* kept across our own re-exec */
        (void) signal(SIGCHLD, SIG_IGN);   /* children are reaped by the kernel */
        arg_fork_server_child = true;

        for (;;) {
                int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (cfd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN)
                                continue;
                        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                                log_warning_errno(-errno, "accept: %m; pausing");
                                (void) poll(NULL, 0, 100);
                                continue;
                        }
                        return log_error_errno(-errno, "accept: %m"), 1;
                }
                pid_t pid = fork();
                if (pid == 0) {
                        (void) safe_close(lfd);
                        (void) signal(SIGCHLD, SIG_DFL);
                        s->client_in = s->client_out = cfd;
                        _exit(session_serve(s));
                }
                (void) safe_close(cfd);
                if (pid < 0) {
                        log_warning_errno(-errno, "fork: %m");
                        (void) poll(NULL, 0, 100);
                        continue;
                }
                if (arg_reexec_after > 0 && ++served >= arg_reexec_after) {
                        char pidbuf[32];
                        snprintf(pidbuf, sizeof(pidbuf), "%d", (int) getpid());
                        (void) setenv("LISTEN_PID", pidbuf, 1);
                        (void) setenv("LISTEN_FDS", "1", 1);
                        execv("/proc/self/exe", argv);
                        log_warning_errno(-errno, "re-exec after %u connections: %m; going on", served);
                        (void) unsetenv("LISTEN_PID");
                        (void) unsetenv("LISTEN_FDS");
                        served = 0;
                }
        }
}

int main(int argc, char **argv) {
        Session session = { .broker_fd = -EBADF, .backend_fd = -EBADF };
        Session *s = &session;
        char err[512];
        int r;

        log_setup("imapproxy-session", LOG_TARGET_AUTO);
        (void) signal(SIGPIPE, SIG_IGN);
        if (parse_argv(argc, argv) < 0)
                return 2;

        bool fds3 = listen_fds() == 1;
        if (arg_fork_server && !fds3) {
                log_error("--fork-server needs a listening socket passed as LISTEN_FDS=1 (fd 3)");
                return 2;
        }
        if (fds3)
                s->client_in = s->client_out = 3;
        else {
                s->client_in = STDIN_FILENO;
                s->client_out = STDOUT_FILENO;
                struct stat a, b;
                if (fstat(0, &a) == 0 && fstat(1, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
                        s->client_out = STDIN_FILENO; /* one socket: use one fd */
        }

        r = config_init(&s->cfg);
        if (r >= 0) {
                r = config_load(&s->cfg, arg_config, config_warn, NULL, err, sizeof(err));
                if (r == -ENOENT && !arg_config_explicit)
                        r = 0; /* no config file: defaults */
                else if (r < 0)
                        log_error("%s", err);
        }
        if (r < 0) {
                static const char bye[] = "* BYE [UNAVAILABLE] Proxy misconfigured.\r\n";
                if (!arg_fork_server)
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

        r = arg_fork_server ? fork_server_run(s, argv) : session_serve(s);
        config_done(&s->cfg);
        return r;
}
