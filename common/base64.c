/*
 * base64.c -- strict base64 decoding for SASL responses.
 *
 * SYNOPSIS
 *	int base64_decode(const char *in, size_t inlen, unsigned char *out, size_t outsize, size_t *ret_len);
 * DESCRIPTION
 *	The session decodes AUTHENTICATE data with this instead of GnuTLS's
 *	gnutls_base64_decode2(): the session is exec'd per client and must not
 *	load GnuTLS (or anything but libc) on its plain path, and the musl
 *	static build cannot dlopen it at all (bench/README.md has the numbers).
 *	tests/fuzz/fuzz-base64.c checks it against GnuTLS's decoder.
 *	Only canonical base64 is accepted (RFC 4648 section 3.5): length a
 *	multiple of 4, padding only at the end, zero trailing bits.
 *	Pure: no allocation, no I/O.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "base64.h"

static int b64_value(unsigned char c) {
        if (c >= 'A' && c <= 'Z')
                return c - 'A';
        if (c >= 'a' && c <= 'z')
                return c - 'a' + 26;
        if (c >= '0' && c <= '9')
                return c - '0' + 52;
        if (c == '+')
                return 62;
        if (c == '/')
                return 63;
        return -1;
}

int base64_decode(const char *in, size_t inlen, unsigned char *out, size_t outsize, size_t *ret_len) {
        size_t o = 0;

        if (inlen % 4 != 0)
                return -EINVAL;
        for (size_t i = 0; i < inlen; i += 4) {
                int v[4];
                unsigned pad = 0;
                bool last = i + 4 == inlen;
                for (int k = 0; k < 4; k++) {
                        unsigned char c = (unsigned char) in[i + (size_t) k];
                        if (c == '=' && last && k >= 2) {
                                pad++;
                                v[k] = 0;
                                continue;
                        }
                        if (pad > 0) /* data after '=' */
                                return -EINVAL;
                        v[k] = b64_value(c);
                        if (v[k] < 0)
                                return -EINVAL;
                }
                uint32_t w = (uint32_t) v[0] << 18 | (uint32_t) v[1] << 12 | (uint32_t) v[2] << 6 | (uint32_t) v[3];
                if ((pad == 1 && (w & 0xff)) || (pad == 2 && (w & 0xffff)))
                        return -EINVAL; /* non-zero bits under the padding */
                unsigned n = 3 - pad;
                if (o + n > outsize)
                        return -E2BIG;
                out[o++] = (unsigned char) (w >> 16);
                if (n > 1)
                        out[o++] = (unsigned char) (w >> 8);
                if (n > 2)
                        out[o++] = (unsigned char) w;
        }
        if (o < outsize)
                out[o] = '\0';
        *ret_len = o;
        return 0;
}
