/*
 * trace.c -- the session's side of imapproxyctl trace.
 *
 * SYNOPSIS
 *	int trace_start(Session *s);
 *	void trace_feed(Session *s, IpcTraceDir dir, const void *buf, size_t len);
 *	void trace_note(Session *s, const char *fmt, ...);
 * DESCRIPTION
 *	The broker never sees a plaintext backend's traffic (the fd is lent to
 *	the session), so the session reports it: when CHECKOUT_OK carries
 *	IPC_LEASE_F_TRACE, trace_start() sets s->trace, and the relay's hooks
 *	(TRACE_BYTES, TRACE_NOTE in session.h) feed both byte streams to the
 *	pure line splitter and redactor (common/imap-trace.c). Each line goes
 *	to the broker as one TRACE message, never blocking: when the broker
 *	socket is full the line is dropped and counted, and the count rides on
 *	the next line that gets through.
 * SECURITY
 *	Only redacted lines leave this module: no LOGIN/AUTHENTICATE
 *	arguments, no SASL responses, no literal contents.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fd-util.h"
#include "imap-trace.h"
#include "ipc.h"
#include "session.h"

typedef struct SessionTrace {
        Session *s;
        ImapTrace it;
        uint32_t dropped;
} SessionTrace;

static void trace_send(void *userdata, IpcTraceDir dir, const char *line, bool truncated) {
        SessionTrace *t = userdata;
        struct ipc_trace m = {
                .dir = dir,
                .flags = truncated ? IPC_TRACE_F_TRUNCATED : 0,
                .dropped = t->dropped,
        };
        if (t->s->broker_fd < 0)
                return;
        snprintf(m.line, sizeof(m.line), "%s", line);
        if (ipc_send_nowait(t->s->broker_fd, IPC_TRACE, &m, sizeof(m)) < 0) {
                if (t->dropped < UINT32_MAX)
                        t->dropped++;
        } else
                t->dropped = 0;
}

int trace_start(Session *s) {
        if (s->trace)
                return 0;
        SessionTrace *t = calloc(1, sizeof(SessionTrace));
        if (!t)
                return -ENOMEM;
        t->s = s;
        imap_trace_init(&t->it, trace_send, t);
        s->trace = t;
        return 0;
}

void trace_feed(Session *s, IpcTraceDir dir, const void *buf, size_t len) {
        imap_trace_feed(&s->trace->it, dir, buf, len);
}

void trace_note(Session *s, const char *fmt, ...) {
        char line[IPC_TRACE_LINE_MAX];
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(line, sizeof(line), fmt, ap);
        va_end(ap);
        if (n < 0)
                return;
        for (char *p = line; *p; p++)
                if ((unsigned char) *p < 0x20 || *p == 0x7f)
                        *p = '?';
        trace_send(s->trace, IPC_TRACE_PROXY, line, (size_t) n >= sizeof(line));
}
