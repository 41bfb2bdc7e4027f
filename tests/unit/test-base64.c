/*
 * test-base64.c -- unit tests for common/base64.c
 *
 * DESCRIPTION
 *	RFC 4648 section 10 vectors, a round trip of every byte value through
 *	a small reference encoder (ref_encode() below, independent of the
 *	decoder), and the strictness base64.h promises: only canonical
 *	base64 (RFC 4648 section 3.5) is accepted, -E2BIG when out is too
 *	small, NUL-termination only when room remains.
 *	tests/fuzz/fuzz-base64.c checks the same decoder against GnuTLS.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base64.h"

static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Canonical base64 of in[0..n) into out (4 * ((n + 2) / 3) + 1 bytes), NUL-terminated. */
static size_t ref_encode(const unsigned char *in, size_t n, char *out) {
        size_t o = 0;

        for (size_t i = 0; i < n; i += 3) {
                unsigned long w = (unsigned long) in[i] << 16;
                size_t k = n - i < 3 ? n - i : 3;
                if (k > 1)
                        w |= (unsigned long) in[i + 1] << 8;
                if (k > 2)
                        w |= in[i + 2];
                out[o++] = alphabet[w >> 18 & 63];
                out[o++] = alphabet[w >> 12 & 63];
                out[o++] = k > 1 ? alphabet[w >> 6 & 63] : '=';
                out[o++] = k > 2 ? alphabet[w & 63] : '=';
        }
        out[o] = '\0';
        return o;
}

static bool in_alphabet(int c) {
        return c != 0 && strchr(alphabet, c) != NULL;
}

/* Decodes in[0..inlen) into a large buffer; checks NUL-termination on success. */
static int decode(const char *in, size_t inlen, unsigned char *out, size_t *n) {
        unsigned char buf[512];
        size_t len = (size_t) -1;
        int r;

        cr_assert(inlen / 4 * 3 < sizeof(buf));
        memset(buf, 0xa5, sizeof(buf));
        r = base64_decode(in, inlen, buf, sizeof(buf), &len);
        cr_assert(r == 0 || r == -EINVAL, "unexpected %d for a large enough buffer", r);
        if (r == 0) {
                cr_assert(len <= inlen / 4 * 3);
                cr_assert_eq(buf[len], '\0', "NUL-terminated when room remains");
                if (out)
                        memcpy(out, buf, len);
                if (n)
                        *n = len;
        }
        return r;
}

static void expect_ok(const char *in, size_t inlen, const void *want, size_t want_len) {
        unsigned char out[512];
        size_t n = 0;
        int r = decode(in, inlen, out, &n);

        cr_assert_eq(r, 0, "\"%.*s\" (%zu bytes) rejected with %d", (int) inlen, in, inlen, r);
        cr_assert_eq(n, want_len, "\"%.*s\": %zu bytes, expected %zu", (int) inlen, in, n, want_len);
        cr_assert(memcmp(out, want, n) == 0, "\"%.*s\": wrong bytes", (int) inlen, in);
}

static void expect_einval(const char *in, size_t inlen) {
        int r = decode(in, inlen, NULL, NULL);

        cr_assert_eq(r, -EINVAL, "input of %zu bytes \"%.*s\" gave %d, expected -EINVAL", inlen, (int) inlen,
                     in, r);
}

#define OK(lit, want) expect_ok(lit, sizeof(lit) - 1, want, sizeof(want) - 1)
#define BAD(lit) expect_einval(lit, sizeof(lit) - 1)

static const struct {
        const char *plain, *b64;
} rfc4648[] = {
        { "", "" },
        { "f", "Zg==" },
        { "fo", "Zm8=" },
        { "foo", "Zm9v" },
        { "foob", "Zm9vYg==" },
        { "fooba", "Zm9vYmE=" },
        { "foobar", "Zm9vYmFy" },
};

Test(base64, rfc4648_vectors) {
        for (size_t i = 0; i < sizeof(rfc4648) / sizeof(rfc4648[0]); i++) {
                char enc[16];

                expect_ok(rfc4648[i].b64, strlen(rfc4648[i].b64), rfc4648[i].plain, strlen(rfc4648[i].plain));
                /* and the reference encoder used below agrees with the RFC */
                ref_encode((const unsigned char *) rfc4648[i].plain, strlen(rfc4648[i].plain), enc);
                cr_assert_str_eq(enc, rfc4648[i].b64);
        }
}

