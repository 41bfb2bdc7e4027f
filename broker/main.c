/*
 * main.c -- imapproxy-broker: start-up, signals and the event loop.
 *
 * DESCRIPTION
 *	Reads the configuration (fatal errors only here, before the loop
 *	runs), draws the per-broker HMAC key, listens on the broker socket,
 *	loads the backend TLS credentials when they will be needed,
 *	probes the backend for its capabilities, tells systemd READY=1 and
 *	runs sd-event until SIGTERM/SIGINT. On stop it logs out every idle
 *	connection; lent ones belong to their sessions and are left alone.
 *	SIGHUP reloads the configuration (reload.c). With WATCHDOG_USEC set
 *	(WatchdogSec=), a timer at half the interval sends WATCHDOG=1: the
 *	pings stop when the event loop does. STATUS= is refreshed at most every
 *	STATUS_INTERVAL_USEC when something changed.
 *	Owns the Broker object.
 */
#include <errno.h>
#include <getopt.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "broker.h"
#include "fd-util.h"
#include "log.h"
#include "secret.h"

#define STATUS_INTERVAL_USEC (2 * 1000000ULL)

const char *arg_config = SYSCONFDIR "/imapproxy.conf";
static bool arg_check_config;

static bool status_dirty;

void broker_update_status(Broker *b) {
        (void) b;
        status_dirty = true;
}

void status_send(Broker *b) {
        char text[256];
        if (stats_format_status(b, text, sizeof(text)) >= 0)
                (void) sd_notifyf(false, "STATUS=%s", text);
        status_dirty = false;
}

static int status_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        if (status_dirty)
                status_send(b);
        (void) sd_event_source_set_time(s, usec + STATUS_INTERVAL_USEC);
        return 0;
}

static int watchdog_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        uint64_t interval = *(const uint64_t *) userdata;
        (void) sd_notify(false, "WATCHDOG=1");
        (void) sd_event_source_set_time(s, usec + interval);
        return 0;
}

/* WatchdogSec=: ping at half the interval from the event loop itself. */
static int watchdog_setup(Broker *b, sd_event_source **ret) {
        static uint64_t interval;
        uint64_t usec = 0;
        int r = sd_watchdog_enabled(false, &usec);
        if (r <= 0 || usec == 0)
                return 0;
        interval = usec / 2;
        r = sd_event_add_time_relative(b->event, ret, CLOCK_MONOTONIC, 0, 0, watchdog_on_timer, &interval);
        if (r < 0)
                return log_error_errno(r, "watchdog timer: %m");
        (void) sd_event_source_set_enabled(*ret, SD_EVENT_ON);
        log_debug("watchdog: pinging every %llu ms", (unsigned long long) (interval / 1000));
        return 1;
}

static int on_stop_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Broker *b = userdata;
        char idle[16];
        (void) snprintf(idle, sizeof(idle), "%u", b->n_idle);
        (void) sd_notify(false, "STOPPING=1");
        log_struct(LOG_INFO, IMAPPROXY_MSGID_BROKER_STOPPING,
                   LOG_FIELDS({ "IMAPPROXY_BACKEND", b->backend_name }, { "IMAPPROXY_IDLE", idle }),
                   "received %s: logging out %u idle connections and exiting", strsignal((int) si->ssi_signo),
                   b->n_idle);
        b->stopping = true;
        pool_logout_all(b);
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

static int on_hup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        (void) broker_reload(userdata);
        return 0;
}

static void help(void) {
        printf("Usage: imapproxy-broker [-f CONFIG] [--check-config]\n"
               "  -f, --config FILE   configuration file (default %s)\n"
               "  -t, --check-config  validate the configuration, print the effective settings, exit\n"
               "  -h, --help          this text\n",
               SYSCONFDIR "/imapproxy.conf");
}

