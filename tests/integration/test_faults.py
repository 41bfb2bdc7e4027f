#!/usr/bin/env python3
"""Fault injection (issue 7): the proxy under crashes, restarts, cut links and hostile
backends.  Run through tests/integration/run.py (`-k test_faults`).

Every fault is provoked for real: SIGKILL of the broker and of sessions, a real
Dovecot stopped and started, a real Dovecot in its own network namespace whose
veth link is cut with iptables (DROP: the kernel gives ETIMEDOUT after
TCP_USER_TIMEOUT; REJECT --reject-with tcp-reset: ECONNRESET), and small scripted
backends (imapfixture.FakeBackend) that stall or send garbage.  Each test states
the outcome a client must see (a tagged OK, `NO [UNAVAILABLE]`, or `* BYE` and a
close) and bounds it in time: nothing may hang.

Leaks are counted in /proc: the broker's descriptors other than its backend
connections must stay at their start-up count over repeated crash cycles, and every
backend connection it holds must be ESTABLISHED.

"A backend login" is an `imap-login: Info: Login: user=<X>` line in Dovecot's log
(test_core.Validation shows that this counting is real).
"""

import imaplib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (FakeBackend, FixtureError, NetNS, Proxy, RawClient,  # noqa: E402
                         children_of, fd_report, imap_login, make_ca, netns_available,
                         proc_cpu_seconds, proc_fds, proc_rss_kb, session_pid_for, tail, tcp_fds,
                         wait_until)
from fixturecase import FixtureCase  # noqa: E402

MESSAGES = 5


class FaultTest(FixtureCase):
    """A fresh temp dir per test; tests start what they need through the helpers,
    and tearDown (fixturecase.FixtureCase) stops all of it (also when the test
    failed half-way); then a fake backend must have seen no behaviour errors."""

    TMP_PREFIX = 'imapproxy-faults-'
    USERS = {'alice': 'pw', 'bob': 'bobpw', 'carol': 'cpw', 'dave': 'dpw'}
    MESSAGES = MESSAGES
    START_DOVECOT = False
    BROKER_LOG_LINES = 60

    def tearDown(self):
        super().tearDown()
        if self.fake:
            self.assertEqual(self.fake.errors, [], 'fake backend behaviour errors')

    def diagnostics(self):
        out = [super().diagnostics()]
        if self.ns and not self.ns.closed:
            try:
                out.append('iptables in %s:\n%s' % (self.ns.name, self.ns.rules()))
            except FixtureError as e:
                out.append(str(e))
        return '\n'.join(out)

    # -- helpers

    def start_proxy(self, backend=None, **conf):
        base = {'backend_timeout': 5, 'login_failure_delay': 0}
        base.update(conf)
        self.px = Proxy(self.tmp, backend or self.dc, **base)
        return self.px

    def wait_probe(self, n=1, timeout=10):
        """The broker has learnt the backend's capabilities n times (once per start)."""
        wait_until(lambda: self.px.broker_log().count(' capabilities: ') >= n, timeout,
                   what='broker capability probe #%d' % n)

    def assertLoginOK(self, r, user, tag='L', reused=None):
        untagged, tagged = r.login(user, self.USERS[user], tag=tag)
        self.assertRegex(tagged, rb'^' + tag.encode() + rb' OK ', r.dump())
        if reused is not None:
            self.assertEqual(any(b'[XPROXYREUSE]' in u for u in untagged), reused,
                             '%s: XPROXYREUSE expected %s\n%s' % (user, reused, r.dump()))

    def assertUnavailable(self, r, user, tag='L', within=None):
        t0 = time.monotonic()
        _, tagged = r.login(user, self.USERS[user], tag=tag)
        dt = time.monotonic() - t0
        self.assertRegex(tagged, rb'^' + tag.encode() + rb' NO \[UNAVAILABLE\]', r.dump())
        if within is not None:
            self.assertLess(dt, within, 'NO [UNAVAILABLE] took %.1fs' % dt)
        return dt

    def assertEndsCleanly(self, r, within, what):
        """The client gets only `* BYE` lines or tagged NO/BAD, then a close, in time."""
        t0 = time.monotonic()
        try:
            rest = r.read_until_close(timeout=within)
        except socket.timeout:
            self.fail('%s: the client was not disconnected within %.0fs\n%s' % (what, within, r.dump()))
        dt = time.monotonic() - t0
        lines = [ln for ln in rest.split(b'\r\n') if ln]
        self.assertTrue(lines, '%s: closed without a BYE or tagged answer\n%s' % (what, r.dump()))
        for ln in lines:
            self.assertRegex(ln, rb'^(\* BYE |\* OK \[ALERT\] |[A-Za-z0-9]+ (NO|BAD) )',
                             '%s: unexpected line before the close\n%s' % (what, r.dump()))
        return dt

    def visit(self, user, port=None, messages=MESSAGES):
        """A webmail page view: LOGIN, SELECT, FETCH, LOGOUT. Returns True when it went
        through, False on a clean LOGIN NO [UNAVAILABLE]; fails the test on anything else."""
        r = RawClient(port or self.px.port, timeout=10)
        try:
            _, t = r.login(user, self.USERS[user], tag='v1')
            if re.match(rb'v1 NO \[UNAVAILABLE\] ', t):
                return False
            self.assertRegex(t, rb'^v1 OK ', r.dump())
            _, t = r.command('v2', 'SELECT INBOX')
            self.assertRegex(t, rb'^v2 OK ', r.dump())
            u, t = r.command('v3', 'FETCH 1:* (FLAGS)')
            self.assertRegex(t, rb'^v3 OK ', r.dump())
            self.assertEqual(sum(1 for x in u if b' FETCH ' in x), messages, r.dump())
            u, t = r.command('v4', 'LOGOUT')
            self.assertRegex(t, rb'^v4 OK ', r.dump())
            self.assertTrue(any(x.startswith(b'* BYE') for x in u), r.dump())
            self.assertEqual(r.read_until_close(timeout=5), b'', r.dump())
            return True
        except (socket.timeout, EOFError, OSError) as e:
            self.fail('%s: %s\n%s' % (user, e, r.dump()))
        finally:
            r.close()

    def broker_nonbackend_fds(self, port=None):
        rep = fd_report(self.px.broker.pid, port or self.dc.port)
        return rep['other'], rep['backend']

    def dovecot_connections(self):
        return sum(self.dc.connections(u) for u in self.USERS)


