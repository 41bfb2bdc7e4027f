/*
 * config.c -- imapproxy.conf reader (up-imapproxy 1.2.8 format, strict errors)
 *
 * SYNOPSIS
 *	int config_init(Config *c);
 *	int config_load_file(Config *c, const char *path, ConfigWarnFn warn, void *userdata,
 *	                     char *err, size_t errsize);
 *	int config_load_buffer(Config *c, const char *name, const char *buf, size_t len,
 *	                       ConfigWarnFn warn, void *userdata, char *err, size_t errsize);
 *	int config_load(Config *c, const char *path, ConfigWarnFn warn, void *userdata,
 *	                char *err, size_t errsize);
 *	void config_done(Config *c);
 *	void config_dump(const Config *c, FILE *f);
 *	void config_dump_origins(const Config *c, FILE *f);
 *	unsigned config_diff(const Config *a, const Config *b, ConfigDiffFn fn, void *userdata);
 *	ServerTls config_server_tls(const Config *c);
 *	void config_check(const Config *c, ConfigWarnFn warn, void *userdata);
 * DESCRIPTION
 *	One "keyword value" per line. The keyword is case-insensitive and ends at
 *	the first blank (space or tab); the value is the rest of the line after
 *	the blanks, with trailing whitespace (CR included) removed. A line whose
 *	first non-blank byte is '#' is a comment; a '#' anywhere else belongs to
 *	the value (passwords may contain it). Blank lines are fine (up-imapproxy
 *	died on whitespace-only lines). A leading UTF-8 BOM is skipped.
 *
 *	Every key is one row of config_keys[] below: name, type, field offset,
 *	range, flags and, for a key that is accepted but not applied, the reason
 *	given to the warning callback. A key given twice: the last one wins.
 *
 *	config_load() reads the main file and then its drop-ins, PATH.d/NAME.conf
 *	in byte order of the names (systemd's convention): packagers and
 *	configuration management put one concern per file there instead of
 *	editing the main file. Each value remembers the file and line it came
 *	from (Config.origin[]), which --check-config prints.
 *
 *	Stricter than up-imapproxy, which ignored unknown keys (its check tested
 *	an array for NULL) and fell back silently on bad values: here an unknown
 *	key, a key without value, a bad value, a line longer than
 *	CONFIG_LINE_MAX, a NUL byte or a control character in a value is an
 *	error, reported as "FILE:LINE: KEY: reason". The first error stops the
 *	parse. "force_tls yes" (up-imapproxy) is a synonym of "server_tls
 *	starttls"; config_server_tls() gives the mode in effect, and
 *	config_check() warns about combinations only the whole file shows
 *	(server_port 993 without server_tls implicit, tls_verify_server no).
 * SECURITY
 *	Values of secret keys (auth_sasl_plain_password, auth_shared_secret) are
 *	never copied into an error or warning message and are wiped with
 *	explicit_bzero() before they are freed, as are the file buffer and the
 *	per-line copy. Unknown text is echoed only sanitized and truncated, and
 *	never past a '=' (so "auth_shared_secret=xyz" does not leak xyz).
 * ERRORS
 *	0 or -errno: -EINVAL (syntax; err says where), -ENOENT, -EISDIR, -EFBIG,
 *	-ENOMEM, or the errno of open()/read(). Never logs, never exits, no
 *	globals; err and the warning callback are the only outputs.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include "config.h"
#include "ipc-proto.h"
#include "macro.h"

typedef enum ConfigType {
        CONFIG_STRING,      /* char *: any text without control characters */
        CONFIG_WORD,        /* char *: additionally no blanks (host, user and group names) */
        CONFIG_PORT,        /* char *: 1..65535 or a service name */
        CONFIG_SOCKET_PATH, /* char *: absolute path that fits sockaddr_un.sun_path */
        CONFIG_BOOL,        /* bool */
        CONFIG_UINT,        /* unsigned, decimal, [min, max] */
        CONFIG_BYTES,       /* unsigned, decimal with optional K/M/G suffix, [min, max] */
        CONFIG_BYTES64,     /* uint64_t, idem */
        CONFIG_IPVERSION,   /* unsigned: 0, 4 or 6 */
        CONFIG_FACILITY,    /* int: LOG_* facility */
        CONFIG_PRIORITY,    /* int: LOG_EMERG..LOG_DEBUG */
        CONFIG_SERVER_TLS,  /* unsigned: ServerTls */
        _CONFIG_TYPE_MAX,
} ConfigType;

enum {
        CONFIG_F_SECRET = 1u << 0,         /* never echo the value; wipe before free */
        CONFIG_F_WARN_IF_TRUE = 1u << 1,   /* bool: "no" is what we do anyway, stay quiet */
        CONFIG_F_WARN_IF_FALSE = 1u << 2,  /* bool: "yes" is what we do anyway, stay quiet */
        CONFIG_F_REFUSE_IF_TRUE = 1u << 3, /* bool: "yes" cannot be honoured safely: error */
};

typedef struct ConfigKey {
        const char *name;
        ConfigType type;
        size_t offset;
        uint64_t min, max; /* numbers: range; strings: max length (0: CONFIG_LINE_MAX) */
        unsigned flags;    /* CONFIG_F_* */
        const char *why;   /* NULL: applied; else why it is not (warning or refusal text) */
} ConfigKey;

#define WHY_LAUNCHER                                                                              \
        "ignored by the daemons: the listening socket belongs to the launcher "                   \
        "(systemd socket unit, xinetd, systemd-socket-activate)"
#define WHY_PRIVS                                                                                 \
        "not yet supported: run the broker under a service manager user "                         \
        "(systemd User=/DynamicUser=)"
#define WHY_CHROOT                                                                                \
        "not yet supported: confine the daemons with the service manager "                        \
        "(systemd RootDirectory=, ProtectSystem=, PrivateTmp=)"
