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
 *
 *	Client TLS lives in a second program built from the same sources with
 *	-DSESSION_TLS and linked to GnuTLS, imapproxy-session-tls, installed
 *	next to this one. A client's STARTTLS gets its tagged OK here, every
 *	byte it sent after STARTTLS is dropped, and this process execve()s
 *	imapproxy-session-tls --starttls-handoff on the same client socket,
 *	which handshakes and carries on without a greeting. Implicit TLS (993)
 *	runs imapproxy-session-tls directly (or this program with
 *	--implicit-tls, which execs it at once). So a plaintext session never
 *	loads GnuTLS (design.md section 3).
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
#include <limits.h>
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
static bool arg_implicit_tls;
static bool arg_starttls_handoff;  /* internal: exec'd after STARTTLS's tagged OK */
static int arg_client_fd_in = -1;  /* internal: the client socket(s) of that exec */
static int arg_client_fd_out = -1;
static unsigned arg_login_failures; /* internal: failed logins before STARTTLS */
static const char *arg_write_ticket_key; /* imapproxy-session-tls: make a new ticket master key */

#define TLS_PROGRAM "imapproxy-session-tls"

int client_write(Session *s, const char *buf, size_t len) {
        /* Composed replies go out in one write (with TCP_NODELAY: one segment). */
#ifdef SESSION_TLS
        if (s->tls)
                return tls_write_all(s, buf, len, 30000);
#endif
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
        if (s->client_addr[0])
                log_set_context("IMAPPROXY_CLIENT", s->client_addr); /* on every journal line of this client */
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
                { "implicit-tls", no_argument, NULL, 'T' },
                { "starttls-handoff", no_argument, NULL, 'H' },
                { "client-fd", required_argument, NULL, 'C' },
                { "login-failures", required_argument, NULL, 'L' },
                { "write-ticket-key", required_argument, NULL, 'W' },
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
                case 'T':
                        arg_implicit_tls = true;
                        break;
                case 'H':
                        arg_starttls_handoff = true;
                        break;
                case 'C': {
                        char *end;
                        unsigned long in = strtoul(optarg, &end, 10), out = in;
                        if (*end == ':')
                                out = strtoul(end + 1, &end, 10);
                        if (*end || in > INT_MAX || out > INT_MAX)
                                return -EINVAL;
                        arg_client_fd_in = (int) in;
                        arg_client_fd_out = (int) out;
                        break;
                }
                case 'L': {
                        char *end;
                        unsigned long v = strtoul(optarg, &end, 10);
                        if (*end || v > 1000)
                                return -EINVAL;
                        arg_login_failures = (unsigned) v;
                        break;
                }
                case 'W':
                        arg_write_ticket_key = optarg;
                        break;
                case 'h':
                        printf("Usage: %s [-f CONFIG] [-s BROKER_SOCKET] [--implicit-tls] [--fork-server [--reexec-after N]]\n"
                               "Serves one IMAP client on fd 0/1 (inetd) or LISTEN_FDS fd 3; with --fork-server,\n"
                               "accepts on the listening socket fd 3 and forks one process per client.\n"
                               "--implicit-tls: TLS from the first byte (port 993), by " TLS_PROGRAM ".\n"
                               "--write-ticket-key FILE (" TLS_PROGRAM "): a new TLS session-ticket master key.\n",
                               program_invocation_short_name);
                        exit(EXIT_SUCCESS);
                default:
                        return -EINVAL;
                }
        }
        return optind < argc ? -EINVAL : 0;
}

#ifndef SESSION_TLS
/* imapproxy-session-tls is installed next to this program. */
static int tls_program_path(char *prog, size_t size) {
        char self[PATH_MAX];
        ssize_t l = readlink("/proc/self/exe", self, sizeof(self) - 1);

        if (l <= 0)
                return l < 0 ? -errno : -ENOENT;
        self[l] = '\0';
        char *slash = strrchr(self, '/');
        if (!slash)
                return -ENOENT;
        *slash = '\0';
        if (snprintf(prog, size, "%s/" TLS_PROGRAM, self) >= (int) size)
                return -ENAMETOOLONG;
        return 0;
}

