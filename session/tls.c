/*
 * tls.c -- client TLS for imapproxy-session-tls (GnuTLS, server side).
 *
 * SYNOPSIS
 *	int tls_setup(const Config *cfg);
 *	int tls_check(const Config *cfg);
 *	void tls_ticket_key_refresh(const Config *cfg);
 *	int tls_handshake(Session *s);
 *	ssize_t tls_recv(Session *s, void *buf, size_t len);
 *	ssize_t tls_send(Session *s, const void *buf, size_t len);
 *	int tls_write_all(Session *s, const void *buf, size_t len, int timeout_ms);
 *	bool tls_pending(const Session *s);
 *	void tls_end(Session *s);
 *	int tls_write_ticket_key(const char *path);
 * DESCRIPTION
 *	Built into imapproxy-session-tls only (-DSESSION_TLS); the plaintext
 *	imapproxy-session never links GnuTLS and execs this program when a
 *	client says STARTTLS (main.c).
 *
 *	tls_check() loads what tls_setup() would (certificate, key,
 *	priority string) into scratch objects and frees them again: a fork
 *	server asks it before it re-executes itself on SIGHUP.
 *
 *	tls_setup() runs once per process: the certificate chain and key
 *	(listen_tls_cert_file, listen_tls_key_file), the priority string
 *	(listen_tls_priority, default CONFIG_TLS_PRIORITY_DEFAULT: TLS 1.2 and
 *	1.3, AEAD, forward secrecy) and the session ticket master key. No CA
 *	is loaded and client certificates are not requested: a session never
 *	touches the system trust store (design.md section 3: ~15 ms).
 *
 *	Resumption across session processes: every session is a new process,
 *	so a server-side session cache cannot work; tickets can. GnuTLS
 *	encrypts tickets (TLS 1.3 and 1.2) with keys it derives from one 64-byte
 *	master key and the current time window (lib/stek.c: the derived key
 *	changes every ticket lifetime, 6 h by default, and the previous one is
 *	still accepted), so every process that reads the same master key
 *	issues and accepts the same tickets. The master key is the file
 *	listen_tls_ticket_key_file (exactly 64 bytes, e.g. from
 *	`head -c 64 /dev/urandom`), read at every session start: replacing
 *	the file (rename(2) over it) rotates it for every new session at once,
 *	at the cost of one full handshake per client. Without the key, or if
 *	it cannot be read, a random key per process is used: resumption then
 *	only works within one fork server.
 *
 *	A fork server (--fork-server) reads the file in tls_setup() and then
 *	calls tls_ticket_key_refresh() before every fork: one stat(2), and the
 *	file is read again only when it is another file or was changed
 *	(device, inode, size, mtime or ctime differ from what the last read
 *	saw). So its children take up a rotated key with the next connection,
 *	like sessions started per connection, and a fork server started before
 *	the key file existed picks it up once it does. A file that has gone or
 *	no longer reads as a key leaves the key in use as it is (one warning
 *	per change): the children still resume each other's sessions.
 *
 *	tls_write_ticket_key() makes a new master key (imapproxy-session-tls
 *	--write-ticket-key FILE, run daily by imapproxy-tls-ticket-key.timer):
 *	PATH.new, mode 0600, synced, then renamed over PATH, so that a session
 *	reads the old key or the new one, never half of one.
 *
 *	I/O is non-blocking: tls_recv()/tls_send() return -EAGAIN when GnuTLS
 *	would block (tls_send() must then be called again with the same
 *	buffer, which the relay does since it only advances on success), and
 *	tls_pending() says whether decrypted bytes wait above the socket.
 * SECURITY
 *	The key file's contents are wiped after use. Handshake failures are
 *	logged at info level with the client's address and GnuTLS's reason.
 * ERRORS
 *	-errno: -EPROTO (TLS error), -ETIMEDOUT, -ECONNRESET (client went
 *	away), -EINVAL/-ENOENT (configuration), -ENOMEM.
 */
#include <errno.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fd-util.h"
#include "log.h"
#include "session.h"

#define TICKET_KEY_SIZE 64

static gnutls_certificate_credentials_t tls_cred;
static gnutls_priority_t tls_prio;
static unsigned char tls_ticket_key[TICKET_KEY_SIZE];
static gnutls_datum_t tls_ticket = { .data = tls_ticket_key, .size = 0 };