#define WHY_STATS "not supported: there is no pimpstat file; use imapproxyctl stats"
#define WHY_PROTOLOG "not supported: there is no protocol log file; use imapproxyctl trace USER"
#define WHY_FOREGROUND                                                                            \
        "ignored: imapproxy-broker always runs in the foreground, supervised by its service manager"
#define WHY_RETRIES                                                                               \
        "ignored: the broker connects per login, bounded by backend_timeout; there is no startup " \
        "reachability loop"
#define WHY_SELECT_CACHE "ignored: SELECT always goes to the server (a cached SELECT can hide new mail)"
#define WHY_ADMIN "not supported: the XPROXY_* admin commands are replaced by imapproxyctl on the broker socket"

/* C type of the Config field behind each ConfigType; KEY() checks it at compile time. */
#define CTYPE_STRING char *
#define CTYPE_WORD char *
#define CTYPE_PORT char *
#define CTYPE_SOCKET_PATH char *
#define CTYPE_BOOL bool
#define CTYPE_UINT unsigned
#define CTYPE_BYTES unsigned
#define CTYPE_BYTES64 uint64_t
#define CTYPE_IPVERSION unsigned
#define CTYPE_FACILITY int
#define CTYPE_PRIORITY int
#define CTYPE_SERVER_TLS unsigned

