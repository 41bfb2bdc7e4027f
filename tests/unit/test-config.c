/*
 * test-config.c -- unit tests for common/config.c (imapproxy.conf reader)
 *
 * DESCRIPTION
 *	Defaults, every value type, the line syntax (comments, blank and
 *	whitespace-only lines, CRLF, no final newline, '#' in values), every
 *	error kind with its exact "FILE:LINE: KEY: reason" text, secrets never
 *	echoed, warnings for keys that are accepted but not applied, duplicate
 *	keys, config_dump(), config_load_file() errors, and the configs shipped
 *	by up-imapproxy and Debian (tests/unit/data/), which must load.
 *	Data files are found relative to this source file (__FILE__), so the
 *	binary runs from the repository root or with an absolute __FILE__.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include "config.h"
#include "ipc-proto.h"

/* ---- helpers ---- */

#define MAX_WARNINGS 64

typedef struct Warnings {
        unsigned n;
        char msg[MAX_WARNINGS][1024];
} Warnings;

static void collect_warning(void *userdata, const char *msg) {
        Warnings *w = userdata;

        cr_assert_lt(w->n, MAX_WARNINGS);
        snprintf(w->msg[w->n++], sizeof(w->msg[0]), "%s", msg);
}

typedef struct Loaded {
        Config c;
        Warnings w;
        char err[1024];
        int r;
} Loaded;

/* Every test starts from config_init() and ends with config_done(); the
 * static is one per test process (Criterion forks per test). */
static Loaded L;

static int load_n(const char *buf, size_t len) {
        L.w.n = 0;
        L.r = config_load_buffer(&L.c, "t.conf", buf, len, collect_warning, &L.w, L.err,
                                 sizeof(L.err));
        return L.r;
}

static int load(const char *buf) {
        return load_n(buf, strlen(buf));
}

static void setup(void) {
        memset(&L, 0, sizeof(L));
        cr_assert_eq(config_init(&L.c), 0);
}

static void teardown(void) {
        config_done(&L.c);
}

/* Expects buf to fail with exactly this message. */
static void expect_error(const char *buf, const char *msg) {
        int r = load(buf);

        cr_expect_eq(r, -EINVAL, "input %s: r=%d", buf, r);
        cr_expect_str_eq(L.err, msg, "input: %s", buf);
}

static bool has_warning(const char *prefix) {
        for (unsigned i = 0; i < L.w.n; i++)
                if (strncmp(L.w.msg[i], prefix, strlen(prefix)) == 0)
                        return true;
        return false;
}

static char *data_path(const char *name) {
        const char *slash = strrchr(__FILE__, '/');
        char *p;

        if (slash)
                cr_assert_gt(asprintf(&p, "%.*s/data/%s", (int) (slash - __FILE__), __FILE__, name), 0);
        else
                cr_assert_gt(asprintf(&p, "data/%s", name), 0);
        return p;
}

static char *dump_to_string(const Config *c) {
        char *out = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&out, &size);

        cr_assert_not_null(f);
        config_dump(c, f);
        cr_assert_eq(fclose(f), 0);
        return out;
}

TestSuite(config, .init = setup, .fini = teardown);

/* ---- defaults ---- */

Test(config, defaults) {
        Config *c = &L.c;

        cr_expect_null(c->server_hostname);
        cr_expect_str_eq(c->server_port, "143");
        cr_expect_eq(c->connect_retries, 0);
        cr_expect_eq(c->connect_delay, 0);
        cr_expect_eq(c->cache_size, 3072);
        cr_expect_null(c->listen_port);
        cr_expect_null(c->listen_address);
        cr_expect_eq(c->cache_expiration_time, 300);
        cr_expect_null(c->proc_username);
        cr_expect_null(c->proc_groupname);
        cr_expect_null(c->stat_filename);
        cr_expect_null(c->protocol_log_filename);
        cr_expect_eq(c->syslog_facility, LOG_MAIL);
        cr_expect_eq(c->syslog_prioritymask, LOG_INFO);
        cr_expect_not(c->send_tcp_keepalives);
        cr_expect_not(c->enable_select_cache);
        cr_expect_not(c->foreground_mode);
        cr_expect_not(c->force_tls);
        cr_expect_null(c->chroot_directory);
        cr_expect_null(c->preauth_command);
        cr_expect_not(c->enable_admin_commands);
        cr_expect_null(c->tls_ca_file);
        cr_expect_null(c->tls_ca_path);
        cr_expect_null(c->tls_cert_file);
        cr_expect_null(c->tls_key_file);
        cr_expect(c->tls_verify_server);
        cr_expect_null(c->tls_ciphers);
        cr_expect_not(c->tls_no_tlsv1);
        cr_expect_not(c->tls_no_tlsv1_1);
        cr_expect_not(c->tls_no_tlsv1_2);
        cr_expect_null(c->auth_sasl_plain_username);
        cr_expect_null(c->auth_sasl_plain_password);
        cr_expect_null(c->auth_shared_secret);
        cr_expect_not(c->dns_rr);
        cr_expect_eq(c->ipversion_only, 0);
        cr_expect_str_eq(c->broker_socket, IPC_DEFAULT_SOCKET);
        cr_expect_str_eq(c->broker_socket, "/run/imapproxy/broker.sock");
        cr_expect_null(c->broker_socket_group);
        cr_expect_null(c->admin_group);
        cr_expect_eq(c->backend_timeout, 30);
        cr_expect_eq(c->client_prelogin_timeout, 60);
        cr_expect_eq(c->client_idle_timeout, 1800);
        cr_expect_eq(c->max_prelogin_line, 40960);
        cr_expect_eq(c->max_command_line, 262144);
        cr_expect_eq(c->login_max_failures, 3);
        cr_expect_eq(c->login_failure_delay, 2000);
        cr_expect(!c->forward_client_id);
        cr_expect_eq(c->max_idle_per_user, 8);
        cr_expect_eq(c->max_literal_size, UINT64_C(1) << 30);
}

Test(config, empty_input_is_fine) {
        cr_expect_eq(load(""), 0);
        cr_expect_eq(load_n(NULL, 0), 0);
        cr_expect_str_eq(L.err, "");
        cr_expect_eq(L.w.n, 0);
        cr_expect_str_eq(L.c.server_port, "143");
}

Test(config, done_accepts_zeroed_and_is_idempotent) {
        Config z = {};

        config_done(&z);
        config_done(&z);
        config_done(NULL);
        config_done(&L.c);
        cr_expect_null(L.c.server_port);
        cr_expect_null(L.c.broker_socket);
        config_done(&L.c); /* teardown runs it a third time */
}

/* ---- every key and type ---- */

static const char all_keys[] =
        "server_hostname imap.example.org\n"
        "server_port 1143\n"
        "connect_retries 10\n"
        "connect_delay 5\n"
        "cache_size 100\n"
        "listen_port 143\n"
        "listen_address 127.0.0.1\n"
        "cache_expiration_time 0\n"
        "proc_username nobody\n"
        "proc_groupname nogroup\n"
        "stat_filename /var/run/pimpstats\n"
        "protocol_log_filename /var/log/imapproxy protocol.log\n"
        "syslog_facility LOG_LOCAL3\n"
        "syslog_prioritymask LOG_WARNING\n"
        "send_tcp_keepalives yes\n"
        "enable_select_cache yes\n"
        "foreground_mode no\n"
        "force_tls no\n"
        "chroot_directory /var/lib/imapproxy/chroot\n"
        "preauth_command ID (\"GUID\" \"1\")\n"
        "enable_admin_commands yes\n"
        "tls_ca_file /etc/ssl/certs/ca-certificates.crt\n"
        "tls_ca_path /etc/ssl/certs/\n"
        "tls_cert_file /etc/ssl/mycert.crt\n"
        "tls_key_file /etc/ssl/mycert.key\n"
        "tls_verify_server no\n"
        "tls_ciphers ALL:!aNULL:!eNULL\n"
        "tls_no_tlsv1 yes\n"
        "tls_no_tlsv1.1 true\n"
        "tls_no_tlsv1.2 on\n"
        "auth_sasl_plain_username proxyuser\n"
        "auth_sasl_plain_password pa ss#word\n"
        "auth_shared_secret s3cr3t\n"
        "dns_rr yes\n"
        "ipversion_only 6\n"
        "broker_socket /run/test/broker.sock\n"
        "broker_socket_group imapproxy\n"
        "admin_group imapadmin\n"
        "backend_timeout 10\n"
        "client_prelogin_timeout 20\n"
        "client_idle_timeout 86400\n"
        "max_prelogin_line 16K\n"
        "max_command_line 1M\n"
        "max_literal_size 2G\n"
        "listen_tls_cert_file /etc/imapproxy/tls/cert.pem\n"
        "listen_tls_key_file /etc/imapproxy/tls/key.pem\n"
        "listen_tls_priority SECURE256:-VERS-ALL:+VERS-TLS1.3\n"
        "listen_tls_ticket_key_file /etc/imapproxy/tls/ticket.key\n"
        "login_requires_tls yes\n"
        "server_tls implicit\n"
        "tls_server_name imap.example.org\n";

