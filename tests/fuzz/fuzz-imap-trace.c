/*
 * fuzz-imap-trace.c -- libFuzzer target for common/imap-trace.c, the lines
 * imapproxyctl trace shows.
 *
 * SYNOPSIS
 *	int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
 * DESCRIPTION
 *	The input is a transcript: chunks separated by the byte 0xff; a chunk
 *	whose first byte is 'S' goes to the server stream, any other to the
 *	client stream (the first byte is part of the data). Invariants for
 *	every emitted line:
 *	- shorter than IPC_TRACE_LINE_MAX, with no control byte (so no CR or
 *	  LF: it passes the codec's one-line check);
 *	- a client line whose second word is LOGIN (any case) shows nothing
 *	  after it but "[redacted]";
 *	- the same transcript fed one byte at a time emits the same lines.
 *	The same file is linked with tests/fuzz/replay-main.c to replay the
 *	corpus in `make check`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imap-trace.h"
#include "fuzz-check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct Sink {
        uint64_t hash;
        size_t lines;
} Sink;

static void check_line(void *userdata, IpcTraceDir dir, const char *line, bool truncated) {
        Sink *s = userdata;
        size_t l = strlen(line);

        CHECK(l < IPC_TRACE_LINE_MAX);
        for (size_t i = 0; i < l; i++)
                CHECK((unsigned char) line[i] >= 0x20 && (unsigned char) line[i] != 0x7f);
        if (dir == IPC_TRACE_CLIENT) {
                const char *sp = strchr(line, ' ');
                if (sp && strncasecmp(sp + 1, "LOGIN", 5) == 0 && (sp[6] == ' ' || sp[6] == '\0') && sp[6])
                        CHECK(strcmp(sp + 6, " [redacted]") == 0);
        }
        s->lines++;
        s->hash = (s->hash ^ (uint64_t) dir ^ (truncated ? 0x100u : 0)) * 1099511628211ULL;
        for (size_t i = 0; i < l; i++)
                s->hash = (s->hash ^ (unsigned char) line[i]) * 1099511628211ULL;
}

static void run(const uint8_t *data, size_t size, bool bytewise, Sink *sink) {
        ImapTrace t;
        size_t i = 0;

        memset(sink, 0, sizeof(*sink));
        imap_trace_init(&t, check_line, sink);
        while (i <= size) {
                const uint8_t *end = memchr(data + i, 0xff, size - i);
                size_t n = end ? (size_t) (end - (data + i)) : size - i;
                IpcTraceDir dir = n > 0 && data[i] == 'S' ? IPC_TRACE_SERVER : IPC_TRACE_CLIENT;
                if (bytewise)
                        for (size_t k = 0; k < n; k++)
                                imap_trace_feed(&t, dir, data + i + k, 1);
                else
                        imap_trace_feed(&t, dir, data + i, n);
                i += n + 1;
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        Sink whole, bytes;
        run(data, size, false, &whole);
        run(data, size, true, &bytes);
        CHECK(whole.lines == bytes.lines && whole.hash == bytes.hash);
        return 0;
}