# ====================================================================== broker crashes

class BrokerCrash(FaultTest):

    def test_a1_sigkill_and_restart_under_load(self):
        """Three SIGKILL/restart cycles of the broker while four clients log in and out
        in a loop and sessions that hold a backend connection keep running commands."""
        self.start_dovecot()
        self.start_proxy()
        self.wait_probe()
        base_other, base_backend = self.broker_nonbackend_fds()
        self.assertEqual(base_backend, [])
        users = ['alice', 'bob', 'carol', 'dave']
        outcomes = {u: [] for u in users}   # (era, True/False)
        errors = []
        era = [0]                           # even: broker up; odd: it may be down
        paused = threading.Event()
        stop = threading.Event()
        idle = {u: threading.Event() for u in users}

        def load(user):
            while not stop.is_set():
                if paused.is_set():
                    idle[user].set()
                    time.sleep(0.02)
                    continue
                idle[user].clear()
                e = era[0]
                try:
                    ok = self.visit(user)
                except AssertionError as ex:
                    errors.append('%s in era %d: %s' % (user, e, ex))
                    return
                outcomes[user].append((e, era[0], ok))
                time.sleep(0.05)  # a page view now and then, not a CPU hog
            idle[user].set()

        holders = []   # (RawClient, session pid, fds after login, errors list)

        def hold(h):
            r, errs = h[0], h[3]
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    u, t = r.command('h%d' % n, 'FETCH 1:* (FLAGS UID)' if n % 2 else 'NOOP', timeout=10)
                    if not re.match(rb'h%d OK ' % n, t):
                        errs.append('holder got %r' % t)
                        return
                except (socket.timeout, EOFError, OSError) as ex:
                    errs.append('holder: %s' % ex)
                    return
                time.sleep(0.05)

        threads = [threading.Thread(target=load, args=(u,), daemon=True) for u in users]
        for t in threads:
            t.start()
        hold_threads = []
        reports = []
        try:
            for cycle in range(3):
                # A session that holds a backend connection across the crash.
                r = self.raw(timeout=10)
                self.assertLoginOK(r, 'alice', tag='H')
                _, t = r.command('S', 'SELECT INBOX')
                self.assertRegex(t, rb'^S OK ', r.dump())
                spid = session_pid_for(self.px.listener, r.sock)
                h = (r, spid, len(proc_fds(spid)), [])
                holders.append(h)
                ht = threading.Thread(target=hold, args=(h,), daemon=True)
                ht.start()
                hold_threads.append(ht)

                time.sleep(1.2)
                era[0] += 1
                self.px.kill_broker(signal.SIGKILL)
                # New logins during the gap: a clean NO [UNAVAILABLE], at once.
                g = self.raw(timeout=10)
                self.assertUnavailable(g, 'bob', tag='G', within=3)
                g.close()
                time.sleep(1.0)
                self.px.start_broker()
                era[0] += 1
                self.wait_probe(cycle + 2)
                time.sleep(1.2)

                # Quiet point: every load client between two visits.
                paused.set()
                for u in users:
                    idle[u].wait(30)
                    self.assertTrue(idle[u].is_set(), '%s still busy after 30 s' % u)
                self.assertEqual(errors, [])
                other, backend = self.broker_nonbackend_fds()
                reports.append((cycle, other, backend))
                self.assertEqual(other, base_other,
                                 'cycle %d: broker descriptors other than backend connections: %d, '
                                 'at start-up %d:\n%r' % (cycle, other, base_other,
                                                           fd_report(self.px.broker.pid, self.dc.port)['fds']))
                self.assertTrue(all(s == 'ESTABLISHED' for s in backend), backend)
                self.assertLessEqual(len(backend), len(users))
                paused.clear()
        finally:
            stop.set()
            paused.clear()
            for t in threads + hold_threads:
                t.join(20)
        self.assertEqual(errors, [])
        print('    [a1] broker fds besides backend connections per cycle: %r (start-up %d)'
              % ([(c, o, len(b)) for c, o, b in reports], base_other))

        # Sessions that held a connection across the crashes: every command answered,
        # no descriptor gained, and LOGOUT still gets BYE + OK.
        for r, spid, nfd, errs in holders:
            self.assertEqual(errs, [], r.dump())
            self.assertEqual(len(proc_fds(spid)), nfd, 'session %d: fds after the crashes' % spid)
            u, t = r.command('Z', 'LOGOUT')
            self.assertRegex(t, rb'^Z OK ', r.dump())
            self.assertEqual(r.read_until_close(timeout=5), b'')
        # Load: visits succeeded in every era the broker was up, and logins during
        # the gaps were refused cleanly (they did happen: the test exercised the gap).
        for u in users:
            self.assertTrue(any(ok for e0, e1, ok in outcomes[u] if e0 == e1 == 6),
                            '%s: no successful visit after the last restart: %r' % (u, outcomes[u][-10:]))
        refused = sum(1 for u in users for e0, e1, ok in outcomes[u] if not ok)
        wrong = [(u, e0) for u in users for e0, e1, ok in outcomes[u] if e0 == e1 and not e0 % 2 and not ok]
        self.assertEqual(wrong, [], 'visits refused while the broker was up (user, era)')
        print('    [a1] visits: %d went through, %d refused cleanly during the gaps'
              % (sum(len(o) for o in outcomes.values()) - refused, refused))
        self.assertGreater(refused, 0, 'no login ever fell into a gap: the test proved nothing')
        # Nothing stays connected to Dovecot but what the broker pools.
        _, backend = self.broker_nonbackend_fds()
        wait_until(lambda: self.dovecot_connections() == len(self.broker_nonbackend_fds()[1]), 10,
                   what='Dovecot connections == connections pooled by the broker')
        self.assertEqual(children_of(self.px.listener.pid), [], 'sessions left running')

    def test_a2_greeted_before_crash_logs_in_after_restart(self):
        """A client greeted by a session whose broker then crashed and restarted logs in
        with its first LOGIN; the session holds no more descriptors than any other."""
        self.start_dovecot()
        self.start_proxy()
        self.wait_probe()
        early = self.raw()
        spid = session_pid_for(self.px.listener, early.sock)
        self.px.kill_broker(signal.SIGKILL)
        self.px.start_broker()
        self.wait_probe(2)
        self.assertLoginOK(early, 'alice')
        _, t = early.command('S', 'SELECT INBOX')
        self.assertRegex(t, rb'^S OK ', early.dump())
        normal = self.raw()
        self.assertLoginOK(normal, 'bob')
        npid = session_pid_for(self.px.listener, normal.sock)
        self.assertEqual(sorted(proc_fds(spid)), sorted(proc_fds(npid)),
                         'fds of the session greeted before the crash vs. a fresh one')
        # A login during the gap, then after the restart, from one session.
        self.px.kill_broker(signal.SIGKILL)
        gap = self.raw()
        gpid = session_pid_for(self.px.listener, gap.sock)
        self.assertUnavailable(gap, 'carol', tag='G1', within=3)
        self.assertUnavailable(gap, 'carol', tag='G2', within=3)
        self.px.start_broker()
        self.assertLoginOK(gap, 'carol', tag='G3')
        self.assertEqual(sorted(proc_fds(gpid)), sorted(proc_fds(npid)),
                         'fds of a session whose logins failed during the gap vs. a fresh one')
        for r in (early, normal, gap):
            _, t = r.command('Z', 'LOGOUT')
            self.assertRegex(t, rb'^Z OK ', r.dump())

    @unittest.skipIf(not shutil.which('certtool'), 'certtool (gnutls-bin) not installed')
    def test_a3_sigkill_with_tls_backend(self):
        """With a TLS backend the broker relays lent connections, so they end with it:
        the client gets a BYE and a close at once (no hang), and after the restart
        logins work again."""
        from test_tls_backend import make_server_cert
        ca_pem, ca_key = make_ca(self.tmp, 'faultca')
        self.start_dovecot(tls=make_server_cert(self.tmp, ca_pem, ca_key))
        self.start_proxy(server_tls='starttls', tls_ca_file=ca_pem)
        self.wait_probe()
        lent = self.raw(timeout=10)
        self.assertLoginOK(lent, 'alice')
        _, t = lent.command('S', 'SELECT INBOX')
        self.assertRegex(t, rb'^S OK ', lent.dump())
        self.px.kill_broker(signal.SIGKILL)
        dt = self.assertEndsCleanly(lent, 5, 'TLS-relayed session when the broker died')
        g = self.raw()
        self.assertUnavailable(g, 'bob', within=3)
        self.px.start_broker()
        self.assertLoginOK(g, 'bob', tag='L2')
        self.assertTrue(self.visit('alice'))
        self.assertIn(', TLS', [ln for ln in self.dc.settled_log().splitlines()
                                if 'Login: user=<alice>' in ln][-1])
        print('    [a3] TLS-relayed client disconnected %.2fs after the broker was killed' % dt)