Test(config, every_key_parses) {
        Config *c = &L.c;

        cr_assert_eq(load(all_keys), 0, "%s", L.err);
        cr_expect_str_eq(c->server_hostname, "imap.example.org");
        cr_expect_str_eq(c->server_port, "1143");
        cr_expect_eq(c->connect_retries, 10);
        cr_expect_eq(c->connect_delay, 5);
        cr_expect_eq(c->cache_size, 100);
        cr_expect_str_eq(c->listen_port, "143");
        cr_expect_str_eq(c->listen_address, "127.0.0.1");
        cr_expect_eq(c->cache_expiration_time, 0);
        cr_expect_str_eq(c->proc_username, "nobody");
        cr_expect_str_eq(c->proc_groupname, "nogroup");
        cr_expect_str_eq(c->stat_filename, "/var/run/pimpstats");
        cr_expect_str_eq(c->protocol_log_filename, "/var/log/imapproxy protocol.log");
        cr_expect_eq(c->syslog_facility, LOG_LOCAL3);
        cr_expect_eq(c->syslog_prioritymask, LOG_WARNING);
        cr_expect(c->send_tcp_keepalives);
        cr_expect(c->enable_select_cache);
        cr_expect_not(c->foreground_mode);
        cr_expect_not(c->force_tls);
        cr_expect_str_eq(c->chroot_directory, "/var/lib/imapproxy/chroot");
        cr_expect_str_eq(c->preauth_command, "ID (\"GUID\" \"1\")");
        cr_expect(c->enable_admin_commands);
        cr_expect_str_eq(c->tls_ca_file, "/etc/ssl/certs/ca-certificates.crt");
        cr_expect_str_eq(c->tls_ca_path, "/etc/ssl/certs/");
        cr_expect_str_eq(c->tls_cert_file, "/etc/ssl/mycert.crt");
        cr_expect_str_eq(c->tls_key_file, "/etc/ssl/mycert.key");
        cr_expect_not(c->tls_verify_server);
        cr_expect_str_eq(c->tls_ciphers, "ALL:!aNULL:!eNULL");
        cr_expect(c->tls_no_tlsv1);
        cr_expect(c->tls_no_tlsv1_1);
        cr_expect(c->tls_no_tlsv1_2);
        cr_expect_str_eq(c->auth_sasl_plain_username, "proxyuser");
        cr_expect_str_eq(c->auth_sasl_plain_password, "pa ss#word");
        cr_expect_str_eq(c->auth_shared_secret, "s3cr3t");
        cr_expect(c->dns_rr);
        cr_expect_eq(c->ipversion_only, 6);
        cr_expect_str_eq(c->broker_socket, "/run/test/broker.sock");
        cr_expect_str_eq(c->broker_socket_group, "imapproxy");
        cr_expect_str_eq(c->admin_group, "imapadmin");
        cr_expect_eq(c->backend_timeout, 10);
        cr_expect_eq(c->client_prelogin_timeout, 20);
        cr_expect_eq(c->client_idle_timeout, 86400);
        cr_expect_eq(c->max_prelogin_line, 16384);
        cr_expect_eq(c->max_command_line, 1048576);
        cr_expect_eq(c->max_literal_size, UINT64_C(2) << 30);
        cr_expect_eq(c->server_tls, SERVER_TLS_IMPLICIT);
        cr_expect_str_eq(c->tls_server_name, "imap.example.org");
}

Test(config, keys_are_case_insensitive) {
        cr_assert_eq(load("SERVER_HOSTNAME a.example\n"
                          "Cache_Size 7\n"
                          "TLS_NO_TLSV1.1 yes\n"
                          "Tls_No_TlsV1.2 YES\n"
                          "MAX_LITERAL_SIZE 3k\n"),
                     0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "a.example");
        cr_expect_eq(L.c.cache_size, 7);
        cr_expect(L.c.tls_no_tlsv1_1);
        cr_expect(L.c.tls_no_tlsv1_2);
        cr_expect_eq(L.c.max_literal_size, 3072);
}

Test(config, dotted_keys_need_the_dot) {
        expect_error("tls_no_tlsv1_1 yes\n",
                     "t.conf:1: tls_no_tlsv1_1: unknown configuration key (did you mean 'tls_no_tlsv1.1'?)");
}

Test(config, booleans) {
        static const char *const yes[] = { "yes", "YES", "Yes", "y", "Y", "true", "TRUE", "on", "On", "1" };
        static const char *const no[] = { "no", "NO", "n", "N", "false", "False", "off", "OFF", "0" };
        static const char *const bad[] = { "maybe", "yess", "2", "ye", "o", "tru", "-1", "y e s", "00" };
        char line[128];

        for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
                L.c.dns_rr = false;
                snprintf(line, sizeof(line), "dns_rr %s\n", yes[i]);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                cr_expect(L.c.dns_rr, "%s", line);
        }
        for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
                L.c.dns_rr = true;
                snprintf(line, sizeof(line), "dns_rr %s\n", no[i]);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                cr_expect_not(L.c.dns_rr, "%s", line);
        }
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                char msg[256];
                snprintf(line, sizeof(line), "dns_rr %s\n", bad[i]);
                snprintf(msg, sizeof(msg),
                         "t.conf:1: dns_rr: invalid value '%s': expected yes or no (also y/n, "
                         "true/false, on/off, 1/0)",
                         bad[i]);
                expect_error(line, msg);
        }
}

Test(config, unsigned_numbers) {
        cr_expect_eq(load("cache_size 1\n"), 0);
        cr_expect_eq(L.c.cache_size, 1);
        cr_expect_eq(load("cache_size 1000000\n"), 0);
        cr_expect_eq(L.c.cache_size, 1000000);
        cr_expect_eq(load("cache_size 0010\n"), 0); /* decimal, not octal */
        cr_expect_eq(L.c.cache_size, 10);
        cr_expect_eq(load("connect_retries 4294967295\n"), 0);
        cr_expect_eq(L.c.connect_retries, UINT_MAX);

        static const char *const bad[] = {
                "0", "1000001", "+5", "-5", "5x", "0x10", "1e3", "5 5", "1K",
                "99999999999999999999999", "18446744073709551616", "4294967297",
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                char line[128], msg[256];
                snprintf(line, sizeof(line), "cache_size %s\n", bad[i]);
                snprintf(msg, sizeof(msg),
                         "t.conf:1: cache_size: invalid value '%s': expected a number from 1 to 1000000",
                         bad[i]);
                expect_error(line, msg);
        }
        expect_error("connect_retries 4294967296\n",
                     "t.conf:1: connect_retries: invalid value '4294967296': expected a number "
                     "from 0 to 4294967295");
}

Test(config, ranges) {
        static const struct {
                const char *key;
                const char *lo, *hi, *below, *above;
        } t[] = {
                { "cache_expiration_time", "0", "604800", NULL, "604801" },
                { "backend_timeout", "1", "86400", "0", "86401" },
                { "client_prelogin_timeout", "1", "86400", "0", "86401" },
                { "client_idle_timeout", "1", "86400", "0", "86401" },
                { "max_prelogin_line", "1024", "1048576", "1023", "1048577" },
                { "max_command_line", "1024", "16777216", "1023", "16777217" },
                { "max_literal_size", "1", "1099511627776", "0", "1099511627777" },
        };
        char line[128];

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                snprintf(line, sizeof(line), "%s %s\n", t[i].key, t[i].lo);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                snprintf(line, sizeof(line), "%s %s\n", t[i].key, t[i].hi);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                if (t[i].below) {
                        snprintf(line, sizeof(line), "%s %s\n", t[i].key, t[i].below);
                        cr_expect_eq(load(line), -EINVAL, "%s", line);
                }
                snprintf(line, sizeof(line), "%s %s\n", t[i].key, t[i].above);
                cr_expect_eq(load(line), -EINVAL, "%s", line);
                cr_expect(strstr(L.err, t[i].key), "%s", L.err);
        }
        expect_error("backend_timeout 0\n",
                     "t.conf:1: backend_timeout: invalid value '0': expected a number from 1 to 86400");
}

