/*
 * stats.c -- the broker's counters: what up-imapproxy's pimpstat showed
 * (current and peak clients, lent/idle/peak backend connections, logins,
 * reuses, hit ratio) plus failures, expiries, dead, dirty and flushed
 * connections.
 *
 * SYNOPSIS
 *	void stats_note_clients(Stats *s, unsigned n_peers);
 *	void stats_note_lent(Stats *s, unsigned n_lent);
 *	void stats_note_idle(Stats *s, unsigned n_idle);
 *	unsigned stats_hit_permille(const Stats *s);
 *	int stats_format_status(const Broker *b, char *buf, size_t size);
 * DESCRIPTION
 *	The totals are plain uint64_t fields of Broker.stats incremented where
 *	the event happens (peer.c, pool.c, backend.c); the current values are
 *	Broker's own gauges (n_peers, n_lent, n_idle, n_pending). This module
 *	keeps the peaks and formats what readers show: the STATUS= line
 *	(main.c) and the admin STATS reply (admin.c, imapproxyctl stats).
 * ERRORS
 *	stats_format_status(): 0 or -ENOBUFS. Never logs.
 */
#include <errno.h>
#include <stdio.h>

#include "broker.h"

void stats_note_clients(Stats *s, unsigned n_peers) {
        if (n_peers > s->peak_clients)
                s->peak_clients = n_peers;
}

void stats_note_lent(Stats *s, unsigned n_lent) {
        if (n_lent > s->peak_lent)
                s->peak_lent = n_lent;
}

void stats_note_idle(Stats *s, unsigned n_idle) {
        if (n_idle > s->peak_idle)
                s->peak_idle = n_idle;
}

unsigned stats_hit_permille(const Stats *s) {
        if (s->logins_total == 0)
                return 0;
        return (unsigned) (s->reuses_total * 1000u / s->logins_total);
}

int stats_format_status(const Broker *b, char *buf, size_t size) {
        const Stats *s = &b->stats;
        unsigned hit = stats_hit_permille(s);
        int n = snprintf(buf, size, "%u sessions, %u backend connections lent, %u idle; %llu logins, %u.%u%% from cache",
                         b->n_peers, b->n_lent, b->n_idle, (unsigned long long) s->logins_total, hit / 10, hit % 10);
        if (n < 0 || (size_t) n >= size)
                return -ENOBUFS;
        return 0;
}
