/*
 * sasl.c -- base64 and SASL PLAIN for AUTHENTICATE, with GnuTLS loaded on demand.
 *
 * SYNOPSIS
 *	int sasl_b64_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *ret_len);
 *	int sasl_plain_split(const char *msg, size_t len, char *authzid, char *authcid, char *password);
 * DESCRIPTION
 *	The session links libc only, because every client connection pays
 *	for each shared library at exec (design.md section 3). GnuTLS's
 *	base64 decoder is therefore dlopen()ed the first time a client uses
 *	AUTHENTICATE; a plain LOGIN never loads it. Owns the library handle.
 * SECURITY
 *	Decoded data may be a password: every intermediate buffer is wiped.
 * ERRORS
 *	0, -EINVAL (not base64 / not a PLAIN message), -E2BIG (too long),
 *	-ENOSYS (GnuTLS cannot be loaded).
 */
#include <dlfcn.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <string.h>

#include "macro.h"
#include "session.h"

typedef int (*b64_decode_fn)(const gnutls_datum_t *b64, gnutls_datum_t *result);

static b64_decode_fn gnutls_b64_decode;
static gnutls_free_function *gnutls_free_ptr;

static int gnutls_load(void) {
        static void *handle;
        if (gnutls_b64_decode)
                return 0;
        if (!handle) {
                handle = dlopen("libgnutls.so.30", RTLD_NOW | RTLD_LOCAL);
                if (!handle)
                        return -ENOSYS;
        }
        b64_decode_fn d = (b64_decode_fn) dlsym(handle, "gnutls_base64_decode2");
        gnutls_free_function *f = dlsym(handle, "gnutls_free");
        if (!d || !f || !*f)
                return -ENOSYS;
        gnutls_free_ptr = f;
        gnutls_b64_decode = d;
        return 0;
}

int sasl_b64_decode(const char *in, size_t inlen, char *out, size_t outsize, size_t *ret_len) {
        int r;

        if (inlen == 1 && in[0] == '=') { /* SASL-IR: "=" is an empty response */
                *ret_len = 0;
                if (outsize > 0)
                        out[0] = '\0';
                return 0;
        }
        if (inlen == 0 || inlen % 4 != 0)
                return -EINVAL;
        for (size_t i = 0; i < inlen; i++) {
                char c = in[i];
                bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
                          c == '/' || (c == '=' && i >= inlen - 2);
                if (!ok)
                        return -EINVAL;
        }
        if (inlen / 4 * 3 >= outsize)
                return -E2BIG;
        r = gnutls_load();
        if (r < 0)
                return r;

        gnutls_datum_t src = { .data = (unsigned char *) in, .size = (unsigned) inlen }, dst = {};
        if (gnutls_b64_decode(&src, &dst) < 0)
                return -EINVAL;
        if (dst.size >= outsize) {
                explicit_bzero(dst.data, dst.size);
                (*gnutls_free_ptr)(dst.data);
                return -E2BIG;
        }
        memcpy(out, dst.data, dst.size);
        out[dst.size] = '\0';
        *ret_len = dst.size;
        explicit_bzero(dst.data, dst.size);
        (*gnutls_free_ptr)(dst.data);
        return 0;
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