Test(base64, empty_input) {
        unsigned char out[4] = { 'X', 'X', 'X', 'X' };
        size_t n = 99;

        cr_assert_eq(base64_decode("", 0, out, sizeof(out), &n), 0);
        cr_assert_eq(n, 0);
        cr_assert_eq(out[0], '\0');

        n = 99;
        cr_assert_eq(base64_decode("", 0, NULL, 0, &n), 0, "no output buffer is needed for nothing");
        cr_assert_eq(n, 0);
}

static void round_trip(const unsigned char *in, size_t n) {
        char enc[512];
        size_t elen = ref_encode(in, n, enc);

        expect_ok(enc, elen, in, n);
}

Test(base64, every_byte_value_round_trips) {
        unsigned char all[256], rev[256];

        for (unsigned c = 0; c < 256; c++) {
                unsigned char b = (unsigned char) c;
                unsigned char two[2][2] = { { b, 0 }, { 0xff, b } };
                unsigned char three[3][3] = { { b, 0, 0 }, { 0xff, b, 0xff }, { 0, 0, b } };

                round_trip(&b, 1);
                for (int k = 0; k < 2; k++)
                        round_trip(two[k], 2);
                for (int k = 0; k < 3; k++)
                        round_trip(three[k], 3);
                all[c] = b;
                rev[255 - c] = b;
        }
        for (size_t n = 0; n <= sizeof(all); n++) { /* every length, every padding */
                round_trip(all, n);
                round_trip(rev, n);
        }
}

Test(base64, every_alphabet_character_decodes) {
        /* "AAA" + c for each character: the value of c ends up in the low 6 bits */
        for (int v = 0; v < 64; v++) {
                char in[5] = { 'A', 'A', 'A', alphabet[v], 0 };
                unsigned char want[3] = { 0, 0, (unsigned char) v };

                expect_ok(in, 4, want, 3);
        }
}

Test(base64, rejects_bad_length) {
        BAD("Z");
        BAD("Zg");
        BAD("Zg=");
        BAD("Zm9");
        BAD("Zm9vY");
        BAD("Zm9vYg");
        BAD("Zm9vYg=");
        BAD("Zm9vYmFyZ");
        BAD("=");
        BAD("==");
        BAD("===");
        BAD("Zg===");
        BAD("Zg====");
        BAD("Zm9vYmFy=");
        BAD("Zm9v\n");
        BAD("Zm9v\r\n");
        for (size_t len = 1; len < 64; len++) {
                char in[64];

                if (len % 4 == 0)
                        continue;
                memset(in, 'A', len);
                expect_einval(in, len);
        }
}

Test(base64, rejects_characters_outside_the_alphabet) {
        BAD("Zm9-");
        BAD("Zm9_");
        BAD("Zm9v Yg==");
        BAD("Zm9 ");
        BAD(" Zm9v   ");
        BAD("Zm9\r");
        BAD("Zm9\n");
        BAD("Zm9v\r\nYg==");
        BAD("Zm9\t");
        BAD("Zm9\0");
        BAD("\0Zm9");
        BAD("Zm9v\0\0\0\0");
        BAD("Zm9\x80");
        BAD("Zm9\xff");
        BAD("Zm\xc3\xa9"); /* UTF-8 */
        BAD("Zm9.");
        BAD("Zm9,");
        BAD("Zm9:");
        BAD("Zm9*");
        /* every other byte value, at every position of the first and of the last quantum */
        for (unsigned c = 0; c < 256; c++) {
                if (in_alphabet((int) c) || c == '=')
                        continue;
                for (size_t pos = 0; pos < 8; pos++) {
                        char in[9] = "Zm9vYmFy";
                        in[pos] = (char) c;
                        expect_einval(in, 8);
                }
        }
}

