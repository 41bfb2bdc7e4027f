/*
 * relay.c -- the client after login: relay both ways, intercept LOGOUT,
 * return the backend connection.
 *
 * SYNOPSIS
 *	int relay_run(Session *s);
 * DESCRIPTION
 *	Non-blocking relay between the client socket and the lent backend
 *	socket with one buffer per direction and poll(). Both directions go
 *	through the IMAP scanner so that command boundaries are known:
 *	  client -> backend: a command's first segment (up to its first literal
 *	    or its end) is held until complete, so LOGOUT is recognised and never
 *	    forwarded; literal bodies stream through as they arrive.
 *	  backend -> client: forwarded as read; tagged completions are matched
 *	    against the commands we forwarded (a tag we did not forward means the
 *	    streams disagree: the connection is tainted), continuations release
 *	    synchronising literals and IDLE.
 *	The phases:
 *	  ACTIVE --client LOGOUT, or client gone at a command boundary--> DRAIN
 *	  DRAIN  --all forwarded commands answered--> RESET (if a mailbox may be
 *	         selected: our own UNSELECT, responses swallowed) --> DONE
 *	At DONE the connection goes back to the broker CLEAN only if nothing
 *	tainted it (state-changing commands such as ENABLE or COMPRESS, unknown
 *	commands, a client that left mid-command, a backend BYE, a scanner
 *	error); otherwise DIRTY. Then the client gets "* BYE" and its tagged OK
 *	in one write.
 *	A reused connection that turns out dead before the backend has said
 *	anything (EOF, a write error, or "* BYE" as its first line: kicked or
 *	restarted while pooled, faster than the broker could notice) is not the
 *	client's problem: nothing has reached the client yet, so the relay
 *	returns it dirty, logs in afresh (IPC_CHECKOUT_F_FRESH, with the
 *	credentials kept for exactly this moment) and replays the client's
 *	bytes to the new connection. Once the backend has answered, the
 *	credentials are wiped and a dead backend ends the session as before.
 *	The client side goes through client_recv()/client_send() (session.h):
 *	plain system calls in imapproxy-session, GnuTLS records in
 *	imapproxy-session-tls, where records already decrypted but not yet read
 *	(client_pending()) count as readable, since poll() cannot see them.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "capability.h"
#include "fd-util.h"
#include "log.h"
#include "session.h"

#define RELAY_CHUNK (256 * 1024)
#define RELAY_SLACK 4096 /* room for capability lines that grow when filtered */
#define TAG_TRACK_MAX 64
#define PIPELINE_MAX 128
#define PROXY_TAG "IMAPPROXY-RESET"
#define REPLAY_MAX (64 * 1024) /* client bytes kept for a retry on a fresh connection */
#define RELAY_RETRY 2          /* relay_once(): the reused connection was dead, log in afresh */

typedef enum RelayPhase {
        RELAY_ACTIVE,
        RELAY_DRAIN,
        RELAY_RESET,
        RELAY_DONE,
        _RELAY_PHASE_MAX,
} RelayPhase;

static const char *const relay_phase_names[_RELAY_PHASE_MAX] = {
        [RELAY_ACTIVE] = "active", [RELAY_DRAIN] = "drain", [RELAY_RESET] = "reset", [RELAY_DONE] = "done",
};
static_assert(ELEMENTSOF(relay_phase_names) == _RELAY_PHASE_MAX, "phase names");

typedef enum CmdKind {
        CMD_OTHER,    /* no lasting effect on the connection beyond the selected mailbox */
        CMD_SELECT,   /* SELECT/EXAMINE: a mailbox may be selected afterwards */
        CMD_UNSELECT, /* CLOSE/UNSELECT: unselected after OK */
        CMD_IDLE,
        CMD_TAINT,    /* changes the connection for good, or unknown */
        CMD_RESET,    /* ours */
} CmdKind;

typedef struct PendingCmd {
        char tag[TAG_TRACK_MAX + 1];
        CmdKind kind;
} PendingCmd;

typedef struct Relay {
        Session *s;
        RelayPhase phase;
        ImapScanner *csc, *ssc;

        uint8_t *cbuf;                 /* client -> backend */
        size_t ccap, clen, cscan, cready, csent;
        uint8_t *sbuf;                 /* backend -> client, RELAY_CHUNK + RELAY_SLACK */
        size_t slen, sscan, sfwd, ssent;
        size_t sline_start;            /* where the current backend line began in sbuf, or SIZE_MAX */
        char local_reply[TAG_TRACK_MAX + 128]; /* our answer to a client command, sent at a line boundary */

        bool client_reading, client_alive, backend_open;
        bool backend_hup;              /* poll said POLLERR/POLLHUP: read it once sbuf is free */
        bool server_scan_ok;
        bool selected;                 /* a mailbox may be selected */
        bool tainted;                  /* never reuse */
        const char *taint_reason;

        /* the client command being scanned */
        bool cmd_classified, cmd_forwarded_part, expect_raw;
        char cmd_tag[TAG_TRACK_MAX + 1];
        bool literal_wait;             /* sync literal forwarded, waiting for "+" */
        bool idle_active;              /* "+" seen for IDLE, DONE not yet sent */

        bool logout_requested;
        char *logout_tag;
        const char *bye_text;

        uint64_t last_client_usec, last_backend_usec, phase_deadline_usec;
        PendingCmd pend[PIPELINE_MAX];
        unsigned n_pend;

        /* while s->retry_armed: every client byte so far, for the retry */
        uint8_t *replay;
        size_t replay_len, replay_cap;
        bool backend_dead_early;
} Relay;