Test(config, sizes_with_suffixes) {
        cr_expect_eq(load("max_literal_size 1K\n"), 0);
        cr_expect_eq(L.c.max_literal_size, 1024);
        cr_expect_eq(load("max_literal_size 64k\n"), 0);
        cr_expect_eq(L.c.max_literal_size, 65536);
        cr_expect_eq(load("max_literal_size 10M\n"), 0);
        cr_expect_eq(L.c.max_literal_size, UINT64_C(10) << 20);
        cr_expect_eq(load("max_literal_size 1024G\n"), 0);
        cr_expect_eq(L.c.max_literal_size, UINT64_C(1) << 40);
        cr_expect_eq(load("max_literal_size 12345\n"), 0);
        cr_expect_eq(L.c.max_literal_size, 12345);
        cr_expect_eq(load("max_command_line 64K\n"), 0);
        cr_expect_eq(L.c.max_command_line, 65536);
        cr_expect_eq(load("max_prelogin_line 1m\n"), 0);
        cr_expect_eq(L.c.max_prelogin_line, 1048576);

        static const char *const bad[] = {
                "1025G", "1T", "K", "1KB", "1 K", "1k1", "-1K", "0K", "17179869184G", "18446744073709551615K",
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                char line[128], msg[256];
                snprintf(line, sizeof(line), "max_literal_size %s\n", bad[i]);
                snprintf(msg, sizeof(msg),
                         "t.conf:1: max_literal_size: invalid value '%s': expected a size from 1 to "
                         "1099511627776 bytes (suffixes K, M, G allowed)",
                         bad[i]);
                expect_error(line, msg);
        }
        cr_expect_eq(L.c.max_literal_size, 12345); /* failed loads changed nothing */
}

Test(config, syslog_facility) {
        static const struct {
                const char *name;
                int value;
        } t[] = {
                { "LOG_USER", LOG_USER },     { "LOG_MAIL", LOG_MAIL },   { "LOG_DAEMON", LOG_DAEMON },
                { "LOG_AUTH", LOG_AUTH },     { "LOG_LPR", LOG_LPR },     { "LOG_NEWS", LOG_NEWS },
                { "LOG_UUCP", LOG_UUCP },     { "LOG_CRON", LOG_CRON },   { "LOG_LOCAL0", LOG_LOCAL0 },
                { "LOG_LOCAL1", LOG_LOCAL1 }, { "LOG_LOCAL2", LOG_LOCAL2 }, { "LOG_LOCAL3", LOG_LOCAL3 },
                { "LOG_LOCAL4", LOG_LOCAL4 }, { "LOG_LOCAL5", LOG_LOCAL5 }, { "LOG_LOCAL6", LOG_LOCAL6 },
                { "LOG_LOCAL7", LOG_LOCAL7 }, { "log_daemon", LOG_DAEMON }, { "daemon", LOG_DAEMON },
                { "Local7", LOG_LOCAL7 },     { "LOG_AUTHPRIV", LOG_AUTHPRIV }, { "mail", LOG_MAIL },
        };
        char line[128];

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                L.c.syslog_facility = -1;
                snprintf(line, sizeof(line), "syslog_facility %s\n", t[i].name);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                cr_expect_eq(L.c.syslog_facility, t[i].value, "%s", line);
        }
        static const char *const bad[] = { "LOG_KERN", "kern", "LOG_", "LOG_LOCAL8", "LOG_MAILX", "16", "LOG__MAIL" };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                snprintf(line, sizeof(line), "syslog_facility %s\n", bad[i]);
                cr_expect_eq(load(line), -EINVAL, "%s", line);
                cr_expect(strstr(L.err, "t.conf:1: syslog_facility: invalid value '"), "%s", L.err);
                cr_expect(strstr(L.err, bad[i]), "%s", L.err);
        }
}

Test(config, syslog_prioritymask) {
        static const struct {
                const char *name;
                int value;
        } t[] = {
                { "LOG_EMERG", LOG_EMERG }, { "LOG_ALERT", LOG_ALERT },     { "LOG_CRIT", LOG_CRIT },
                { "LOG_ERR", LOG_ERR },     { "LOG_WARNING", LOG_WARNING }, { "LOG_NOTICE", LOG_NOTICE },
                { "LOG_INFO", LOG_INFO },   { "LOG_DEBUG", LOG_DEBUG },     { "debug", LOG_DEBUG },
                { "log_err", LOG_ERR },     { "Warning", LOG_WARNING },
        };
        char line[128];

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                L.c.syslog_prioritymask = -1;
                snprintf(line, sizeof(line), "syslog_prioritymask %s\n", t[i].name);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                cr_expect_eq(L.c.syslog_prioritymask, t[i].value, "%s", line);
        }
        expect_error("syslog_prioritymask LOG_TRACE\n",
                     "t.conf:1: syslog_prioritymask: invalid value 'LOG_TRACE': expected a syslog "
                     "priority: LOG_EMERG, LOG_ALERT, LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_NOTICE, "
                     "LOG_INFO or LOG_DEBUG");
        expect_error("syslog_prioritymask 7\n",
                     "t.conf:1: syslog_prioritymask: invalid value '7': expected a syslog "
                     "priority: LOG_EMERG, LOG_ALERT, LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_NOTICE, "
                     "LOG_INFO or LOG_DEBUG");
}

Test(config, ipversion_only) {
        cr_expect_eq(load("ipversion_only 4\n"), 0);
        cr_expect_eq(L.c.ipversion_only, 4);
        cr_expect_eq(load("ipversion_only 6\n"), 0);
        cr_expect_eq(L.c.ipversion_only, 6);
        cr_expect_eq(load("ipversion_only 0\n"), 0);
        cr_expect_eq(L.c.ipversion_only, 0);
        expect_error("ipversion_only 5\n",
                     "t.conf:1: ipversion_only: invalid value '5': expected 4 (IPv4 only), 6 (IPv6 "
                     "only) or 0 (both)");
        cr_expect_eq(load("ipversion_only ipv4\n"), -EINVAL);
        cr_expect_eq(load("ipversion_only 46\n"), -EINVAL);
}

Test(config, server_port) {
        static const char *const good[] = { "1", "143", "65535", "imap", "imap2", "my-imap_2.x" };
        static const char *const bad[] = { "0", "65536", "99999999999999999999", "-143", "143x",
                                           "im ap", "-imap", "imap:143", "[143]" };
        char line[128], msg[256];

        for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
                snprintf(line, sizeof(line), "server_port %s\n", good[i]);
                cr_expect_eq(load(line), 0, "%s: %s", line, L.err);
                cr_expect_str_eq(L.c.server_port, good[i]);
        }
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                snprintf(line, sizeof(line), "server_port %s\n", bad[i]);
                snprintf(msg, sizeof(msg),
                         "t.conf:1: server_port: invalid value '%s': expected a port number from 1 "
                         "to 65535 or a service name",
                         bad[i]);
                expect_error(line, msg);
        }
}

static void collect_check(void) {
        L.w.n = 0;
        config_check(&L.c, collect_warning, &L.w);
}

Test(config, server_port_993_warns_without_implicit_tls) {
        cr_expect_eq(load("server_port 993\n"), 0);
        cr_expect_eq(L.w.n, 0);
        collect_check();
        cr_expect_eq(L.w.n, 1);
        cr_expect(has_warning("server_port 993 (imaps) is the implicit-TLS port, but server_tls is not"));
        cr_expect_eq(load("server_port IMAPS\nserver_tls starttls\n"), 0);
        collect_check();
        cr_expect_eq(L.w.n, 1);
        /* order does not matter: the check sees the whole file */
        cr_expect_eq(load("server_tls implicit\nserver_port 993\n"), 0);
        collect_check();
        cr_expect_eq(L.w.n, 0, "%s", L.w.msg[0]);
        cr_expect_eq(load("server_port 143\nserver_tls none\n"), 0);
        collect_check();
        cr_expect_eq(L.w.n, 0);
}

