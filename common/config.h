/*
 * config.h -- imapproxy.conf reader (up-imapproxy's format). See config.c
 * and imapproxy.conf(5).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CONFIG_LINE_MAX 4096           /* bytes per line, without the line end */
#define CONFIG_FILE_MAX (1024 * 1024)  /* bytes config_load_file() reads at most */
#define CONFIG_DROPINS_MAX 128         /* FILE.d/NAME.conf files config_load() reads at most */
#define CONFIG_KEYS_MAX 64             /* rows of config_keys[] (checked in config.c) */

#ifndef SYSCONFDIR
#define SYSCONFDIR "/etc"
#endif
#define CONFIG_DEFAULT_PATH SYSCONFDIR "/imapproxy.conf"

/* Client TLS without listen_tls_priority: TLS 1.2 and 1.3 only, AEAD ciphers
 * only, forward-secret key exchange only, the server's preference. */
#define CONFIG_TLS_PRIORITY_DEFAULT                                                               \
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM:+CHACHA20-POLY1305:" \
        "+AES-128-GCM:-MAC-ALL:+AEAD:-KX-ALL:+ECDHE-ECDSA:+ECDHE-RSA:%SERVER_PRECEDENCE"

/* server_tls: how the broker talks to the backend. */
typedef enum ServerTls {
        SERVER_TLS_NONE,     /* plain IMAP (STARTTLS anyway when the server says LOGINDISABLED) */
        SERVER_TLS_STARTTLS, /* STARTTLS before anything else; never log in without it */
        SERVER_TLS_IMPLICIT, /* TLS from the first byte (port 993) */
        _SERVER_TLS_MAX,
} ServerTls;

typedef struct Config {
        /* ---- up-imapproxy 1.2.8 keys ---- */
        char *server_hostname;         /* backend host (name or address); required by the broker */
        char *server_port;             /* backend port/service; default "143" */
        unsigned connect_retries;      /* accepted; not used (backend tried per login) */
        unsigned connect_delay;        /* accepted; not used */
        unsigned cache_size;           /* max backend connections, lent + idle; default 3072 */
        char *listen_port;             /* launcher's business; read by scripts/imapproxy-run */
        char *listen_address;          /* idem */
        unsigned cache_expiration_time; /* seconds an idle pooled connection lives; default 300 */
        char *proc_username;
        char *proc_groupname;
        char *stat_filename;
        char *protocol_log_filename;
        int syslog_facility;           /* LOG_* facility; default LOG_MAIL */
        int syslog_prioritymask;       /* max LOG_* level logged; default LOG_INFO */
        bool send_tcp_keepalives;
        bool enable_select_cache;      /* accepted; SELECT always goes to the server */
        bool foreground_mode;          /* accepted; we always run in the foreground */
        bool force_tls;                /* up-imapproxy's synonym of server_tls starttls */
        char *chroot_directory;
        char *preauth_command;
        bool enable_admin_commands;
        char *tls_ca_file;
        char *tls_ca_path;
        char *tls_cert_file;
        char *tls_key_file;
        bool tls_verify_server;
        char *tls_ciphers;
        bool tls_no_tlsv1;
        bool tls_no_tlsv1_1;
        bool tls_no_tlsv1_2;
        char *auth_sasl_plain_username;
        char *auth_sasl_plain_password; /* secret */
        char *auth_shared_secret;       /* secret */
        bool dns_rr;                   /* round-robin new connections over resolved addresses */
        unsigned ipversion_only;       /* 4, 6, or 0 for both */

        /* ---- imapproxy keys ---- */
        char *broker_socket;           /* default IPC_DEFAULT_SOCKET */
        char *broker_socket_group;     /* group allowed to connect (besides root and the broker's uid) */
        char *admin_group;             /* group allowed to use imapproxyctl (besides root) */
        unsigned backend_timeout;      /* s: connect, greeting, login, each backend reply; default 30 */
        unsigned client_prelogin_timeout; /* s: client idle before login; default 60 */
        unsigned client_idle_timeout;  /* s: client idle after login; default 1800 */
        unsigned backend_response_timeout; /* s: backend silent while a command runs; default 300 */
        unsigned backend_link_timeout; /* s: TCP_USER_TIMEOUT + keepalive on backend sockets; 0 = kernel's; default 60 */
        unsigned max_prelogin_line;    /* bytes; default 40960 (a 30 KB ID must pass) */
        unsigned max_command_line;     /* bytes after login; default 262144 */
        uint64_t max_literal_size;     /* bytes after login; default 1 GiB */
        unsigned login_max_failures;   /* failed logins before the client is disconnected; default 3 */
        unsigned login_failure_delay;  /* ms: a failed login is answered no sooner; default 2000 */
        bool forward_client_id;        /* send the client's ID + x-originating-* before LOGIN */
        unsigned max_idle_per_user;    /* idle pooled connections kept per user; default 8 */

        /* ---- client-side TLS (terminated in the session; imapproxy-session(8)) ---- */
        char *listen_tls_cert_file;    /* PEM chain, server certificate first; STARTTLS is offered iff set */
        char *listen_tls_key_file;     /* PEM private key; default: listen_tls_cert_file */
        char *listen_tls_priority;     /* GnuTLS priority string; NULL: CONFIG_TLS_PRIORITY_DEFAULT */
        char *listen_tls_ticket_key_file; /* 64-byte TLS 1.3 ticket master key shared by all sessions */
        bool login_requires_tls;       /* LOGIN/AUTHENTICATE only after TLS; LOGINDISABLED before */

        /* ---- where each value came from (config_dump_origins()) ---- */
        struct {
                unsigned file;         /* 1 + index into files[]; 0: the built-in default */
                unsigned line;
        } origin[CONFIG_KEYS_MAX];     /* indexed like config_keys[] in config.c */
        char **files;                  /* names of the files/buffers parsed, in order */
        unsigned n_files;
        unsigned server_tls;           /* ServerTls as written; see config_server_tls() */
        char *tls_server_name;         /* name checked against the backend's certificate, sent as SNI */
} Config;