static void replay_drop(Relay *r) {
        if (r->replay) {
                explicit_bzero(r->replay, r->replay_len);
                free(r->replay);
        }
        r->replay = NULL;
        r->replay_len = r->replay_cap = 0;
}

/* The backend answered (or a retry could no longer be transparent). */
static void retry_disarm(Relay *r) {
        replay_drop(r);
        session_retry_disarm(r->s);
}

static void replay_record(Relay *r, const uint8_t *p, size_t n) {
        if (!r->s->retry_armed || n == 0)
                return;
        if (r->replay_len + n > REPLAY_MAX) {
                retry_disarm(r);
                return;
        }
        if (r->replay_len + n > r->replay_cap) {
                /* usually one command line before the backend answers: start small */
                size_t cap = MAX(r->replay_cap, (size_t) 1024);
                while (cap < r->replay_len + n)
                        cap *= 2;
                cap = MIN(cap, (size_t) REPLAY_MAX);
                uint8_t *q = malloc(cap);
                if (!q) {
                        retry_disarm(r);
                        return;
                }
                if (r->replay) {
                        memcpy(q, r->replay, r->replay_len);
                        explicit_bzero(r->replay, r->replay_len);
                        free(r->replay);
                }
                r->replay = q;
                r->replay_cap = cap;
        }
        memcpy(r->replay + r->replay_len, p, n);
        r->replay_len += n;
}

/* Whether a dead backend can still be replaced without the client noticing. */
static bool backend_dead_early(Relay *r) {
        if (!r->s->retry_armed || !r->client_alive || r->phase == RELAY_RESET)
                return false;
        r->backend_dead_early = true;
        r->backend_open = false;
        return true;
}

static void relay_taint(Relay *r, const char *why) {
        if (!r->tainted)
                log_debug("connection of %s not reusable: %s", r->s->user, why);
        r->tainted = true;
        if (!r->taint_reason)
                r->taint_reason = why;
}

static void relay_enter_phase(Relay *r, RelayPhase p) {
        log_debug("relay %s: %s -> %s", r->s->user, relay_phase_names[r->phase], relay_phase_names[p]);
        r->phase = p;
        r->phase_deadline_usec = now_usec() + (uint64_t) r->s->cfg.backend_timeout * 1000000ULL;
}

/* ---- command tracking ---- */

static CmdKind classify(const ImapLine *l) {
        static const char *const harmless[] = {
                "CAPABILITY", "NOOP", "CHECK", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
                "LIST", "LSUB", "STATUS", "APPEND", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
                "UID", "NAMESPACE", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "GETACL", "SETACL", "DELETEACL",
                "LISTRIGHTS", "MYRIGHTS", "GETMETADATA", "SETMETADATA", "ID", "SORT", "THREAD", "ESEARCH",
                "XLIST", "GENURLAUTH", "URLFETCH", "RESETKEY", "REPLACE",
        };
        const ImapArg *cmd = &l->args[1];

        if (imap_arg_is(cmd, "SELECT") || imap_arg_is(cmd, "EXAMINE"))
                return CMD_SELECT;
        if (imap_arg_is(cmd, "CLOSE") || imap_arg_is(cmd, "UNSELECT"))
                return CMD_UNSELECT;
        if (imap_arg_is(cmd, "IDLE"))
                return CMD_IDLE;
        for (size_t i = 0; i < ELEMENTSOF(harmless); i++)
                if (imap_arg_is(cmd, harmless[i]))
                        return CMD_OTHER;
        return CMD_TAINT; /* ENABLE, COMPRESS, STARTTLS, NOTIFY, LANGUAGE, AUTHENTICATE, unknown... */
}

static bool tag_trackable(const ImapArg *a) {
        return a->type == IMAP_ARG_ATOM && !a->truncated && a->len > 0 && a->len <= TAG_TRACK_MAX &&
               a->depth == 0 && !(a->len == 1 && (a->str[0] == '*' || a->str[0] == '+'));
}

static void pend_push(Relay *r, const char *tag, CmdKind kind) {
        if (r->n_pend >= PIPELINE_MAX) {
                relay_taint(r, "too many pipelined commands to track");
                return;
        }
        PendingCmd *p = &r->pend[r->n_pend++];
        snprintf(p->tag, sizeof(p->tag), "%s", tag);
        p->kind = kind;
}

