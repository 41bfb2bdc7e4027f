/*
 * base64.h -- strict RFC 4648 base64 decoding (no whitespace, padding required).
 */
#pragma once

#include <stddef.h>

/* Decodes inlen bytes of in into out (at most outsize bytes, NUL-terminated
 * if room remains). 0 with *ret_len set, -EINVAL for anything that is not
 * canonical base64 (bad character, bad length, misplaced or short padding,
 * non-zero trailing bits), -E2BIG if out is too small. */
int base64_decode(const char *in, size_t inlen, unsigned char *out, size_t outsize, size_t *ret_len);