#define FIELD_OFFSET(field, ctype)                                                                \
        (offsetof(Config, field) +                                                                \
         0 * sizeof(struct {                                                                      \
                 static_assert(__builtin_types_compatible_p(typeof(((Config *) NULL)->field), ctype), \
                               "Config." #field ": type does not match its ConfigType");         \
                 int dummy;                                                                       \
         }))

#define KEY(n, t, field, lo, hi, fl, w)                                                           \
        {                                                                                         \
                .name = (n), .type = CONFIG_##t, .offset = FIELD_OFFSET(field, CTYPE_##t),        \
                .min = (lo), .max = (hi), .flags = (fl), .why = (w),                              \
        }

/* Dump order: up-imapproxy's keys in the order of its shipped file, then ours. */
static const ConfigKey config_keys[] = {
        KEY("server_hostname", WORD, server_hostname, 0, 255, 0, NULL),
        KEY("connect_retries", UINT, connect_retries, 0, UINT_MAX, 0, WHY_RETRIES),
        KEY("connect_delay", UINT, connect_delay, 0, UINT_MAX, 0, WHY_RETRIES),
        KEY("cache_size", UINT, cache_size, 1, 1000000, 0, NULL),
        KEY("listen_port", PORT, listen_port, 0, 0, 0, WHY_LAUNCHER),
        KEY("listen_address", WORD, listen_address, 0, 255, 0, WHY_LAUNCHER),
        KEY("server_port", PORT, server_port, 0, 0, 0, NULL),
        KEY("cache_expiration_time", UINT, cache_expiration_time, 0, 86400 * 7, 0, NULL),
        KEY("proc_username", WORD, proc_username, 0, 255, 0, WHY_PRIVS),
        KEY("proc_groupname", WORD, proc_groupname, 0, 255, 0, WHY_PRIVS),
        KEY("stat_filename", STRING, stat_filename, 0, 0, 0, WHY_STATS),
        KEY("protocol_log_filename", STRING, protocol_log_filename, 0, 0, 0, WHY_PROTOLOG),
        KEY("syslog_facility", FACILITY, syslog_facility, 0, 0, 0, NULL),
        KEY("syslog_prioritymask", PRIORITY, syslog_prioritymask, 0, 0, 0, NULL),
        KEY("send_tcp_keepalives", BOOL, send_tcp_keepalives, 0, 0, 0, NULL),
        KEY("enable_select_cache", BOOL, enable_select_cache, 0, 0, CONFIG_F_WARN_IF_TRUE,
            WHY_SELECT_CACHE),
        KEY("foreground_mode", BOOL, foreground_mode, 0, 0, CONFIG_F_WARN_IF_FALSE,
            WHY_FOREGROUND),
        KEY("force_tls", BOOL, force_tls, 0, 0, 0, NULL),
        KEY("chroot_directory", STRING, chroot_directory, 0, 0, 0, WHY_CHROOT),
        KEY("preauth_command", STRING, preauth_command, 0, 0, 0, NULL),
        KEY("enable_admin_commands", BOOL, enable_admin_commands, 0, 0,
            CONFIG_F_WARN_IF_TRUE, WHY_ADMIN),
        KEY("tls_ca_file", STRING, tls_ca_file, 0, 0, 0, NULL),
        KEY("tls_ca_path", STRING, tls_ca_path, 0, 0, 0, NULL),
        KEY("tls_cert_file", STRING, tls_cert_file, 0, 0, 0, NULL),
        KEY("tls_key_file", STRING, tls_key_file, 0, 0, 0, NULL),
        KEY("tls_verify_server", BOOL, tls_verify_server, 0, 0, 0, NULL),
        KEY("tls_ciphers", STRING, tls_ciphers, 0, 0, 0, NULL),
        KEY("tls_no_tlsv1", BOOL, tls_no_tlsv1, 0, 0, 0, NULL),
        KEY("tls_no_tlsv1.1", BOOL, tls_no_tlsv1_1, 0, 0, 0, NULL),
        KEY("tls_no_tlsv1.2", BOOL, tls_no_tlsv1_2, 0, 0, 0, NULL),
        KEY("auth_sasl_plain_username", STRING, auth_sasl_plain_username, 0, 0, 0, NULL),
        KEY("auth_sasl_plain_password", STRING, auth_sasl_plain_password, 0, 0,
            CONFIG_F_SECRET, NULL),
        KEY("auth_shared_secret", STRING, auth_shared_secret, 0, 0, CONFIG_F_SECRET, NULL),
        KEY("dns_rr", BOOL, dns_rr, 0, 0, 0, NULL),
        KEY("ipversion_only", IPVERSION, ipversion_only, 0, 0, 0, NULL),

        KEY("broker_socket", SOCKET_PATH, broker_socket, 0, 0, 0, NULL),
        KEY("broker_socket_group", WORD, broker_socket_group, 0, 255, 0, NULL),
        KEY("admin_group", WORD, admin_group, 0, 255, 0, NULL),
        KEY("backend_timeout", UINT, backend_timeout, 1, 86400, 0, NULL),
        KEY("client_prelogin_timeout", UINT, client_prelogin_timeout, 1, 86400, 0, NULL),
        KEY("client_idle_timeout", UINT, client_idle_timeout, 1, 86400, 0, NULL),
        KEY("backend_response_timeout", UINT, backend_response_timeout, 1, 86400, 0, NULL),
        KEY("backend_link_timeout", UINT, backend_link_timeout, 0, 86400, 0, NULL),
        KEY("max_prelogin_line", BYTES, max_prelogin_line, 1024, 1048576, 0, NULL),
        KEY("max_command_line", BYTES, max_command_line, 1024, 16777216, 0, NULL),
        KEY("max_literal_size", BYTES64, max_literal_size, 1, UINT64_C(1) << 40, 0, NULL),
        KEY("login_max_failures", UINT, login_max_failures, 1, 1000, 0, NULL),
        KEY("login_failure_delay", UINT, login_failure_delay, 0, 60000, 0, NULL),
        KEY("forward_client_id", BOOL, forward_client_id, 0, 0, 0, NULL),
        KEY("max_idle_per_user", UINT, max_idle_per_user, 1, 1000000, 0, NULL),
        KEY("listen_tls_cert_file", STRING, listen_tls_cert_file, 0, 0, 0, NULL),
        KEY("listen_tls_key_file", STRING, listen_tls_key_file, 0, 0, 0, NULL),
        KEY("listen_tls_priority", STRING, listen_tls_priority, 0, 0, 0, NULL),
        KEY("listen_tls_ticket_key_file", STRING, listen_tls_ticket_key_file, 0, 0, 0, NULL),
        KEY("login_requires_tls", BOOL, login_requires_tls, 0, 0, 0, NULL),
        KEY("server_tls", SERVER_TLS, server_tls, 0, 0, 0, NULL),
        KEY("tls_server_name", WORD, tls_server_name, 0, 255, 0, NULL),
};

static_assert(ELEMENTSOF(config_keys) <= CONFIG_KEYS_MAX, "raise CONFIG_KEYS_MAX in config.h");

typedef struct NameValue {
        const char *name;
        int value;
} NameValue;

static const NameValue bool_names[] = {
        { "yes", 1 }, { "y", 1 }, { "true", 1 },  { "on", 1 },  { "1", 1 },
        { "no", 0 },  { "n", 0 }, { "false", 0 }, { "off", 0 }, { "0", 0 },
};

/* syslog(3) facilities except LOG_KERN (up-imapproxy's file says the same). */
static const NameValue facility_names[] = {
        { "USER", LOG_USER },       { "MAIL", LOG_MAIL },     { "DAEMON", LOG_DAEMON },
        { "AUTH", LOG_AUTH },       { "SYSLOG", LOG_SYSLOG }, { "LPR", LOG_LPR },
        { "NEWS", LOG_NEWS },       { "UUCP", LOG_UUCP },     { "CRON", LOG_CRON },
        { "AUTHPRIV", LOG_AUTHPRIV }, { "FTP", LOG_FTP },     { "LOCAL0", LOG_LOCAL0 },
        { "LOCAL1", LOG_LOCAL1 },   { "LOCAL2", LOG_LOCAL2 }, { "LOCAL3", LOG_LOCAL3 },
        { "LOCAL4", LOG_LOCAL4 },   { "LOCAL5", LOG_LOCAL5 }, { "LOCAL6", LOG_LOCAL6 },
        { "LOCAL7", LOG_LOCAL7 },
};

static const NameValue server_tls_names[] = {
        { "none", SERVER_TLS_NONE },
        { "starttls", SERVER_TLS_STARTTLS },
        { "implicit", SERVER_TLS_IMPLICIT },
};
static_assert(ELEMENTSOF(server_tls_names) == _SERVER_TLS_MAX, "server_tls names");

static const NameValue priority_names[] = {
        { "EMERG", LOG_EMERG },     { "ALERT", LOG_ALERT },   { "CRIT", LOG_CRIT },
        { "ERR", LOG_ERR },         { "WARNING", LOG_WARNING }, { "NOTICE", LOG_NOTICE },
        { "INFO", LOG_INFO },       { "DEBUG", LOG_DEBUG },
};

#define SUN_PATH_MAX (sizeof(((struct sockaddr_un *) NULL)->sun_path))
#define ECHO_MAX 64 /* bytes of user text echoed in a message */

typedef struct Parser {
        Config *config;
        const char *name;
        unsigned file; /* 1 + index into config->files[] */
        ConfigWarnFn warn;
        void *userdata;
        char *err;
        size_t errsize;
        unsigned line;
} Parser;

static bool is_blank(char ch) {
        return ch == ' ' || ch == '\t';
}

static bool is_trailing_space(char ch) {
        return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\v' || ch == '\f';
}

static bool is_control(char ch) {
        unsigned char u = (unsigned char) ch;
        return (u < 0x20 && u != '\t') || u == 0x7f;
}

/* Printable, bounded copy of user text for a message: no control or 8-bit
 * bytes reach a log line, and long text is cut with "...". */
static const char *sanitize(const char *s, size_t n, char *out, size_t outsize) {
        size_t k = 0, lim = MIN(n, (size_t) ECHO_MAX);

        assert(outsize > ECHO_MAX + 3);
        for (size_t i = 0; i < lim; i++) {
                unsigned char u = (unsigned char) s[i];
                out[k++] = (u >= 0x20 && u < 0x7f) ? (char) u : '?';
        }
        if (n > lim) {
                memcpy(out + k, "...", 3);
                k += 3;
        }
        out[k] = 0;
        return out;
}

/* Writes "NAME:LINE: KEY: reason" (KEY omitted if NULL) to err, returns r. */
_printf_(4, 5) static int parser_fail(const Parser *p, const char *key, int r, const char *fmt, ...) {
        va_list ap;
        int n;

        if (!p->err || p->errsize == 0)
                return r;
        if (key)
                n = snprintf(p->err, p->errsize, "%s:%u: %s: ", p->name, p->line, key);
        else
                n = snprintf(p->err, p->errsize, "%s:%u: ", p->name, p->line);
        if (n < 0 || (size_t) n >= p->errsize)
                return r;
        va_start(ap, fmt);
        (void) vsnprintf(p->err + n, p->errsize - (size_t) n, fmt, ap);
        va_end(ap);
        return r;
}

static void parser_warn(const Parser *p, const char *key, const char *why) {
        char msg[1024];

        if (!p->warn)
                return;
        (void) snprintf(msg, sizeof(msg), "%s:%u: %s: %s", p->name, p->line, key, why);
        p->warn(p->userdata, msg);
}

static const ConfigKey *config_key_find(const char *key, size_t len) {
        for (size_t i = 0; i < ELEMENTSOF(config_keys); i++)
                if (ascii_strcasecmp_n(key, len, config_keys[i].name) == 0)
                        return &config_keys[i];
        return NULL;
}

static int ascii_lower(int ch) {
        return ch >= 'A' && ch <= 'Z' ? ch + 32 : ch;
}

/* Levenshtein distance, case-insensitive; for "did you mean" on a typo.
 * Returns SIZE_MAX as soon as the distance is known to exceed limit: the
 * fuzzer feeds thousands of unknown keys, and so can a broken file. */
static size_t edit_distance(const char *a, size_t alen, const char *b, size_t limit) {
        size_t blen = strlen(b), prev[48], cur[48];

        if (alen >= ELEMENTSOF(prev) || blen >= ELEMENTSOF(prev))
                return SIZE_MAX;
        if (alen > blen + limit || blen > alen + limit)
                return SIZE_MAX; /* the length difference alone is over the limit */
        for (size_t j = 0; j <= blen; j++)
                prev[j] = j;
        for (size_t i = 1; i <= alen; i++) {
                size_t row_min;

                cur[0] = row_min = i;
                for (size_t j = 1; j <= blen; j++) {
                        size_t sub = prev[j - 1] + (ascii_lower(a[i - 1]) != ascii_lower(b[j - 1]));
                        cur[j] = MIN(MIN(prev[j] + 1, cur[j - 1] + 1), sub);
                        row_min = MIN(row_min, cur[j]);
                }
                if (row_min > limit) /* distances never shrink down the rows */
                        return SIZE_MAX;
                memcpy(prev, cur, (blen + 1) * sizeof(size_t));
        }
        return prev[blen];
}

static const ConfigKey *config_key_suggest(const char *key, size_t len) {
        const ConfigKey *best = NULL;
        size_t best_d = 3; /* suggest only within distance 2 */

        for (size_t i = 0; i < ELEMENTSOF(config_keys); i++) {
                size_t d = edit_distance(key, len, config_keys[i].name, best_d - 1);
                if (d < best_d) {
                        best_d = d;
                        best = &config_keys[i];
                }
        }
        return best;
}

static int name_value_find(const NameValue *t, size_t n, const char *s, bool log_prefix, int *ret) {
        if (log_prefix && strlen(s) > 4 && ascii_strcasecmp_n(s, 4, "LOG_") == 0)
                s += 4;
        for (size_t i = 0; i < n; i++)
                if (ascii_strcasecmp_n(s, strlen(s), t[i].name) == 0) {
                        *ret = t[i].value;
                        return 0;
                }
        return -EINVAL;
}

static const char *name_value_name(const NameValue *t, size_t n, int value) {
        for (size_t i = 0; i < n; i++)
                if (t[i].value == value)
                        return t[i].name;
        return NULL;
}

/* Decimal without sign, blanks or junk; with suffix, one of K/M/G (x1024^n). */
static int parse_u64(const char *s, bool suffix, uint64_t *ret) {
        uint64_t v = 0;
        const char *q = s;
        unsigned shift = 0;

        if (*q < '0' || *q > '9')
                return -EINVAL;
        for (; *q >= '0' && *q <= '9'; q++) {
                unsigned d = (unsigned) (*q - '0');
                if (v > (UINT64_MAX - d) / 10)
                        return -ERANGE;
                v = v * 10 + d;
        }
        if (suffix && *q) {
                switch (*q) {
                case 'k': case 'K': shift = 10; break;
                case 'm': case 'M': shift = 20; break;
                case 'g': case 'G': shift = 30; break;
                default: return -EINVAL;
                }
                q++;
                if (v > (UINT64_MAX >> shift))
                        return -ERANGE;
                v <<= shift;
        }
        if (*q)
                return -EINVAL;
        *ret = v;
        return 0;
}

static bool is_service_name(const char *s) {
        bool letter = false;

        if (!*s || *s == '-' || strlen(s) > 64)
                return false;
        for (; *s; s++) {
                char ch = *s;
                if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))
                        letter = true;
                else if (!(ch >= '0' && ch <= '9') && ch != '-' && ch != '_' && ch != '.')
                        return false;
        }
        return letter;
}