static int pend_find(Relay *r, const ImapArg *tag) {
        for (unsigned i = 0; i < r->n_pend; i++)
                if (strlen(r->pend[i].tag) == tag->len && memcmp(r->pend[i].tag, tag->str, tag->len) == 0)
                        return (int) i;
        return -1;
}

static void pend_remove(Relay *r, unsigned i) {
        memmove(&r->pend[i], &r->pend[i + 1], (r->n_pend - i - 1) * sizeof(PendingCmd));
        r->n_pend--;
}

static bool pend_has_idle(const Relay *r) {
        for (unsigned i = 0; i < r->n_pend; i++)
                if (r->pend[i].kind == CMD_IDLE)
                        return true;
        return false;
}

/* First segment of a client command complete: decide what it is. */
static void client_classify(Relay *r, const ImapLine *l) {
        r->cmd_classified = true;
        r->cmd_tag[0] = '\0';
        if (l->n_args < 2 || !tag_trackable(&l->args[0]) || l->args[1].type != IMAP_ARG_ATOM) {
                relay_taint(r, "client line that is not a command we can track");
                return;
        }
        memcpy(r->cmd_tag, l->args[0].str, l->args[0].len);
        r->cmd_tag[l->args[0].len] = '\0';
        CmdKind k = classify(l);
        if (k == CMD_TAINT)
                relay_taint(r, "state-changing or unknown command");
        if (k == CMD_SELECT)
                r->selected = true; /* from now on, whatever the answer */
        pend_push(r, r->cmd_tag, k);
}

static bool is_logout_line(const ImapLine *l) {
        return l->n_args == 2 && tag_trackable(&l->args[0]) && imap_arg_is(&l->args[1], "LOGOUT");
}

static void start_drain(Relay *r) {
        r->client_reading = false;
        r->clen = r->cready; /* anything after LOGOUT, or a partial line, is dropped */
        if (r->cscan > r->clen)
                r->cscan = r->clen;
        relay_enter_phase(r, RELAY_DRAIN);
}

/* The client is gone or refused: end like a LOGOUT if we are at a command
 * boundary, else the connection cannot be trusted. */
static void client_gone(Relay *r, const char *why) {
        bool boundary = imap_scanner_at_line_start(r->csc) && r->cready == r->clen && !r->literal_wait;
        log_debug("client of %s: %s (%s)", r->s->user, why, boundary ? "at a command boundary" : "mid-command");
        if (!boundary || r->expect_raw || r->idle_active)
                relay_taint(r, "client left in the middle of a command");
        r->client_reading = false;
        start_drain(r);
        if (r->tainted)
                relay_enter_phase(r, RELAY_DONE); /* nothing to save by draining */
}

static void client_refuse(Relay *r, const char *text) {
        char msg[TAG_TRACK_MAX + 256];
        const ImapLine *pl = imap_scanner_partial_line(r->csc);
        const char *tag = "*";
        char tagbuf[TAG_TRACK_MAX + 1];
        if (pl && pl->n_args > 0 && tag_trackable(&pl->args[0])) {
                memcpy(tagbuf, pl->args[0].str, pl->args[0].len);
                tagbuf[pl->args[0].len] = '\0';
                tag = tagbuf;
        }
        r->bye_text = text;
        if (r->cmd_forwarded_part)
                relay_taint(r, "client command refused after part of it was forwarded");
        int n = snprintf(msg, sizeof(msg), "%s BAD %s\r\n", tag, text);
        if (r->client_alive && n > 0 && (size_t) n < sizeof(msg))
                (void) client_write(r->s, msg, (size_t) n);
        /* Drop the refused command and everything after it; end the session. */
        r->clen = r->cscan = r->cready;
        r->cmd_forwarded_part = false;
        imap_scanner_reset(r->csc);
        r->client_reading = false;
        start_drain(r);
}

