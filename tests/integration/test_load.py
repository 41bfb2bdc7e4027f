#!/usr/bin/env python3
"""Load and soak tests against a real Dovecot (issue 7, "Load").

  Load: LOAD_POOLED (make check: 1000; `make load`: 10000) backend connections
  put in the pool through the broker socket (tests/integration/ipcwire.py:
  checkout with IPC_CHECKOUT_F_FRESH, check in clean), then LOAD_CLIENTS
  (make check: 300; `make load`: 1000) IMAP clients logged in at the same
  time through a fork-server session, each served from the pool, all held
  for LOAD_HOLD seconds with NOOPs, then logged out: no error anywhere, and
  the pool is intact afterwards.

  Soak: SOAK_SECONDS (make check: 60, 20 under the sanitizers; `make soak
  DURATION=3600`) of logins, logouts, expiries (cache_expiration_time 2)
  and `doveadm kick`s mixed; the broker's VmRSS and fd count are sampled and
  must stay flat: after the load stops and the pool has expired, fds are
  back to where they started and VmRSS has grown by less than 25% + 2 MB
  over its value after the warm-up.
"""

import os
import random
import resource
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (RawClient, imap_login, proc_cpu_seconds,  # noqa: E402
                         proc_fd_count, proc_rss_kb, wait_until)
from test_core import ProxyTest  # noqa: E402
import ipcwire  # noqa: E402

SAN = os.environ.get('IMAPPROXY_SAN') == '1'
LOAD_POOLED = int(os.environ.get('LOAD_POOLED') or (300 if SAN else 1000))
LOAD_CLIENTS = int(os.environ.get('LOAD_CLIENTS') or (100 if SAN else 300))
LOAD_HOLD = float(os.environ.get('LOAD_HOLD') or 5)
SOAK_SECONDS = float(os.environ.get('SOAK_SECONDS') or (20 if SAN else 60))

