/*
 * imapproxyctl.c -- administer a running imapproxy-broker over its socket:
 * counters, pooled connections, flushing them, tracing one user.
 *
 * SYNOPSIS
 *	imapproxyctl [-f CONFIG | -s SOCKET] [--json] stats | list | flush [USER] | trace USER
 * DESCRIPTION
 *	The successor of up-imapproxy's pimpstat and XPROXY_* admin commands
 *	(imapproxyctl(8)). Connects to the broker socket (broker_socket from
 *	the configuration, or -s), says HELLO with the admin role, sends one
 *	ADMIN request and prints the reply: human-readable, or JSON with
 *	--json. trace prints TRACE_EVENTs until interrupted.
 * SECURITY
 *	The broker decides who is an administrator (root or admin_group, by
 *	SO_PEERCRED); this program holds no privilege of its own. Nothing it
 *	prints contains a password: list has none to show, and trace lines
 *	were redacted by the session before they left it. Every string from
 *	the broker is printed through a sanitizer (no control bytes).
 * ERRORS
 *	Exit status 0, 1 (error, including permission denied), 2 (usage).
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "fd-util.h"
#include "ipc.h"

static const char *arg_config = NULL;
static const char *arg_socket = NULL;
static bool arg_json = false;

static void help(FILE *f) {
        fprintf(f,
                "Usage: imapproxyctl [OPTIONS] COMMAND [ARG]\n"
                "Administer a running imapproxy-broker.\n\n"
                "Commands:\n"
                "  stats         counters: clients, backend connections, logins, hit ratio, failures\n"
                "  list          idle and lent backend connections (user, backend, age, idle time)\n"
                "  flush [USER]  log out idle connections (all, or USER's); lent ones are closed\n"
                "                instead of pooled when they come back\n"
                "  trace USER    print USER's IMAP traffic (credentials redacted) until Ctrl-C\n\n"
                "Options:\n"
                "  -f, --config FILE   read broker_socket from FILE (default %s)\n"
                "  -s, --socket PATH   broker socket (overrides the configuration)\n"
                "  -j, --json          machine-readable output (stats, list, flush)\n"
                "  -h, --help          this text\n",
                CONFIG_DEFAULT_PATH);
}

static void die(const char *fmt, ...) _printf_(1, 2) _noreturn_;
static void die(const char *fmt, ...) {
        va_list ap;
        fputs("imapproxyctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        exit(EXIT_FAILURE);
}

/* Printable rendition of a broker-supplied string: control bytes as '?'. */
static const char *clean(const char *s, char *buf, size_t size) {
        size_t o = 0;
        for (; *s && o + 1 < size; s++) {
                unsigned char c = (unsigned char) *s;
                buf[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char) c;
        }
        buf[o] = '\0';
        return buf;
}

static void json_string(FILE *f, const char *s) {
        fputc('"', f);
        for (; *s; s++) {
                unsigned char c = (unsigned char) *s;
                if (c == '"' || c == '\\')
                        fprintf(f, "\\%c", c);
                else if (c < 0x20 || c == 0x7f)
                        fprintf(f, "\\u%04x", c);
                else
                        fputc(c, f);
        }
        fputc('"', f);
}

static void quiet_warn(void *userdata, const char *msg) {
        (void) userdata;
        (void) msg; /* the broker reports configuration warnings; we only need broker_socket */
}

static char *socket_path(void) {
        if (arg_socket)
                return strdup(arg_socket);
        const char *path = arg_config ? arg_config : CONFIG_DEFAULT_PATH;
        if (!arg_config && access(path, F_OK) < 0)
                return strdup(IPC_DEFAULT_SOCKET);
        Config cfg;
        char err[512];
        if (config_init(&cfg) < 0)
                die("out of memory");
        if (config_load(&cfg, path, quiet_warn, NULL, err, sizeof(err)) < 0) /* with PATH.d drop-ins, like the daemons */
                die("%s", err);
        char *s = strdup(cfg.broker_socket);
        config_done(&cfg);
        return s;
}