/* Scan new client bytes; move cready over what may be forwarded. */
static void client_scan(Relay *r) {
        while (r->cscan < r->clen && r->phase == RELAY_ACTIVE) {
                uint64_t rem = imap_scanner_literal_remaining(r->csc);
                size_t avail = r->clen - r->cscan, used = 0;
                if (rem > 0) {
                        /* literal body: stream it */
                        size_t take = rem < avail ? (size_t) rem : avail;
                        int ev = imap_scanner_feed(r->csc, r->cbuf + r->cscan, take, &used);
                        r->cscan += used;
                        r->cready = r->cscan;
                        if (ev < 0 || used == 0) {
                                relay_taint(r, "scanner stuck in a literal");
                                return;
                        }
                        continue;
                }

                int ev = imap_scanner_feed(r->csc, r->cbuf + r->cscan, avail, &used);
                r->cscan += used;
                if (ev < 0) {
                        switch (ev) {
                        case -EMSGSIZE:
                                client_refuse(r, "Command line too long.");
                                break;
                        case -EFBIG:
                                client_refuse(r, "Literal too big.");
                                break;
                        default:
                                client_refuse(r, imap_scanner_error_text(r->csc));
                        }
                        return;
                }
                if (ev == IMAP_SCAN_NEED_MORE)
                        return;
                if (ev == IMAP_SCAN_LITERAL) {
                        uint64_t size;
                        unsigned flags;
                        imap_scanner_literal(r->csc, &size, &flags);
                        if (!r->cmd_classified)
                                client_classify(r, imap_scanner_partial_line(r->csc));
                        r->cready = r->cscan;
                        r->cmd_forwarded_part = true;
                        if (!(flags & IMAP_LITERAL_NONSYNC))
                                r->literal_wait = true;
                        continue;
                }
                /* IMAP_SCAN_LINE */
                const ImapLine *l = imap_scanner_line(r->csc);
                if (r->expect_raw) {
                        r->expect_raw = false; /* DONE (or an AUTHENTICATE answer) */
                        r->idle_active = false;
                } else if (!r->cmd_classified && is_logout_line(l)) {
                        r->logout_requested = true;
                        r->logout_tag = strndup(l->args[0].str, l->args[0].len);
                        if (!r->logout_tag)
                                relay_taint(r, "out of memory");
                        r->clen = r->cscan = r->cready; /* LOGOUT is ours: never forwarded */
                        start_drain(r);
                        return;
                } else if (!r->cmd_classified && l->n_args >= 2 && tag_trackable(&l->args[0]) &&
                           imap_arg_is(&l->args[1], "COMPRESS")) {
                        /* Not advertised, and the relay cannot follow a compressed
                         * stream: answer it ourselves, never forward it. */
                        retry_disarm(r); /* a replay would answer it twice */
                        snprintf(r->local_reply, sizeof(r->local_reply),
                                 "%.*s NO [CANNOT] COMPRESS is not available through this proxy.\r\n",
                                 (int) l->args[0].len, l->args[0].str);
                        memmove(r->cbuf + r->cready, r->cbuf + r->cscan, r->clen - r->cscan);
                        r->clen -= r->cscan - r->cready;
                        r->cscan = r->cready;
                        r->cmd_classified = r->cmd_forwarded_part = false;
                        continue;
                } else if (!r->cmd_classified)
                        client_classify(r, l);
                r->cready = r->cscan;
                r->cmd_classified = r->cmd_forwarded_part = false;
        }
}

/* ---- backend side ---- */

static void start_reset_or_finish(Relay *r);

static void server_line(Relay *r, const ImapLine *l) {
        if (l->n_args == 0)
                return;
        const ImapArg *tag = &l->args[0];

        if (tag->type == IMAP_ARG_ATOM && tag->len == 1 && tag->str[0] == '*') {
                if (l->n_args >= 2 && imap_arg_is(&l->args[1], "BYE"))
                        relay_taint(r, "backend said BYE");
                return;
        }
        if (tag->type == IMAP_ARG_ATOM && tag->len == 1 && tag->str[0] == '+') {
                if (r->literal_wait)
                        r->literal_wait = false;
                else if (pend_has_idle(r) && !r->idle_active) {
                        if (imap_scanner_at_line_start(r->csc) && r->cscan == r->clen) {
                                imap_scanner_expect_raw_line(r->csc);
                                r->expect_raw = true;
                                r->idle_active = true;
                        } else
                                relay_taint(r, "client sent data before IDLE was accepted");
                } else
                        relay_taint(r, "unexpected continuation request");
                return;
        }

        int i = pend_find(r, tag);
        if (i < 0) {
                relay_taint(r, "backend answered a command we did not forward");
                return;
        }
        bool ok = l->n_args >= 2 && imap_arg_is(&l->args[1], "OK");
        PendingCmd *p = &r->pend[i];
        switch (p->kind) {
        case CMD_UNSELECT:
                if (ok)
                        r->selected = false;
                break;
        case CMD_RESET:
                r->selected = false; /* OK, or NO/BAD "no mailbox selected": unselected either way */
                break;
        case CMD_IDLE:
                if (r->expect_raw) {
                        /* IDLE ended by the server before DONE: the client's next line is a command. */
                        imap_scanner_reset(r->csc);
                        r->expect_raw = false;
                }
                r->idle_active = false;
                break;
        default:
                break;
        }
        if (r->literal_wait && strcmp(p->tag, r->cmd_tag) == 0) {
                /* The backend refused a synchronising literal: the client will not send it. */
                r->literal_wait = false;
                imap_scanner_reset(r->csc);
                r->cmd_classified = r->cmd_forwarded_part = false;
        }
        CmdKind kind = p->kind;
        pend_remove(r, (unsigned) i);
        if (kind == CMD_RESET) {
                relay_enter_phase(r, RELAY_DONE);
                return;
        }
}

