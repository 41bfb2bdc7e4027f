/*
 * tls-policy.h -- pure decisions about backend TLS (no GnuTLS here: common/
 * is linked into the session too). See tls-policy.c.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "config.h"

typedef enum TlsStep {
        TLS_STEP_LOGIN,                /* go on and log in */
        TLS_STEP_STARTTLS,             /* send STARTTLS first */
        TLS_STEP_REFUSE_NO_STARTTLS,   /* TLS is required and the server does not offer STARTTLS */
        TLS_STEP_REFUSE_LOGINDISABLED, /* the server refuses logins and offers no STARTTLS */
        _TLS_STEP_MAX,
} TlsStep;

/* What to do once the capabilities of a connection are known. mode is the
 * configured ServerTls, tls_active whether the connection is already under
 * TLS (implicit, or after STARTTLS), caps the space-separated capabilities. */
TlsStep tls_policy_next(ServerTls mode, bool tls_active, const char *caps);

/* GnuTLS priority string: tls_ciphers (or "NORMAL") with ":-VERS-TLS1.x"
 * appended for each up-imapproxy tls_no_tlsv1* key set; refusing a version
 * refuses the older ones too (tls_no_tlsv1.2 alone means TLS 1.3 only).
 * 0 or -ENOBUFS. */
int tls_priority_build(const char *ciphers, bool no_tls10, bool no_tls11, bool no_tls12, char *out,
                       size_t outsize);