static int broker_connect(void) {
        char *path = socket_path();
        int fd = -EBADF, r;
        IpcMessage m;

        if (!path)
                die("out of memory");
        r = ipc_connect(path, &fd);
        if (r < 0)
                die("cannot connect to the broker at %s: %s%s", path, strerror(-r),
                    r == -EACCES ? " (only root and members of admin_group may use imapproxyctl)"
                    : r == -ENOENT || r == -ECONNREFUSED ? " (is imapproxy-broker running? -f/-s name its socket)"
                                                        : "");
        struct ipc_hello h = { .version = IPC_PROTO_VERSION, .role = IPC_ROLE_ADMIN };
        r = ipc_send(fd, IPC_HELLO, &h, sizeof(h), -EBADF);
        if (r < 0)
                die("broker at %s: %s", path, strerror(-r));
        r = ipc_recv(fd, &m);
        if (r == -ECONNRESET)
                die("the broker at %s closed the connection: not allowed (only root and members of admin_group "
                    "may use imapproxyctl), or a different version of imapproxy",
                    path);
        if (r < 0)
                die("broker at %s: %s", path, strerror(-r));
        if (m.type == IPC_ADMIN_DONE && m.u.admin_done.status != 0) {
                char buf[IPC_TEXT_MAX];
                die("%s", clean(m.u.admin_done.text, buf, sizeof(buf)));
        }
        if (m.type != IPC_HELLO_REPLY || m.u.hello_reply.version != IPC_PROTO_VERSION)
                die("broker at %s answered with %s, version %u (we speak %u)", path, ipc_type_to_string(m.type),
                    m.type == IPC_HELLO_REPLY ? m.u.hello_reply.version : 0, IPC_PROTO_VERSION);
        ipc_message_done(&m);
        free(path);
        return fd;
}

static void request(int fd, IpcAdminOp op, const char *user) {
        struct ipc_admin q = { .op = op };
        if (user) {
                if (strlen(user) >= sizeof(q.user))
                        die("user name too long (at most %zu bytes)", sizeof(q.user) - 1);
                memcpy(q.user, user, strlen(user) + 1);
        }
        int r = ipc_send(fd, IPC_ADMIN, &q, sizeof(q), -EBADF);
        if (r < 0)
                die("sending the request: %s", strerror(-r));
}

static void receive(int fd, IpcMessage *m) {
        int r = ipc_recv(fd, m);
        if (r == -ECONNRESET)
                die("the broker closed the connection");
        if (r < 0)
                die("reading the broker's answer: %s", strerror(-r));
        if (m->type == IPC_ADMIN_DONE && m->u.admin_done.status != 0) {
                char buf[IPC_TEXT_MAX];
                die("%s", clean(m->u.admin_done.text, buf, sizeof(buf)));
        }
}

static void format_duration(uint64_t usec, char *buf, size_t size) {
        uint64_t s = usec / 1000000ULL;
        if (s < 60)
                snprintf(buf, size, "%llus", (unsigned long long) s);
        else if (s < 3600)
                snprintf(buf, size, "%llum%02llus", (unsigned long long) (s / 60), (unsigned long long) (s % 60));
        else if (s < 86400)
                snprintf(buf, size, "%lluh%02llum", (unsigned long long) (s / 3600),
                         (unsigned long long) (s % 3600 / 60));
        else
                snprintf(buf, size, "%llud%02lluh", (unsigned long long) (s / 86400),
                         (unsigned long long) (s % 86400 / 3600));
}

/* ---- stats ---- */