Test(base64, rejects_padding_in_the_middle) {
        BAD("Zg==Zm9v");
        BAD("Zm8=Zm9v");
        BAD("Zg==Zg==");
        BAD("Zm9vZg==Zm9v");
        BAD("Z=9v");
        BAD("Zm=v");
        BAD("=m9v");
        BAD("Zm9v=m9vZm9v");
        BAD("Zm9vZm=vZm9v");
        BAD("Zg=A");
        BAD("Zm=A");
        BAD("Zm9vZg=A");
        /* '=' at any position of any quantum but the last */
        for (size_t pos = 0; pos < 8; pos++) {
                char in[13] = "Zm9vYmFyZm9v";
                in[pos] = '=';
                expect_einval(in, 12);
        }
}

Test(base64, rejects_padding_at_start_of_last_quantum) {
        BAD("====");
        BAD("=Zg=");
        BAD("=AAA");
        BAD("==AA");
        BAD("Z===");
        BAD("A===");
        BAD("=A==");
        BAD("Zm9v====");
        BAD("Zm9vZ===");
        BAD("Zm9v=Zg=");
        BAD("Zm9v==Zg");
}

Test(base64, rejects_non_zero_trailing_bits) {
        OK("Zg==", "f");
        BAD("Zh==");
        OK("Zm8=", "fo");
        BAD("Zm9=");
        BAD("Zm9vYh==");
        BAD("Zm9vYmF=");
        BAD("AB==");
        BAD("AAB=");
        BAD("//==");
        BAD("///=");
        /* with one '=' the last character carries 2 unused bits, with two 4 */
        for (int v = 0; v < 64; v++) {
                char one[5] = { 'Z', 'm', alphabet[v], '=', 0 };
                char two[5] = { 'Z', alphabet[v], '=', '=', 0 };
                int r1 = decode(one, 4, NULL, NULL), r2 = decode(two, 4, NULL, NULL);

                cr_assert_eq(r1, (v & 3) ? -EINVAL : 0, "\"%s\" gave %d", one, r1);
                cr_assert_eq(r2, (v & 15) ? -EINVAL : 0, "\"%s\" gave %d", two, r2);
        }
}

Test(base64, out_too_small_by_one) {
        for (size_t i = 1; i < sizeof(rfc4648) / sizeof(rfc4648[0]); i++) {
                const char *b64 = rfc4648[i].b64;
                size_t want = strlen(rfc4648[i].plain), n;
                unsigned char out[16];

                n = 99;
                memset(out, 'X', sizeof(out));
                cr_assert_eq(base64_decode(b64, strlen(b64), out, want - 1, &n), -E2BIG, "\"%s\" into %zu", b64,
                             want - 1);
                cr_assert_eq(out[want - 1], 'X', "\"%s\": nothing written past outsize", b64);

                /* exactly the decoded length: succeeds, no NUL and nothing beyond */
                n = 99;
                memset(out, 'X', sizeof(out));
                cr_assert_eq(base64_decode(b64, strlen(b64), out, want, &n), 0, "\"%s\" into %zu", b64, want);
                cr_assert_eq(n, want);
                cr_assert(memcmp(out, rfc4648[i].plain, want) == 0);
                cr_assert_eq(out[want], 'X', "\"%s\": no NUL without room for it", b64);

                /* one more: NUL-terminated */
                n = 99;
                memset(out, 'X', sizeof(out));
                cr_assert_eq(base64_decode(b64, strlen(b64), out, want + 1, &n), 0);
                cr_assert_eq(n, want);
                cr_assert_eq(out[want], '\0', "\"%s\": NUL-terminated when room remains", b64);
                cr_assert_eq(out[want + 1], 'X');
        }
}

Test(base64, out_too_small_long_input) {
        unsigned char data[300], out[300];
        char enc[404];
        size_t n;

        for (size_t i = 0; i < sizeof(data); i++)
                data[i] = (unsigned char) (i * 7 + 3);
        size_t elen = ref_encode(data, sizeof(data), enc);

        cr_assert_eq(base64_decode(enc, elen, out, sizeof(data) - 1, &n), -E2BIG);
        cr_assert_eq(base64_decode(enc, elen, out, 0, &n), -E2BIG);
        cr_assert_eq(base64_decode(enc, elen, out, sizeof(data), &n), 0);
        cr_assert_eq(n, sizeof(data));
        cr_assert(memcmp(out, data, sizeof(data)) == 0);
}