Test(config, server_tls_values) {
        cr_expect_eq(load(""), 0);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_NONE);
        cr_expect_eq(load("server_tls STARTTLS\n"), 0, "%s", L.err);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_STARTTLS);
        cr_expect_eq(load("server_tls implicit\n"), 0, "%s", L.err);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_IMPLICIT);
        cr_expect_eq(load("server_tls none\n"), 0, "%s", L.err);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_NONE);
        cr_expect_str_eq(server_tls_to_string(SERVER_TLS_IMPLICIT), "implicit");
        expect_error("server_tls yes\n",
                     "t.conf:1: server_tls: invalid value 'yes': expected none, starttls or implicit "
                     "(TLS from the first byte, port 993)");
        cr_expect_eq(load("tls_server_name imap.example.org\n"), 0, "%s", L.err);
        cr_expect_str_eq(L.c.tls_server_name, "imap.example.org");
        expect_error("tls_server_name a b\n", "t.conf:1: tls_server_name: invalid value 'a b': expected a "
                                              "name without blanks, at most 255 bytes");
}

Test(config, broker_socket) {
        char line[256];

        cr_expect_eq(load("broker_socket /tmp/x.sock\n"), 0);
        cr_expect_str_eq(L.c.broker_socket, "/tmp/x.sock");
        expect_error("broker_socket run/broker.sock\n",
                     "t.conf:1: broker_socket: invalid value 'run/broker.sock': expected an "
                     "absolute path shorter than 108 bytes");
        /* 107 bytes fit sun_path with the NUL, 108 do not */
        snprintf(line, sizeof(line), "broker_socket /%0106d\n", 0);
        cr_expect_eq(load(line), 0, "%s", L.err);
        cr_expect_eq(strlen(L.c.broker_socket), 107);
        snprintf(line, sizeof(line), "broker_socket /%0107d\n", 0);
        cr_expect_eq(load(line), -EINVAL);
        cr_expect(strstr(L.err, "t.conf:1: broker_socket: invalid value '/000"), "%s", L.err);
        cr_expect(strstr(L.err, "...': expected an absolute path"), "long values are cut: %s", L.err);
}

Test(config, names_without_blanks) {
        expect_error("server_hostname imap example org\n",
                     "t.conf:1: server_hostname: invalid value 'imap example org': expected a name "
                     "without blanks, at most 255 bytes");
        expect_error("broker_socket_group mail users\n",
                     "t.conf:1: broker_socket_group: invalid value 'mail users': expected a name "
                     "without blanks, at most 255 bytes");
        cr_expect_eq(load("server_hostname ::1\n"), 0);
        cr_expect_str_eq(L.c.server_hostname, "::1");
        cr_expect_eq(load("server_hostname fe80::1%eth0\n"), 0);
        cr_expect_str_eq(L.c.server_hostname, "fe80::1%eth0");
}

/* ---- line syntax ---- */

Test(config, comments_blank_and_whitespace_only_lines) {
        cr_assert_eq(load("# comment\n"
                          "\n"
                          "   \n"
                          "\t\t\n"
                          " \t \r\n"
                          "   # indented comment\n"
                          "\t#server_hostname commented.example\n"
                          "#\n"
                          "server_hostname real.example\n"
                          "   \n"),
                     0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "real.example");
        cr_expect_eq(L.w.n, 0);
}

Test(config, crlf_and_no_final_newline) {
        cr_assert_eq(load("server_hostname crlf.example\r\n"
                          "\r\n"
                          "cache_size 42\r\n"
                          "auth_shared_secret abc\r\n"
                          "server_port 1143"),
                     0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "crlf.example");
        cr_expect_eq(L.c.cache_size, 42);
        cr_expect_str_eq(L.c.auth_shared_secret, "abc");
        cr_expect_str_eq(L.c.server_port, "1143");
        cr_expect_eq(load("cache_size 43\r"), 0);
        cr_expect_eq(L.c.cache_size, 43);
}

Test(config, hash_inside_value_is_kept) {
        cr_assert_eq(load("auth_shared_secret abc#def # not a comment\n"
                          "auth_sasl_plain_password #starts-with-hash\n"
                          "preauth_command ID (\"name\" \"#1\")\n"
                          "tls_ciphers ALL:!aNULL # trailing\n"),
                     0, "%s", L.err);
        cr_expect_str_eq(L.c.auth_shared_secret, "abc#def # not a comment");
        cr_expect_str_eq(L.c.auth_sasl_plain_password, "#starts-with-hash");
        cr_expect_str_eq(L.c.preauth_command, "ID (\"name\" \"#1\")");
        cr_expect_str_eq(L.c.tls_ciphers, "ALL:!aNULL # trailing");
}

Test(config, whitespace_around_key_and_value) {
        cr_assert_eq(load("  server_hostname \t  trimmed.example \t \r\n"
                          "\tstat_filename   /var/run/with inner  spaces  \n"
                          "cache_size\t\t99\t\n"),
                     0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "trimmed.example");
        cr_expect_str_eq(L.c.stat_filename, "/var/run/with inner  spaces");
        cr_expect_eq(L.c.cache_size, 99);
}

Test(config, utf8_bom_is_skipped) {
        cr_expect_eq(load("\xef\xbb\xbfserver_hostname bom.example\n"), 0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "bom.example");
}

/* ---- errors ---- */

Test(config, unknown_key) {
        expect_error("server_hostname a\n\nbogus_key 1\n", "t.conf:3: bogus_key: unknown configuration key");
        expect_error("tls_verify_sever yes\n",
                     "t.conf:1: tls_verify_sever: unknown configuration key (did you mean "
                     "'tls_verify_server'?)");
        expect_error("Cache_Sise 1\n",
                     "t.conf:1: Cache_Sise: unknown configuration key (did you mean 'cache_size'?)");
        /* the suggestion reaches distance 2 (two missing, two extra, two
         * changed letters) and no further; the search stops early on the
         * length difference and on a whole row over the limit */
        expect_error("cache_sie 1\n",
                     "t.conf:1: cache_sie: unknown configuration key (did you mean 'cache_size'?)");
        expect_error("cachesie 1\n",
                     "t.conf:1: cachesie: unknown configuration key (did you mean 'cache_size'?)");
        expect_error("cache_sizexx 1\n",
                     "t.conf:1: cache_sizexx: unknown configuration key (did you mean 'cache_size'?)");
        expect_error("cxche_sizx 1\n",
                     "t.conf:1: cxche_sizx: unknown configuration key (did you mean 'cache_size'?)");
        expect_error("cachsie 1\n", "t.conf:1: cachsie: unknown configuration key");
        expect_error("cache_sizexxx 1\n", "t.conf:1: cache_sizexxx: unknown configuration key");
        expect_error("xxxhe_size 1\n", "t.conf:1: xxxhe_size: unknown configuration key");
        /* a key alone on its line is still unknown before it is valueless */
        expect_error("\n\n\n\nbogus\n", "t.conf:5: bogus: unknown configuration key");
        /* control and 8-bit bytes are not echoed raw */
        expect_error("bo\x1bgus\xc3\xa9 1\n", "t.conf:1: bo?gus??: unknown configuration key");
}

Test(config, missing_value) {
        expect_error("server_hostname\n", "t.conf:1: server_hostname: missing value");
        expect_error("# c\ncache_size   \t \r\n", "t.conf:2: cache_size: missing value");
        expect_error("auth_shared_secret", "t.conf:1: auth_shared_secret: missing value");
}

Test(config, invalid_value_names_file_line_key) {
        expect_error("server_hostname a\n# x\n\ncache_size lots\n",
                     "t.conf:4: cache_size: invalid value 'lots': expected a number from 1 to 1000000");
        /* the first error wins; what came before it is applied */
        cr_expect_str_eq(L.c.server_hostname, "a");
}

Test(config, trailing_comment_is_part_of_the_value) {
        expect_error("cache_size 10 # connections\n",
                     "t.conf:1: cache_size: invalid value '10 # connections': expected a number "
                     "from 1 to 1000000 ('#' after a value is not a comment)");
        expect_error("dns_rr yes\t# round robin\n",
                     "t.conf:1: dns_rr: invalid value 'yes?# round robin': expected yes or no "
                     "(also y/n, true/false, on/off, 1/0) ('#' after a value is not a comment)");
}

Test(config, equals_sign_syntax_is_rejected) {
        expect_error("server_hostname=imap.example\n",
                     "t.conf:1: server_hostname: expected 'keyword value' separated by blanks, not '='");
        expect_error("cache_size = 5\n", "t.conf:1: cache_size: expected 'cache_size value', not 'cache_size = value'");
        expect_error("=x\n", "t.conf:1: expected 'keyword value' separated by blanks, not '='");
        /* '=' inside a value is fine */
        cr_expect_eq(load("tls_ciphers A=B\n"), 0);
        cr_expect_eq(load("auth_shared_secret =x=\n"), 0);
        cr_expect_str_eq(L.c.auth_shared_secret, "=x=");
}