static int cmd_stats(int fd) {
        IpcMessage m;
        request(fd, IPC_ADMIN_OP_STATS, NULL);
        receive(fd, &m);
        if (m.type != IPC_ADMIN_STATS)
                die("unexpected answer: %s", ipc_type_to_string(m.type));
        const struct ipc_admin_stats *s = &m.u.admin_stats;
        unsigned long long hit = s->logins_total ? s->reuses_total * 1000ULL / s->logins_total : 0;

        if (arg_json) {
                printf("{\"uptime_seconds\": %llu, \"clients\": %u, \"peak_clients\": %u, \"clients_total\": %llu, "
                       "\"lent\": %u, \"peak_lent\": %u, \"idle\": %u, \"peak_idle\": %u, \"pending\": %u, "
                       "\"logins\": %llu, \"reuses\": %llu, \"hit_ratio\": %.3f, \"backend_logins\": %llu, "
                       "\"login_failures\": %llu, \"backend_errors\": %llu, \"expired\": %llu, \"dead\": %llu, "
                       "\"dirty\": %llu, \"flushed\": %llu, \"trace_dropped\": %llu}\n",
                       (unsigned long long) (s->uptime_usec / 1000000ULL), s->clients, s->peak_clients,
                       (unsigned long long) s->clients_total, s->lent, s->peak_lent, s->idle, s->peak_idle,
                       s->pending, (unsigned long long) s->logins_total, (unsigned long long) s->reuses_total,
                       (double) hit / 1000.0, (unsigned long long) s->backend_logins,
                       (unsigned long long) s->login_failures, (unsigned long long) s->backend_errors,
                       (unsigned long long) s->expired, (unsigned long long) s->dead,
                       (unsigned long long) s->dirty, (unsigned long long) s->flushed,
                       (unsigned long long) s->trace_dropped);
        } else {
                char up[32];
                format_duration(s->uptime_usec, up, sizeof(up));
                printf("uptime            %s\n", up);
                printf("clients           %u now, %u peak, %llu total\n", s->clients, s->peak_clients,
                       (unsigned long long) s->clients_total);
                printf("backend lent      %u now, %u peak\n", s->lent, s->peak_lent);
                printf("backend idle      %u now, %u peak\n", s->idle, s->peak_idle);
                printf("backend pending   %u logins under way\n", s->pending);
                printf("logins            %llu\n", (unsigned long long) s->logins_total);
                printf("reuses            %llu\n", (unsigned long long) s->reuses_total);
                printf("hit ratio         %llu.%llu%%\n", hit / 10, hit % 10);
                printf("backend logins    %llu\n", (unsigned long long) s->backend_logins);
                printf("login failures    %llu\n", (unsigned long long) s->login_failures);
                printf("backend errors    %llu\n", (unsigned long long) s->backend_errors);
                printf("expired           %llu\n", (unsigned long long) s->expired);
                printf("dead              %llu\n", (unsigned long long) s->dead);
                printf("dirty             %llu\n", (unsigned long long) s->dirty);
                printf("flushed           %llu\n", (unsigned long long) s->flushed);
                printf("trace dropped     %llu\n", (unsigned long long) s->trace_dropped);
        }
        ipc_message_done(&m);
        return 0;
}

/* ---- list ---- */

