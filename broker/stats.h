/*
 * stats.h -- the broker's counters (pimpstat's, plus failures and expiries).
 * See stats.c.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef struct Broker Broker;

/* Totals since the broker started; peaks of the current-value gauges that
 * live in Broker (n_peers, n_lent, n_idle). Only stats.c and the places that
 * see an event write them; imapproxyctl stats and STATUS= read them. */
typedef struct Stats {
        uint64_t clients_total;       /* sessions that said hello */
        uint64_t logins_total;        /* successful checkouts (connections lent) */
        uint64_t reuses_total;        /* ... of which from the pool (cache hits) */
        uint64_t backend_logins;      /* fresh backend logins that succeeded */
        uint64_t login_failures;      /* NO/BAD from the backend, or not the shared secret */
        uint64_t backend_errors;      /* connect/greeting/timeout errors */
        uint64_t expired;             /* idle connections closed after cache_expiration_time */
        uint64_t dead;                /* idle connections found dead (EOF, BYE, junk) */
        uint64_t dirty;               /* returned dirty or never returned: not reused */
        uint64_t flushed;             /* connections closed by imapproxyctl flush */
        uint64_t trace_dropped;       /* trace lines dropped: session or imapproxyctl too slow */
        uint64_t peers_refused;       /* broker connections closed at once: max_peers or no fd left */
        unsigned peak_lent, peak_idle, peak_clients;
} Stats;

/* Record a new value of a gauge; keeps its peak. */
void stats_note_clients(Stats *s, unsigned n_peers);
void stats_note_lent(Stats *s, unsigned n_lent);
void stats_note_idle(Stats *s, unsigned n_idle);

/* Cache hits per 1000 logins (0 when there was none). */
unsigned stats_hit_permille(const Stats *s);

/* One human-readable line for sd_notify STATUS= (without "STATUS="). */
int stats_format_status(const Broker *b, char *buf, size_t size);