Test(config, control_characters_in_values) {
        expect_error("preauth_command ID\rFOO\n",
                     "t.conf:1: preauth_command: invalid value 'ID?FOO': expected text without "
                     "control characters");
        expect_error("stat_filename /tmp/\x7f\n",
                     "t.conf:1: stat_filename: invalid value '/tmp/?': expected text without "
                     "control characters");
        /* a tab inside a value is kept */
        cr_expect_eq(load("auth_sasl_plain_username a\tb\n"), 0);
        cr_expect_str_eq(L.c.auth_sasl_plain_username, "a\tb");
}

Test(config, force_tls_is_a_synonym_of_server_tls_starttls) {
        cr_expect_eq(load("force_tls no\n"), 0);
        cr_expect_eq(L.w.n, 0);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_NONE);
        cr_expect_eq(load("\nforce_tls yes\n"), 0, "%s", L.err);
        cr_expect(L.c.force_tls);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_STARTTLS);
        collect_check();
        cr_expect(has_warning("force_tls yes: taken as server_tls starttls"));
        /* an explicit server_tls wins; force_tls only asks for some TLS */
        cr_expect_eq(load("force_tls yes\nserver_tls implicit\n"), 0, "%s", L.err);
        cr_expect_eq(config_server_tls(&L.c), SERVER_TLS_IMPLICIT);
}

Test(config, check_warns_about_unverified_tls) {
        cr_expect_eq(load("tls_verify_server no\n"), 0, "%s", L.err);
        collect_check();
        cr_expect(has_warning("tls_verify_server no: the backend's certificate is NOT checked"));
        cr_expect_eq(load("tls_cert_file /x.pem\n"), 0, "%s", L.err);
        collect_check();
        cr_expect(has_warning("tls_cert_file without tls_key_file"));
}