static bool is_port(const char *s) {
        uint64_t v;

        if (*s >= '0' && *s <= '9')
                return parse_u64(s, false, &v) == 0 && v >= 1 && v <= 65535;
        return is_service_name(s);
}

static int invalid(const Parser *p, const ConfigKey *k, const char *v, const char *expected) {
        char echo[ECHO_MAX + 4];

        if (k->flags & CONFIG_F_SECRET)
                return parser_fail(p, k->name, -EINVAL, "invalid value: expected %s", expected);
        return parser_fail(p, k->name, -EINVAL, "invalid value '%s': expected %s%s",
                           sanitize(v, strlen(v), echo, sizeof(echo)), expected,
                           strstr(v, " #") || strstr(v, "\t#")
                                   ? " ('#' after a value is not a comment)"
                                   : "");
}

static int invalid_range(const Parser *p, const ConfigKey *k, const char *v) {
        char expected[160];

        (void) snprintf(expected, sizeof(expected),
                        k->type == CONFIG_UINT ? "a number from %" PRIu64 " to %" PRIu64
                                               : "a size from %" PRIu64 " to %" PRIu64
                                                 " bytes (suffixes K, M, G allowed)",
                        k->min, k->max);
        return invalid(p, k, v, expected);
}

static void free_string(char **s, bool secret) {
        if (!*s)
                return;
        if (secret)
                explicit_bzero(*s, strlen(*s));
        free(*s);
        *s = NULL;
}

