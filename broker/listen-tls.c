/*
 * listen-tls.c -- the broker checks the client-TLS settings the sessions use.
 *
 * SYNOPSIS
 *	int listen_tls_check(const Config *c);
 * DESCRIPTION
 *	Client TLS is done by imapproxy-session-tls, which reads
 *	listen_tls_cert_file, listen_tls_key_file, listen_tls_priority and
 *	listen_tls_ticket_key_file at every session start and can only tell
 *	its client nothing when they are wrong. So the broker, which links
 *	GnuTLS anyway, loads them once at start-up and for --check-config:
 *	a certificate and key that do not load or do not match, or a priority
 *	string GnuTLS rejects, is an error naming the key; a ticket key file
 *	that cannot be read or is not 64 bytes, or login_requires_tls without
 *	a certificate, is a warning (sessions still work, without resumption
 *	across processes, or without logins). Nothing is kept.
 * SECURITY
 *	The ticket key is read into a stack buffer that is wiped.
 * ERRORS
 *	0 or -EINVAL (logged).
 */
#include <errno.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "log.h"

static int ticket_key_size(const char *path, size_t *ret) {
        unsigned char buf[65];
        size_t got = 0;
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        for (;;) {
                ssize_t n = read(fd, buf + got, sizeof(buf) - got);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0 || (got += (size_t) n) == sizeof(buf))
                        break;
        }
        (void) close(fd);
        explicit_bzero(buf, sizeof(buf));
        *ret = got;
        return 0;
}

int listen_tls_check(const Config *c) {
        gnutls_certificate_credentials_t cred = NULL;
        gnutls_priority_t prio = NULL;
        const char *err_pos = NULL;
        int r;

        if (c->login_requires_tls && !c->listen_tls_cert_file)
                log_warning("login_requires_tls is set but listen_tls_cert_file is not: no client can log in");
        if (!c->listen_tls_cert_file) {
                if (c->listen_tls_key_file || c->listen_tls_ticket_key_file || c->listen_tls_priority)
                        log_warning("listen_tls_* keys without listen_tls_cert_file: client TLS is off");
                return 0;
        }
        const char *key = c->listen_tls_key_file ? c->listen_tls_key_file : c->listen_tls_cert_file;
        r = gnutls_certificate_allocate_credentials(&cred);
        if (r < 0)
                return log_error_errno(-ENOMEM, "client TLS: %s", gnutls_strerror(r));
        r = gnutls_certificate_set_x509_key_file2(cred, c->listen_tls_cert_file, key, GNUTLS_X509_FMT_PEM, NULL, 0);
        gnutls_certificate_free_credentials(cred);
        if (r < 0)
                return log_error_errno(-EINVAL, "listen_tls_cert_file %s, listen_tls_key_file %s: %s",
                                       c->listen_tls_cert_file, key, gnutls_strerror(r));
        if (c->listen_tls_priority) {
                r = gnutls_priority_init(&prio, c->listen_tls_priority, &err_pos);
                if (r < 0)
                        return log_error_errno(-EINVAL, "listen_tls_priority: %s at '%.40s'", gnutls_strerror(r),
                                               err_pos ? err_pos : c->listen_tls_priority);
                gnutls_priority_deinit(prio);
        }
        if (c->listen_tls_ticket_key_file) {
                size_t n = 0;
                r = ticket_key_size(c->listen_tls_ticket_key_file, &n);
                if (r < 0)
                        log_warning_errno(r, "listen_tls_ticket_key_file %s: %m; TLS sessions will not resume "
                                             "across session processes", c->listen_tls_ticket_key_file);
                else if (n != 64)
                        log_warning("listen_tls_ticket_key_file %s: not exactly 64 bytes; TLS sessions will not "
                                    "resume across session processes", c->listen_tls_ticket_key_file);
        }
        return 0;
}