static int cmd_list(int fd) {
        IpcMessage m;
        bool first = true;

        request(fd, IPC_ADMIN_OP_LIST, NULL);
        if (arg_json)
                fputs("[", stdout);
        else
                printf("%-5s %-24s %-22s %8s %8s %5s %7s %s\n", "STATE", "USER", "BACKEND", "AGE", "IDLE", "USES",
                       "SESSION", "FLAGS");
        for (;;) {
                receive(fd, &m);
                if (m.type == IPC_ADMIN_DONE)
                        break;
                if (m.type != IPC_ADMIN_CONN)
                        die("unexpected answer: %s", ipc_type_to_string(m.type));
                const struct ipc_admin_conn *c = &m.u.admin_conn;
                const char *state = c->state == IPC_LIST_IDLE ? "idle" : "lent";
                if (arg_json) {
                        printf("%s\n {\"state\": \"%s\", \"user\": ", first ? "" : ",", state);
                        json_string(stdout, c->user);
                        fputs(", \"authzid\": ", stdout);
                        json_string(stdout, c->authzid);
                        fputs(", \"backend\": ", stdout);
                        json_string(stdout, c->backend);
                        printf(", \"age_seconds\": %.3f, \"idle_seconds\": %.3f, \"uses\": %u, \"session_pid\": %u, "
                               "\"no_reuse\": %s, \"traced\": %s}",
                               (double) c->age_usec / 1e6, (double) c->idle_usec / 1e6, c->uses, c->pid,
                               c->flags & IPC_LIST_F_NO_REUSE ? "true" : "false",
                               c->flags & IPC_LIST_F_TRACED ? "true" : "false");
                } else {
                        char user[2 * IPC_USER_MAX + 2], u[IPC_USER_MAX], z[IPC_USER_MAX], be[IPC_BACKEND_MAX];
                        char age[32], idle[32], pid[16];
                        if (c->authzid[0])
                                snprintf(user, sizeof(user), "%s*%s", clean(c->user, u, sizeof(u)),
                                         clean(c->authzid, z, sizeof(z)));
                        else
                                snprintf(user, sizeof(user), "%s", clean(c->user, u, sizeof(u)));
                        format_duration(c->age_usec, age, sizeof(age));
                        if (c->state == IPC_LIST_IDLE)
                                format_duration(c->idle_usec, idle, sizeof(idle));
                        else
                                snprintf(idle, sizeof(idle), "-");
                        if (c->pid)
                                snprintf(pid, sizeof(pid), "%u", c->pid);
                        else
                                snprintf(pid, sizeof(pid), "-");
                        printf("%-5s %-24s %-22s %8s %8s %5u %7s %s%s%s\n", state, user,
                               clean(c->backend, be, sizeof(be)), age, idle, c->uses, pid,
                               c->flags & IPC_LIST_F_NO_REUSE ? "no-reuse" : "",
                               (c->flags & IPC_LIST_F_NO_REUSE) && (c->flags & IPC_LIST_F_TRACED) ? "," : "",
                               c->flags & IPC_LIST_F_TRACED ? "traced" : "");
                }
                first = false;
                ipc_message_done(&m);
        }
        if (arg_json)
                fputs(first ? "]\n" : "\n]\n", stdout);
        else
                printf("%u idle, %u lent\n", m.u.admin_done.n_idle, m.u.admin_done.n_lent);
        ipc_message_done(&m);
        return 0;
}

/* ---- flush ---- */

static int cmd_flush(int fd, const char *user) {
        IpcMessage m;
        request(fd, IPC_ADMIN_OP_FLUSH, user ? user : "");
        receive(fd, &m);
        if (m.type != IPC_ADMIN_DONE)
                die("unexpected answer: %s", ipc_type_to_string(m.type));
        const struct ipc_admin_done *d = &m.u.admin_done;
        if (arg_json) {
                fputs("{\"user\": ", stdout);
                if (user)
                        json_string(stdout, user);
                else
                        fputs("null", stdout);
                printf(", \"idle_closed\": %u, \"lent_marked\": %u}\n", d->n_idle, d->n_lent);
        } else {
                char u[IPC_USER_MAX];
                printf("%s: %u idle connection%s logged out; %u lent connection%s marked: %s\n",
                       user ? clean(user, u, sizeof(u)) : "all users", d->n_idle, d->n_idle == 1 ? "" : "s",
                       d->n_lent, d->n_lent == 1 ? "" : "s",
                       d->n_lent == 1 ? "it will be closed, not pooled, when its session ends"
                                      : "they will be closed, not pooled, when their sessions end");
        }
        ipc_message_done(&m);
        return 0;
}

/* ---- trace ---- */