/* Called once per occurrence of a key that is accepted but not applied (or
 * applied with a caveat, e.g. server_port 993); msg is "FILE:LINE: KEY: why"
 * and never contains the value of a secret. warn may be NULL. */
typedef void (*ConfigWarnFn)(void *userdata, const char *msg);

/* Defaults for every field (strings that have a default are strdup'ed). 0 or -ENOMEM. */
int config_init(Config *c);

/* Parse a file / a buffer (name is used in messages) on top of what c holds.
 * Returns 0, -EINVAL with err = "FILE:LINE: KEY: reason", or for the file:
 * -ENOENT, -EISDIR, -EFBIG (over CONFIG_FILE_MAX), -errno of open/read, with
 * err = "FILE: reason". err is NUL-terminated, truncated to errsize, may be
 * NULL if errsize is 0, and is "" on success.
 * On failure c may be partially updated: parse into a fresh Config and swap. */
int config_load_file(Config *c, const char *path, ConfigWarnFn warn, void *userdata, char *err,
                     size_t errsize);
int config_load_buffer(Config *c, const char *name, const char *buf, size_t len, ConfigWarnFn warn,
                       void *userdata, char *err, size_t errsize);

/* The main file, then its drop-ins: every regular "*.conf" file (not starting
 * with '.') in the directory "PATH.d", in byte order of the names (C locale),
 * each on top of what came before, so a later value overrides. A missing
 * PATH.d is fine; PATH.d that is not a directory, an unreadable drop-in or more
 * than CONFIG_DROPINS_MAX of them is an error naming it. Returns what
 * config_load_file() returns; -ENOENT only when PATH itself is missing (then
 * no drop-in is read). Errors name the drop-in file and line. */
int config_load(Config *c, const char *path, ConfigWarnFn warn, void *userdata, char *err, size_t errsize);

/* Frees strings (wiping secrets first). Accepts a zeroed or half-built Config. */
void config_done(Config *c);

/* Print "key value" for every key (secrets shown as "(set)"). */
/* The backend TLS mode in effect: server_tls, or STARTTLS when only
 * up-imapproxy's force_tls yes asks for TLS. */
ServerTls config_server_tls(const Config *c);

/* Name for a ServerTls value ("none", "starttls", "implicit"). */
const char *server_tls_to_string(ServerTls t);

/* Consistency warnings that need the whole file (e.g. server_port 993 without
 * server_tls implicit); call once after the last load. warn may be NULL. */
void config_check(const Config *c, ConfigWarnFn warn, void *userdata);

/* Print "key value" for every key (secrets shown as "(set)"), for --check-config. */
void config_dump(const Config *c, FILE *f);
/* The same, each line preceded by a comment saying where the value came
 * from ("# FILE:LINE" or "# default"), for --check-config. */
void config_dump_origins(const Config *c, FILE *f);

/* Calls fn for every key whose value differs between a and b (secrets are
 * compared, never passed on). Returns the number of such keys. */
typedef void (*ConfigDiffFn)(void *userdata, const char *key);
unsigned config_diff(const Config *a, const Config *b, ConfigDiffFn fn, void *userdata);
