/*
 * tls-policy.c -- when the broker uses TLS to the backend, and with what
 * GnuTLS priority string.
 *
 * SYNOPSIS
 *	TlsStep tls_policy_next(ServerTls mode, bool tls_active, const char *caps);
 *	int tls_priority_build(const char *ciphers, bool no_tls10, bool no_tls11,
 *	                       bool no_tls12, char *out, size_t outsize);
 * DESCRIPTION
 *	server_tls none: plain IMAP, but STARTTLS when the server says
 *	LOGINDISABLED (as up-imapproxy did); server_tls starttls (or
 *	force_tls yes): STARTTLS before anything else, and no login at all
 *	when the server does not offer it; server_tls implicit: the
 *	connection is TLS from the start. Credentials are never sent on a
 *	connection where TLS was required and not established: the only
 *	TLS_STEP_LOGIN answers are "TLS is up" or "mode none and the server
 *	accepts plaintext logins".
 *	A refused version also refuses the older ones: GnuTLS drops TLS 1.3
 *	when TLS 1.2 is off but 1.1 is on (no holes), so a bare
 *	"-VERS-TLS1.2" would leave exactly TLS 1.0 and 1.1.
 *	Pure: no I/O, no GnuTLS, owns nothing.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "capability.h"
#include "tls-policy.h"

TlsStep tls_policy_next(ServerTls mode, bool tls_active, const char *caps) {
        bool starttls = capability_list_contains(caps, "STARTTLS");
        bool disabled = capability_list_contains(caps, "LOGINDISABLED");

        if (tls_active)
                return disabled ? TLS_STEP_REFUSE_LOGINDISABLED : TLS_STEP_LOGIN;
        switch (mode) {
        case SERVER_TLS_NONE:
                if (!disabled)
                        return TLS_STEP_LOGIN;
                return starttls ? TLS_STEP_STARTTLS : TLS_STEP_REFUSE_LOGINDISABLED;
        case SERVER_TLS_STARTTLS:
                return starttls ? TLS_STEP_STARTTLS : TLS_STEP_REFUSE_NO_STARTTLS;
        case SERVER_TLS_IMPLICIT: /* TLS should have been active from the start */
        default:
                return TLS_STEP_REFUSE_NO_STARTTLS;
        }
}

int tls_priority_build(const char *ciphers, bool no_tls10, bool no_tls11, bool no_tls12, char *out,
                       size_t outsize) {
        no_tls11 = no_tls11 || no_tls12;
        no_tls10 = no_tls10 || no_tls11;
        int n = snprintf(out, outsize, "%s%s%s%s", ciphers && *ciphers ? ciphers : "NORMAL",
                         no_tls10 ? ":-VERS-TLS1.0" : "", no_tls11 ? ":-VERS-TLS1.1" : "",
                         no_tls12 ? ":-VERS-TLS1.2" : "");
        if (n < 0 || (size_t) n >= outsize)
                return -ENOBUFS;
        return 0;
}