/* Replace sbuf[start, end) (one whole line) with repl. */
static bool sbuf_replace(Relay *r, size_t start, size_t end, const char *repl, size_t rl) {
        size_t old = end - start;
        if (r->slen - old + rl > RELAY_CHUNK + RELAY_SLACK)
                return false;
        memmove(r->sbuf + start + rl, r->sbuf + end, r->slen - end);
        memcpy(r->sbuf + start, repl, rl);
        r->slen = r->slen - old + rl;
        r->sscan = r->sscan - old + rl;
        return true;
}

/* The backend's capability list as the client may see it: "* CAPABILITY ..."
 * and "... OK [CAPABILITY ...] ..." lines are rewritten through
 * caps_filter(), so that, e.g., COMPRESS=DEFLATE is never offered. */
static void filter_capability_line(Relay *r, const ImapLine *l) {
        if (l->n_args < 2 || r->sline_start == SIZE_MAX || r->sline_start > r->sscan ||
            r->sline_start != r->sfwd) /* part of it already went to the client */
                return;
        const char *line = (const char *) r->sbuf + r->sline_start;
        size_t len = r->sscan - r->sline_start, caps_at, caps_end;
        bool untagged = l->args[0].len == 1 && l->args[0].str[0] == '*';
        char caps[IPC_CAPS_MAX], filtered[IPC_CAPS_MAX], out[IPC_CAPS_MAX + 512];

        if (untagged && imap_arg_is(&l->args[1], "CAPABILITY")) {
                const char *p = memmem(line, len, "CAPABILITY", 10);
                if (!p)
                        return;
                caps_at = (size_t) (p - line) + 10;
                caps_end = len;
                while (caps_end > caps_at && (line[caps_end - 1] == '\n' || line[caps_end - 1] == '\r'))
                        caps_end--;
        } else if (l->n_args >= 3 && l->args[2].type == IMAP_ARG_CODE &&
                   strncasecmp(l->args[2].str, "CAPABILITY", 10) == 0) {
                const char *p = memmem(line, len, "[", 1);
                const char *q = p ? memchr(p, ']', len - (size_t) (p - line)) : NULL;
                if (!p || !q || (size_t) (q - p) < 11)
                        return;
                caps_at = (size_t) (p - line) + 11;
                caps_end = (size_t) (q - line);
        } else
                return;

        size_t cl = caps_end > caps_at ? caps_end - caps_at : 0;
        if (cl >= sizeof(caps))
                return;
        memcpy(caps, line + caps_at, cl);
        caps[cl] = '\0';
        caps_filter(caps, 0, filtered, sizeof(filtered));
        int n = snprintf(out, sizeof(out), "%.*s %s%.*s", (int) (caps_at - (caps_at > 0 && line[caps_at - 1] == ' ')),
                         line, filtered, (int) (len - caps_end), line + caps_end);
        if (n < 0 || (size_t) n >= sizeof(out))
                return;
        (void) sbuf_replace(r, r->sline_start, r->sscan, out, (size_t) n);
}

/* Scan sbuf[sscan..slen); bytes scanned while forwarding to the client
 * extend sfwd; in RESET they are swallowed. */
static void server_scan(Relay *r) {
        while (r->sscan < r->slen) {
                bool forward = r->phase == RELAY_ACTIVE || r->phase == RELAY_DRAIN;
                size_t used = r->slen - r->sscan;
                if (r->server_scan_ok) {
                        int ev = imap_scanner_feed(r->ssc, r->sbuf + r->sscan, r->slen - r->sscan, &used);
                        if (ev < 0) {
                                relay_taint(r, "backend response the scanner rejects");
                                r->server_scan_ok = false;
                                used = r->slen - r->sscan;
                        } else if (ev == IMAP_SCAN_LINE) {
                                r->sscan += used;
                                if (forward)
                                        filter_capability_line(r, imap_scanner_line(r->ssc));
                                if (forward)
                                        r->sfwd = r->sscan;
                                r->sline_start = r->sscan;
                                server_line(r, imap_scanner_line(r->ssc));
                                if (r->phase == RELAY_DRAIN && r->n_pend == 0)
                                        start_reset_or_finish(r);
                                continue;
                        }
                }
                r->sscan += used;
                if (forward)
                        r->sfwd = r->sscan;
        }
}

static int backend_send_own(Relay *r, const char *cmd) {
        /* Our command goes after everything already forwarded; cbuf has room:
         * reading from the client stopped and the held part was dropped. */
        size_t l = strlen(cmd);
        if (r->clen + l > r->ccap)
                return -ENOBUFS;
        memcpy(r->cbuf + r->clen, cmd, l);
        r->clen += l;
        r->cscan = r->cready = r->clen;
        return 0;
}