/* After STARTTLS's tagged OK: become imapproxy-session-tls on the same client
 * socket. Nothing the client sent after STARTTLS survives the exec. Returns
 * only on failure (the client, told to start TLS, is then disconnected). */
static int exec_tls_session(Session *s) {
        char prog[PATH_MAX], fds[32], failures[16];
        const char *argv[16];
        size_t n = 0;
        int r = tls_program_path(prog, sizeof(prog));

        if (r < 0)
                return log_error_errno(r, "STARTTLS: cannot find " TLS_PROGRAM " next to this program: %m");
        (void) fd_set_cloexec(s->client_in, false);
        (void) fd_set_cloexec(s->client_out, false);
        snprintf(fds, sizeof(fds), "%d:%d", s->client_in, s->client_out);
        snprintf(failures, sizeof(failures), "%u", s->login_failures);
        argv[n++] = prog;
        argv[n++] = "--starttls-handoff";
        argv[n++] = "--client-fd";
        argv[n++] = fds;
        argv[n++] = "--login-failures";
        argv[n++] = failures;
        if (arg_config_explicit) {
                argv[n++] = "-f";
                argv[n++] = arg_config;
        }
        if (arg_broker_socket) {
                argv[n++] = "-s";
                argv[n++] = arg_broker_socket;
        }
        argv[n] = NULL;
        if (arg_fork_server_child) { /* the launcher's variables describe no client of ours */
                (void) unsetenv("REMOTE_ADDR");
                (void) unsetenv("REMOTE_PORT");
        }
        execv(prog, (char *const *) argv);
        return log_error_errno(-errno, "STARTTLS: cannot execute %s: %m", prog);
}
#endif

/* One client, from greeting to goodbye. */
static int session_serve(Session *s) {
        char caps[IPC_CAPS_MAX], greeting[IPC_CAPS_MAX + 128];
        int r = 0;

        (void) fd_set_nodelay(s->client_out);
        client_address(s);
        s->login_failures = arg_login_failures;

#ifdef SESSION_TLS
        /* Implicit TLS, or the handshake the client asked for with STARTTLS
         * (answered by the plaintext session that exec'd us). */
        r = tls_handshake(s);
        if (r < 0)
                return 0; /* logged; a client that cannot do TLS is not our failure */
        s->tls_active = true;
#endif

        (void) broker_hello(s); /* unreachable: greet anyway, LOGIN gets NO [UNAVAILABLE] */

        if (!arg_starttls_handoff) { /* after STARTTLS there is no second greeting */
                caps_prelogin(s, caps, sizeof(caps));
                int n = snprintf(greeting, sizeof(greeting), "* OK [CAPABILITY %s] IMAP proxy ready.\r\n", caps);
                if (n < 0 || (size_t) n >= sizeof(greeting) || client_write(s, greeting, (size_t) n) < 0)
                        goto out;
        }

        r = prelogin_run(s);
#ifndef SESSION_TLS
        if (r == PRELOGIN_STARTTLS) {
                s->broker_fd = safe_close(s->broker_fd);
                r = exec_tls_session(s);
        }
#endif
        if (r == PRELOGIN_LOGGED_IN) {
                r = relay_run(s);
                (void) broker_checkin(s, false); /* no-op unless the relay failed to return it */
        }
        if (s->pending) {
                explicit_bzero(s->pending, s->pending_len);
                free(s->pending);
                s->pending = NULL;
        }
out:
        session_retry_disarm(s); /* armed at login; the relay normally disarms it */
        free(s->trace); /* imapproxyctl trace state (one allocation, see trace.c) */
        s->trace = NULL;
        s->broker_fd = safe_close(s->broker_fd);
#ifdef SESSION_TLS
        tls_end(s);
#endif
        return r < 0 ? 1 : 0;
}

static volatile sig_atomic_t fork_server_reload; /* SIGHUP seen */

static void fork_server_sighup(int sig) {
        (void) sig;
        fork_server_reload = 1;
}