static int parse_argv(int argc, char **argv) {
        static const struct option opts[] = {
                { "config", required_argument, NULL, 'f' },
                { "check-config", no_argument, NULL, 't' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        int c;
        while ((c = getopt_long(argc, argv, "f:th", opts, NULL)) >= 0) {
                switch (c) {
                case 'f':
                        arg_config = optarg;
                        break;
                case 't':
                        arg_check_config = true;
                        break;
                case 'h':
                        help();
                        exit(EXIT_SUCCESS);
                default:
                        return -EINVAL;
                }
        }
        if (optind < argc)
                return -EINVAL;
        return 0;
}

static int load_config(Broker *b) {
        char err[512];
        int r = broker_config_read(&b->cfg, arg_config, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "%s", err);
        if (proxy_auth_enabled(b))
                log_info("proxy authentication: clients log in with the shared secret, the backend sees %s",
                         b->cfg.auth_sasl_plain_username);
        broker_apply_config(b);
        return 0;
}

int main(int argc, char **argv) {
        Broker broker = { .listen_fd = -EBADF, .reserve_fd = -EBADF, .resolve_pipe = { -EBADF, -EBADF } };
        Broker *b = &broker;
        sd_event_source *status_timer = NULL, *watchdog_timer = NULL;
        sigset_t mask;
        int r;

        log_setup("imapproxy-broker", LOG_TARGET_AUTO);
        if (parse_argv(argc, argv) < 0) {
                help();
                return 2;
        }
        if (load_config(b) < 0) {
                config_done(&b->cfg); /* what the file set before its bad line */
                return 1;
        }
        if (arg_check_config) {
                r = tls_init(b); /* the TLS files and priority string are part of the configuration */
                tls_done(b);
                if (r >= 0)
                        r = listen_tls_check(&b->cfg);
                if (r < 0) {
                        config_done(&b->cfg);
                        return 1;
                }
                config_dump_origins(&b->cfg, stdout);
                config_done(&b->cfg);
                return 0;
        }

        b->hmac_key = secret_alloc(HMAC_KEY_SIZE);
        if (!b->hmac_key)
                return log_error_errno(-errno, "cannot allocate the key: %m"), 1;
        if (gnutls_rnd(GNUTLS_RND_KEY, b->hmac_key, HMAC_KEY_SIZE) < 0) {
                log_error("cannot draw a random key");
                return 1;
        }
        (void) signal(SIGPIPE, SIG_IGN);
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigprocmask(SIG_BLOCK, &mask, NULL);

        r = sd_event_default(&b->event);
        if (r < 0)
                return log_error_errno(r, "sd_event_default: %m"), 1;
        if ((r = sd_event_add_signal(b->event, NULL, SIGTERM, on_stop_signal, b)) < 0 ||
            (r = sd_event_add_signal(b->event, NULL, SIGINT, on_stop_signal, b)) < 0 ||
            (r = sd_event_add_signal(b->event, NULL, SIGHUP, on_hup, b)) < 0)
                return log_error_errno(r, "signals: %m"), 1;
        /* Trust store and client certificate: once, here (a bad file stops us now). */
        if (tls_init(b) < 0 || listen_tls_check(&b->cfg) < 0)
                return 1;
        if ((r = pool_init(b)) < 0 || (r = resolve_init(b)) < 0 || (r = backend_init(b)) < 0 ||
            (r = admin_init(b)) < 0)
                return log_error_errno(r, "initialisation: %m"), 1;
        r = peer_listen(b);
        if (r < 0)
                return 1;
        r = sd_event_add_time_relative(b->event, &status_timer, CLOCK_MONOTONIC, STATUS_INTERVAL_USEC, 0,
                                       status_on_timer, b);
        if (r >= 0)
                (void) sd_event_source_set_enabled(status_timer, SD_EVENT_ON);
        if (watchdog_setup(b, &watchdog_timer) < 0)
                return 1;

        log_struct(LOG_INFO, IMAPPROXY_MSGID_BROKER_STARTED, LOG_FIELDS({ "IMAPPROXY_BACKEND", b->backend_name }),
                   "imapproxy-broker ready: backend %s (server_tls %s), cache_size %u, cache_expiration_time %u s, "
                   "socket %s",
                   b->backend_name, server_tls_to_string(config_server_tls(&b->cfg)), b->cfg.cache_size,
                   b->cfg.cache_expiration_time, b->listen_fd_inherited ? "(inherited)" : b->cfg.broker_socket);
        (void) sd_notify(false, "READY=1");
        status_send(b);

        r = sd_event_loop(b->event);

        status_timer = sd_event_source_disable_unref(status_timer);
        watchdog_timer = sd_event_source_disable_unref(watchdog_timer);
        peer_close_all(b);
        backend_done(b);
        pool_done(b);
        tls_done(b); /* after pool_done: the relays forward the pool's LOGOUTs */
        resolve_done(b);
        b->event = sd_event_unref(b->event);
        secret_free(b->hmac_key, HMAC_KEY_SIZE);
        b->hmac_key = NULL;
        config_done(&b->cfg);
        return r < 0 ? 1 : 0;
}