# Dovecot for many connections: several clients per imap process (one uid,
# test only), login processes in high-performance mode, no per-user cap.
DOVECOT_MANY = '''
default_client_limit = 16000
default_vsz_limit = 1G
service imap {
  service_count = 0
  client_limit = 250
  process_limit = 200
}
service imap-login {
  service_count = 0
  client_limit = 10000
  process_min_avail = 2
  process_limit = 8
}
service anvil {
  client_limit = 16000
}
protocol imap {
  mail_max_userip_connections = 16000
}
'''


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Load(ProxyTest):
    TMP_PREFIX = 'imapproxy-load-'
    START_PROXY = False
    USERS = {'load%d' % i: 'pw%d' % i for i in range(10)}
    MESSAGES = 2
    DOVECOT_EXTRA = DOVECOT_MANY

    def test_a_pooled_and_concurrent(self):
        need = LOAD_POOLED + 2 * LOAD_CLIENTS + 500
        have = raise_nofile(need)
        if have < need:
            self.skipTest('RLIMIT_NOFILE hard limit %d < %d' % (have, need))
        per_user = LOAD_POOLED // len(self.USERS) + 1
        self.start_proxy(fork_server=True, cache_size=LOAD_POOLED + LOAD_CLIENTS + 10,
                         max_idle_per_user=per_user + LOAD_CLIENTS, cache_expiration_time=3600,
                         client_prelogin_timeout=120)
        bpid = self.px.broker.popen.pid

        # 1. Fill the pool: fresh logins through the broker socket, checked in clean.
        t0 = time.monotonic()
        errors = []

        def filler(users, count):
            try:
                with ipcwire.Wire(self.px.broker_socket, timeout=60) as w:
                    w.hello()
                    for i in range(count):
                        u = users[i % len(users)]
                        kind, ans = w.checkout(u, self.USERS[u], fresh=True)
                        if kind != 'ok':
                            errors.append((u, ans))
                            return
                        ticket, _f, _c, fd = ans
                        w.checkin(ticket, fd, clean=True)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
        users = sorted(self.USERS)
        nthreads = 8
        threads = [threading.Thread(target=filler, args=(users[k % len(users):] + users[:k % len(users)],
                                                         LOAD_POOLED // nthreads + (k < LOAD_POOLED % nthreads)))
                   for k in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        t_fill = time.monotonic() - t0
        self.assertEqual(errors, [], 'filling the pool')
        wait_until(lambda: proc_fd_count(bpid) >= LOAD_POOLED, 30, 0.2,
                   '%d pooled fds' % LOAD_POOLED)
        live = sum(self.dc.connections(u) for u in users)
        self.assertGreaterEqual(live, LOAD_POOLED, 'Dovecot sees the pooled connections')
        rss_pooled = proc_rss_kb(bpid)
        fds_pooled = proc_fd_count(bpid)

        # 2. LOAD_CLIENTS clients logged in at once, all from the pool, held.
        logins0 = self.dc.logins(settle=True)
        clients, errors = [], []
        t1 = time.monotonic()
        for i in range(LOAD_CLIENTS):
            try:
                c = RawClient(self.px.port, timeout=60)
                clients.append(c)
                u = users[i % len(users)]
                c.send('L LOGIN %s %s\r\n' % (u, self.USERS[u]))
            except Exception as e:  # noqa: BLE001
                errors.append('connect %d: %r' % (i, e))
        reused = 0
        for i, c in enumerate(clients):
            try:
                untagged, tagged = c.read_tagged('L', timeout=60)
                if not tagged.startswith(b'L OK'):
                    errors.append('login %d: %r' % (i, tagged))
                reused += any(b'XPROXYREUSE' in line for line in untagged)
            except Exception as e:  # noqa: BLE001
                errors.append('login %d: %r' % (i, e))
        t_login = time.monotonic() - t1
        self.assertEqual(errors[:5], [], '%d errors' % len(errors))
        cpu0 = proc_cpu_seconds(bpid)
        end = time.monotonic() + LOAD_HOLD
        rounds = 0
        while time.monotonic() < end:
            for c in clients:
                c.send('N NOOP\r\n')
            for i, c in enumerate(clients):
                _, tagged = c.read_tagged('N', timeout=60)
                if not tagged.startswith(b'N OK'):
                    errors.append('noop %d: %r' % (i, tagged))
            rounds += 1
        cpu_hold = proc_cpu_seconds(bpid) - cpu0
        for c in clients:
            c.send('S SELECT INBOX\r\nO LOGOUT\r\n')
        for i, c in enumerate(clients):
            _, tagged = c.read_tagged('O', timeout=60)
            if not tagged.startswith(b'O OK'):
                errors.append('logout %d: %r' % (i, tagged))
            c.close()
        self.assertEqual(errors[:5], [], '%d errors' % len(errors))
        self.assertEqual(reused, LOAD_CLIENTS, 'every client served from the pool')
        self.assertEqual(self.dc.logins(settle=True), logins0, 'no fresh backend login while the pool was full')
        self.assertTrue(self.px.broker.alive())
        wait_until(lambda: proc_fd_count(bpid) >= fds_pooled - 5, 30, 0.2,
                   'connections back in the pool')
        print('    [load] %d pooled backend connections in %.1fs (%.0f/s); %d clients logged in at once '
              'in %.1fs, %d NOOP rounds over %.0fs; broker RSS %d MB with the pool full, %d fds, '
              'CPU %.2fs while held' % (LOAD_POOLED, t_fill, LOAD_POOLED / t_fill, LOAD_CLIENTS, t_login,
                                        rounds, LOAD_HOLD, rss_pooled // 1024, fds_pooled, cpu_hold))


class Soak(ProxyTest):
    START_PROXY = False
    USERS = {'s%d' % i: 'pw%d' % i for i in range(8)}

    def test_soak(self):
        self.start_proxy(cache_expiration_time=2, cache_size=40, fork_server=True)
        bpid = self.px.broker.popen.pid
        users = sorted(self.USERS)
        stop = threading.Event()
        stats = {'logins': 0, 'kicks': 0, 'login_errors': [], 'dropped': 0}
        lock = threading.Lock()

        def worker(seed):
            rnd = random.Random(seed)
            while not stop.is_set():
                u = rnd.choice(users)
                try:
                    m = imap_login(self.px.port, u, self.USERS[u], timeout=20)
                except Exception as e:  # noqa: BLE001
                    with lock:
                        stats['login_errors'].append('%s: %r' % (u, e))
                    continue
                with lock:
                    stats['logins'] += 1
                try:
                    m.select('INBOX')
                    m.fetch('1:*', '(FLAGS)')
                    if rnd.random() < 0.2:
                        time.sleep(rnd.uniform(0, 2.5))  # let some expire meanwhile
                    m.logout()
                except Exception:  # noqa: BLE001 - kicked while in use: the server's doing
                    with lock:
                        stats['dropped'] += 1
                    try:
                        m.shutdown()
                    except Exception:  # noqa: BLE001
                        pass
                time.sleep(rnd.uniform(0, 0.05))

        def kicker():
            rnd = random.Random(7)
            while not stop.wait(1.0):
                self.dc.kick(rnd.choice(users))
                with lock:
                    stats['kicks'] += 1

        samples = []  # (t, rss_kb, fds)
        fds_start = proc_fd_count(bpid)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        threads.append(threading.Thread(target=kicker))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            while time.monotonic() - t0 < SOAK_SECONDS:
                time.sleep(1.0)
                self.assertTrue(self.px.broker.alive(), 'broker died during the soak')
                samples.append((time.monotonic() - t0, proc_rss_kb(bpid), proc_fd_count(bpid)))
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        # The pool empties by expiry (2 s) once nothing uses it.
        wait_until(lambda: proc_fd_count(bpid) <= fds_start, 20, 0.2,
                   'broker fds back to %d (now %d)' % (fds_start, proc_fd_count(bpid)))
        rss_end = proc_rss_kb(bpid)
        warm = [s for s in samples if s[0] >= SOAK_SECONDS * 0.2] or samples
        rss_warm = warm[0][1]
        rss_max = max(s[1] for s in warm)
        fds_max = max(s[2] for s in samples)
        print('    [soak] %.0fs: %d logins, %d kicks, %d sessions cut by a kick, %d login errors; '
              'broker VmRSS %d KB after warm-up, max %d KB, %d KB at the end; fds %d at start, '
              'max %d, %d at the end' % (SOAK_SECONDS, stats['logins'], stats['kicks'], stats['dropped'],
                                         len(stats['login_errors']), rss_warm, rss_max, rss_end,
                                         fds_start, fds_max, proc_fd_count(bpid)))
        self.assertEqual(stats['login_errors'][:5], [], 'logins failed during the soak')
        self.assertGreater(stats['logins'], SOAK_SECONDS * 2, 'the soak did too little to mean anything')
        self.assertGreater(stats['kicks'], 0)
        self.assertLess(rss_max, rss_warm * 1.25 + 2048, 'broker VmRSS grew during the soak: %r' % samples)
        self.assertLess(rss_end, rss_warm * 1.25 + 2048, 'broker VmRSS grew during the soak')
        self.assertLessEqual(fds_max, fds_start + 40 + 5, 'broker fds beyond cache_size')
        # Churn really happened: pooled connections expired or were kicked and
        # new backend logins replaced them (8 users, at most 8 idle each).
        backend_logins = self.dc.logins(settle=True)
        print('    [soak] %d backend logins for %d client logins' % (backend_logins, stats['logins']))
        self.assertGreater(backend_logins, 2 * len(users), 'no expiry or kick made the broker log in again')


if __name__ == '__main__':
    unittest.main()