/* The same program anew in this process, on the same listening socket: it
 * reads the configuration (and the TLS files) again and gets a fresh
 * address-space layout and stack canary. SIGHUP is blocked here (see
 * fork_server_run()) and the mask survives the exec: a SIGHUP that arrives
 * before the new image has its handler stays pending instead of killing
 * it. Returns only if the exec failed. */
static void fork_server_reexec(char **argv, const char *why) {
        char pidbuf[32];

        snprintf(pidbuf, sizeof(pidbuf), "%d", (int) getpid());
        (void) setenv("LISTEN_PID", pidbuf, 1);
        (void) setenv("LISTEN_FDS", "1", 1);
        execv("/proc/self/exe", argv);
        log_warning_errno(-errno, "re-exec (%s): %m; going on", why);
        (void) unsetenv("LISTEN_PID");
        (void) unsetenv("LISTEN_FDS");
}

/* The configuration: -f FILE (its absence is an error), or the default
 * path (its absence means the defaults), with drop-ins. err is "" unless
 * config_load() said why. */
static int load_config(Config *c, char *err, size_t errsize) {
        int r = config_init(c);

        err[0] = '\0';
        if (r < 0)
                return r;
        r = config_load(c, arg_config, config_warn, NULL, err, errsize);
        if (r == -ENOENT && !arg_config_explicit)
                return 0;
        return r;
}

/* SIGHUP: would the new image start? The configuration must load, and for
 * imapproxy-session-tls the certificate, key and priority string too. A
 * refusal is logged with the reason; the running process goes on. */
static int fork_server_reload_check(void) {
        Config c;
        char err[512];
        int r = load_config(&c, err, sizeof(err));

        if (r < 0 && err[0])
                log_error("reload refused, the running configuration stays: %s", err);
        else if (r < 0)
                log_error_errno(r, "reload refused, the running configuration stays: %m");
#ifdef SESSION_TLS
        if (r >= 0) {
                r = tls_check(&c);
                if (r < 0)
                        log_error("reload refused, the running configuration and TLS files stay (see above)");
        }
#endif
        config_done(&c);
        return r;
}

/* --fork-server: fd 3 is a listening socket (systemd Accept=no,
 * systemd-socket-activate without -a, xinetd wait = yes). The configuration
 * is read once; every connection gets its own process by fork() alone, with
 * no exec, which is most of a session's start-up cost (bench/README.md). The
 * children of one parent share its address-space layout and stack canary,
 * so the parent re-execs itself every arg_reexec_after connections to get
 * fresh ones; children in flight are not affected. SIGHUP (systemctl
 * reload) re-execs it too, after checking that the new configuration loads,
 * so that a changed configuration or a renewed certificate takes effect
 * without ending the sessions in progress. SIGHUP is blocked except while
 * the parent waits for a connection (ppoll), so a reload never slips
 * between the check of the flag and the wait. */