/* Validates v for k and stores it; v is NUL-terminated, non-empty, trimmed. */
static int config_set(const Parser *p, const ConfigKey *k, const char *v) {
        void *field = (uint8_t *) p->config + k->offset;
        uint64_t u;
        int r, i;

        for (const char *q = v; *q; q++)
                if (is_control(*q))
                        return invalid(p, k, v, "text without control characters");
        if (v[0] == '=' && (v[1] == 0 || is_blank(v[1])))
                return parser_fail(p, k->name, -EINVAL, "expected '%s value', not '%s = value'",
                                   k->name, k->name);

        switch (k->type) {
        case CONFIG_WORD:
                if (strpbrk(v, " \t") || strlen(v) > k->max) {
                        char expected[96];
                        (void) snprintf(expected, sizeof(expected),
                                        "a name without blanks, at most %" PRIu64 " bytes", k->max);
                        return invalid(p, k, v, expected);
                }
                break;
        case CONFIG_PORT:
                if (!is_port(v))
                        return invalid(p, k, v, "a port number from 1 to 65535 or a service name");
                break;
        case CONFIG_SOCKET_PATH:
                if (v[0] != '/' || strlen(v) >= SUN_PATH_MAX) {
                        char expected[96];
                        (void) snprintf(expected, sizeof(expected),
                                        "an absolute path shorter than %zu bytes", SUN_PATH_MAX);
                        return invalid(p, k, v, expected);
                }
                break;
        case CONFIG_STRING:
                break;
        case CONFIG_BOOL:
                if (name_value_find(bool_names, ELEMENTSOF(bool_names), v, false, &i) < 0)
                        return invalid(p, k, v, "yes or no (also y/n, true/false, on/off, 1/0)");
                if (i && (k->flags & CONFIG_F_REFUSE_IF_TRUE))
                        return parser_fail(p, k->name, -EINVAL, "%s", k->why);
                *(bool *) field = i;
                break;
        case CONFIG_UINT:
        case CONFIG_BYTES:
        case CONFIG_BYTES64:
                r = parse_u64(v, k->type != CONFIG_UINT, &u);
                if (r < 0 || u < k->min || u > k->max)
                        return invalid_range(p, k, v);
                if (k->type == CONFIG_BYTES64)
                        *(uint64_t *) field = u;
                else
                        *(unsigned *) field = (unsigned) u;
                break;
        case CONFIG_IPVERSION:
                r = parse_u64(v, false, &u);
                if (r < 0 || (u != 0 && u != 4 && u != 6))
                        return invalid(p, k, v, "4 (IPv4 only), 6 (IPv6 only) or 0 (both)");
                *(unsigned *) field = (unsigned) u;
                break;
        case CONFIG_FACILITY:
                if (name_value_find(facility_names, ELEMENTSOF(facility_names), v, true, &i) < 0)
                        return invalid(p, k, v,
                                       "a syslog facility: LOG_USER, LOG_MAIL, LOG_DAEMON, "
                                       "LOG_AUTH, LOG_AUTHPRIV, LOG_SYSLOG, LOG_LPR, LOG_NEWS, "
                                       "LOG_UUCP, LOG_CRON, LOG_FTP or LOG_LOCAL0..LOG_LOCAL7");
                *(int *) field = i;
                break;
        case CONFIG_PRIORITY:
                if (name_value_find(priority_names, ELEMENTSOF(priority_names), v, true, &i) < 0)
                        return invalid(p, k, v,
                                       "a syslog priority: LOG_EMERG, LOG_ALERT, LOG_CRIT, "
                                       "LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO or LOG_DEBUG");
                *(int *) field = i;
                break;
        case CONFIG_SERVER_TLS:
                if (name_value_find(server_tls_names, ELEMENTSOF(server_tls_names), v, false, &i) < 0)
                        return invalid(p, k, v,
                                       "none, starttls or implicit (TLS from the first byte, port 993)");
                *(unsigned *) field = (unsigned) i;
                break;
        case _CONFIG_TYPE_MAX:
        default:
                assert(k->type < _CONFIG_TYPE_MAX); /* a bad row in config_keys[] */
                return -EINVAL;
        }

        switch (k->type) {
        case CONFIG_STRING:
        case CONFIG_WORD:
        case CONFIG_PORT:
        case CONFIG_SOCKET_PATH: {
                char *s = strdup(v);
                if (!s)
                        return parser_fail(p, k->name, -ENOMEM, "out of memory");
                free_string((char **) field, k->flags & CONFIG_F_SECRET);
                *(char **) field = s;
                break;
        }
        default:
                break;
        }
        p->config->origin[k - config_keys].file = p->file;
        p->config->origin[k - config_keys].line = p->line;

        if (k->why && !(k->flags & CONFIG_F_REFUSE_IF_TRUE)) {
                bool quiet = (k->type == CONFIG_BOOL) &&
                             (((k->flags & CONFIG_F_WARN_IF_TRUE) && !*(bool *) field) ||
                              ((k->flags & CONFIG_F_WARN_IF_FALSE) && *(bool *) field));
                if (!quiet)
                        parser_warn(p, k->name, k->why);
        }

        return 0;
}