static void start_reset_or_finish(Relay *r) {
        if (r->tainted || !r->backend_open || !r->selected) {
                relay_enter_phase(r, RELAY_DONE);
                return;
        }
        /* Deselect without expunging and without the client seeing anything. */
        const char *cmd = capability_list_contains(r->s->postlogin_caps, "UNSELECT")
                                  ? PROXY_TAG " UNSELECT\r\n"
                                  : PROXY_TAG " EXAMINE \"imapproxy/nonexistent/\\\"mailbox\"\r\n";
        if (backend_send_own(r, cmd) < 0) {
                relay_taint(r, "no room for the reset command");
                relay_enter_phase(r, RELAY_DONE);
                return;
        }
        pend_push(r, PROXY_TAG, CMD_RESET);
        relay_enter_phase(r, RELAY_RESET);
}

/* ---- I/O ---- */

static void client_flush(Relay *r);
static void backend_flush(Relay *r);

/* After a read, write at once: poll for POLLOUT only when a write would
 * block (saves a poll round per command on the hot path). */
static void client_read(Relay *r) {
        size_t space = r->ccap - r->clen;
        if (space == 0)
                return;
        ssize_t n = client_recv(r->s, r->cbuf + r->clen, MIN(space, (size_t) RELAY_CHUNK));
        if (n == -EAGAIN || n == -EINTR)
                return;
        if (n <= 0) {
                r->client_alive = false;
                client_gone(r, n == 0 ? "disconnected" : "read error");
                return;
        }
        replay_record(r, r->cbuf + r->clen, (size_t) n);
        TRACE_BYTES(r->s, IPC_TRACE_CLIENT, r->cbuf + r->clen, (size_t) n);
        r->clen += (size_t) n;
        r->last_client_usec = now_usec();
        client_scan(r);
        if (r->backend_open && r->csent < r->cready)
                backend_flush(r);
}

static void client_flush(Relay *r) {
        while (r->ssent < r->sfwd) {
                ssize_t n = client_send(r->s, r->sbuf + r->ssent, r->sfwd - r->ssent);
                if (n == -EINTR)
                        continue;
                if (n == -EAGAIN)
                        return;
                if (n <= 0) {
                        r->client_alive = false;
                        r->ssent = r->sfwd;
                        if (r->phase == RELAY_ACTIVE)
                                client_gone(r, "write error");
                        return;
                }
                r->ssent += (size_t) n;
        }
}

