#!/usr/bin/env python3
"""Core integration tests: imapproxy-broker + imapproxy-session in front of a real,
private Dovecot.  Each test gets a fresh Dovecot and proxy (so Dovecot's login
counts belong to that test alone).  Run through tests/integration/run.py.

What "a backend login" means here: a `imap-login: Info: Login: user=<X>` line
in Dovecot's own log (Dovecot writes it for every successful IMAP login); a
reused pooled connection produces none.  test_k checks that this counting does
see every direct login, so the other tests cannot pass vacuously.
"""

import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import Dovecot, Proxy, imap_login, FixtureError  # noqa: E402
from fixturecase import FixtureCase  # noqa: E402

MESSAGES = 5


class ProxyTest(FixtureCase):
    """Fresh Dovecot + proxy per test (fixturecase.FixtureCase does the set-up,
    the stopping and the crash checks). Subclasses/tests may set PROXY_CONF / USERS."""

    MESSAGES = MESSAGES
    START_PROXY = True

    def login(self, user='alice', password=None):
        """imaplib client logged in through the proxy; unlike imap(), the test
        owns it (tearDown does not close it)."""
        return imap_login(self.px.port, user, password or self.USERS[user])


class Core(ProxyTest):

    # (a) ---------------------------------------------------------------
    def test_a_login_twice_reuses(self):
        m = self.login()
        caps = [c.upper() for c in m.capabilities]
        self.assertIn('XIMAPPROXY', caps, 'greeting capabilities')
        self.assertIn('IMAP4REV1', caps, 'greeting capabilities (the backend\'s)')
        self.assertReused(m, False, 'first login')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1, 'dovecot logins after the first session')

        m = self.login()
        self.assertReused(m, True, 'second login')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1, 'dovecot logins after two sessions')
        self.assertEqual(self.dc.logouts('alice'), 0, 'the pooled connection must stay open')
        self.assertEqual(self.dc.connections('alice'), 1, 'doveadm who: the pooled connection')

    # (b) ---------------------------------------------------------------
    def test_b_20_users_10_rounds(self):
        users = {'u%02d' % i: 'pw-%02d' % i for i in range(20)}
        self.px.stop()
        self.dc.stop()
        sub = os.path.join(self.tmp, 'b')
        os.makedirs(sub)
        self.dc = Dovecot(sub, users=users, messages=MESSAGES)
        self.px = self.start_proxy()
        requests = 0
        reused = 0
        t0 = time.monotonic()
        for rnd in range(10):
            for u, p in users.items():
                m = imap_login(self.px.port, u, p)
                reused += 'XPROXYREUSE' in m.untagged_responses
                typ, data = m.select('INBOX')
                self.assertEqual((typ, int(data[0])), ('OK', MESSAGES), 'round %d user %s' % (rnd, u))
                typ, data = m.fetch('1:*', '(FLAGS)')
                self.assertEqual(typ, 'OK')
                self.assertEqual(len(data), MESSAGES)
                self.logout(m)
                requests += 1
        dt = time.monotonic() - t0
        logins = self.dc.logins()
        print('    [b] %d requests in %.1fs (%.1f ms each): %d dovecot logins = %.3f backend '
              'logins per request; %d reused' % (requests, dt, 1000 * dt / requests, logins,
                                                 logins / requests, reused))
        self.assertLessEqual(logins, 20, 'dovecot logins for 20 users x 10 rounds')
        self.assertEqual(reused, requests - logins, 'XPROXYREUSE count vs. backend logins')

    # (c) ---------------------------------------------------------------
    def test_c_wrong_password_with_pooled_connection(self):
        self.logout(self.login())
        self.assertEqual(self.dc.logins('alice'), 1)
        r = self.raw()
        untagged, tagged = r.login('alice', 'wrong-password', tag='c1')
        self.assertRegex(tagged, rb'^c1 NO \[AUTHENTICATIONFAILED\]', r.dump())
        self.assertFalse(any(b'XPROXYREUSE' in u for u in untagged), r.dump())
        r.close()
        m = self.login()
        self.assertReused(m, True, 'correct login after a wrong one')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1, 'no extra dovecot login')

    def test_c2_retry_after_wrong_password_same_connection(self):
        self.logout(self.login())
        r = self.raw()
        _, tagged = r.login('alice', 'wrong-password', tag='c1')
        self.assertRegex(tagged, rb'^c1 NO \[AUTHENTICATIONFAILED\]', r.dump())
        untagged, tagged = r.login('alice', 'pw', tag='c2')
        self.assertRegex(tagged, rb'^c2 OK', r.dump())
        self.assertTrue(any(u.startswith(b'* OK [XPROXYREUSE]') for u in untagged), r.dump())
        _, tagged = r.command('c3', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^c3 OK', r.dump())
        self.assertEqual(self.dc.logins('alice'), 1)

    # (d) ---------------------------------------------------------------
    def test_d_two_concurrent_sessions(self):
        m1 = self.login()
        m2 = self.login()
        self.select_fetch(m1)
        self.select_fetch(m2)
        self.assertEqual(self.dc.logins('alice'), 2, 'two concurrent sessions, two backend logins')
        self.logout(m1)
        self.logout(m2)
        self.assertEqual(self.dc.connections('alice'), 2, 'both connections pooled')
        m3 = self.login()
        m4 = self.login()
        self.assertReused(m3, True, 'third session')
        self.assertReused(m4, True, 'fourth session (concurrent with the third)')
        self.select_fetch(m3)
        self.select_fetch(m4)
        self.logout(m3)
        self.logout(m4)
        self.assertEqual(self.dc.logins('alice'), 2, 'still two backend logins')

    def test_d2_parallel_clients_threads(self):
        """8 clients log in at the same moment (2 users); everything works, at most 8 logins."""
        errors = []
        barrier = threading.Barrier(8)

        def one(user):
            try:
                barrier.wait(10)
                for _ in range(3):
                    m = self.login(user)
                    self.select_fetch(m)
                    self.logout(m)
            except Exception as e:  # noqa: BLE001
                errors.append('%s: %r' % (user, e))
        threads = [threading.Thread(target=one, args=(('alice', 'bob')[i % 2],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertLessEqual(self.dc.logins(), 8)

    # (e) ---------------------------------------------------------------
    def test_e_cache_expiration(self):
        self.px.stop()
        self.start_proxy(cache_expiration_time=2)
        m = self.login()
        self.select_fetch(m)
        self.logout(m)
        t0 = time.monotonic()
        self.assertEqual(self.dc.logouts('alice', settle=False), 0)
        try:
            self.dc.wait_logouts(1, 'alice', timeout=6)
        except FixtureError:
            self.fail('no logout/disconnect of the pooled connection in dovecot\'s log %.1fs after '
                      'LOGOUT with cache_expiration_time 2' % (time.monotonic() - t0))
        dt = time.monotonic() - t0
        print('    [e] pooled connection closed %.1fs after client LOGOUT (ttl 2s)' % dt)
        self.assertGreaterEqual(dt, 1.5, 'closed before cache_expiration_time')
        m = self.login()
        self.assertReused(m, False, 'login after expiry')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 2, 'fresh dovecot login after expiry')

    # (f) ---------------------------------------------------------------
    def test_f_kicked_pooled_connection(self):
        self.logout(self.login())
        self.assertEqual(self.dc.connections('alice'), 1)
        self.dc.kick('alice')
        self.dc.wait_logouts(1, 'alice')
        m = self.login()
        self.assertReused(m, False, 'login after doveadm kick')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 2, 'fresh dovecot login after kick')

    def test_f2_kick_then_login_at_once(self):
        """No waiting for the broker to notice: a dead pooled connection must never be
        handed out as an error; the client gets a working session."""
        for i in range(3):
            self.logout(self.login())
            self.dc.kick('alice')
            m = self.login()
            self.select_fetch(m)
            typ, data = m.noop()
            self.assertEqual(typ, 'OK', data)
            self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 4)

    def test_f3_lent_dead_before_it_answers(self):
        """The race of f2 made certain: the pooled connection's server process is
        stopped (so the broker cannot notice anything) and lent; it dies while the
        client's first command is in flight. Nothing reached the client yet, so the
        session must log in afresh and replay the command: the client sees OK."""
        self.logout(self.login())
        pids = self.dc.pids('alice')
        self.assertEqual(len(pids), 1, pids)
        os.kill(pids[0], signal.SIGSTOP)
        try:
            r = self.raw()
            untagged, tagged = r.login('alice', 'pw', tag='a1')
            self.assertRegex(tagged, rb'^a1 OK', r.dump())
            self.assertTrue(any(u.startswith(b'* OK [XPROXYREUSE]') for u in untagged), r.dump())
            r.send('a2 SELECT INBOX\r\n')
            time.sleep(0.3)  # the command sits in the stopped process's socket
        finally:
            os.kill(pids[0], signal.SIGKILL)
        untagged, tagged = r.read_tagged('a2', timeout=10)
        self.assertRegex(tagged, rb'^a2 OK', r.dump())
        self.assertTrue(any(re.match(rb'^\* \d+ EXISTS', u) for u in untagged), r.dump())
        _, tagged = r.command('a3', 'NOOP')
        self.assertRegex(tagged, rb'^a3 OK', r.dump())
        self.dc.wait_logins(2, 'alice')
        self.assertEqual(self.dc.logins('alice'), 2)

    # (g) ---------------------------------------------------------------
    def test_g_logout_with_mailbox_selected(self):
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='g1')
        self.assertRegex(tagged, rb'^g1 OK', r.dump())
        _, tagged = r.command('g2', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^g2 OK', r.dump())
        # A \Deleted message must survive LOGOUT (the proxy must not CLOSE).
        _, tagged = r.command('g3', 'STORE 1 +FLAGS.SILENT (\\Deleted)')
        self.assertRegex(tagged, rb'^g3 OK', r.dump())
        r.send('g4 LOGOUT\r\n')
        rest = r.read_until_close(timeout=5)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\ng4 OK [^\r\n]*\r\n\Z',
                         'bytes after LOGOUT must be exactly `* BYE ...` and `g4 OK ...`; got %r'
                         % rest)
        self.assertNotIn(b'[CLOSED]', rest)

        r = self.raw()
        untagged, tagged = r.login('alice', 'pw', tag='h1')
        self.assertRegex(tagged, rb'^h1 OK', r.dump())
        self.assertTrue(any(u.startswith(b'* OK [XPROXYREUSE]') for u in untagged),
                        'second session must reuse: %s' % r.dump())
        untagged, tagged = r.command('h2', 'FETCH 1 FLAGS')
        self.assertRegex(tagged, rb'^h2 (BAD|NO) ',
                         'FETCH before SELECT on a reused connection must fail (unselected): %s'
                         % r.dump())
        untagged, tagged = r.command('h3', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^h3 OK', r.dump())
        self.assertIn(b'* %d EXISTS\r\n' % MESSAGES, untagged, 'no message expunged: %s' % r.dump())
        r.send('h4 LOGOUT\r\n')
        rest = r.read_until_close(timeout=5)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\nh4 OK [^\r\n]*\r\n\Z', rest)
        self.assertEqual(self.dc.logins('alice'), 1)

    # (h) ---------------------------------------------------------------
    def test_h_prelogin_robustness(self):
        self.px.stop()
        self.start_proxy(max_prelogin_line=1024)
        r = self.raw()
        self.assertRegex(r.greeting, rb'^\* OK \[CAPABILITY [^\]]*\bXIMAPPROXY\b[^\]]*\] ',
                         r.greeting)
        self.assertRegex(r.greeting, rb'\bIMAP4rev1\b', r.greeting)

        _, tagged = r.command('h1', 'XYZZY garbage here')
        self.assertRegex(tagged, rb'^h1 BAD', r.dump())
        _, tagged = r.command('h2', 'NOOP')
        self.assertRegex(tagged, rb'^h2 OK', 'connection still usable after BAD: ' + r.dump())
        untagged, tagged = r.command('h3', 'CAPABILITY')
        self.assertRegex(tagged, rb'^h3 OK', r.dump())
        self.assertTrue(any(re.match(rb'^\* CAPABILITY .*\bXIMAPPROXY\b', u) for u in untagged),
                        r.dump())
        _, tagged = r.command('h4', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^h4 BAD', 'SELECT before login: ' + r.dump())
        _, tagged = r.command('h5', 'FETCH 1:* FLAGS')
        self.assertRegex(tagged, rb'^h5 BAD', r.dump())
        r.send(b'\r\n')  # empty line: ignored or `* BAD`, nothing else
        got = r.read_available(wait=0.5)
        self.assertRegex(got, rb'\A(\* BAD [^\r\n]*\r\n)?\Z', r.dump())
        _, tagged = r.command('h6', 'NOOP')
        self.assertRegex(tagged, rb'^h6 OK', r.dump())

        # A huge literal announcement: refused, no continuation request.
        r.send(b'a1 LOGIN {2147483648}\r\n')
        got = r.read_available(wait=1.0)
        self.assertNotRegex(got, rb'(\A|\r\n)\+', 'no continuation for a 2 GiB literal')
        # One command, one response: a BAD (and possibly a BYE if it closes), nothing else.
        self.assertRegex(got, rb'\A(a1|\*) BAD [^\r\n]*\r\n(\* BYE [^\r\n]*\r\n)?\Z',
                         'sent `a1 LOGIN {2147483648}` CRLF once; expected exactly one BAD; '
                         'got %r' % got)

        # A line longer than max_prelogin_line: BAD, then the connection closes.
        r2 = self.raw()
        r2.send(b'l1 NOOP ' + b'x' * 3000 + b'\r\n')
        rest = r2.read_until_close(timeout=5)
        self.assertRegex(rest, rb'\A(l1|\*) BAD [^\r\n]*\r\n', 'over-long line: ' + r2.dump())

        # Over-long line without any CRLF at all.
        r3 = self.raw()
        r3.send(b'm1 ' + b'y' * 5000)
        rest = r3.read_until_close(timeout=5)
        self.assertRegex(rest, rb'\A(m1|\*) BAD ', 'over-long unterminated line: ' + r3.dump())

        # Pre-login LOGOUT
        r4 = self.raw()
        r4.send('z1 LOGOUT\r\n')
        rest = r4.read_until_close(timeout=5)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\nz1 OK [^\r\n]*\r\n\Z', rest)

        # The proxy still serves new clients.
        m = self.login()
        self.select_fetch(m)
        self.logout(m)
        self.assertTrue(self.px.broker.alive(), 'broker died')

    def test_h2_literal_login(self):
        """LOGIN with synchronising literals before login (used by real clients for
        passwords with special characters)."""
        r = self.raw()
        r.send(b'k1 LOGIN {5}\r\n')
        cont = r.readline()
        self.assertRegex(cont, rb'^\+', r.dump())
        r.send(b'alice {2}\r\n')
        cont = r.readline()
        self.assertRegex(cont, rb'^\+', r.dump())
        r.send(b'pw\r\n')
        _, tagged = r.read_tagged('k1')
        self.assertRegex(tagged, rb'^k1 OK', r.dump())
        _, tagged = r.command('k2', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^k2 OK', r.dump())

    def test_h3_prelogin_timeout(self):
        self.px.stop()
        self.start_proxy(client_prelogin_timeout=2)
        r = self.raw()
        t0 = time.monotonic()
        rest = r.read_until_close(timeout=6)
        dt = time.monotonic() - t0
        self.assertGreaterEqual(dt, 1.5, 'closed too early: %r' % rest)
        print('    [h3] idle pre-login client closed after %.1fs: %r' % (dt, rest))

    # (i) ---------------------------------------------------------------
    def test_i_broker_sigkill(self):
        m = self.login()
        self.select_fetch(m)
        self.px.kill_broker(signal.SIGKILL)
        self.select_fetch(m)
        typ, data = m.noop()
        self.assertEqual(typ, 'OK', data)
        self.logout(m)

        r = self.raw()
        self.assertRegex(r.greeting, rb'^\* OK', 'greeting with the broker down: %r' % r.greeting)
        _, tagged = r.login('alice', 'pw', tag='i1')
        self.assertRegex(tagged, rb'^i1 NO \[UNAVAILABLE\]', r.dump())
        r.close()

        self.px.start_broker()
        m = self.login()
        self.select_fetch(m)
        self.logout(m)
        m = self.login()
        self.assertReused(m, True, 'second login after broker restart')
        self.logout(m)

    def test_i2_broker_sigterm_logs_out_pooled(self):
        self.logout(self.login())
        self.logout(self.login('bob'))
        self.assertEqual(self.dc.logouts(), 0)
        rc = self.px.kill_broker(signal.SIGTERM, timeout=10)
        self.assertEqual(rc, 0, 'broker exit status on SIGTERM')
        self.dc.wait_logouts(2)
        log = self.dc.settled_log()
        for u in ('alice', 'bob'):
            self.assertRegex(log, r'imap\(%s\)[^:]*: Info: (Disconnected: )?Logged out' % u,
                             'the broker should LOGOUT its idle connection of %s' % u)

    # (j) ---------------------------------------------------------------
    def test_j_curl(self):
        curl = shutil.which('curl')
        self.assertIsNotNone(curl, 'curl not installed')
        base = 'imap://127.0.0.1:%d' % self.px.port

        def run(url):
            r = subprocess.run([curl, '-sS', '--max-time', '15', '--user', 'alice:pw', url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            self.assertEqual(r.returncode, 0, 'curl %s: rc=%d %s' % (
                url, r.returncode, r.stderr.decode(errors='replace')))
            return r.stdout.decode(errors='replace')
        out = run(base + '/')
        self.assertRegex(out, r'(?m)^\* LIST .*INBOX', out)
        out = run(base + '/INBOX')
        self.assertRegex(out, r'(?m)^\* LIST .*INBOX', out)
        out = run(base + '/INBOX;MAILINDEX=2')
        self.assertIn('Subject: Test message 2 for alice', out)
        out = run(base + '/INBOX;UID=3')
        self.assertIn('this is message number 3', out)
        logins = self.dc.logins('alice')
        self.assertEqual(logins, 1, 'curl\'s 4 sessions should share one backend login')

    # (k) ---------------------------------------------------------------
    def test_k2_proxy_really_uses_this_dovecot(self):
        """The first login through the proxy is a real login on our Dovecot, and the
        proxied session sees our messages."""
        self.assertEqual(self.dc.logins(), 0)
        m = self.login('bob')
        self.assertEqual(self.dc.logins('bob'), 1)
        typ, data = m.select('INBOX')
        typ, data = m.fetch('4', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        self.assertEqual(typ, 'OK')
        self.assertIn(b'Test message 4 for bob', data[0][1])
        self.logout(m)

    # (l) ---------------------------------------------------------------
    def test_l_listen_fds_mode(self):
        """Session started with LISTEN_FDS=1 (client on fd 3) instead of --inetd."""
        self.px.stop()
        self.px = Proxy(self.tmp, self.dc, inetd=False)
        m = self.login()
        self.select_fetch(m)
        self.logout(m)
        m = self.login()
        self.assertReused(m, True, 'second login, LISTEN_FDS mode')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)

    # (m) ---------------------------------------------------------------
    def test_m_client_vanishes_after_login(self):
        """A client that disconnects without LOGOUT must not break anything; its
        connection is either cleanly returned or dropped, and the next login works."""
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='v1')
        self.assertRegex(tagged, rb'^v1 OK', r.dump())
        _, tagged = r.command('v2', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^v2 OK', r.dump())
        r.send(b'v3 FETCH 1:* (BODY.PEEK[])\r\n')  # vanish mid-response
        r.close()
        time.sleep(0.3)
        m = self.login()
        self.select_fetch(m)
        typ, data = m.fetch('1', '(FLAGS)')
        self.assertEqual(typ, 'OK', data)
        self.logout(m)
        self.assertTrue(self.px.broker.alive())

    def test_m2_idle_and_literal_after_login(self):
        """IDLE/DONE and an APPEND with a literal relayed after login; the connection
        is still reusable afterwards."""
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='n1')
        self.assertRegex(tagged, rb'^n1 OK', r.dump())
        _, tagged = r.command('n2', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^n2 OK', r.dump())
        r.send(b'n3 IDLE\r\n')
        self.assertRegex(r.readline(), rb'^\+ ', r.dump())
        r.send(b'DONE\r\n')
        _, tagged = r.read_tagged('n3')
        self.assertRegex(tagged, rb'^n3 OK', r.dump())
        msg = b'Subject: appended\r\n\r\nbody with a line LOGOUT\r\nn9 LOGOUT\r\n'
        r.send(b'n4 APPEND INBOX {%d}\r\n' % len(msg))
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(msg + b'\r\n')
        _, tagged = r.read_tagged('n4')
        self.assertRegex(tagged, rb'^n4 OK', r.dump())
        r.send(b'n5 LOGOUT\r\n')
        rest = r.read_until_close(timeout=5)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\nn5 OK [^\r\n]*\r\n\Z', rest)
        m = self.login()
        self.assertReused(m, True, 'after IDLE and APPEND')
        typ, data = m.select('INBOX')
        self.assertEqual(int(data[0]), MESSAGES + 1)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)

    # (n) ---------------------------------------------------------------
    def test_n_authenticate_plain_if_advertised(self):
        """If the proxy advertises AUTH=PLAIN, AUTHENTICATE PLAIN (with SASL-IR when
        advertised, and with a continuation) must work and reuse like LOGIN."""
        r = self.raw()
        caps = r.greeting.upper()
        if b'AUTH=PLAIN' not in caps:
            self.skipTest('proxy does not advertise AUTH=PLAIN: %r' % r.greeting)
        import base64
        cred = base64.b64encode(b'\0alice\0pw')
        r.send(b'p1 AUTHENTICATE PLAIN\r\n')
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(cred + b'\r\n')
        _, tagged = r.read_tagged('p1')
        self.assertRegex(tagged, rb'^p1 OK', r.dump())
        r.send('p2 LOGOUT\r\n')
        r.read_until_close()
        if b'SASL-IR' in caps:
            r = self.raw()
            untagged, tagged = r.command('p3', 'AUTHENTICATE PLAIN ' + cred.decode())
            self.assertRegex(tagged, rb'^p3 OK', r.dump())
            self.assertTrue(any(u.startswith(b'* OK [XPROXYREUSE]') for u in untagged), r.dump())
        self.assertEqual(self.dc.logins('alice'), 1)

    # (o) ---------------------------------------------------------------
    def test_o_no_cross_user_reuse(self):
        """alice's pooled connection is never given to bob (or to alice with bob's password).
        (The failed login comes last: Dovecot's auth penalty is per source IP, and every
        backend login comes from the broker's address, so it would delay bob's login.)"""
        self.logout(self.login('alice'))
        m = self.login('bob')
        self.assertReused(m, False, 'bob after alice')
        m.select('INBOX')
        typ, data = m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        self.assertIn(b'for bob', data[0][1], 'bob must see his own mailbox')
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)
        self.assertEqual(self.dc.logins('bob'), 1)
        m = self.login('alice')
        self.assertReused(m, True, 'alice again')
        m.select('INBOX')
        typ, data = m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        self.assertIn(b'for alice', data[0][1])
        self.logout(m)
        r = self.raw()
        _, tagged = r.login('alice', 'bobpw', tag='o1')
        self.assertRegex(tagged, rb'^o1 NO ', r.dump())
        self.assertEqual(self.dc.logins(), 2)

    # (p) ---------------------------------------------------------------
    def test_p_cache_size_bounds_the_pool(self):
        users = {'u%d' % i: 'pw%d' % i for i in range(4)}
        self.px.stop()
        self.dc.stop()
        sub = os.path.join(self.tmp, 'p')
        os.makedirs(sub)
        self.dc = Dovecot(sub, users=users, messages=1)
        self.start_proxy(cache_size=2)
        for u, p in users.items():
            m = imap_login(self.px.port, u, p)
            self.assertEqual(m.select('INBOX')[0], 'OK')
            self.logout(m)
        time.sleep(0.3)
        live = sum(self.dc.connections(u) for u in users)
        self.assertLessEqual(live, 2, 'pooled backend connections with cache_size 2')
        self.assertEqual(self.dc.logins(), 4)

    # (q) ---------------------------------------------------------------
    def test_q_large_literals_relayed_intact(self):
        m = self.login()
        m.select('INBOX')
        body = b''.join(b'line %06d: %s\r\n' % (i, b'x' * 60) for i in range(12000))  # ~850 KB
        msg = b'Subject: big\r\nMessage-ID: <big@example.org>\r\n\r\n' + body
        typ, data = m.append('INBOX', None, None, msg)
        self.assertEqual(typ, 'OK', data)
        m.noop()
        typ, data = m.fetch(str(MESSAGES + 1), '(BODY.PEEK[])')
        self.assertEqual(typ, 'OK')
        self.assertEqual(data[0][1], msg, 'message fetched back through the proxy differs')
        self.logout(m)
        m = self.login()
        self.assertReused(m, True, 'after a large APPEND/FETCH')
        typ, data = m.select('INBOX')
        self.assertEqual(int(data[0]), MESSAGES + 1)
        self.logout(m)

    # (r) ---------------------------------------------------------------
    def test_r_pipelined_commands_then_logout(self):
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='r1')
        self.assertRegex(tagged, rb'^r1 OK', r.dump())
        r.send(b'r2 NOOP\r\nr3 SELECT INBOX\r\nr4 FETCH 1:* (FLAGS)\r\nr5 LOGOUT\r\n')
        data = r.read_until_close(timeout=5)
        lines = data.split(b'\r\n')
        tags = [ln.split(b' ', 1)[0] for ln in lines if ln and not ln.startswith(b'*')]
        self.assertEqual(tags, [b'r2', b'r3', b'r4', b'r5'], data)
        self.assertEqual(sum(1 for ln in lines if re.match(rb'^\* \d+ FETCH', ln)), MESSAGES, data)
        self.assertRegex(data, rb'\r\n\* BYE [^\r\n]*\r\nr5 OK [^\r\n]*\r\n\Z', data)
        m = self.login()
        self.assertReused(m, True, 'after pipelined LOGOUT')
        self.logout(m)

    def test_s_pipelined_prelogin(self):
        """CAPABILITY, LOGIN and SELECT in one write: the SELECT queued behind LOGIN
        must reach the backend after the login."""
        r = self.raw()
        r.send(b's1 CAPABILITY\r\ns2 LOGIN alice pw\r\ns3 SELECT INBOX\r\n')
        _, t1 = r.read_tagged('s1')
        self.assertRegex(t1, rb'^s1 OK', r.dump())
        _, t2 = r.read_tagged('s2')
        self.assertRegex(t2, rb'^s2 OK', r.dump())
        untagged, t3 = r.read_tagged('s3')
        self.assertRegex(t3, rb'^s3 OK', r.dump())
        self.assertIn(b'* %d EXISTS\r\n' % MESSAGES, untagged, r.dump())

    # (t) ---------------------------------------------------------------
    def test_t_enable_makes_connection_unreusable(self):
        """design.md section 4: ENABLE changes the connection state for good; such a
        connection must not be handed to the next session."""
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='t1')
        self.assertRegex(tagged, rb'^t1 OK', r.dump())
        _, tagged = r.command('t2', 'ENABLE CONDSTORE')
        self.assertRegex(tagged, rb'^t2 OK', r.dump())
        r.send(b't3 LOGOUT\r\n')
        rest = r.read_until_close()
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\nt3 OK [^\r\n]*\r\n\Z', rest)
        m = self.login()
        self.assertReused(m, False, 'login after a session that sent ENABLE')
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 2)

    # (u) ---------------------------------------------------------------
    def test_u_login_syntax_variants(self):
        """LITERAL+ (advertised in the greeting) and quoted strings with escapes."""
        r = self.raw()
        if b'LITERAL+' in r.greeting.upper():
            r.send(b'u1 LOGIN {5+}\r\nalice {2+}\r\npw\r\n')
            _, tagged = r.read_tagged('u1')
            self.assertRegex(tagged, rb'^u1 OK', r.dump())
            r.send(b'u2 LOGOUT\r\n')
            r.read_until_close()
        # a password with a quote, a backslash and a space (imaplib quotes it)
        self.px.stop()
        self.dc.stop()
        sub = os.path.join(self.tmp, 'u')
        os.makedirs(sub)
        self.dc = Dovecot(sub, users={'carol': 'p"w\\x y'}, messages=1)
        self.start_proxy()
        for i in range(2):
            m = imap_login(self.px.port, 'carol', 'p"w\\x y')
            self.assertReused(m, i == 1, 'carol login %d' % (i + 1))
            self.logout(m)
        self.assertEqual(self.dc.logins('carol'), 1)

    # (v) ---------------------------------------------------------------
    def test_v_kick_during_active_session(self):
        """Dovecot drops a lent connection: the client sees the server's BYE / EOF, the
        broker and the next login are fine."""
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='v1')
        self.assertRegex(tagged, rb'^v1 OK', r.dump())
        _, tagged = r.command('v2', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^v2 OK', r.dump())
        self.dc.kick('alice')
        rest = r.read_until_close(timeout=5)
        # Dovecot's own BYE is relayed; the proxy may add its own (seen: two BYEs).
        self.assertRegex(rest, rb'\A(\* BYE [^\r\n]*\r\n)*\Z', rest)
        m = self.login()
        self.assertReused(m, False, 'after the lent connection was kicked')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 2)

    # (w) ---------------------------------------------------------------
    def test_w_backend_restart(self):
        """All pooled connections die with a Dovecot restart; the next logins work."""
        self.logout(self.login('alice'))
        self.logout(self.login('bob'))
        self.dc.stop()
        self.dc.start()
        for u in ('alice', 'bob'):
            m = self.login(u)
            self.assertReused(m, False, '%s after a backend restart' % u)
            self.select_fetch(m)
            self.logout(m)
        self.assertEqual(self.dc.logins(), 4)