/* Name of the key at the start of a line if it is a known one, for messages
 * about lines that are not parsed further (too long, NUL byte). */
static const char *line_known_key(const char *s, size_t n) {
        size_t i = 0, j;

        while (i < n && is_blank(s[i]))
                i++;
        for (j = i; j < n && s[j] && !is_blank(s[j]); j++)
                ;
        if (j == i)
                return NULL;
        const ConfigKey *k = config_key_find(s + i, j - i);
        return k ? k->name : NULL;
}

static int parse_line(Parser *p, const char *s, size_t n) {
        char value[CONFIG_LINE_MAX + 1];
        const ConfigKey *k;
        size_t i = 0, kstart, klen;
        int r;

        if (n > 0 && s[n - 1] == '\r') /* a CRLF line end does not count */
                n--;
        if (n > CONFIG_LINE_MAX)
                return parser_fail(p, line_known_key(s, CONFIG_LINE_MAX), -EINVAL,
                                   "line too long (%zu bytes, at most %d)", n, CONFIG_LINE_MAX);
        if (memchr(s, 0, n))
                return parser_fail(p, line_known_key(s, n), -EINVAL, "NUL byte in line");

        while (n > 0 && is_trailing_space(s[n - 1]))
                n--;
        while (i < n && is_blank(s[i]))
                i++;
        if (i == n || s[i] == '#')
                return 0;

        kstart = i;
        while (i < n && !is_blank(s[i]))
                i++;
        klen = i - kstart;
        while (i < n && is_blank(s[i]))
                i++;

        k = config_key_find(s + kstart, klen);
        if (!k) {
                char echo[ECHO_MAX + 4];
                const char *eq = memchr(s + kstart, '=', klen);
                const ConfigKey *hint;

                if (eq) /* "key=value": never echo what follows '=', it may be a secret */
                        return parser_fail(p,
                                           eq == s + kstart ? NULL
                                                            : sanitize(s + kstart, (size_t) (eq - (s + kstart)),
                                                                       echo, sizeof(echo)),
                                           -EINVAL, "expected 'keyword value' separated by blanks, not '='");
                sanitize(s + kstart, klen, echo, sizeof(echo));
                hint = config_key_suggest(s + kstart, klen);
                if (hint)
                        return parser_fail(p, echo, -EINVAL,
                                           "unknown configuration key (did you mean '%s'?)", hint->name);
                return parser_fail(p, echo, -EINVAL, "unknown configuration key");
        }
        if (i == n)
                return parser_fail(p, k->name, -EINVAL, "missing value");

        memcpy(value, s + i, n - i);
        value[n - i] = 0;
        r = config_set(p, k, value);
        if (k->flags & CONFIG_F_SECRET)
                explicit_bzero(value, sizeof(value));
        return r;
}

static int file_fail(const char *path, int r, char *err, size_t errsize, const char *what);

/* Remembers a file name for Config.origin[]; returns its number (1-based). */
static int config_add_file(Config *c, const char *name) {
        char **n, *copy;

        if (c->n_files >= UINT_MAX / 2)
                return -E2BIG;
        copy = strdup(name);
        if (!copy)
                return -ENOMEM;
        n = realloc(c->files, (c->n_files + 1) * sizeof(char *));
        if (!n) {
                free(copy);
                return -ENOMEM;
        }
        c->files = n;
        c->files[c->n_files++] = copy;
        return (int) c->n_files;
}

