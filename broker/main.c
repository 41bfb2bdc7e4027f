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

#define STATUS_INTERVAL_USEC (2 * 1000000ULL)

static const char *arg_config = SYSCONFDIR "/imapproxy.conf";
static bool arg_check_config;

static bool status_dirty;

void broker_update_status(Broker *b) {
        (void) b;
        status_dirty = true;
}

static void status_send(Broker *b) {
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

static int on_stop_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Broker *b = userdata;
        log_info("received %s: logging out %u idle connections and exiting", strsignal((int) si->ssi_signo), b->n_idle);
        (void) sd_notify(false, "STOPPING=1");
        b->stopping = true;
        pool_logout_all(b);
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

static int on_hup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        log_notice("SIGHUP: configuration reload is not supported yet; restart to apply changes");
        return 0;
}

static void config_warn(void *userdata, const char *msg) {
        log_warning("%s", msg);
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
        int r = config_init(&b->cfg);
        if (r < 0)
                return log_error_errno(r, "config: %m");
        r = config_load(&b->cfg, arg_config, config_warn, NULL, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "%s", err);
        int n_auth = !!b->cfg.auth_shared_secret + !!b->cfg.auth_sasl_plain_username + !!b->cfg.auth_sasl_plain_password;
        if (n_auth != 0 && n_auth != 3)
                return log_error_errno(-EINVAL, "%s: proxy authentication needs all of auth_shared_secret, "
                                       "auth_sasl_plain_username and auth_sasl_plain_password", arg_config);
        if (n_auth == 3)
                log_info("proxy authentication: clients log in with the shared secret, the backend sees %s",
                         b->cfg.auth_sasl_plain_username);
        if (!b->cfg.server_hostname)
                return log_error_errno(-EINVAL, "%s: server_hostname is not set: which IMAP server should we cache?",
                                       arg_config);
        config_check(&b->cfg, config_warn, NULL);
        return 0;
}

int main(int argc, char **argv) {
        Broker broker = { .listen_fd = -EBADF, .resolve_pipe = { -EBADF, -EBADF } };
        Broker *b = &broker;
        sd_event_source *status_timer = NULL;
        sigset_t mask;
        int r;

        log_setup("imapproxy-broker", LOG_TARGET_AUTO);
        if (parse_argv(argc, argv) < 0) {
                help();
                return 2;
        }
        if (load_config(b) < 0)
                return 1;
        log_set_facility(b->cfg.syslog_facility);
        if (!getenv("IMAPPROXY_LOG_LEVEL"))
                log_set_max_level(b->cfg.syslog_prioritymask);
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

        if (gnutls_rnd(GNUTLS_RND_KEY, b->hmac_key, sizeof(b->hmac_key)) < 0) {
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
        if ((r = pool_init(b)) < 0 || (r = resolve_init(b)) < 0 || (r = backend_init(b)) < 0)
                return log_error_errno(r, "initialisation: %m"), 1;
        r = peer_listen(b);
        if (r < 0)
                return 1;
        r = sd_event_add_time_relative(b->event, &status_timer, CLOCK_MONOTONIC, STATUS_INTERVAL_USEC, 0,
                                       status_on_timer, b);
        if (r >= 0)
                (void) sd_event_source_set_enabled(status_timer, SD_EVENT_ON);

        log_info("imapproxy-broker ready: backend %s:%s (server_tls %s), cache_size %u, cache_expiration_time %u s, socket %s",
                 b->cfg.server_hostname, b->cfg.server_port, server_tls_to_string(config_server_tls(&b->cfg)),
                 b->cfg.cache_size, b->cfg.cache_expiration_time,
                 b->listen_fd_inherited ? "(inherited)" : b->cfg.broker_socket);
        (void) sd_notify(false, "READY=1");
        status_send(b);

        r = sd_event_loop(b->event);

        status_timer = sd_event_source_disable_unref(status_timer);
        peer_close_all(b);
        backend_done(b);
        pool_done(b);
        tls_done(b); /* after pool_done: the relays forward the pool's LOGOUTs */
        resolve_done(b);
        b->event = sd_event_unref(b->event);
        explicit_bzero(b->hmac_key, sizeof(b->hmac_key));
        config_done(&b->cfg);
        return r < 0 ? 1 : 0;
}
