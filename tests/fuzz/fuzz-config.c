/*
 * fuzz-config.c -- libFuzzer target for config_load_buffer()
 *
 * DESCRIPTION
 *	Three parses per input, each on top of config_init() defaults:
 *	1. the input as a whole file: the result is 0 or -EINVAL (-ENOMEM
 *	   aside), err is NUL-terminated, empty on success and starts with
 *	   "fuzz:" on error; config_dump() and config_done() then work on
 *	   whatever was parsed;
 *	2. the same with an 8-byte err buffer (truncation);
 *	3. the input glued behind a secret key and a canary value (key and
 *	   separator chosen by the first byte): the canary must never show up
 *	   in an error or a warning, whatever the rest of the line does (control
 *	   bytes, NUL, overlong line, "key=value", "key = value").
 *	Built by "make fuzz" (clang, -fsanitize=fuzzer) and replayed over
 *	tests/fuzz/corpus/config/ by tests/fuzz/replay-main.c in "make check".
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CANARY "Zq8" /* short on purpose: a cut echo of the value would still show it */

static void check_warning(void *userdata, const char *msg) {
        bool canary = userdata != NULL;

        if (!msg || strncmp(msg, "fuzz:", 5) != 0)
                abort();
        if (canary && strstr(msg, CANARY))
                abort();
}

static void parse_whole(const uint8_t *data, size_t size) {
        static FILE *devnull;
        char err[512], tiny[8];
        Config c;
        int r;

        if (!devnull)
                devnull = fopen("/dev/null", "we");
        if (config_init(&c) < 0)
                return;
        memset(err, 'X', sizeof(err));
        r = config_load_buffer(&c, "fuzz", (const char *) data, size, check_warning, NULL, err,
                               sizeof(err));
        if (r != 0 && r != -EINVAL && r != -ENOMEM)
                abort();
        if (!memchr(err, 0, sizeof(err)))
                abort();
        if (r == 0 && err[0] != 0)
                abort();
        if (r == -EINVAL && strncmp(err, "fuzz:", 5) != 0)
                abort();
        if (devnull)
                config_dump(&c, devnull);
        config_done(&c);

        if (config_init(&c) < 0)
                return;
        memset(tiny, 'X', sizeof(tiny));
        (void) config_load_buffer(&c, "fuzz", (const char *) data, size, NULL, NULL, tiny, sizeof(tiny));
        if (!memchr(tiny, 0, sizeof(tiny)))
                abort();
        config_done(&c);
}

static void parse_behind_secret(const uint8_t *data, size_t size) {
        static const char *const prefixes[] = {
                "auth_shared_secret " CANARY,
                "auth_sasl_plain_password " CANARY,
                "AUTH_SHARED_SECRET = " CANARY,
                "auth_sasl_plain_password=" CANARY,
                "  Auth_Sasl_Plain_Password\t" CANARY,
                "auth_shared_secret " CANARY "\x01",
        };
        const char *prefix;
        char err[512], *buf;
        size_t plen;
        Config c;
        int r;

        if (size == 0 || memmem(data, size, CANARY, strlen(CANARY)))
                return;
        prefix = prefixes[data[0] % (sizeof(prefixes) / sizeof(prefixes[0]))];
        plen = strlen(prefix);
        buf = malloc(plen + size - 1);
        if (!buf)
                return;
        memcpy(buf, prefix, plen);
        memcpy(buf + plen, data + 1, size - 1);

        if (config_init(&c) == 0) {
                r = config_load_buffer(&c, "fuzz", buf, plen + size - 1, check_warning, (void *) 1,
                                       err, sizeof(err));
                if (r < 0 && strstr(err, CANARY))
                        abort();
                config_done(&c);
        }
        free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size > CONFIG_FILE_MAX)
                return 0;
        parse_whole(data, size);
        parse_behind_secret(data, size);
        return 0;
}