static int cmd_trace(int fd, const char *user) {
        static const char *const dirs[_IPC_TRACE_DIR_MAX] = {
                [IPC_TRACE_CLIENT] = "C:", [IPC_TRACE_SERVER] = "S:", [IPC_TRACE_PROXY] = "*:",
        };
        IpcMessage m;

        request(fd, IPC_ADMIN_OP_TRACE, user);
        receive(fd, &m);
        if (m.type != IPC_ADMIN_DONE)
                die("unexpected answer: %s", ipc_type_to_string(m.type));
        char text[IPC_TEXT_MAX];
        fprintf(stderr, "imapproxyctl: %s (Ctrl-C to stop)\n", clean(m.u.admin_done.text, text, sizeof(text)));
        ipc_message_done(&m);

        for (;;) {
                receive(fd, &m);
                if (m.type != IPC_TRACE_EVENT)
                        die("unexpected message: %s", ipc_type_to_string(m.type));
                const struct ipc_trace_event *e = &m.u.trace_event;
                char ts[64], line[IPC_TRACE_LINE_MAX], u[IPC_USER_MAX];
                time_t sec = (time_t) (e->time_usec / 1000000ULL);
                struct tm tm;
                if (localtime_r(&sec, &tm))
                        strftime(ts, sizeof(ts), "%H:%M:%S", &tm);
                else
                        snprintf(ts, sizeof(ts), "?");
                if (e->dropped)
                        printf("%s.%03u %s[%u] (%u lines dropped: reader too slow)\n", ts,
                               (unsigned) (e->time_usec % 1000000ULL / 1000), clean(e->user, u, sizeof(u)), e->pid,
                               e->dropped);
                printf("%s.%03u %s[%u] %s %s%s\n", ts, (unsigned) (e->time_usec % 1000000ULL / 1000),
                       clean(e->user, u, sizeof(u)), e->pid, dirs[e->dir], clean(e->line, line, sizeof(line)),
                       e->flags & IPC_TRACE_F_TRUNCATED ? " [...]" : "");
                ipc_message_done(&m);
        }
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                { "config", required_argument, NULL, 'f' },
                { "socket", required_argument, NULL, 's' },
                { "json", no_argument, NULL, 'j' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        int c;

        /* Options may follow the command too: "imapproxyctl stats --json". */
        while ((c = getopt_long(argc, argv, "f:s:jh", opts, NULL)) >= 0) {
                switch (c) {
                case 'f':
                        arg_config = optarg;
                        break;
                case 's':
                        arg_socket = optarg;
                        break;
                case 'j':
                        arg_json = true;
                        break;
                case 'h':
                        help(stdout);
                        return 0;
                default:
                        help(stderr);
                        return 2;
                }
        }
        if (optind >= argc) {
                help(stderr);
                return 2;
        }
        const char *cmd = argv[optind];
        int nargs = argc - optind - 1;
        const char *arg = nargs > 0 ? argv[optind + 1] : NULL;

        (void) signal(SIGPIPE, SIG_IGN);
        setvbuf(stdout, NULL, _IOLBF, 0); /* trace lines appear as they come, also into a pipe */

        if (strcmp(cmd, "stats") == 0 && nargs == 0)
                return cmd_stats(broker_connect());
        if (strcmp(cmd, "list") == 0 && nargs == 0)
                return cmd_list(broker_connect());
        if (strcmp(cmd, "flush") == 0 && nargs <= 1) {
                if (arg && !*arg)
                        die("flush: empty user name");
                return cmd_flush(broker_connect(), arg);
        }
        if (strcmp(cmd, "trace") == 0 && nargs == 1) {
                if (!*arg)
                        die("trace: empty user name");
                return cmd_trace(broker_connect(), arg);
        }
        fprintf(stderr, "imapproxyctl: unknown command or wrong number of arguments: %s\n", cmd);
        help(stderr);
        return 2;
}