/* What the last look at listen_tls_ticket_key_file saw: the file's identity
 * and change times, or the error that open()/fstat() gave. */
typedef struct KeyFileId {
        int err;
        dev_t dev;
        ino_t ino;
        off_t size;
        struct timespec mtim, ctim;
} KeyFileId;
static KeyFileId tls_ticket_key_id = { .err = -ENOENT };

static KeyFileId key_file_id(const struct stat *st, int err) {
        if (err < 0)
                return (KeyFileId) { .err = err };
        return (KeyFileId) { .dev = st->st_dev, .ino = st->st_ino, .size = st->st_size,
                             .mtim = st->st_mtim, .ctim = st->st_ctim };
}

static bool key_file_id_equal(const KeyFileId *a, const KeyFileId *b) {
        return a->err == b->err && a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
               a->mtim.tv_sec == b->mtim.tv_sec && a->mtim.tv_nsec == b->mtim.tv_nsec &&
               a->ctim.tv_sec == b->ctim.tv_sec && a->ctim.tv_nsec == b->ctim.tv_nsec;
}

static int gnutls_to_errno(int e) {
        switch (e) {
        case GNUTLS_E_AGAIN:
                return -EAGAIN;
        case GNUTLS_E_INTERRUPTED:
                return -EINTR;
        case GNUTLS_E_MEMORY_ERROR:
                return -ENOMEM;
        case GNUTLS_E_PUSH_ERROR:
        case GNUTLS_E_PULL_ERROR:
        case GNUTLS_E_PREMATURE_TERMINATION:
                return -ECONNRESET;
        default:
                return -EPROTO;
        }
}

/* Exactly TICKET_KEY_SIZE bytes, or an error; the key in use changes only
 * on success. tls_ticket_key_id records the file that was read, whatever
 * the outcome: what stat() shows when open() fails (a file we may not read
 * is looked at again only when it changes), else the error. */
static int ticket_key_load(const char *path) {
        struct stat st;
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {
                int r = -errno;
                tls_ticket_key_id = key_file_id(&st, stat(path, &st) < 0 ? r : 0);
                return r;
        }
        tls_ticket_key_id = key_file_id(&st, fstat(fd, &st) < 0 ? -errno : 0);
        unsigned char buf[TICKET_KEY_SIZE + 1];
        size_t got = 0;
        int r = 0;
        while (got < sizeof(buf)) {
                ssize_t n = read(fd, buf + got, sizeof(buf) - got);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        break;
                }
                if (n == 0)
                        break;
                got += (size_t) n;
        }
        (void) close(fd);
        if (r == 0 && got != TICKET_KEY_SIZE)
                r = -EBADMSG;
        if (r == 0) {
                memcpy(tls_ticket_key, buf, TICKET_KEY_SIZE);
                tls_ticket.size = TICKET_KEY_SIZE;
        }
        explicit_bzero(buf, sizeof(buf));
        return r;
}

/* Certificate chain, key and priority string of cfg; logs what fails. */
static int tls_load(const Config *cfg, gnutls_certificate_credentials_t *ret_cred, gnutls_priority_t *ret_prio) {
        const char *cert = cfg->listen_tls_cert_file;
        const char *key = cfg->listen_tls_key_file ? cfg->listen_tls_key_file : cert;
        const char *prio = cfg->listen_tls_priority ? cfg->listen_tls_priority : CONFIG_TLS_PRIORITY_DEFAULT;
        const char *err_pos = NULL;
        int r;

        if (!cert)
                return log_error_errno(-EINVAL, "client TLS needs listen_tls_cert_file in the configuration");
        r = gnutls_certificate_allocate_credentials(ret_cred);
        if (r < 0)
                return log_error_errno(-ENOMEM, "gnutls_certificate_allocate_credentials: %s", gnutls_strerror(r));
        r = gnutls_certificate_set_x509_key_file2(*ret_cred, cert, key, GNUTLS_X509_FMT_PEM, NULL, 0);
        if (r < 0)
                return log_error_errno(-EINVAL, "listen_tls_cert_file %s / listen_tls_key_file %s: %s", cert, key,
                                       gnutls_strerror(r));
        r = gnutls_priority_init(ret_prio, prio, &err_pos);
        if (r < 0)
                return log_error_errno(-EINVAL, "listen_tls_priority: %s at '%.40s'", gnutls_strerror(r),
                                       err_pos ? err_pos : prio);
        return 0;
}