static void backend_read(Relay *r) {
        /* Only when everything read so far has been forwarded (or swallowed). */
        if (r->sscan == r->slen && r->ssent >= r->sfwd) {
                r->slen = r->sscan = r->sfwd = r->ssent = 0;
        } else
                return;
        ssize_t n = recv(r->s->backend_fd, r->sbuf, RELAY_CHUNK, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
        if (n <= 0) {
                if (backend_dead_early(r))
                        return;
                r->backend_open = false;
                relay_taint(r, "backend connection closed");
                return;
        }
        if (r->s->retry_armed) {
                if (n >= 5 && strncasecmp((const char *) r->sbuf, "* BYE", 5) == 0 && backend_dead_early(r))
                        return;
                retry_disarm(r); /* it answered: from now on it is the client's connection */
        }
        TRACE_BYTES(r->s, IPC_TRACE_SERVER, r->sbuf, (size_t) n);
        r->slen = (size_t) n;
        r->sline_start = imap_scanner_at_line_start(r->ssc) ? 0 : SIZE_MAX;
        r->last_backend_usec = now_usec();
        server_scan(r);
        if (r->client_alive && r->ssent < r->sfwd && r->s->client_in == r->s->client_out)
                client_flush(r);
}

static void backend_flush(Relay *r) {
        while (r->csent < r->cready) {
                ssize_t n = send(r->s->backend_fd, r->cbuf + r->csent, r->cready - r->csent, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return;
                if (n <= 0) {
                        if (backend_dead_early(r))
                                return;
                        r->backend_open = false;
                        relay_taint(r, "backend write error");
                        return;
                }
                r->csent += (size_t) n;
                r->last_backend_usec = now_usec();
        }
        /* All forwarded: keep only the held partial segment. */
        if (r->csent == r->cready && r->csent > 0) {
                size_t keep = r->clen - r->cready;
                memmove(r->cbuf, r->cbuf + r->cready, keep);
                r->cscan -= r->cready;
                r->clen = keep;
                r->cready = r->csent = 0;
        }
}

static int relay_finish(Relay *r) {
        Session *s = r->s;
        bool clean = !r->tainted && r->backend_open && r->n_pend == 0 && !r->selected && r->csent == r->cready;

        if (!clean)
                log_info("session of %s ends; backend connection not reused: %s", s->user,
                         r->taint_reason ? r->taint_reason : r->selected ? "mailbox still selected" : "unfinished");
        TRACE_NOTE(s, "session ends: %s", clean ? "connection returned to the pool" : "connection not reusable");
        (void) broker_checkin(s, clean);

        if (!r->client_alive)
                return 0;
        /* What the backend said before stays ahead of our BYE. */
        (void) fd_set_nonblock(s->client_out, false);
        if (r->ssent < r->sfwd)
                (void) client_write(s, (const char *) r->sbuf + r->ssent, r->sfwd - r->ssent);
        char msg[512];
        int n;
        if (r->logout_requested && r->logout_tag)
                n = snprintf(msg, sizeof(msg), "* BYE Logging out\r\n%s OK Logout completed.\r\n", r->logout_tag);
        else if (!r->backend_open)
                n = snprintf(msg, sizeof(msg), "* BYE Connection to the IMAP server lost.\r\n");
        else
                n = snprintf(msg, sizeof(msg), "* BYE %s\r\n", r->bye_text ? r->bye_text : "Disconnecting.");
        if (n > 0 && (size_t) n < sizeof(msg))
                (void) client_write(s, msg, (size_t) n);
        return 0;
}

static int relay_once(Session *s, uint8_t **ret_replay, size_t *ret_replay_len) {
        Relay rel = {
                .s = s,
                .phase = RELAY_ACTIVE,
                .client_reading = true,
                .client_alive = true,
                .backend_open = true,
                .server_scan_ok = true,
        };
        Relay *r = &rel;
        ImapScanLimits clim = {
                .max_line = s->cfg.max_command_line,
                .max_literal = s->cfg.max_literal_size,
                .max_depth = 64,
                .capture_size = 1024,
                .max_args = 4,
        };
        ImapScanLimits slim = {
                .max_line = 1u << 30, /* we only follow the backend, we do not police it */
                .max_literal = UINT64_MAX >> 1,
                .max_depth = 1024,
                .capture_size = 1024,
                .max_args = 4,
        };
        int ret;

        r->ccap = s->cfg.max_command_line + RELAY_CHUNK + 64;
        r->cbuf = malloc(r->ccap);
        r->sbuf = malloc(RELAY_CHUNK + RELAY_SLACK);
        if (!r->cbuf || !r->sbuf || imap_scanner_new(IMAP_SCAN_CLIENT, &clim, &r->csc) < 0 ||
            imap_scanner_new(IMAP_SCAN_SERVER, &slim, &r->ssc) < 0) {
                ret = -ENOMEM;
                relay_taint(r, "out of memory");
                goto out;
        }
        (void) fd_set_nonblock(s->client_in, true);
        (void) fd_set_nonblock(s->client_out, true);
        (void) fd_set_nonblock(s->backend_fd, true);
        r->last_client_usec = r->last_backend_usec = now_usec();

        if (s->pending_len > 0) {
                size_t l = MIN(s->pending_len, r->ccap);
                memcpy(r->cbuf, s->pending, l);
                replay_record(r, r->cbuf, l);
                TRACE_BYTES(s, IPC_TRACE_CLIENT, r->cbuf, l);
                r->clen = l;
                client_scan(r);
        }

        while (r->phase != RELAY_DONE && !r->backend_dead_early) {
                if (!r->client_alive) {
                        r->ssent = r->sfwd; /* nobody to read it */
                        r->local_reply[0] = '\0';
                }
                if (r->phase == RELAY_DRAIN && r->n_pend == 0)
                        start_reset_or_finish(r);
                if (r->phase == RELAY_DONE)
                        break;
                if (r->local_reply[0] && r->ssent == r->sfwd && r->sscan == r->slen &&
                    imap_scanner_at_line_start(r->ssc)) {
                        /* our own answer goes between two backend lines */
                        (void) fd_set_nonblock(s->client_out, false);
                        if (client_write(s, r->local_reply, strlen(r->local_reply)) < 0)
                                r->client_alive = false;
                        (void) fd_set_nonblock(s->client_out, true);
                        r->local_reply[0] = '\0';
                }
                bool backend_can_read = r->backend_open && r->sscan == r->slen && r->ssent >= r->sfwd;
                /* An error or hang-up is reported whatever we ask for: while the
                 * client still has to take what we hold, leave the backend out of
                 * poll() or it would wake us at once, again and again. */
                struct pollfd p[2] = {
                        { .fd = s->client_in, .events = 0 },
                        { .fd = r->backend_hup && !backend_can_read ? -1 : s->backend_fd, .events = 0 },
                };
                if (r->phase == RELAY_ACTIVE && r->client_reading && r->clen < r->ccap)
                        p[0].events |= POLLIN;
                if (r->client_alive && r->ssent < r->sfwd)
                        p[0].events |= POLLOUT;
                if (backend_can_read)
                        p[1].events |= POLLIN;
                if (r->backend_open && r->csent < r->cready)
                        p[1].events |= POLLOUT;
                if (s->client_in != s->client_out && (p[0].events & POLLOUT)) {
                        /* odd inetd set-up: flush synchronously */
                        client_flush(r);
                        p[0].events &= (short) ~POLLOUT;
                }

                if (!r->backend_open) {
                        if (r->phase == RELAY_ACTIVE)
                                log_info("backend connection of %s closed", s->user);
                        break;
                }
                if (r->phase != RELAY_ACTIVE && !r->client_alive && !(p[1].events))
                        break;

                uint64_t now = now_usec(), deadline, backend_deadline = UINT64_MAX;
                /* The backend is late only when it has every byte of every
                 * command (or owes a "+" for a synchronising literal): a client
                 * stalled in the middle of an upload is the client's idle time. */
                bool backend_owes = r->csent == r->cready &&
                                    (r->literal_wait ||
                                     (imap_scanner_at_line_start(r->csc) && r->cready == r->clen));
                if (r->n_pend > 0 && !pend_has_idle(r) && backend_owes)
                        backend_deadline = r->last_backend_usec + (uint64_t) s->cfg.backend_response_timeout * 1000000ULL;
                if (r->phase == RELAY_ACTIVE)
                        deadline = r->last_client_usec + (uint64_t) s->cfg.client_idle_timeout * 1000000ULL;
                else
                        deadline = r->phase_deadline_usec;
                deadline = MIN(deadline, backend_deadline);
                int timeout = deadline > now ? (int) MIN((deadline - now + 999) / 1000, (uint64_t) 3600000) : 0;

                /* Decrypted client bytes waiting above the socket: poll() cannot
                 * see them, so do not sleep on it. */
                bool cpend = (p[0].events & POLLIN) && client_pending(s);
                int n = poll(p, 2, cpend ? 0 : timeout);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        relay_taint(r, "poll failed");
                        break;
                }
                if (cpend) {
                        p[0].revents |= POLLIN;
                        n++;
                }
                if (n == 0) {
                        if (now_usec() >= backend_deadline) {
                                relay_taint(r, "backend did not answer in time");
                                r->bye_text = "Server not responding.";
                                break;
                        }
                        if (r->phase == RELAY_ACTIVE) {
                                r->bye_text = "Disconnected for inactivity.";
                                client_gone(r, "idle timeout");
                        } else {
                                relay_taint(r, "backend did not answer in time");
                                break;
                        }
                        continue;
                }
                if (p[1].revents & (POLLHUP | POLLERR))
                        r->backend_hup = true;
                if (p[1].revents & (POLLIN | POLLHUP | POLLERR))
                        backend_read(r);
                if (p[1].revents & POLLOUT)
                        backend_flush(r);
                if (p[0].revents & POLLOUT)
                        client_flush(r);
                if (p[0].revents & (POLLIN | POLLHUP | POLLERR) && r->phase == RELAY_ACTIVE)
                        client_read(r);
                else if (p[0].revents & (POLLHUP | POLLERR))
                        r->client_alive = false; /* gone while we drain: stop polling it */
                /* Drained already (e.g. LOGOUT with nothing outstanding)? */
                if (r->phase == RELAY_DRAIN && r->n_pend == 0)
                        start_reset_or_finish(r);
                if (r->phase == RELAY_RESET || r->phase == RELAY_DRAIN)
                        backend_flush(r);
        }
        if (r->backend_dead_early) {
                *ret_replay = TAKE_PTR(r->replay);
                *ret_replay_len = r->replay_len;
                r->replay_len = 0;
                ret = RELAY_RETRY;
                goto out;
        }
        ret = relay_finish(r);
out:
        replay_drop(r);
        if (!r->cbuf || !r->sbuf)
                (void) broker_checkin(s, false);
        free(r->logout_tag);
        imap_scanner_free(r->csc);
        imap_scanner_free(r->ssc);
        free(r->cbuf);
        free(r->sbuf);
        return ret;
}

int relay_run(Session *s) {
        uint8_t *replay = NULL;
        size_t replay_len = 0;
        int r = relay_once(s, &replay, &replay_len);

        if (r == RELAY_RETRY) {
                struct ipc_checkout_fail fail;
                char user[IPC_USER_MAX];

                log_info("reused backend connection of %s was dead before it answered: logging in afresh", s->user);
                (void) broker_checkin(s, false);
                snprintf(user, sizeof(user), "%s", s->user);
                int k = broker_checkout(s, user, s->retry_authzid, s->retry_password, IPC_CHECKOUT_F_FRESH, &fail);
                session_retry_disarm(s);
                if (s->pending) {
                        explicit_bzero(s->pending, s->pending_len);
                        free(s->pending);
                }
                s->pending = replay;
                s->pending_len = replay_len;
                if (k == 0)
                        r = relay_once(s, &replay, &replay_len); /* not armed: cannot return RELAY_RETRY */
                else {
                        if (k < 0)
                                log_warning_errno(k, "fresh login for %s: broker not available: %m", user);
                        else
                                log_info("fresh login for %s refused: %s", user, fail.text);
                        static const char bye[] = "* BYE Connection to the IMAP server lost.\r\n";
                        (void) fd_set_nonblock(s->client_out, false);
                        (void) client_write(s, bye, sizeof(bye) - 1);
                        r = 0;
                }
        }
        session_retry_disarm(s);
        return r;
}
