/*
 * reload.c -- reading the broker's configuration, at start and on SIGHUP.
 *
 * SYNOPSIS
 *	int broker_config_read(Config *c, const char *path, char *err, size_t errsize);
 *	void broker_apply_config(Broker *b);
 *	int broker_reload(Broker *b);
 * DESCRIPTION
 *	broker_config_read() parses the file and its drop-ins into a fresh
 *	Config and checks what the broker needs on top of the syntax.
 *	broker_reload() (SIGHUP, systemctl reload) tells systemd RELOADING=1
 *	with MONOTONIC_USEC, reads the files into a new Config and either
 *	swaps it in whole or keeps the running one whole, then says READY=1.
 *	Nothing is dropped: idle and lent connections, sessions and the broker
 *	socket stay. A new configuration is refused (and logged with the file,
 *	line and key, MESSAGE_ID CONFIG_REJECTED) when it does not parse, or
 *	when it changes a key that only a restart can apply (restart_keys[]):
 *	the backend and its TLS settings (pooled connections are logged in to
 *	the old one; TLS credentials are loaded once), the broker socket (bound
 *	once), admin_group (resolved once) and proxy authentication (pooled connections are logged in as the
 *	old account). Everything else applies at once:
 *	cache_size (surplus idle connections are closed), cache_expiration_time
 *	(also for connections already idle), max_idle_per_user, backend_timeout
 *	and the other backend keys for the next backend login, syslog_facility
 *	and syslog_prioritymask. Sessions read the files themselves at every
 *	start, so client_* keys and limits reach new connections even without
 *	a reload.
 * ERRORS
 *	broker_config_read(): 0 or -errno with err filled in; never logs.
 *	broker_reload(): 0 applied, -EINVAL/-EPERM refused (logged).
 *	The client-TLS files (listen_tls_*) are checked as at start-up
 *	(listen_tls_check()); files that do not load refuse the reload too.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "broker.h"
#include "log.h"

static const char *const restart_keys[] = {
        "server_hostname", "server_port", "broker_socket", "broker_socket_group", "admin_group",
        "auth_shared_secret", "auth_sasl_plain_username", "auth_sasl_plain_password",
        /* backend TLS: the credentials and priorities are loaded once (tls_init) */
        "server_tls", "tls_server_name", "force_tls", "tls_ca_file", "tls_ca_path", "tls_cert_file",
        "tls_key_file", "tls_verify_server", "tls_ciphers", "tls_no_tlsv1", "tls_no_tlsv1.1", "tls_no_tlsv1.2",
};

static void config_warn(void *userdata, const char *msg) {
        log_warning("%s", msg);
}

int broker_config_read(Config *c, const char *path, char *err, size_t errsize) {
        int r = config_init(c);
        if (r < 0) {
                (void) snprintf(err, errsize, "%s: out of memory", path);
                return r;
        }
        r = config_load(c, path, config_warn, NULL, err, errsize);
        if (r < 0)
                goto fail;
        int n_auth = !!c->auth_shared_secret + !!c->auth_sasl_plain_username + !!c->auth_sasl_plain_password;
        if (n_auth != 0 && n_auth != 3) {
                (void) snprintf(err, errsize, "%s: proxy authentication needs all of auth_shared_secret, "
                                "auth_sasl_plain_username and auth_sasl_plain_password", path);
                r = -EINVAL;
                goto fail;
        }
        if (!c->server_hostname) {
                (void) snprintf(err, errsize, "%s: server_hostname is not set: which IMAP server should we cache?",
                                path);
                r = -EINVAL;
                goto fail;
        }
        config_check(c, config_warn, NULL);
        return 0;
fail:
        config_done(c);
        return r;
}

void broker_apply_config(Broker *b) {
        log_set_facility(b->cfg.syslog_facility);
        if (!getenv("IMAPPROXY_LOG_LEVEL"))
                log_set_max_level(b->cfg.syslog_prioritymask);
        (void) snprintf(b->backend_name, sizeof(b->backend_name), "%s:%s", b->cfg.server_hostname,
                        b->cfg.server_port);
}

typedef struct Changes {
        char list[512];           /* "key, key" */
        const char *restart_key;  /* first changed key that needs a restart */
} Changes;

static void note_change(void *userdata, const char *key) {
        Changes *ch = userdata;
        size_t l = strlen(ch->list);

        for (size_t i = 0; i < ELEMENTSOF(restart_keys); i++)
                if (strcmp(key, restart_keys[i]) == 0 && !ch->restart_key)
                        ch->restart_key = restart_keys[i];
        (void) snprintf(ch->list + l, sizeof(ch->list) - l, "%s%s", l ? ", " : "", key);
}

static void notify_reloading(void) {
        struct timespec ts;
        (void) clock_gettime(CLOCK_MONOTONIC, &ts);
        (void) sd_notifyf(false, "RELOADING=1\nMONOTONIC_USEC=%llu",
                          (unsigned long long) ts.tv_sec * 1000000ULL + (unsigned long long) ts.tv_nsec / 1000ULL);
}

int broker_reload(Broker *b) {
        Changes ch = {};
        char err[512];
        Config n;
        int r;

        notify_reloading();
        r = broker_config_read(&n, arg_config, err, sizeof(err));
        if (r < 0) {
                log_struct(LOG_ERR, IMAPPROXY_MSGID_CONFIG_REJECTED, LOG_FIELDS({ "IMAPPROXY_CONFIG", arg_config }),
                           "reload refused, the running configuration stays: %s", err);
                goto done;
        }
        /* The sessions read the client-TLS files at every start: say now, not
         * at the next TLS client, that they do not load (logged by the check). */
        r = listen_tls_check(&n);
        if (r < 0) {
                log_struct(LOG_ERR, IMAPPROXY_MSGID_CONFIG_REJECTED, LOG_FIELDS({ "IMAPPROXY_CONFIG", arg_config }),
                           "reload refused, the running configuration stays: the client TLS settings do not load "
                           "(new TLS sessions fail until the files are fixed)");
                config_done(&n);
                goto done;
        }
        (void) config_diff(&b->cfg, &n, note_change, &ch);
        if (ch.restart_key) {
                log_struct(LOG_ERR, IMAPPROXY_MSGID_CONFIG_REJECTED, LOG_FIELDS({ "IMAPPROXY_CONFIG", arg_config }),
                           "reload refused, the running configuration stays: %s changed, which needs a restart "
                           "(systemctl restart imapproxy-broker)", ch.restart_key);
                config_done(&n);
                r = -EPERM;
                goto done;
        }
        Config old = b->cfg;
        b->cfg = n;
        config_done(&old);
        broker_apply_config(b);
        pool_config_changed(b);
        log_struct(LOG_NOTICE, IMAPPROXY_MSGID_CONFIG_RELOADED,
                   LOG_FIELDS({ "IMAPPROXY_CONFIG", arg_config }, { "IMAPPROXY_CHANGED", ch.list[0] ? ch.list : NULL }),
                   "configuration reloaded from %s: %s%s", arg_config, ch.list[0] ? ch.list : "nothing changed",
                   ch.list[0] ? " changed" : "");
        r = 0;
done:
        (void) sd_notify(false, "READY=1");
        status_send(b);
        return r;
}