int tls_check(const Config *cfg) {
        gnutls_certificate_credentials_t cred = NULL;
        gnutls_priority_t prio = NULL;
        int r = tls_load(cfg, &cred, &prio);

        if (prio)
                gnutls_priority_deinit(prio);
        if (cred)
                gnutls_certificate_free_credentials(cred);
        return r;
}

int tls_setup(const Config *cfg) {
        int r = tls_load(cfg, &tls_cred, &tls_prio);

        if (r < 0)
                return r;

        if (cfg->listen_tls_ticket_key_file) {
                r = ticket_key_load(cfg->listen_tls_ticket_key_file);
                if (r == -EBADMSG)
                        log_warning("listen_tls_ticket_key_file %s: not exactly 64 bytes; TLS sessions will not "
                                    "resume across session processes", cfg->listen_tls_ticket_key_file);
                else if (r < 0)
                        log_warning_errno(r, "listen_tls_ticket_key_file %s: %m; TLS sessions will not resume "
                                             "across session processes", cfg->listen_tls_ticket_key_file);
        }
        if (tls_ticket.size == 0) {
                gnutls_datum_t k = { NULL, 0 };
                r = gnutls_session_ticket_key_generate(&k);
                if (r < 0 || k.size != TICKET_KEY_SIZE) {
                        if (r >= 0)
                                gnutls_free(k.data);
                        log_warning("no TLS session ticket key: %s", r < 0 ? gnutls_strerror(r) : "odd size");
                } else {
                        memcpy(tls_ticket_key, k.data, TICKET_KEY_SIZE);
                        tls_ticket.size = TICKET_KEY_SIZE;
                        explicit_bzero(k.data, k.size);
                        gnutls_free(k.data);
                }
        }
        return 0;
}

void tls_ticket_key_refresh(const Config *cfg) {
        const char *path = cfg->listen_tls_ticket_key_file;
        struct stat st;
        KeyFileId now;

        if (!path)
                return;
        now = key_file_id(&st, stat(path, &st) < 0 ? -errno : 0);
        if (key_file_id_equal(&now, &tls_ticket_key_id))
                return; /* the common case: one stat() per connection */
        int r = ticket_key_load(path);
        if (r >= 0)
                log_info("listen_tls_ticket_key_file %s changed: new TLS session ticket master key", path);
        else if (r == -EBADMSG) /* (%m only works in the format itself) */
                log_warning("listen_tls_ticket_key_file %s changed but is not exactly 64 bytes; "
                            "keeping the key in use", path);
        else
                log_warning_errno(r, "listen_tls_ticket_key_file %s changed but cannot be read: %m; "
                                     "keeping the key in use", path);
}

static int tls_wait(const Session *s, gnutls_session_t g, uint64_t deadline_usec) {
        struct pollfd p;
        bool out = gnutls_record_get_direction(g) == 1;
        p.fd = out ? s->client_out : s->client_in;
        p.events = out ? POLLOUT : POLLIN;
        for (;;) {
                uint64_t now = now_usec();
                if (now >= deadline_usec)
                        return -ETIMEDOUT;
                int n = poll(&p, 1, (int) MIN((deadline_usec - now + 999) / 1000, (uint64_t) 3600000));
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n > 0)
                        return 0;
        }
}