class Validation(ProxyTest):
    """Dovecot alone: validates the fixture's counting (runs without the proxy binaries)."""

    START_PROXY = False

    # (k) ---------------------------------------------------------------
    def test_k_counting_is_real(self):
        """Directly against Dovecot every login is counted and every end is seen:
        the proxy tests' `logins == 1` cannot pass by a counting bug."""
        for i in range(1, 4):
            m = imap_login(self.dc.port, 'alice', 'pw')
            self.select_fetch(m)
            self.logout(m)
            self.assertEqual(self.dc.logins('alice'), i)
            self.assertEqual(self.dc.logouts('alice'), i)
        m = imap_login(self.dc.port, 'bob', 'bobpw')
        self.assertEqual(self.dc.logins('bob'), 1)
        self.assertEqual(self.dc.logins(), 4)
        self.assertEqual(self.dc.connections('bob'), 1)
        self.dc.kick('bob')
        self.dc.wait_logouts(1, 'bob')
        self.assertEqual(self.dc.connections('bob'), 0)
        with self.assertRaises(imaplib.IMAP4.abort):
            m.noop()
        with self.assertRaises(imaplib.IMAP4.error) as cm:
            imap_login(self.dc.port, 'alice', 'nope')
        self.assertIn(b'[AUTHENTICATIONFAILED]', cm.exception.args[0]
                      if isinstance(cm.exception.args[0], bytes) else
                      str(cm.exception).encode())
        self.assertEqual(self.dc.logins(), 4, 'a failed login is not counted')

    def test_k3_plain_relay_is_detected(self):
        """A proxy that does not pool (a plain TCP relay) gives one Dovecot login per
        session and no XPROXYREUSE: exactly what test_a asserts against."""
        lsock = socket.socket()
        lsock.bind(('127.0.0.1', 0))
        lsock.listen(8)
        port = lsock.getsockname()[1]
        stop = threading.Event()

        def pump(a, b):
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    b.sendall(d)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        def serve():
            lsock.settimeout(0.2)
            while not stop.is_set():
                try:
                    c, _ = lsock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                b = socket.create_connection(('127.0.0.1', self.dc.port))
                for x, y in ((c, b), (b, c)):
                    threading.Thread(target=pump, args=(x, y), daemon=True).start()
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            for i in (1, 2):
                m = imap_login(port, 'alice', 'pw')
                self.assertNotIn('XPROXYREUSE', m.untagged_responses)
                self.select_fetch(m)
                self.logout(m)
            self.assertEqual(self.dc.logins('alice'), 2)
        finally:
            stop.set()
            t.join(2)
            lsock.close()


if __name__ == '__main__':
    unittest.main()