Test(config, long_lines) {
        char *buf = malloc(6000);
        size_t n;

        cr_assert_not_null(buf);
        /* exactly CONFIG_LINE_MAX bytes (plus CRLF) is fine */
        n = (size_t) snprintf(buf, 6000, "# one\n\nstat_filename /");
        memset(buf + n, 'a', CONFIG_LINE_MAX - strlen("stat_filename /"));
        n += CONFIG_LINE_MAX - strlen("stat_filename /");
        memcpy(buf + n, "\r\n", 2);
        cr_expect_eq(load_n(buf, n + 2), 0, "%s", L.err);
        cr_expect_eq(strlen(L.c.stat_filename), CONFIG_LINE_MAX - strlen("stat_filename "));

        /* one more is not */
        buf[n] = 'a';
        memcpy(buf + n + 1, "\n", 1);
        cr_expect_eq(load_n(buf, n + 2), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:3: stat_filename: line too long (4097 bytes, at most 4096)");

        /* a 5000-byte line of garbage on line 3, without final newline */
        n = (size_t) snprintf(buf, 6000, "cache_size 5\n\n");
        memset(buf + n, 'x', 5000);
        cr_expect_eq(load_n(buf, n + 5000), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:3: line too long (5000 bytes, at most 4096)");
        cr_expect_eq(L.c.cache_size, 5);

        /* a long comment is a long line too */
        buf[n] = '#';
        cr_expect_eq(load_n(buf, n + 5000), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:3: line too long (5000 bytes, at most 4096)");
        free(buf);
}

Test(config, nul_byte) {
        static const char in[] = "server_hostname a\ncache_size 1\0 2\n";
        static const char in2[] = "# comment\0 with nul\n";
        static const char in3[] = "\n\n\0";

        cr_expect_eq(load_n(in, sizeof(in) - 1), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:2: cache_size: NUL byte in line");
        cr_expect_eq(load_n(in2, sizeof(in2) - 1), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:1: NUL byte in line");
        cr_expect_eq(load_n(in3, sizeof(in3) - 1), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:3: NUL byte in line");
}

/* ---- secrets ---- */

Test(config, secrets_never_echoed) {
        static const char *const inputs[] = {
                "auth_shared_secret hunter2\x01\n",
                "auth_sasl_plain_password hunter2\x7f\n",
                "auth_shared_secret = hunter2\n",
                "auth_sasl_plain_password = hunter2\n",
                "auth_shared_secret=hunter2\n",
                "AUTH_SASL_PLAIN_PASSWORD=hunter2\n",
                "auth_shared_secret hunter2\rx\n",
        };

        for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
                cr_expect_eq(load(inputs[i]), -EINVAL, "%zu", i);
                cr_expect(strstr(L.err, "t.conf:1: "), "%s", L.err);
                cr_expect(strcasestr(L.err, "auth_"), "%s", L.err);
                cr_expect_null(strstr(L.err, "hunter"), "secret leaked: %s", L.err);
                for (unsigned j = 0; j < L.w.n; j++)
                        cr_expect_null(strstr(L.w.msg[j], "hunter"), "secret leaked: %s", L.w.msg[j]);
        }
        expect_error("auth_shared_secret x\x01y\n",
                     "t.conf:1: auth_shared_secret: invalid value: expected text without control characters");

        /* too long and NUL: the key is named, the value is not shown */
        char *buf = malloc(5100);
        cr_assert_not_null(buf);
        size_t n = (size_t) snprintf(buf, 5100, "auth_sasl_plain_password ");
        memset(buf + n, 'S', 5000);
        cr_expect_eq(load_n(buf, n + 5000), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:1: auth_sasl_plain_password: line too long (5025 bytes, at most 4096)");
        free(buf);
        static const char nul[] = "auth_shared_secret hun\0ter2\n";
        cr_expect_eq(load_n(nul, sizeof(nul) - 1), -EINVAL);
        cr_expect_str_eq(L.err, "t.conf:1: auth_shared_secret: NUL byte in line");
}

Test(config, secrets_in_warnings_and_dump) {
        /* proxy authentication is applied: no warnings, and never the values */
        cr_expect_eq(load("auth_shared_secret hunter2\nauth_sasl_plain_password hunter3\nlisten_port 1\n"), 0);
        cr_expect_eq(L.w.n, 1);
        for (unsigned j = 0; j < L.w.n; j++)
                cr_expect_null(strstr(L.w.msg[j], "hunter"), "%s", L.w.msg[j]);

        char *d = dump_to_string(&L.c);
        cr_expect_null(strstr(d, "hunter"), "%s", d);
        cr_expect(strstr(d, "\nauth_shared_secret (set)\n"), "%s", d);
        cr_expect(strstr(d, "\nauth_sasl_plain_password (set)\n"), "%s", d);
        free(d);
}

/* ---- warnings ---- */

Test(config, warnings_for_keys_not_applied) {
        static const struct {
                const char *line, *prefix;
        } t[] = {
                { "listen_port 143", "t.conf:1: listen_port: ignored by the daemons: the listening socket belongs to the launcher" },
                { "listen_address 127.0.0.1", "t.conf:1: listen_address: ignored by the daemons" },
                { "proc_username nobody", "t.conf:1: proc_username: not yet supported: run the broker under a service manager user" },
                { "proc_groupname nogroup", "t.conf:1: proc_groupname: not yet supported" },
                { "chroot_directory /var/empty", "t.conf:1: chroot_directory: not yet supported" },
                { "stat_filename /var/run/pimpstats", "t.conf:1: stat_filename: not supported: " },
                { "protocol_log_filename /x", "t.conf:1: protocol_log_filename: not supported: there is no protocol log file; use imapproxyctl trace USER" },
                { "foreground_mode no", "t.conf:1: foreground_mode: ignored: imapproxy-broker always runs in the foreground" },
                { "connect_retries 10", "t.conf:1: connect_retries: ignored: the broker connects per login" },
                { "connect_delay 5", "t.conf:1: connect_delay: ignored: the broker connects per login" },
                { "enable_select_cache yes", "t.conf:1: enable_select_cache: ignored: SELECT always goes to the server" },
                { "enable_admin_commands on", "t.conf:1: enable_admin_commands: not supported: the XPROXY_* admin commands are replaced by imapproxyctl" },
        };

        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                cr_expect_eq(load(t[i].line), 0, "%s: %s", t[i].line, L.err);
                cr_expect_eq(L.w.n, 1, "%s: %u warnings", t[i].line, L.w.n);
                cr_expect(has_warning(t[i].prefix), "%s: got '%s'", t[i].line, L.w.msg[0]);
        }
}

Test(config, warnings_once_per_occurrence_with_line) {
        cr_expect_eq(load("listen_port 143\n# x\nlisten_port 1143\nproc_username nobody\n"), 0);
        cr_expect_eq(L.w.n, 3);
        cr_expect(has_warning("t.conf:1: listen_port: "));
        cr_expect(has_warning("t.conf:3: listen_port: "));
        cr_expect(has_warning("t.conf:4: proc_username: "));
        cr_expect_str_eq(L.c.listen_port, "1143");
        /* no callback: still parses */
        cr_expect_eq(config_load_buffer(&L.c, "x", "listen_port 1\n", 14, NULL, NULL, NULL, 0), 0);
        cr_expect_str_eq(L.c.listen_port, "1");
}

Test(config, applied_keys_give_no_warning) {
        cr_expect_eq(load("preauth_command ID (\"GUID\" \"1\")\nauth_sasl_plain_username u\n"
                          "auth_sasl_plain_password p\nauth_shared_secret s\nforward_client_id yes\n"
                          "login_max_failures 5\nlogin_failure_delay 0\nmax_idle_per_user 2\n"), 0, "%s", L.err);
        cr_expect_eq(L.w.n, 0);
        cr_expect(L.c.forward_client_id);
        cr_expect_eq(L.c.login_max_failures, 5);
        cr_expect_eq(L.c.login_failure_delay, 0);
        cr_expect_eq(L.c.max_idle_per_user, 2);
        cr_expect_eq(load("login_max_failures 0\n"), -EINVAL);
        cr_expect(strstr(L.err, "t.conf:1: login_max_failures: invalid value '0'"), "%s", L.err);
}

Test(config, no_warnings_for_applied_keys_or_neutral_values) {
        cr_expect_eq(load("server_hostname h\nserver_port 143\ncache_size 5\ncache_expiration_time 60\n"
                          "syslog_facility LOG_MAIL\nsyslog_prioritymask LOG_DEBUG\n"
                          "send_tcp_keepalives yes\ndns_rr yes\nipversion_only 4\n"
                          "broker_socket /run/x.sock\nbroker_socket_group mail\nbackend_timeout 5\n"
                          "client_prelogin_timeout 5\nclient_idle_timeout 5\nmax_prelogin_line 2048\n"
                          "max_command_line 4096\nmax_literal_size 1M\n"
                          /* values that match what imapproxy does anyway */
                          "enable_select_cache no\nforeground_mode yes\nforce_tls no\n"
                          "enable_admin_commands no\n"),
                     0, "%s", L.err);
        cr_expect_eq(L.w.n, 0, "%s", L.w.msg[0]);
}

/* ---- duplicates ---- */

Test(config, duplicate_keys_last_one_wins) {
        cr_expect_eq(load("server_hostname first.example\n"
                          "auth_shared_secret one\n"
                          "cache_size 1\n"
                          "server_hostname second.example\n"
                          "auth_shared_secret two\n"
                          "cache_size 2\n"
                          "SERVER_HOSTNAME third.example\n"),
                     0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "third.example");
        cr_expect_str_eq(L.c.auth_shared_secret, "two");
        cr_expect_eq(L.c.cache_size, 2);
        /* a second load on top replaces strings (defaults included) */
        cr_expect_eq(load("server_port 10143\nbroker_socket /tmp/b.sock\n"), 0);
        cr_expect_str_eq(L.c.server_port, "10143");
        cr_expect_str_eq(L.c.broker_socket, "/tmp/b.sock");
        cr_expect_str_eq(L.c.server_hostname, "third.example");
}

/* ---- dump ---- */

Test(config, dump_lists_every_key) {
        static const char *const keys[] = {
                "server_hostname", "server_port", "connect_retries", "connect_delay", "cache_size",
                "listen_port", "listen_address", "cache_expiration_time", "proc_username",
                "proc_groupname", "stat_filename", "protocol_log_filename", "syslog_facility",
                "syslog_prioritymask", "send_tcp_keepalives", "enable_select_cache", "foreground_mode",
                "force_tls", "chroot_directory", "preauth_command", "enable_admin_commands",
                "tls_ca_file", "tls_ca_path", "tls_cert_file", "tls_key_file", "tls_verify_server",
                "tls_ciphers", "tls_no_tlsv1", "tls_no_tlsv1.1", "tls_no_tlsv1.2",
                "auth_sasl_plain_username", "auth_sasl_plain_password", "auth_shared_secret", "dns_rr",
                "ipversion_only", "broker_socket", "broker_socket_group", "admin_group", "backend_timeout",
                "client_prelogin_timeout", "client_idle_timeout", "backend_response_timeout", "backend_link_timeout",
                "max_prelogin_line",
                "max_command_line", "max_literal_size", "login_max_failures", "login_failure_delay",
                "forward_client_id", "max_idle_per_user", "listen_tls_cert_file", "listen_tls_key_file",
                "listen_tls_priority", "listen_tls_ticket_key_file", "login_requires_tls",
                "server_tls", "tls_server_name",
        };
        char *d = dump_to_string(&L.c), *nl;
        size_t lines = 0;

        for (const char *q = d; (nl = strchr(q, '\n')); q = nl + 1)
                lines++;
        cr_expect_eq(lines, sizeof(keys) / sizeof(keys[0]), "%s", d);
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
                char pat[64];
                snprintf(pat, sizeof(pat), "%s ", keys[i]);
                cr_expect(strncmp(d, pat, strlen(pat)) == 0 || strstr(d, pat), "missing %s", keys[i]);
        }
        cr_expect(strstr(d, "server_hostname (unset)\n"), "%s", d);
        cr_expect(strstr(d, "\nserver_port 143\n"), "%s", d);
        cr_expect(strstr(d, "\ncache_size 3072\n"), "%s", d);
        cr_expect(strstr(d, "\nsyslog_facility LOG_MAIL\n"), "%s", d);
        cr_expect(strstr(d, "\nsyslog_prioritymask LOG_INFO\n"), "%s", d);
        cr_expect(strstr(d, "\ntls_verify_server yes\n"), "%s", d);
        cr_expect(strstr(d, "\nserver_tls none\n"), "%s", d);
        cr_expect(strstr(d, "\nauth_shared_secret (unset)\n"), "%s", d);
        cr_expect(strstr(d, "\nbroker_socket /run/imapproxy/broker.sock\n"), "%s", d);
        cr_expect(strstr(d, "\nmax_literal_size 1073741824\n"), "%s", d);
        free(d);
}

Test(config, client_tls_keys) {
        cr_expect_null(L.c.listen_tls_cert_file);
        cr_expect_null(L.c.listen_tls_priority);
        cr_expect_not(L.c.login_requires_tls);
        cr_assert_eq(load("listen_tls_cert_file /etc/imapproxy/cert.pem\n"
                          "listen_tls_key_file /etc/imapproxy/key.pem\n"
                          "listen_tls_priority NORMAL:-VERS-ALL:+VERS-TLS1.3\n"
                          "listen_tls_ticket_key_file /etc/imapproxy/ticket.key\n"
                          "login_requires_tls yes\n"), 0, "%s", L.err);
        cr_expect_eq(L.w.n, 0, "client TLS keys are applied, not warned about: %s", L.w.msg[0]);
        cr_expect_str_eq(L.c.listen_tls_cert_file, "/etc/imapproxy/cert.pem");
        cr_expect_str_eq(L.c.listen_tls_key_file, "/etc/imapproxy/key.pem");
        cr_expect_str_eq(L.c.listen_tls_priority, "NORMAL:-VERS-ALL:+VERS-TLS1.3");
        cr_expect_str_eq(L.c.listen_tls_ticket_key_file, "/etc/imapproxy/ticket.key");
        cr_expect(L.c.login_requires_tls);
        expect_error("login_requires_tls maybe\n",
                     "t.conf:1: login_requires_tls: invalid value 'maybe': expected yes or no (also y/n, "
                     "true/false, on/off, 1/0)");
}

Test(config, dump_of_a_full_config_loads_back) {
        Config c2;
        char err[512];

        cr_assert_eq(load(all_keys), 0, "%s", L.err);
        /* secrets print as "(set)" and cannot round-trip: unset them, and
         * blank their "(unset)" lines in the text that is loaded back */
        free(L.c.auth_sasl_plain_password);
        L.c.auth_sasl_plain_password = NULL;
        free(L.c.auth_shared_secret);
        L.c.auth_shared_secret = NULL;
        char *d = dump_to_string(&L.c), *in = strdup(d), *q;
        cr_assert_not_null(in);
        static const char *const blank[] = { "auth_sasl_plain_password (unset)", "auth_shared_secret (unset)" };
        for (size_t i = 0; i < 2; i++) {
                q = strstr(in, blank[i]);
                cr_assert_not_null(q);
                memset(q, ' ', strlen(blank[i]));
        }
        cr_expect_null(strstr(in, "(unset)"), "%s", in);

        cr_assert_eq(config_init(&c2), 0);
        cr_expect_eq(config_load_buffer(&c2, "dump", in, strlen(in), NULL, NULL, err, sizeof(err)), 0,
                     "%s", err);
        char *d2 = dump_to_string(&c2);
        cr_expect_str_eq(d2, d);
        free(d);
        free(d2);
        free(in);
        config_done(&c2);
}

/* ---- err buffer ---- */

Test(config, small_or_missing_err_buffer) {
        char small[12];

        memset(small, 'Z', sizeof(small));
        cr_expect_eq(config_load_buffer(&L.c, "t.conf", "bogus 1\n", 8, NULL, NULL, small, sizeof(small)), -EINVAL);
        cr_expect_str_eq(small, "t.conf:1: b");
        cr_expect_eq(config_load_buffer(&L.c, "t.conf", "bogus 1\n", 8, NULL, NULL, NULL, 0), -EINVAL);
        cr_expect_eq(config_load_buffer(&L.c, "t.conf", "bogus 1\n", 8, NULL, NULL, small, 1), -EINVAL);
        cr_expect_eq(small[0], 0);
        cr_expect_eq(config_load_buffer(&L.c, NULL, "bogus 1\n", 8, NULL, NULL, L.err, sizeof(L.err)), -EINVAL);
        cr_expect_str_eq(L.err, "(config):1: bogus: unknown configuration key");
}

/* ---- files ---- */

Test(config, missing_file) {
        int r = config_load_file(&L.c, "/nonexistent/imapproxy.conf", collect_warning, &L.w, L.err,
                                 sizeof(L.err));
        cr_expect_eq(r, -ENOENT);
        cr_expect_str_eq(L.err, "/nonexistent/imapproxy.conf: No such file or directory");
}

Test(config, directory_is_an_error) {
        cr_expect_eq(config_load_file(&L.c, "/", NULL, NULL, L.err, sizeof(L.err)), -EISDIR);
        cr_expect_str_eq(L.err, "/: Is a directory");
}

Test(config, file_too_large) {
        char path[] = "/tmp/test-config-XXXXXX";
        int fd = mkstemp(path);
        char *buf = malloc(CONFIG_FILE_MAX + 1);

        cr_assert_geq(fd, 0);
        cr_assert_not_null(buf);
        memset(buf, '\n', CONFIG_FILE_MAX + 1);
        cr_assert_eq(write(fd, buf, CONFIG_FILE_MAX + 1), CONFIG_FILE_MAX + 1);
        cr_expect_eq(config_load_file(&L.c, path, NULL, NULL, L.err, sizeof(L.err)), -EFBIG);
        cr_expect(strstr(L.err, ": file too large (more than 1 MiB)"), "%s", L.err);

        /* exactly CONFIG_FILE_MAX is fine */
        cr_assert_eq(ftruncate(fd, CONFIG_FILE_MAX), 0);
        cr_expect_eq(config_load_file(&L.c, path, NULL, NULL, L.err, sizeof(L.err)), 0, "%s", L.err);
        close(fd);
        unlink(path);
        free(buf);
}

Test(config, file_errors_name_the_path) {
        char path[] = "/tmp/test-config-XXXXXX";
        int fd = mkstemp(path);
        static const char text[] = "server_hostname h\nlisten_port 1143\ncache_size 0\n";
        char expect[256];

        cr_assert_geq(fd, 0);
        cr_assert_eq(write(fd, text, sizeof(text) - 1), (ssize_t) sizeof(text) - 1);
        close(fd);
        cr_expect_eq(config_load_file(&L.c, path, collect_warning, &L.w, L.err, sizeof(L.err)), -EINVAL);
        snprintf(expect, sizeof(expect),
                 "%s:3: cache_size: invalid value '0': expected a number from 1 to 1000000", path);
        cr_expect_str_eq(L.err, expect);
        snprintf(expect, sizeof(expect), "%s:2: listen_port: ", path);
        cr_expect(has_warning(expect));
        unlink(path);
}

Test(config, file_from_a_pipe) {
        int p[2];

        cr_assert_eq(pipe(p), 0);
        cr_assert_eq(write(p[1], "cache_size 77\n", 14), 14);
        close(p[1]);
        char path[64];
        snprintf(path, sizeof(path), "/proc/self/fd/%d", p[0]);
        cr_expect_eq(config_load_file(&L.c, path, NULL, NULL, L.err, sizeof(L.err)), 0, "%s", L.err);
        cr_expect_eq(L.c.cache_size, 77);
        close(p[0]);
}

static void load_data_file(const char *name) {
        char *path = data_path(name);
        int r = config_load_file(&L.c, path, collect_warning, &L.w, L.err, sizeof(L.err));

        cr_assert_eq(r, 0, "%s: %s (%d)", path, L.err, r);
        cr_expect_str_eq(L.err, "");
        for (unsigned i = 0; i < L.w.n; i++)
                cr_expect(strncmp(L.w.msg[i], path, strlen(path)) == 0, "%s", L.w.msg[i]);
        free(path);
}

static void expect_warned_keys(const char *const *keys, size_t n) {
        cr_expect_eq(L.w.n, n);
        for (size_t i = 0; i < n && i < L.w.n; i++) {
                char pat[64];
                snprintf(pat, sizeof(pat), ": %s: ", keys[i]);
                cr_expect(strstr(L.w.msg[i], pat), "warning %zu: %s, wanted %s", i, L.w.msg[i], keys[i]);
        }
}

Test(config, debian_shipped_example_loads) {
        static const char *const warned[] = {
                "connect_retries", "connect_delay",   "listen_port",           "proc_username",
                "proc_groupname",  "stat_filename",   "protocol_log_filename", "foreground_mode",
                "chroot_directory",
        };

        load_data_file("debian-example-imapproxy.conf");
        expect_warned_keys(warned, sizeof(warned) / sizeof(warned[0]));
        cr_expect_str_eq(L.c.server_hostname, "your.imap.server.com");
        cr_expect_str_eq(L.c.server_port, "143");
        cr_expect_eq(L.c.cache_size, 3072);
        cr_expect_eq(L.c.cache_expiration_time, 300);
        cr_expect_eq(L.c.syslog_facility, LOG_MAIL);
        cr_expect_str_eq(L.c.chroot_directory, "/var/lib/imapproxy/chroot");
        cr_expect_not(L.c.send_tcp_keepalives);
}

Test(config, debian_etc_config_loads) {
        static const char *const warned[] = {
                "connect_retries", "connect_delay",   "listen_port",           "proc_username",
                "proc_groupname",  "stat_filename",   "protocol_log_filename", "foreground_mode",
                "chroot_directory",
        };

        load_data_file("debian-etc-imapproxy.conf");
        expect_warned_keys(warned, sizeof(warned) / sizeof(warned[0]));
        cr_expect_str_eq(L.c.server_hostname, "localhost");
        cr_expect_str_eq(L.c.listen_port, "1143");
}

Test(config, upstream_default_config_loads) {
        static const char *const warned[] = {
                "connect_retries", "connect_delay",   "listen_port",           "proc_username",
                "proc_groupname",  "stat_filename",   "protocol_log_filename", "foreground_mode",
        };

        /* ends with a line holding one space: fatal for up-imapproxy */
        load_data_file("upstream-imapproxy.conf");
        expect_warned_keys(warned, sizeof(warned) / sizeof(warned[0]));
        cr_expect_str_eq(L.c.server_hostname, "your.imap.server.com");
        cr_expect_str_eq(L.c.proc_groupname, "nobody");
        cr_expect_null(L.c.chroot_directory);
}

Test(config, our_annotated_default_config_loads) {
        char *path = data_path("../../../imapproxy.conf");
        int r = config_load_file(&L.c, path, collect_warning, &L.w, L.err, sizeof(L.err));

        cr_expect_eq(r, 0, "%s", L.err);
        cr_expect_eq(L.w.n, 0, "our own file must not warn: %s", L.w.msg[0]);
        free(path);

        /* and it states the defaults: same dump as config_init() */
        Config d;
        cr_assert_eq(config_init(&d), 0);
        char *a = dump_to_string(&L.c), *b = dump_to_string(&d);
        cr_expect_str_eq(a, b);
        free(a);
        free(b);
        config_done(&d);
}

/* ---- drop-in directory: FILE.d/NAME.conf ---- */

typedef struct TmpTree {
        char dir[64];
        char main[128];
        char dropins[160];
} TmpTree;

static void write_file(const char *path, const char *text) {
        FILE *f = fopen(path, "w");
        cr_assert_not_null(f, "%s", path);
        cr_assert_eq(fputs(text, f) >= 0, 1);
        cr_assert_eq(fclose(f), 0);
}

static void tree_make(TmpTree *t, const char *main_text) {
        snprintf(t->dir, sizeof(t->dir), "/tmp/test-config-dropin-XXXXXX");
        cr_assert_not_null(mkdtemp(t->dir));
        snprintf(t->main, sizeof(t->main), "%s/imapproxy.conf", t->dir);
        snprintf(t->dropins, sizeof(t->dropins), "%s/imapproxy.conf.d", t->dir);
        write_file(t->main, main_text);
}

static void tree_dropin(TmpTree *t, const char *name, const char *text) {
        char p[256];
        (void) mkdir(t->dropins, 0755);
        snprintf(p, sizeof(p), "%s/%s", t->dropins, name);
        write_file(p, text);
}

static void tree_remove(TmpTree *t) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", t->dir);
        cr_expect_eq(system(cmd), 0);
}

static int tree_load(TmpTree *t) {
        L.w.n = 0;
        L.r = config_load(&L.c, t->main, collect_warning, &L.w, L.err, sizeof(L.err));
        return L.r;
}

Test(config, dropins_missing_directory_is_fine) {
        TmpTree t;
        tree_make(&t, "server_hostname main\ncache_size 10\n");
        cr_expect_eq(tree_load(&t), 0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "main");
        cr_expect_eq(L.c.cache_size, 10);
        tree_remove(&t);
}

Test(config, dropins_override_in_lexical_order) {
        TmpTree t;
        tree_make(&t, "server_hostname main\ncache_size 10\ncache_expiration_time 5\nbackend_timeout 7\n");
        tree_dropin(&t, "20-b.conf", "cache_size 20\nserver_hostname twenty\n");
        tree_dropin(&t, "10-a.conf", "cache_size 11\ncache_expiration_time 6\n");
        tree_dropin(&t, "30-c.conf", "# only a comment\n\n");
        tree_dropin(&t, "Z-upper.conf", "backend_timeout 9\n"); /* bytes: '1' < '3' < 'Z': read last */
        tree_dropin(&t, "ignored.conf.orig", "cache_size 999\n");
        tree_dropin(&t, ".hidden.conf", "cache_size 998\n");
        tree_dropin(&t, "README", "not a config file at all\n");
        cr_assert_eq(tree_load(&t), 0, "%s", L.err);
        cr_expect_str_eq(L.c.server_hostname, "twenty");
        cr_expect_eq(L.c.cache_size, 20);
        cr_expect_eq(L.c.cache_expiration_time, 6);
        cr_expect_eq(L.c.backend_timeout, 9);
        tree_remove(&t);
}

Test(config, dropin_error_names_the_dropin_file_and_line) {
        TmpTree t;
        char expect[512];
        tree_make(&t, "server_hostname main\n");
        tree_dropin(&t, "10-ok.conf", "cache_size 20\n");
        tree_dropin(&t, "50-bad.conf", "# backend\nserver_port 1143\ncache_size many\n");
        cr_expect_eq(tree_load(&t), -EINVAL);
        snprintf(expect, sizeof(expect),
                 "%s/50-bad.conf:3: cache_size: invalid value 'many': expected a number from 1 to 1000000", t.dropins);
        cr_expect_str_eq(L.err, expect);
        tree_remove(&t);
}

Test(config, dropin_warnings_name_the_dropin_file) {
        TmpTree t;
        char expect[512];
        tree_make(&t, "server_hostname main\n");
        tree_dropin(&t, "10-x.conf", "\nlisten_port 1143\n");
        cr_expect_eq(tree_load(&t), 0, "%s", L.err);
        snprintf(expect, sizeof(expect), "%s/10-x.conf:2: listen_port: ", t.dropins);
        cr_expect(has_warning(expect), "%s", L.w.n ? L.w.msg[0] : "(no warning)");
        tree_remove(&t);
}

Test(config, dropin_directory_that_is_a_file_is_an_error) {
        TmpTree t;
        char expect[512];
        tree_make(&t, "server_hostname main\n");
        write_file(t.dropins, "cache_size 5\n");
        cr_expect_eq(tree_load(&t), -ENOTDIR);
        snprintf(expect, sizeof(expect), "%s: Not a directory", t.dropins);
        cr_expect_str_eq(L.err, expect);
        tree_remove(&t);
}

Test(config, missing_main_file_reads_no_dropins) {
        TmpTree t;
        tree_make(&t, "");
        tree_dropin(&t, "10-x.conf", "cache_size 5\n");
        cr_assert_eq(unlink(t.main), 0);
        cr_expect_eq(tree_load(&t), -ENOENT);
        cr_expect_eq(L.c.cache_size, 3072);
        tree_remove(&t);
}

Test(config, too_many_dropins) {
        TmpTree t;
        tree_make(&t, "server_hostname main\n");
        for (int i = 0; i <= CONFIG_DROPINS_MAX; i++) {
                char n[32];
                snprintf(n, sizeof(n), "%03d.conf", i);
                tree_dropin(&t, n, "cache_size 5\n");
        }
        cr_expect_eq(tree_load(&t), -E2BIG);
        cr_expect(strstr(L.err, "more than 128"), "%s", L.err);
        tree_remove(&t);
}

static char *dump_origins_to_string(const Config *c) {
        char *out = NULL;
        size_t size = 0;
        FILE *f = open_memstream(&out, &size);

        cr_assert_not_null(f);
        config_dump_origins(c, f);
        cr_assert_eq(fclose(f), 0);
        return out;
}

Test(config, dump_origins_say_where_each_value_came_from) {
        TmpTree t;
        char expect[512];
        tree_make(&t, "server_hostname main\n\ncache_size 10\n");
        tree_dropin(&t, "10-a.conf", "# x\ncache_size 11\n");
        cr_assert_eq(tree_load(&t), 0, "%s", L.err);
        char *d = dump_origins_to_string(&L.c);
        snprintf(expect, sizeof(expect), "# effective settings, read from: %s %s/10-a.conf\n", t.main, t.dropins);
        cr_expect(strncmp(d, expect, strlen(expect)) == 0, "%s", d);
        snprintf(expect, sizeof(expect), "# %s:1\nserver_hostname main\n", t.main);
        cr_expect(strstr(d, expect), "%s", d);
        snprintf(expect, sizeof(expect), "# %s/10-a.conf:2\ncache_size 11\n", t.dropins);
        cr_expect(strstr(d, expect), "%s", d);
        cr_expect(strstr(d, "# default\nserver_port 143\n"), "%s", d);

        free(d);
        tree_remove(&t);
}

static void count_diff(void *userdata, const char *key) {
        char *out = userdata;
        strncat(out, key, 255 - strlen(out));
        strncat(out, " ", 255 - strlen(out));
}

Test(config, diff_lists_changed_keys) {
        Config c2;
        char keys[256] = "";
        cr_assert_eq(load("server_hostname a\ncache_size 5\nauth_shared_secret s1\n"), 0, "%s", L.err);
        cr_assert_eq(config_init(&c2), 0);
        static const char other[] = "server_hostname a\ncache_size 6\nauth_shared_secret s2\ndns_rr yes\n";
        cr_assert_eq(config_load_buffer(&c2, "b", other, sizeof(other) - 1, NULL, NULL, L.err, sizeof(L.err)), 0,
                     "%s", L.err);
        cr_expect_eq(config_diff(&L.c, &c2, count_diff, keys), 3);
        cr_expect_str_eq(keys, "cache_size auth_shared_secret dns_rr ");
        cr_expect_eq(config_diff(&L.c, &L.c, NULL, NULL), 0);
        config_done(&c2);
}
