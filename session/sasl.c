/*
 * sasl.c -- decoding AUTHENTICATE data: base64 and the SASL PLAIN message.
 *
 * SYNOPSIS
 *	int sasl_b64_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *ret_len);
 *	int sasl_plain_split(const char *msg, size_t len, char *authzid, char *authcid, char *password);
 * DESCRIPTION
 *	Base64 comes from common/base64.c, not GnuTLS: the session is exec'd
 *	per client connection, links nothing but libc (statically, with musl,
 *	where it can), and so cannot load GnuTLS; base64.c is fuzzed against
 *	GnuTLS's decoder instead. Owns nothing.
 * SECURITY
 *	Decoded data may be a password: callers wipe their buffers.
 * ERRORS
 *	0, -EINVAL (not base64 / not a PLAIN message), -E2BIG (too long).
 */
#include <errno.h>
#include <string.h>

#include "base64.h"
#include "macro.h"
#include "session.h"

int sasl_b64_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *ret_len) {
        if (inlen == 1 && in[0] == '=') { /* SASL-IR: "=" is an empty response */
                *ret_len = 0;
                if (outsize > 0)
                        out[0] = '\0';
                return 0;
        }
        if (inlen == 0)
                return -EINVAL;
        if (outsize == 0)
                return -E2BIG;
        /* One byte kept back so the result is always NUL-terminated (it is
         * used as a C string: user names and passwords). */
        int r = base64_decode(in, inlen, (unsigned char *) out, outsize - 1, ret_len);
        if (r == 0)
                out[*ret_len] = '\0';
        return r;
}

/* RFC 4616: [authzid] NUL authcid NUL passwd. Output buffers are
 * IPC_USER_MAX, IPC_USER_MAX and IPC_PASSWORD_MAX bytes. */
int sasl_plain_split(const char *msg, size_t len, char *authzid, char *authcid, char *password) {
        const char *n1 = memchr(msg, '\0', len);
        if (!n1)
                return -EINVAL;
        const char *n2 = memchr(n1 + 1, '\0', len - (size_t) (n1 + 1 - msg));
        if (!n2)
                return -EINVAL;
        size_t zl = (size_t) (n1 - msg), cl = (size_t) (n2 - n1 - 1), pl = len - (size_t) (n2 + 1 - msg);
        if (cl == 0)
                return -EINVAL;
        if (zl >= IPC_USER_MAX || cl >= IPC_USER_MAX || pl >= IPC_PASSWORD_MAX)
                return -E2BIG;
        if (memchr(n2 + 1, '\0', pl))
                return -EINVAL;
        memcpy(authzid, msg, zl);
        authzid[zl] = '\0';
        memcpy(authcid, n1 + 1, cl);
        authcid[cl] = '\0';
        memcpy(password, n2 + 1, pl);
        password[pl] = '\0';
        return 0;
}