# ====================================================================== session crashes

def append_literal_cmd(tag, size):
    return '%s APPEND INBOX {%d}\r\n' % (tag, size)


class SessionKill(FaultTest):

    def message(self, size, marker):
        head = ('From: a@example.org\r\nTo: b@example.org\r\nSubject: %s\r\n\r\n' % marker).encode()
        body = (b'0123456789abcdef' * (size // 16 + 1))[:size - len(head) - 2] + b'\r\n'
        return head + body

    def mailbox(self, user):
        """(message count, {subject: size}) read directly from Dovecot."""
        m = imap_login(self.dc.port, user, self.USERS[user])
        try:
            typ, data = m.select('INBOX', readonly=True)
            n = int(data[0])
            sizes = {}
            if n:
                typ, data = m.fetch('1:*', '(RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
                for item in data:
                    if isinstance(item, tuple):
                        sz = int(re.search(rb'RFC822\.SIZE (\d+)', item[0]).group(1))
                        subj = re.search(rb'Subject: ([^\r\n]*)', item[1])
                        sizes[subj.group(1).decode() if subj else '?'] = sz
            return n, sizes
        finally:
            m.logout()

    def lent_session(self, user, reuse):
        """A client logged in through the proxy (on a pooled connection when reuse) and
        its session pid and backend connection (local address)."""
        r = self.raw(timeout=10)
        self.assertLoginOK(r, user, reused=reuse)
        spid = session_pid_for(self.px.listener, r.sock)
        back = tcp_fds(spid, self.dc.port)
        self.assertEqual(len(back), 1, 'session %d backend sockets: %r' % (spid, back))
        return r, spid, back[0][1]

    def assertNotReused(self, user, killed_local, logins_before):
        """The next login of user is a new backend login on a new connection."""
        r, spid, local = self.lent_session(user, reuse=False)
        self.assertNotEqual(local, killed_local, 'the killed session\'s backend connection was lent again')
        self.dc.wait_logins(logins_before + 1, user)
        _, t = r.command('Z', 'LOGOUT')
        self.assertRegex(t, rb'^Z OK ', r.dump())

    def test_b1_killed_during_append(self):
        """SIGKILL of a session in the middle of an APPEND literal (on a reused
        connection): nothing of the message is stored, the connection is never lent
        again, Dovecot sees it close; then the same with the whole literal sent."""
        self.start_dovecot()
        self.start_proxy()
        self.visit('alice')                       # one pooled connection
        n0, _ = self.mailbox('alice')
        logins0 = self.dc.logins('alice')
        size = 4 << 20
        msg = self.message(size, 'half-sent')
        r, spid, local = self.lent_session('alice', reuse=True)
        r.send(append_literal_cmd('A', size))
        self.assertTrue(r.readline().startswith(b'+'), r.dump())
        r.send(msg[:size // 2])
        time.sleep(0.3)
        os.kill(spid, signal.SIGKILL)
        # The connection dies with the session: Dovecot sees it go.
        wait_until(lambda: self.dc.connections('alice') == 0, 10,
                   what='Dovecot to see the killed session\'s connection close')
        self.assertNotReused('alice', local, logins0)
        n1, sizes = self.mailbox('alice')
        self.assertEqual(n1, n0, 'a half-sent APPEND left a message: %r' % sizes)

        # Whole literal sent, killed before the answer could be relayed: all or nothing.
        logins1 = self.dc.logins('alice')
        msg = self.message(size, 'fully-sent')
        r, spid, local = self.lent_session('alice', reuse=True)
        r.send(append_literal_cmd('B', size))
        self.assertTrue(r.readline().startswith(b'+'), r.dump())
        r.send(msg + b'\r\n')
        os.kill(spid, signal.SIGKILL)
        wait_until(lambda: self.dc.connections('alice') == 0, 10,
                   what='Dovecot to see the killed session\'s connection close')
        self.assertNotReused('alice', local, logins1)
        n2, sizes = self.mailbox('alice')
        self.assertIn(n2, (n0, n0 + 1))
        if n2 == n0 + 1:
            self.assertEqual(sizes.get('fully-sent'), len(msg), 'stored a partial message: %r' % sizes)
        print('    [b1] whole literal then SIGKILL: message %s' % ('stored whole' if n2 > n0 else 'not stored'))
        self.assertIn('went away holding the connection of alice', self.px.broker_log())

    def test_b2_killed_during_big_fetch(self):
        """SIGKILL of a session while it relays a 16 MB FETCH the client does not read:
        the connection is not reused, the next login is a new one."""
        self.start_dovecot()
        self.start_proxy()
        big = self.message(16 << 20, 'big')
        m = imap_login(self.dc.port, 'bob', self.USERS['bob'])
        typ, data = m.append('INBOX', None, None, big)
        self.assertEqual(typ, 'OK', data)
        m.logout()
        self.assertTrue(self.visit('bob', messages=MESSAGES + 1))
        logins0 = self.dc.logins('bob')
        r, spid, local = self.lent_session('bob', reuse=True)
        _, t = r.command('S', 'SELECT INBOX')
        self.assertRegex(t, rb'^S OK ', r.dump())
        r.send('F FETCH %d BODY.PEEK[]\r\n' % (MESSAGES + 1))
        first = r.readline(timeout=10)
        self.assertRegex(first, rb'^\* %d FETCH \(BODY\[\] \{%d\}' % (MESSAGES + 1, len(big)), r.dump())
        time.sleep(0.5)    # the session is now blocked on the client, holding the rest
        os.kill(spid, signal.SIGKILL)
        wait_until(lambda: self.dc.connections('bob') == 0, 10,
                   what='Dovecot to see the killed session\'s connection close')
        self.assertNotReused('bob', local, logins0)
        self.assertIn('went away holding the connection of bob', self.px.broker_log())
        self.assertTrue(self.visit('bob', messages=MESSAGES + 1))


# ====================================================================== backend restarts

class BackendRestart(FaultTest):

    def test_c1_restart_with_pooled_and_lent(self):
        """Dovecot restarts while alice and bob are pooled, carol is lent and idle and
        dave is lent in IDLE: the broker drops the pooled ones at once, carol and dave
        get a BYE and a close, and every next login succeeds."""
        self.start_dovecot()
        self.start_proxy()
        self.wait_probe()
        base_other, _ = self.broker_nonbackend_fds()
        self.assertTrue(self.visit('alice'))
        self.assertTrue(self.visit('bob'))
        self.assertEqual(len(self.broker_nonbackend_fds()[1]), 2)
        carol = self.raw(timeout=10)
        self.assertLoginOK(carol, 'carol')
        _, t = carol.command('c1', 'SELECT INBOX')
        self.assertRegex(t, rb'^c1 OK', carol.dump())
        dave = self.raw(timeout=10)
        self.assertLoginOK(dave, 'dave')
        _, t = dave.command('d1', 'SELECT INBOX')
        dave.send('d2 IDLE\r\n')
        self.assertTrue(dave.readline().startswith(b'+ '), dave.dump())

        t0 = time.monotonic()
        self.dc.stop()
        stopped = time.monotonic() - t0
        wait_until(lambda: self.broker_nonbackend_fds()[1] == [], 2,
                   what='the broker to drop both pooled connections')
        self.assertEqual(self.broker_nonbackend_fds()[0], base_other)
        dt_c = self.assertEndsCleanly(carol, 5, 'carol (lent, idle)')
        dt_d = self.assertEndsCleanly(dave, 5, 'dave (lent, in IDLE)')
        log = self.px.broker_log()
        self.assertEqual(len(re.findall(r'connection of (alice|bob) closed while idle', log)), 2, tail(log))
        self.dc.start()
        for u in ('alice', 'bob', 'carol', 'dave'):
            r = self.raw()
            self.assertLoginOK(r, u, reused=False)
            _, t = r.command('Z', 'LOGOUT')
            self.assertRegex(t, rb'^Z OK', r.dump())
        print('    [c1] dovecot stop took %.1fs; lent clients closed %.1fs / %.1fs later'
              % (stopped, dt_c, dt_d))

    def test_c2_restart_during_big_fetch(self):
        """Dovecot stops while a client downloads a 16 MB message: the client gets what
        was sent, then a BYE and a close; the next login is fresh and works."""
        self.start_dovecot()
        self.start_proxy()
        big = b'Subject: big\r\n\r\n' + b'q' * (16 << 20) + b'\r\n'
        m = imap_login(self.dc.port, 'alice', self.USERS['alice'])
        m.append('INBOX', None, None, big)
        m.logout()
        r = self.raw(timeout=10)
        self.assertLoginOK(r, 'alice')
        _, t = r.command('S', 'SELECT INBOX')
        self.assertRegex(t, rb'^S OK ', r.dump())
        r.send('F FETCH %d BODY.PEEK[]\r\n' % (MESSAGES + 1))
        self.assertRegex(r.readline(timeout=10), rb'^\* %d FETCH ' % (MESSAGES + 1))
        self.dc.stop()
        try:
            data = r.read_until_close(timeout=15)
        except socket.timeout:
            self.fail('the client was not disconnected after Dovecot stopped mid-FETCH')
        self.assertRegex(data, rb'\* BYE [^\r\n]*\r\n\Z')
        self.dc.start()
        self.assertTrue(self.visit('alice', messages=MESSAGES + 1))
        self.assertTrue(self.visit('bob'))


# ====================================================================== cut links

LINK_TIMEOUT = 3


@unittest.skipIf(netns_available(), 'network namespaces: %s' % netns_available())
class LinkCut(FaultTest):
    """Dovecot in its own network namespace; the link is cut with iptables inside it.
    The broker runs with backend_link_timeout 3: TCP_USER_TIMEOUT 3 s and keepalive
    probes on idle backend connections."""

    TIMEDOUT_LOG = r'closed while idle \(Connection timed out\)'
    RESET_LOG = r'closed while idle \(Connection reset by peer\)'

    def setUp(self):
        super().setUp()
        self.ns = NetNS()
        self.start_dovecot(netns=self.ns)
        self.start_proxy(backend_link_timeout=LINK_TIMEOUT, backend_response_timeout=60,
                         backend_timeout=4)
        self.wait_probe()

    def pooled(self, user):
        self.assertTrue(self.visit(user))
        # The client has its LOGOUT answer an instant before the broker has
        # the connection back from the session.
        wait_until(lambda: self.broker_nonbackend_fds()[1] != [], 5,
                   what='the connection back in the broker\'s pool')
        backend = self.broker_nonbackend_fds()[1]
        self.assertEqual(backend, ['ESTABLISHED'])
        time.sleep(1.5)   # every segment of the visit acknowledged: only probes can tell

    def wait_dropped(self, user, limit):
        t0 = time.monotonic()
        wait_until(lambda: self.broker_nonbackend_fds()[1] == [], limit,
                   what='the broker to notice the cut link of the pooled connection')
        dt = time.monotonic() - t0
        # the socket may be closed an instant before the line is written
        wait_until(lambda: re.search(r'connection of %s closed while idle' % user, self.px.broker_log()), 2,
                   what='the broker to log why the pooled connection of %s was closed' % user)
        return dt

    def after_heal(self, user):
        self.ns.heal()
        r = self.raw(timeout=10)
        self.assertLoginOK(r, user, reused=False)
        _, t = r.command('Z', 'LOGOUT')
        self.assertRegex(t, rb'^Z OK', r.dump())

    def test_d1_pooled_link_dropped(self):
        self.pooled('alice')
        self.ns.cut(self.dc.port, 'drop')
        dt = self.wait_dropped('alice', LINK_TIMEOUT + 6)
        self.assertRegex(self.px.broker_log(), self.TIMEDOUT_LOG)
        # While the link stays cut, a login is refused within backend_timeout.
        r = self.raw(timeout=15)
        self.assertUnavailable(r, 'alice', within=4 + 3)
        self.after_heal('alice')
        print('    [d1] pooled connection behind DROP noticed after %.1fs' % dt)

    def test_d2_pooled_link_reset(self):
        self.pooled('alice')
        self.ns.cut(self.dc.port, 'reset')
        dt = self.wait_dropped('alice', LINK_TIMEOUT + 6)
        self.assertRegex(self.px.broker_log(), self.RESET_LOG)
        r = self.raw(timeout=15)
        self.assertUnavailable(r, 'alice', within=3)
        self.after_heal('alice')
        print('    [d2] pooled connection behind RST noticed after %.1fs' % dt)

    def test_d3_lent_link_dropped(self):
        """Lent: one client waits for a NOOP answer, one sits idle; both get a BYE and
        a close within the link timeout (backend_response_timeout is 60 s)."""
        busy = self.raw(timeout=10)
        self.assertLoginOK(busy, 'alice')
        quiet = self.raw(timeout=10)
        self.assertLoginOK(quiet, 'bob')
        self.ns.cut(self.dc.port, 'drop')
        busy.send('N1 NOOP\r\n')
        dt_busy = self.assertEndsCleanly(busy, LINK_TIMEOUT + 6, 'lent, command outstanding, DROP')
        dt_quiet = self.assertEndsCleanly(quiet, LINK_TIMEOUT + 6, 'lent, idle, DROP')
        self.after_heal('alice')
        self.after_heal('bob')
        print('    [d3] lent connections behind DROP: busy client closed after %.1fs, idle one %.1fs later'
              % (dt_busy, dt_quiet))

    def test_d4_lent_link_reset(self):
        busy = self.raw(timeout=10)
        self.assertLoginOK(busy, 'alice')
        self.ns.cut(self.dc.port, 'reset')
        busy.send('N1 NOOP\r\n')
        dt = self.assertEndsCleanly(busy, 3, 'lent, command outstanding, RST')
        self.after_heal('alice')
        print('    [d4] lent connection behind RST: client closed after %.1fs' % dt)

    def test_d5_lent_reset_while_client_reads_nothing(self):
        """The link resets in the middle of a 16 MB FETCH the client is not reading:
        the session waits for its client without spinning, then delivers what it
        holds and a BYE."""
        big = b'Subject: big\r\n\r\n' + b'z' * (16 << 20) + b'\r\n'
        m = imaplib.IMAP4(self.dc.address, self.dc.port, timeout=20)
        m.login('alice', self.USERS['alice'])
        m.append('INBOX', None, None, big)
        m.logout()
        r = self.raw(timeout=10)
        self.assertLoginOK(r, 'alice')
        _, t = r.command('S', 'SELECT INBOX')
        self.assertRegex(t, rb'^S OK ', r.dump())
        spid = session_pid_for(self.px.listener, r.sock)
        r.send('F FETCH %d BODY.PEEK[]\r\n' % (MESSAGES + 1))
        self.assertRegex(r.readline(timeout=10), rb'^\* %d FETCH ' % (MESSAGES + 1))
        time.sleep(0.5)      # buffers full both ways: the session waits for the client
        self.ns.cut(self.dc.port, 'reset')
        time.sleep(LINK_TIMEOUT + 1)
        t0, cpu0 = time.monotonic(), proc_cpu_seconds(spid)
        time.sleep(2)
        cpu = proc_cpu_seconds(spid) - cpu0
        self.assertLess(cpu, 0.3, 'the session burnt %.2f s of CPU in %.1f s waiting for its client'
                        % (cpu, time.monotonic() - t0))
        try:
            data = r.read_until_close(timeout=15)
        except socket.timeout:
            self.fail('the client was not disconnected after the link reset')
        self.assertRegex(data, rb'\* BYE [^\r\n]*\r\n\Z')
        self.after_heal('alice')
        print('    [d5] session CPU while its client read nothing after the reset: %.2fs in 2s' % cpu)


CERTTOOL = shutil.which('certtool')


@unittest.skipIf(netns_available() or not CERTTOOL, 'network namespaces or certtool unavailable')
class LinkCutTls(LinkCut):
    """The same over STARTTLS: the broker holds the TCP connection and lends one end of
    a socketpair, so it must notice the dead link and close what it lent."""

    def setUp(self):
        from test_tls_backend import make_server_cert
        FaultTest.setUp(self)
        ca_pem, ca_key = make_ca(self.tmp, 'faultca')
        cert = make_server_cert(self.tmp, ca_pem, ca_key)
        self.ns = NetNS()
        self.start_dovecot(netns=self.ns, tls=cert)
        self.start_proxy(backend_link_timeout=LINK_TIMEOUT, backend_response_timeout=60,
                         backend_timeout=4, server_tls='starttls', tls_ca_file=ca_pem,
                         tls_verify_server='no')
        self.wait_probe()

    def after_heal(self, user):
        super().after_heal(user)
        logins = [ln for ln in self.dc.settled_log().splitlines() if 'Login: user=<%s>' % user in ln]
        self.assertIn(', TLS', logins[-1], 'the new login was not over TLS')

    TIMEDOUT_LOG = r'backend TLS connection: Error in the (pull|push) function\. \(Connection timed out\)'
    RESET_LOG = r'backend TLS connection: Error in the (pull|push) function\. \(Connection reset by peer\)'
    test_d5_lent_reset_while_client_reads_nothing = None


# ====================================================================== hostile backends

GREETING = b'* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN UNSELECT] fake ready.\r\n'


class BadBackend(FaultTest):
    """One broker in front of a scripted backend (FakeBackend) that forwards to a real
    Dovecot unless told to misbehave on the next connection: after each fault the same
    broker must still serve a normal login."""

    def setUp(self):
        super().setUp()
        self.start_dovecot()
        dport = self.dc.port
        self.forward = lambda c: c.forward(dport)
        self.fake = FakeBackend(self.forward)
        self.start_proxy(backend=None, server_port=self.fake.port, backend_timeout=3,
                         backend_response_timeout=3)
        self.wait_probe()
        self.broker_pid = self.px.broker.pid
        self.base_fds = fd_report(self.broker_pid, self.fake.port)['other']

    def serves_others(self, user='bob', check_fds=True):
        self.assertTrue(self.px.broker.alive(), 'the broker died')
        self.assertEqual(self.px.broker.pid, self.broker_pid)
        r = self.raw(timeout=10)
        self.assertLoginOK(r, user)
        _, t = r.command('S', 'SELECT INBOX')
        self.assertRegex(t, rb'^S OK ', r.dump())
        _, t = r.command('Z', 'LOGOUT')
        self.assertRegex(t, rb'^Z OK ', r.dump())
        self.assertLess(proc_rss_kb(self.px.broker.pid), 64 * 1024, 'broker RSS')
        if check_fds:
            self.no_fd_left()

    def no_fd_left(self):
        """No broker descriptor left behind by the faults once every client has gone."""
        for c in self.raws:
            c.close()
        wait_until(lambda: children_of(self.px.listener.pid) == [], 5, what='sessions to end')
        wait_until(lambda: fd_report(self.broker_pid, self.fake.port)['other'] == self.base_fds, 3,
                   what='broker descriptors besides backend connections back to %d (now %r)'
                   % (self.base_fds, fd_report(self.broker_pid, self.fake.port)))

    def fault_login(self, behaviour, user='alice', within=3 + 3):
        """LOGIN through the next (faulty) backend connection: a clean NO [UNAVAILABLE]."""
        seen = []

        def wrapped(c):
            seen.append(c)
            behaviour(c)
        self.fake.push(wrapped)
        r = self.raw(timeout=15)
        dt = self.assertUnavailable(r, user, within=within)
        self.assertEqual(len(seen), 1, 'the broker did not connect to the fake backend')
        return r, seen[0], dt

    def test_e1_stall_serves_others_meanwhile(self):
        """A backend that accepts and never says a word: the client waits no longer than
        backend_timeout (3 s) for NO [UNAVAILABLE]; a concurrent login goes through."""
        result = {}

        def slow():
            try:
                result['r'] = self.fault_login(lambda c: c.wait_closed(30))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                result['e'] = e
        t = threading.Thread(target=slow)
        t.start()
        self.fake.wait_conns(2)     # probe + the stalled one
        t0 = time.monotonic()
        self.serves_others(check_fds=False)
        dt_other = time.monotonic() - t0
        self.assertTrue(t.is_alive() and 'r' not in result,
                        'the other login (%.1fs) finished after the stalled one was refused' % dt_other)
        t.join(15)
        if 'e' in result:
            raise result['e']
        r, conn, dt = result['r']
        self.assertGreaterEqual(dt, 2.5, 'refused before backend_timeout: %.1fs' % dt)
        wait_until(lambda: conn.closed_by_peer_at, 3, what='the broker to close the stalled connection')
        self.no_fd_left()
        print('    [e1] stalled backend: NO after %.1fs; concurrent login took %.1fs' % (dt, dt_other))

    def test_e1b_session_killed_while_backend_stalls(self):
        """The session waiting for a login on a stalled backend is killed: the broker
        gives up that backend connection at once, not after backend_timeout."""
        seen = []

        def fn(c):
            seen.append(c)
            c.send(GREETING)
            c.wait_closed(30)
        self.fake.push(fn)
        r = self.raw(timeout=10)
        r.send('L LOGIN alice pw\r\n')
        wait_until(lambda: seen and b'LOGIN' in seen[0].received, 5, what='LOGIN at the fake backend')
        spid = session_pid_for(self.px.listener, r.sock)
        t0 = time.monotonic()
        os.kill(spid, signal.SIGKILL)
        wait_until(lambda: seen[0].closed_by_peer_at, 2, what='the broker to close the abandoned login')
        print('    [e1b] abandoned backend login closed %.2fs after the session died'
              % (seen[0].closed_by_peer_at - t0))
        self.serves_others()

    def test_e2_stall_after_greeting(self):
        def fn(c):
            c.send(GREETING)
            c.wait_closed(30)
        r, conn, dt = self.fault_login(fn)
        self.assertIn(b'LOGIN', conn.received, 'the broker never sent LOGIN')
        self.serves_others()

    def test_e3_garbage(self):
        for junk in (b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + bytes(range(256)) + b'\r\n',
                     b'HTTP/1.1 400 Bad Request\r\n\r\n',
                     b'+ \r\n', b')))) ((((\r\n', b'\r\n\r\n\r\n'):
            def fn(c, junk=junk):
                c.send(junk)
                c.wait_closed(10)
            self.fault_login(fn, within=2)
        # Garbage after a valid greeting, as the answer to LOGIN.
        def fn2(c):
            c.send(GREETING)
            c.readline()
            c.send(b'L OK \x00\xff\xfe garbage {5}\r\n')
            c.wait_closed(10)
        self.fault_login(fn2, within=2)
        # Closed or reset right after accept.
        self.fault_login(lambda c: None, within=2)

        def rst(c):
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
        self.fault_login(rst, within=2)
        self.serves_others()

    def test_e4_enormous_greeting(self):
        """100 MB greeting line, and a 60 000-byte CAPABILITY greeting (more than the
        broker keeps): refused or cut, never buffered, the broker keeps serving."""
        def flood(c):
            chunk = b'* OK ' + b'A' * (1 << 20)
            try:
                for _ in range(100):
                    c.send(chunk)
            except OSError:
                pass
            c.wait_closed(10)
        r, conn, dt = self.fault_login(flood, within=3)
        self.assertLess(conn.sent, 100 << 20, 'the broker read a 100 MB greeting line to the end')

        def wide(c):
            caps = b' '.join(b'X-CAP-%05d' % i for i in range(5400))
            c.send(b'* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN ' + caps + b'] wide.\r\n')
            c.forward(self.dc.port, swallow_greeting=True)
        self.fake.push(wide)
        r = self.raw(timeout=10)
        _, t = r.login('alice', self.USERS['alice'], tag='W')
        self.assertRegex(t, rb'^W (OK|NO \[UNAVAILABLE\]) ', r.dump())
        # Whatever it learnt from that greeting, new sessions still greet and log in.
        self.serves_others()
        g = self.raw()
        self.assertLess(len(g.greeting), 8192, 'greeting of %d bytes' % len(g.greeting))

        # A list longer than the broker keeps (2 KB), short enough to be parsed: what
        # it keeps are whole capabilities, never a cut one such as AUTH=PLAIN out of
        # AUTH=PLAINX.
        sent = [b'IMAP4rev1'] + [b'X-LONG-CAPABILITY-%04d' % i for i in range(130)] + [b'AUTH=PLAIN']

        def long(c):
            c.send(b'* OK [CAPABILITY ' + b' '.join(sent) + b'] long.\r\n')
            c.forward(self.dc.port, swallow_greeting=True)
        self.fake.push(long)
        r = self.raw(timeout=10)
        _, t = r.login('alice', self.USERS['alice'], tag='W2')
        self.assertRegex(t, rb'^W2 OK ', r.dump())
        g = self.raw()
        shown = re.search(rb'\[CAPABILITY ([^\]]*)\]', g.greeting).group(1).split()
        ours = {b'XIMAPPROXY', b'AUTH=PLAIN', b'AUTH=LOGIN', b'SASL-IR', b'LITERAL+', b'ID', b'IDLE',
                b'ENABLE', b'STARTTLS'}
        cut = [c for c in shown if c not in sent and c not in ours]
        print('    [e4] %d of %d capabilities kept; last: %r' % (len(shown), len(sent), shown[-3:]))
        self.assertEqual(cut, [], 'capabilities shown that the server never sent')
        self.serves_others()

    def test_e5_format_string_banner(self):
        """printf directives in the greeting, the capabilities and a NO text are data."""
        fmt = b'%n%n%s%s%x%p%999999d'

        def banner(c):
            c.send(b'* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN X-' + fmt + b'] ' + fmt + b' ready.\r\n')
            c.forward(self.dc.port, swallow_greeting=True)
        self.fake.push(banner)
        r = self.raw(timeout=10)
        self.assertLoginOK(r, 'alice')
        _, t = r.command('Z', 'LOGOUT')
        self.assertRegex(t, rb'^Z OK', r.dump())
        # The broker took that greeting's capabilities as the server's: sessions
        # show them verbatim.
        g = self.raw()
        self.assertIn(b' X-' + fmt + b' ', g.greeting)

        def refuse(c):
            c.send(GREETING)
            line = c.readline()
            c.send(line.split(b' ')[0] + b' NO [AUTHENTICATIONFAILED] ' + fmt + b'\r\n')
            c.wait_closed(10)
        self.fake.push(refuse)
        _, t = g.login('carol', self.USERS['carol'], tag='F')
        self.assertEqual(t, b'F NO [AUTHENTICATIONFAILED] ' + fmt + b'\r\n', g.dump())
        self.serves_others()

    def test_e6_nul_bytes(self):
        def greet_nul(c):
            c.send(b'* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hello\x00world\r\n')
            c.wait_closed(10)
        self.fault_login(greet_nul, within=2)

        def no_nul(c):
            c.send(GREETING)
            line = c.readline()
            c.send(line.split(b' ')[0] + b' NO [AUTHENTICATIONFAILED] bad\x00password\r\n')
            c.wait_closed(10)
        r, conn, dt = self.fault_login(no_nul, within=2)
        self.assertNotIn(b'\x00', b''.join(d for w, d in r.transcript if w == 'S'))
        self.serves_others()

    def test_e7_gigabyte_literal_announced(self):
        """{1073741824} in the greeting and in the LOGIN answer: refused at once; after
        login (relayed to the client, which asked for it): the client is cut off when
        the backend stops sending, within backend_response_timeout."""
        def greet_lit(c):
            c.send(b'* OK [ALERT] {1073741824}\r\n')
            try:
                c.send(b'x' * (1 << 20))
            except OSError:
                pass
            c.wait_closed(10)
        self.fault_login(greet_lit, within=2)

        def login_lit(c):
            c.send(GREETING)
            c.readline()
            c.send(b'* CAPABILITY {1073741824}\r\n')
            c.wait_closed(10)
        self.fault_login(login_lit, within=2)

        def relay_lit(c):
            c.send(GREETING)
            line = c.readline()
            c.send(line.split(b' ')[0] + b' OK [CAPABILITY IMAP4rev1 UNSELECT] ok\r\n')
            line = c.readline()
            c.send(b'* 1 FETCH (BODY[] {1073741824}\r\n' + b'y' * 65536)
            c.wait_closed(30)
        self.fake.push(relay_lit)
        r = self.raw(timeout=10)
        self.assertLoginOK(r, 'alice')
        r.send('F FETCH 1 BODY[]\r\n')
        t0 = time.monotonic()
        try:
            r.read_until_close(timeout=3 + 5)
        except socket.timeout:
            self.fail('the client was not cut off after the backend stalled mid-literal\n' + r.dump())
        dt = time.monotonic() - t0
        self.assertGreaterEqual(dt, 2.5)
        self.serves_others()
        print('    [e7] 1 GB literal then silence: client cut off after %.1fs' % dt)

    def test_e8_garbage_after_login(self):
        """After login the backend answers a command with NUL bytes and garbage, then
        stalls (alice) or closes (bob): each client is cut off with a BYE in time,
        and the connection is closed, never pooled."""
        def junk_then(close):
            def fn(c):
                c.send(GREETING)
                line = c.readline()
                c.send(line.split(b' ')[0] + b' OK [CAPABILITY IMAP4rev1 UNSELECT] ok\r\n')
                c.readline()
                c.send(b'* 1 FETCH (FLAGS (\x00\x01)) \xff\xfe ))) {3}\r\nab')
                if not close:
                    c.wait_closed(30)
            return fn
        for user, close in (('alice', False), ('bob', True)):
            seen = []
            fn = junk_then(close)
            self.fake.push(lambda c, fn=fn: (seen.append(c), fn(c)))
            r = self.raw(timeout=10)
            self.assertLoginOK(r, user)
            r.send('N NOOP\r\n')
            try:
                rest = r.read_until_close(timeout=3 + 5)
            except socket.timeout:
                self.fail('%s: not cut off after garbage from the backend\n%s' % (user, r.dump()))
            self.assertRegex(rest, rb'\* BYE [^\r\n]*\r\n\Z', r.dump())
            if not close:
                wait_until(lambda: seen and seen[0].closed_by_peer_at, 5,
                           what='the backend connection of %s to be closed' % user)
        self.serves_others()


if __name__ == '__main__':
    unittest.main()


class SlowFirstProbe(FaultTest):
    """A session that arrives while the broker is still taking its first look at the
    backend (the usual case under socket activation: the first client starts the
    broker) is greeted with the backend's capabilities, not a minimal list."""

    def test_g1_first_greeting_waits_for_the_probe(self):
        self.start_dovecot()
        dport = self.dc.port
        fwd = lambda c: c.forward(dport)  # noqa: E731

        def slow_greeting(c):
            time.sleep(0.8)
            c.forward(dport)
        fake = FakeBackend(fwd)
        fake.push(slow_greeting)
        try:
            self.start_proxy(backend=None, server_port=fake.port)
            t0 = time.monotonic()
            r = self.raw(timeout=10)
            dt = time.monotonic() - t0
            self.assertRegex(r.greeting, rb'^\* OK \[CAPABILITY [^]]*\bIDLE\b',
                             'first greeting without the backend\'s capabilities: %r' % r.greeting)
            self.assertGreater(dt, 0.3, 'the probe was not under way when the session connected')
            self.assertLess(dt, 4.0, 'greeting took %.1fs' % dt)
            self.assertLoginOK(r, 'alice')
        finally:
            fake.stop()