static int fork_server_run(Session *s, char **argv) {
        const int lfd = 3;
        int acc = 0;
        socklen_t l = sizeof(acc);
        unsigned served = 0;
        sigset_t hup, waiting;
        struct sigaction sa = { .sa_handler = fork_server_sighup }; /* no SA_RESTART */

        if (getsockopt(lfd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) < 0 || !acc)
                return log_error_errno(-EBADF, "--fork-server needs a listening socket as fd 3 (LISTEN_FDS=1)"), 1;
        (void) fd_set_cloexec(lfd, false); /* kept across our own re-exec */
        (void) signal(SIGCHLD, SIG_IGN);   /* children are reaped by the kernel */
        arg_fork_server_child = true;
        (void) sigemptyset(&hup);
        (void) sigaddset(&hup, SIGHUP);
        (void) sigprocmask(SIG_BLOCK, &hup, &waiting); /* already blocked after a re-exec */
        (void) sigdelset(&waiting, SIGHUP);
        (void) sigemptyset(&sa.sa_mask);
        (void) sigaction(SIGHUP, &sa, NULL);

        for (;;) {
                if (fork_server_reload) {
                        fork_server_reload = 0;
                        if (fork_server_reload_check() >= 0) {
                                log_info("SIGHUP: configuration checked, re-executing to load it");
                                fork_server_reexec(argv, "reload");
                        }
                }
                struct pollfd p = { .fd = lfd, .events = POLLIN };
                if (ppoll(&p, 1, NULL, &waiting) < 0) {
                        if (errno != EINTR)
                                return log_error_errno(-errno, "ppoll: %m"), 1;
                        continue;
                }
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
#ifdef SESSION_TLS
                tls_ticket_key_refresh(&s->cfg); /* a rotated key for this child and the next */
#endif
                pid_t pid = fork();
                if (pid == 0) {
                        (void) safe_close(lfd);
                        (void) signal(SIGCHLD, SIG_DFL);
                        (void) signal(SIGHUP, SIG_DFL);
                        (void) sigprocmask(SIG_UNBLOCK, &hup, NULL);
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
                        fork_server_reexec(argv, "after --reexec-after connections");
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
#ifdef SESSION_TLS
        if (arg_write_ticket_key)
                return tls_write_ticket_key(arg_write_ticket_key) < 0 ? 1 : 0;
#else
        if (arg_write_ticket_key) {
                log_error("--write-ticket-key: use " TLS_PROGRAM);
                return 2;
        }
#endif
#ifndef SESSION_TLS
        if (arg_implicit_tls || arg_starttls_handoff) {
                /* Same pid, same fds, same environment (LISTEN_PID stays right). */
                char prog[PATH_MAX];
                r = tls_program_path(prog, sizeof(prog));
                if (r >= 0) {
                        argv[0] = prog;
                        execv(prog, argv);
                        r = -errno;
                }
                log_error_errno(r, "--implicit-tls: cannot execute " TLS_PROGRAM " next to this program: %m");
                return 1;
        }
#endif

        bool fds3 = !arg_starttls_handoff && listen_fds() == 1;
        if (arg_fork_server && !fds3) {
                log_error("--fork-server needs a listening socket passed as LISTEN_FDS=1 (fd 3)");
                return 2;
        }
        if (arg_starttls_handoff) {
                if (arg_client_fd_in < 0 || arg_fork_server) {
                        log_error("--starttls-handoff is internal: it needs --client-fd and no --fork-server");
                        return 2;
                }
                s->client_in = arg_client_fd_in;
                s->client_out = arg_client_fd_out;
                (void) fd_set_cloexec(s->client_in, true);
                (void) fd_set_cloexec(s->client_out, true);
        } else if (fds3)
                s->client_in = s->client_out = 3;
        else {
                s->client_in = STDIN_FILENO;
                s->client_out = STDOUT_FILENO;
                struct stat a, b;
                if (fstat(0, &a) == 0 && fstat(1, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
                        s->client_out = STDIN_FILENO; /* one socket: use one fd */
        }

        r = load_config(&s->cfg, err, sizeof(err));
        if (r < 0 && err[0])
                log_error("%s", err);
        if (r < 0) {
#ifndef SESSION_TLS /* (a TLS client would not understand it) */
                static const char bye[] = "* BYE [UNAVAILABLE] Proxy misconfigured.\r\n";
                if (!arg_fork_server)
                        (void) client_write(s, bye, sizeof(bye) - 1);
#endif
                config_done(&s->cfg); /* what the file set before its bad line (LeakSanitizer) */
                return 1;
        }
        log_set_facility(s->cfg.syslog_facility);
        if (!getenv("IMAPPROXY_LOG_LEVEL"))
                log_set_max_level(s->cfg.syslog_prioritymask);
        if (arg_broker_socket) {
                free(s->cfg.broker_socket);
                s->cfg.broker_socket = strdup(arg_broker_socket);
                if (!s->cfg.broker_socket) {
                        config_done(&s->cfg);
                        return 1;
                }
        }

#ifdef SESSION_TLS
        /* Once per process: a fork server pays for loading the key once. */
        r = tls_setup(&s->cfg);
        if (r < 0) {
                config_done(&s->cfg);
                return 1; /* logged; the client cannot be told in a language it speaks */
        }
#endif
        r = arg_fork_server ? fork_server_run(s, argv) : session_serve(s);
        config_done(&s->cfg);
        return r;
}
