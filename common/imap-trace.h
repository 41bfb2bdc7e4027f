/*
 * imap-trace.h -- IMAP protocol lines for imapproxyctl trace, with
 * credentials and literal contents left out. See imap-trace.c.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ipc-proto.h"

#define IMAP_TRACE_TAG_MAX 64
#define IMAP_TRACE_TAIL 32 /* raw bytes kept to recognise "{N}" / "{N+}" at a line's end */

typedef void (*ImapTraceEmit)(void *userdata, IpcTraceDir dir, const char *line, bool truncated);

typedef struct ImapTraceStream {
        char line[IPC_TRACE_LINE_MAX]; /* printable prefix of the current logical line */
        size_t len;
        bool truncated;
        char tail[IMAP_TRACE_TAIL];    /* last raw bytes of the current physical line */
        size_t tail_len;
        uint64_t literal_left;         /* literal bytes still to skip */
        bool pending_cr;               /* the last buffer ended in CR: line end or not, we shall see */
} ImapTraceStream;

typedef struct ImapTrace {
        ImapTraceEmit emit;
        void *userdata;
        ImapTraceStream client, server;
        bool in_auth;                  /* client lines are SASL responses until auth_tag completes */
        char auth_tag[IMAP_TRACE_TAG_MAX];
} ImapTrace;

void imap_trace_init(ImapTrace *t, ImapTraceEmit emit, void *userdata);
/* dir: IPC_TRACE_CLIENT or IPC_TRACE_SERVER. Calls emit once per complete
 * logical line (a line and its literals), redacted. Never fails. */
void imap_trace_feed(ImapTrace *t, IpcTraceDir dir, const uint8_t *buf, size_t len);