int tls_handshake(Session *s) {
        gnutls_session_t g = NULL;
        uint64_t deadline = now_usec() + (uint64_t) s->cfg.client_prelogin_timeout * 1000000ULL;
        int r;

        r = gnutls_init(&g, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
        if (r < 0)
                return log_error_errno(-ENOMEM, "gnutls_init: %s", gnutls_strerror(r));
        if ((r = gnutls_priority_set(g, tls_prio)) < 0 ||
            (r = gnutls_credentials_set(g, GNUTLS_CRD_CERTIFICATE, tls_cred)) < 0) {
                gnutls_deinit(g);
                return log_error_errno(-EINVAL, "TLS session set-up: %s", gnutls_strerror(r));
        }
        gnutls_certificate_server_set_request(g, GNUTLS_CERT_IGNORE);
        if (tls_ticket.size == TICKET_KEY_SIZE) {
                r = gnutls_session_ticket_enable_server(g, &tls_ticket);
                if (r < 0)
                        log_warning("TLS session tickets off: %s", gnutls_strerror(r));
        }
        gnutls_transport_set_int2(g, s->client_in, s->client_out);
        (void) fd_set_nonblock(s->client_in, true);
        (void) fd_set_nonblock(s->client_out, true);

        for (;;) {
                r = gnutls_handshake(g);
                if (r == GNUTLS_E_SUCCESS)
                        break;
                if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
                        int w = tls_wait(s, g, deadline);
                        if (w < 0) {
                                log_info_errno(w, "TLS handshake with %s: %m", s->client_addr);
                                gnutls_deinit(g);
                                return w;
                        }
                        continue;
                }
                if (!gnutls_error_is_fatal(r))
                        continue; /* warning alerts */
                log_info("TLS handshake with %s failed: %s", s->client_addr, gnutls_strerror(r));
                gnutls_deinit(g);
                return gnutls_to_errno(r) == -EAGAIN ? -EPROTO : gnutls_to_errno(r);
        }
        s->tls = g;
        if (log_get_max_level() >= LOG_DEBUG) {
                char *desc = gnutls_session_get_desc(g);
                log_debug("TLS with %s: %s%s", s->client_addr, desc ? desc : "?",
                          gnutls_session_is_resumed(g) ? ", resumed" : "");
                gnutls_free(desc);
        }
        return 0;
}

ssize_t tls_recv(Session *s, void *buf, size_t len) {
        ssize_t n = gnutls_record_recv(s->tls, buf, len);
        if (n >= 0)
                return n;
        if (n == GNUTLS_E_REHANDSHAKE || n == GNUTLS_E_WARNING_ALERT_RECEIVED)
                return -EAGAIN; /* nothing for us; the next poll round reads on */
        return gnutls_to_errno((int) n);
}

ssize_t tls_send(Session *s, const void *buf, size_t len) {
        ssize_t n = gnutls_record_send(s->tls, buf, len);
        return n >= 0 ? n : gnutls_to_errno((int) n);
}

int tls_write_all(Session *s, const void *buf, size_t len, int timeout_ms) {
        const uint8_t *p = buf;
        uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : now_usec() + (uint64_t) timeout_ms * 1000ULL;
        while (len > 0) {
                ssize_t n = gnutls_record_send(s->tls, p, len);
                if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
                        int w = tls_wait(s, s->tls, deadline);
                        if (w < 0)
                                return w;
                        continue; /* GnuTLS wants the same buffer again */
                }
                if (n < 0)
                        return gnutls_to_errno((int) n);
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

bool tls_pending(const Session *s) {
        return gnutls_record_check_pending(s->tls) > 0;
}

void tls_end(Session *s) {
        if (!s->tls)
                return;
        /* close_notify, best effort: the client may be gone. */
        (void) gnutls_bye(s->tls, GNUTLS_SHUT_WR);
        gnutls_deinit(s->tls);
        s->tls = NULL;
}

int tls_write_ticket_key(const char *path) {
        gnutls_datum_t k = { NULL, 0 };
        char tmp[4096];
        int r, fd;

        if (snprintf(tmp, sizeof(tmp), "%s.new", path) >= (int) sizeof(tmp))
                return -ENAMETOOLONG;
        r = gnutls_session_ticket_key_generate(&k);
        if (r < 0)
                return log_error_errno(-EIO, "gnutls_session_ticket_key_generate: %s", gnutls_strerror(r));
        if (k.size != TICKET_KEY_SIZE) {
                r = log_error_errno(-EINVAL, "unexpected ticket key size %u", k.size);
                goto out;
        }
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, 0600);
        if (fd < 0) {
                r = log_error_errno(-errno, "%s: %m", tmp);
                goto out;
        }
        r = fd_write_all(fd, k.data, k.size, -1);
        if (r >= 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r >= 0)
                r = -errno;
        if (r >= 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                log_error_errno(r, "writing %s: %m", path);
                (void) unlink(tmp);
        }
out:
        explicit_bzero(k.data, k.size);
        gnutls_free(k.data);
        return r;
}
