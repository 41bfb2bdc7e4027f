/*
 * fuzz-base64.c -- libFuzzer target for common/base64.c
 *
 * SYNOPSIS
 *	int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
 * DESCRIPTION
 *	The input is decoded as base64 text. Invariants checked for every input:
 *	- with a buffer large enough for any result, base64_decode() returns 0
 *	  or -EINVAL; on success *ret_len <= outsize, out[*ret_len] is NUL and
 *	  re-encoding the output with ref_encode() gives back the input: only
 *	  canonical base64 is accepted (nothing repaired, nothing ignored);
 *	- with a buffer of exactly *ret_len bytes it still succeeds and writes
 *	  nothing past it; one byte less gives -E2BIG; a small buffer chosen
 *	  from the input gives 0, -EINVAL or -E2BIG consistently with the above;
 *	- the input bytes themselves, encoded with ref_encode(), decode back to
 *	  the input: every canonical encoding is accepted.
 *	Built with FUZZ_WITH_GNUTLS (the libFuzzer build, see the Makefile),
 *	the result is also compared with gnutls_base64_decode2():
 *	- whenever ours accepts, GnuTLS accepts with identical bytes;
 *	- whenever ours rejects and GnuTLS accepts (GnuTLS skips white space
 *	  and stops at '-'), the input is not canonical: gnutls_base64_encode2()
 *	  of GnuTLS's result differs from the input, and ours accepts that
 *	  re-encoding with the same bytes;
 *	- gnutls_base64_encode2() of the input bytes equals ref_encode().
 *	So ours accepts exactly the canonical encodings GnuTLS accepts.
 *	Without FUZZ_WITH_GNUTLS it links libcommon.a only and is replayed over
 *	tests/fuzz/corpus/base64/ by tests/fuzz/replay-main.c in "make check".
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef FUZZ_WITH_GNUTLS
#include <gnutls/gnutls.h>
#endif

#include "base64.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_INPUT 65536

static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Canonical base64 (RFC 4648 section 4, padded) of in[0..n) into out,
 * which has room for 4 * ((n + 2) / 3) bytes. Returns the length. */
static size_t ref_encode(const uint8_t *in, size_t n, char *out) {
        size_t o = 0;

        for (size_t i = 0; i < n; i += 3) {
                uint32_t w = (uint32_t) in[i] << 16;
                size_t k = n - i < 3 ? n - i : 3;
                if (k > 1)
                        w |= (uint32_t) in[i + 1] << 8;
                if (k > 2)
                        w |= in[i + 2];
                out[o++] = alphabet[w >> 18 & 63];
                out[o++] = alphabet[w >> 12 & 63];
                out[o++] = k > 1 ? alphabet[w >> 6 & 63] : '=';
                out[o++] = k > 2 ? alphabet[w & 63] : '=';
        }
        return o;
}

static bool same(const void *a, size_t alen, const void *b, size_t blen) {
        return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

#define CANARY 0xa5

/* Decodes into a buffer of exactly outsize bytes followed by a canary. */
static int decode_into(const char *in, size_t inlen, size_t outsize, uint8_t *out, size_t *ret_len) {
        size_t len = (size_t) -1;
        int r;

        memset(out, CANARY, outsize + 1);
        r = base64_decode(in, inlen, out, outsize, &len);
        if (r != 0 && r != -EINVAL && r != -E2BIG)
                abort();
        if (out[outsize] != CANARY) /* wrote past outsize */
                abort();
        if (r == 0) {
                if (len > outsize)
                        abort();
                if (len < outsize && out[len] != 0)
                        abort();
                *ret_len = len;
        }
        return r;
}

#ifdef FUZZ_WITH_GNUTLS
static void compare_with_gnutls(const uint8_t *data, size_t size, int ours, const uint8_t *out, size_t n) {
        gnutls_datum_t in = { .data = (unsigned char *) data, .size = (unsigned) size }, dec = { 0 };
        int theirs = gnutls_base64_decode2(&in, &dec);

        if (ours == 0) {
                if (theirs != 0 || !same(out, n, dec.data, dec.size))
                        abort();
        } else if (theirs == 0) {
                gnutls_datum_t enc = { 0 };
                uint8_t *again;
                size_t m = 0;

                if (gnutls_base64_encode2(&dec, &enc) != 0)
                        abort();
                if (same(enc.data, enc.size, data, size)) /* canonical, yet we refused it */
                        abort();
                /* the canonical form of what GnuTLS read is accepted by ours */
                again = malloc(dec.size + 1);
                if (!again)
                        abort();
                if (decode_into((const char *) enc.data, enc.size, dec.size, again, &m) != 0 ||
                    !same(again, m, dec.data, dec.size))
                        abort();
                free(again);
                gnutls_free(enc.data);
        }
        gnutls_free(dec.data);
}

static void compare_encoder_with_gnutls(const uint8_t *data, size_t size, const char *enc, size_t elen) {
        gnutls_datum_t in = { .data = (unsigned char *) data, .size = (unsigned) size }, theirs = { 0 };

        if (gnutls_base64_encode2(&in, &theirs) != 0)
                abort();
        if (!same(theirs.data, theirs.size, enc, elen))
                abort();
        gnutls_free(theirs.data);
}
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *in = (const char *) data;
        size_t outsize = size / 4 * 3 + 1, n = 0, m = 0, small;
        uint8_t *out, *out2;
        char *enc;
        int r, r2;

        if (size > MAX_INPUT)
                return 0;
        out = malloc(outsize + 1);
        out2 = malloc(outsize + 1);
        enc = malloc((size + 2) / 3 * 4 + 1);
        if (!out || !out2 || !enc)
                abort();

        /* 1. a buffer large enough for anything: 0 or -EINVAL */
        r = decode_into(in, size, outsize, out, &n);
        if (r == -E2BIG)
                abort();
        if (r == 0) {
                if (n != outsize - 1 - (size > 0 && data[size - 1] == '=') - (size > 1 && data[size - 2] == '='))
                        abort();
                if (!same(enc, ref_encode(out, n, enc), data, size)) /* accepted => canonical */
                        abort();
                /* exactly n bytes: fits, nothing beyond; n - 1 bytes: -E2BIG */
                if (decode_into(in, size, n, out2, &m) != 0 || !same(out2, m, out, n))
                        abort();
                if (n > 0 && decode_into(in, size, n - 1, out2, &m) != -E2BIG)
                        abort();
        }

        /* 2. a small buffer picked by the input */
        small = size > 0 ? data[0] % 8 : 0;
        if (small > outsize)
                small = outsize;
        r2 = decode_into(in, size, small, out2, &m);
        if (r == 0 && n <= small) {
                if (r2 != 0 || !same(out2, m, out, n))
                        abort();
        } else if (r == 0) {
                if (r2 != -E2BIG)
                        abort();
        } else if (r2 == 0) /* an invalid input never succeeds with less room */
                abort();

#ifdef FUZZ_WITH_GNUTLS
        compare_with_gnutls(data, size, r, out, n);
#endif

        /* 3. the input bytes, canonically encoded, decode back to them */
        {
                size_t elen = ref_encode(data, size, enc);
                uint8_t *back = malloc(size + 1);

                if (!back)
                        abort();
                if (decode_into(enc, elen, size, back, &m) != 0 || !same(back, m, data, size))
                        abort();
#ifdef FUZZ_WITH_GNUTLS
                compare_encoder_with_gnutls(data, size, enc, elen);
#endif
                free(back);
        }

        free(enc);
        free(out2);
        free(out);
        return 0;
}