int config_load_buffer(Config *c, const char *name, const char *buf, size_t len, ConfigWarnFn warn,
                       void *userdata, char *err, size_t errsize) {
        Parser p = {
                .config = c,
                .name = name ?: "(config)",
                .warn = warn,
                .userdata = userdata,
                .err = err,
                .errsize = errsize,
        };
        size_t pos = 0;
        int r;

        assert(c);
        assert(buf || len == 0);

        if (err && errsize > 0)
                err[0] = 0;
        r = config_add_file(c, p.name);
        if (r < 0)
                return file_fail(p.name, r, err, errsize, NULL);
        p.file = (unsigned) r;
        if (len >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0) /* UTF-8 BOM from some editors */
                pos = 3;

        while (pos < len) {
                const char *s = buf + pos, *nl = memchr(s, '\n', len - pos);
                size_t n = nl ? (size_t) (nl - s) : len - pos;

                pos += n + !!nl;
                p.line++;
                r = parse_line(&p, s, n);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int file_fail(const char *path, int r, char *err, size_t errsize, const char *what) {
        const char *desc = what ?: strerror(-r);

        if (err && errsize > 0)
                (void) snprintf(err, errsize, "%s: %s", path, desc ?: "Unknown error");
        return r;
}

int config_load_file(Config *c, const char *path, ConfigWarnFn warn, void *userdata, char *err,
                     size_t errsize) {
        char *buf = NULL;
        size_t len = 0, cap = 0;
        struct stat st;
        int fd, r;

        assert(c);
        assert(path);

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return file_fail(path, -errno, err, errsize, NULL);
        if (fstat(fd, &st) < 0) {
                r = file_fail(path, -errno, err, errsize, NULL);
                goto finish;
        }
        if (S_ISDIR(st.st_mode)) {
                r = file_fail(path, -EISDIR, err, errsize, NULL);
                goto finish;
        }
        if (S_ISREG(st.st_mode) && st.st_size > CONFIG_FILE_MAX) {
                r = file_fail(path, -EFBIG, err, errsize, "file too large (more than 1 MiB)");
                goto finish;
        }

        /* Regular files: one read of st_size (+1 to see EOF); pipes and
         * files that grow: double up to CONFIG_FILE_MAX + 1. */
        cap = S_ISREG(st.st_mode) ? (size_t) st.st_size + 1 : 4096;
        buf = malloc(cap);
        if (!buf) {
                r = file_fail(path, -ENOMEM, err, errsize, NULL);
                goto finish;
        }
        for (;;) {
                ssize_t k;

                if (len == cap) {
                        size_t ncap = MIN(cap * 2, (size_t) CONFIG_FILE_MAX + 1);
                        char *nbuf;

                        if (len > CONFIG_FILE_MAX) {
                                r = file_fail(path, -EFBIG, err, errsize,
                                              "file too large (more than 1 MiB)");
                                goto finish;
                        }
                        nbuf = malloc(ncap); /* not realloc: the old copy must be wiped */
                        if (!nbuf) {
                                r = file_fail(path, -ENOMEM, err, errsize, NULL);
                                goto finish;
                        }
                        memcpy(nbuf, buf, len);
                        explicit_bzero(buf, len);
                        free(buf);
                        buf = nbuf;
                        cap = ncap;
                }
                k = read(fd, buf + len, cap - len);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        r = file_fail(path, -errno, err, errsize, NULL);
                        goto finish;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
        }

        r = config_load_buffer(c, path, buf, len, warn, userdata, err, errsize);

finish:
        if (buf) {
                explicit_bzero(buf, cap);
                free(buf);
        }
        (void) close(fd);
        return r;
}

static int cmp_names(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static bool is_dropin_name(const char *n) {
        size_t l = strlen(n);
        return n[0] != '.' && l > 5 && strcmp(n + l - 5, ".conf") == 0;
}

int config_load(Config *c, const char *path, ConfigWarnFn warn, void *userdata, char *err, size_t errsize) {
        char *dir = NULL, **names = NULL;
        size_t n = 0;
        DIR *d = NULL;
        int r;

        r = config_load_file(c, path, warn, userdata, err, errsize);
        if (r < 0)
                return r;

        if (asprintf(&dir, "%s.d", path) < 0)
                return file_fail(path, -ENOMEM, err, errsize, NULL);
        d = opendir(dir);
        if (!d) {
                r = errno == ENOENT ? 0 : file_fail(dir, -errno, err, errsize, NULL);
                goto finish;
        }
        for (;;) {
                struct dirent *de;
                struct stat st;

                errno = 0;
                de = readdir(d);
                if (!de) {
                        if (errno != 0) {
                                r = file_fail(dir, -errno, err, errsize, NULL);
                                goto finish;
                        }
                        break;
                }
                if (!is_dropin_name(de->d_name))
                        continue;
                /* Only regular files (or links to them): an editor's backup
                 * directory called "x.conf" is not configuration. */
                if (fstatat(dirfd(d), de->d_name, &st, 0) < 0 || !S_ISREG(st.st_mode))
                        continue;
                if (n >= CONFIG_DROPINS_MAX) {
                        r = file_fail(dir, -E2BIG, err, errsize, "more than 128 *.conf drop-in files");
                        goto finish;
                }
                char **nn = realloc(names, (n + 1) * sizeof(char *));
                if (!nn) {
                        r = file_fail(dir, -ENOMEM, err, errsize, NULL);
                        goto finish;
                }
                names = nn;
                if (asprintf(&names[n], "%s/%s", dir, de->d_name) < 0) {
                        r = file_fail(dir, -ENOMEM, err, errsize, NULL);
                        goto finish;
                }
                n++;
        }
        if (n > 1) /* qsort(NULL, 0, ...) is undefined: UBSan flags it for an empty directory */
                qsort(names, n, sizeof(char *), cmp_names); /* the same prefix: byte order of the names */
        for (size_t i = 0; i < n; i++) {
                r = config_load_file(c, names[i], warn, userdata, err, errsize);
                if (r == -ENOENT) /* vanished since readdir(): still an error, but say so clearly */
                        r = file_fail(names[i], -EIO, err, errsize, "drop-in file vanished while being read");
                if (r < 0)
                        goto finish;
        }
        r = 0;
finish:
        for (size_t i = 0; i < n; i++)
                free(names[i]);
        free(names);
        if (d)
                (void) closedir(d);
        free(dir);
        return r;
}

int config_init(Config *c) {
        assert(c);

        *c = (Config) {
                .cache_size = 3072,
                .cache_expiration_time = 300,
                .syslog_facility = LOG_MAIL,
                .syslog_prioritymask = LOG_INFO,
                .tls_verify_server = true,
                .backend_timeout = 30,
                .client_prelogin_timeout = 60,
                .client_idle_timeout = 1800,
                .backend_response_timeout = 300,
                .backend_link_timeout = 60,
                .max_prelogin_line = 40960,
                .max_command_line = 262144,
                .max_literal_size = UINT64_C(1) << 30,
                .login_max_failures = 3,
                .login_failure_delay = 2000,
                .max_idle_per_user = 8,
        };
        c->server_port = strdup("143");
        c->broker_socket = strdup(IPC_DEFAULT_SOCKET);
        if (!c->server_port || !c->broker_socket) {
                config_done(c);
                return -ENOMEM;
        }
        return 0;
}

void config_done(Config *c) {
        if (!c)
                return;
        for (size_t i = 0; i < ELEMENTSOF(config_keys); i++) {
                const ConfigKey *k = &config_keys[i];

                switch (k->type) {
                case CONFIG_STRING:
                case CONFIG_WORD:
                case CONFIG_PORT:
                case CONFIG_SOCKET_PATH:
                        free_string((char **) ((uint8_t *) c + k->offset), k->flags & CONFIG_F_SECRET);
                        break;
                default:
                        break;
                }
        }
        for (unsigned i = 0; i < c->n_files; i++)
                free(c->files[i]);
        free(c->files);
        *c = (Config) {};
}

static void dump(const Config *c, FILE *f, bool origins) {
        assert(c);
        assert(f);

        if (origins) {
                fprintf(f, "# effective settings, read from:");
                for (unsigned i = 0; i < c->n_files; i++)
                        fprintf(f, " %s", c->files[i]);
                fprintf(f, "%s\n", c->n_files ? "" : " (no file: built-in defaults)");
        }

        for (size_t i = 0; i < ELEMENTSOF(config_keys); i++) {
                const ConfigKey *k = &config_keys[i];
                const void *field = (const uint8_t *) c + k->offset;
                const char *name;

                if (origins) {
                        unsigned file = c->origin[i].file;
                        if (file > 0 && file <= c->n_files)
                                fprintf(f, "# %s:%u\n", c->files[file - 1], c->origin[i].line);
                        else
                                fprintf(f, "# default\n");
                }

                switch (k->type) {
                case CONFIG_STRING:
                case CONFIG_WORD:
                case CONFIG_PORT:
                case CONFIG_SOCKET_PATH: {
                        const char *s = *(char *const *) field;
                        if (k->flags & CONFIG_F_SECRET)
                                fprintf(f, "%s %s\n", k->name, s ? "(set)" : "(unset)");
                        else
                                fprintf(f, "%s %s\n", k->name, s ?: "(unset)");
                        break;
                }
                case CONFIG_BOOL:
                        fprintf(f, "%s %s\n", k->name, *(const bool *) field ? "yes" : "no");
                        break;
                case CONFIG_UINT:
                case CONFIG_BYTES:
                case CONFIG_IPVERSION:
                        fprintf(f, "%s %u\n", k->name, *(const unsigned *) field);
                        break;
                case CONFIG_BYTES64:
                        fprintf(f, "%s %" PRIu64 "\n", k->name, *(const uint64_t *) field);
                        break;
                case CONFIG_FACILITY:
                        name = name_value_name(facility_names, ELEMENTSOF(facility_names),
                                               *(const int *) field);
                        if (name)
                                fprintf(f, "%s LOG_%s\n", k->name, name);
                        else
                                fprintf(f, "%s %d\n", k->name, *(const int *) field);
                        break;
                case CONFIG_PRIORITY:
                        name = name_value_name(priority_names, ELEMENTSOF(priority_names),
                                               *(const int *) field);
                        if (name)
                                fprintf(f, "%s LOG_%s\n", k->name, name);
                        else
                                fprintf(f, "%s %d\n", k->name, *(const int *) field);
                        break;
                case CONFIG_SERVER_TLS:
                        fprintf(f, "%s %s\n", k->name, server_tls_to_string(*(const unsigned *) field));
                        break;
                default:
                        break;
                }
        }
}

void config_dump(const Config *c, FILE *f) {
        dump(c, f, false);
}

void config_dump_origins(const Config *c, FILE *f) {
        dump(c, f, true);
}

static bool same_string(const char *a, const char *b) {
        return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

unsigned config_diff(const Config *a, const Config *b, ConfigDiffFn fn, void *userdata) {
        unsigned n = 0;

        assert(a);
        assert(b);
        for (size_t i = 0; i < ELEMENTSOF(config_keys); i++) {
                const ConfigKey *k = &config_keys[i];
                const void *fa = (const uint8_t *) a + k->offset, *fb = (const uint8_t *) b + k->offset;
                bool same;

                switch (k->type) {
                case CONFIG_STRING:
                case CONFIG_WORD:
                case CONFIG_PORT:
                case CONFIG_SOCKET_PATH:
                        same = same_string(*(char *const *) fa, *(char *const *) fb);
                        break;
                case CONFIG_BOOL:
                        same = *(const bool *) fa == *(const bool *) fb;
                        break;
                case CONFIG_UINT:
                case CONFIG_BYTES:
                case CONFIG_IPVERSION:
                case CONFIG_SERVER_TLS:
                        same = *(const unsigned *) fa == *(const unsigned *) fb;
                        break;
                case CONFIG_BYTES64:
                        same = *(const uint64_t *) fa == *(const uint64_t *) fb;
                        break;
                case CONFIG_FACILITY:
                case CONFIG_PRIORITY:
                        same = *(const int *) fa == *(const int *) fb;
                        break;
                default:
                        same = false; /* a type this function does not know: assume it changed */
                        break;
                }
                if (!same) {
                        n++;
                        if (fn)
                                fn(userdata, k->name);
                }
        }
        return n;
}

const char *server_tls_to_string(ServerTls t) {
        const char *n = name_value_name(server_tls_names, ELEMENTSOF(server_tls_names), (int) t);
        return n ?: "?";
}

ServerTls config_server_tls(const Config *c) {
        if (c->server_tls != SERVER_TLS_NONE)
                return (ServerTls) c->server_tls;
        return c->force_tls ? SERVER_TLS_STARTTLS : SERVER_TLS_NONE;
}

void config_check(const Config *c, ConfigWarnFn warn, void *userdata) {
        const char *port = c->server_port ?: "";
        ServerTls t = config_server_tls(c);

        if (!warn)
                return;
        /* up-imapproxy warns about this too: 993 is implicit TLS. */
        if ((strcmp(port, "993") == 0 || ascii_strcasecmp_n(port, strlen(port), "imaps") == 0) &&
            t != SERVER_TLS_IMPLICIT)
                warn(userdata, "server_port 993 (imaps) is the implicit-TLS port, but server_tls is not "
                               "'implicit': logins will fail; set server_tls implicit, or use the "
                               "server's IMAP port (143)");
        if (t == SERVER_TLS_IMPLICIT && strcmp(port, "143") == 0)
                warn(userdata, "server_tls implicit with server_port 143: port 143 normally speaks plain "
                               "IMAP (use server_tls starttls there, or server_port 993)");
        if (c->server_tls == SERVER_TLS_NONE && c->force_tls)
                warn(userdata, "force_tls yes: taken as server_tls starttls (up-imapproxy's name)");
        if (c->tls_cert_file && !c->tls_key_file)
                warn(userdata, "tls_cert_file without tls_key_file: the key is read from the "
                               "certificate file (as up-imapproxy did)");
        if (c->tls_key_file && !c->tls_cert_file)
                warn(userdata, "tls_key_file without tls_cert_file: no client certificate is sent");
        if (!c->tls_verify_server)
                warn(userdata, "tls_verify_server no: the backend's certificate is NOT checked when "
                               "TLS is used; anyone on the path can read the passwords");
}
