#!/usr/bin/env python3
"""Hostile clients and hostile local processes against the proxy, with a real
Dovecot behind it (issue 7, "Reliability and security").

  Hostile IMAP clients (before login, and some after): slow-loris, 1 MB
  lines, unterminated quoted strings, deep nesting, literals of 2^63, 2^64-1,
  2^64 and -1, NUL bytes, invalid base64 in AUTHENTICATE, LOGIN floods with
  wrong passwords, thousands of connections that never log in.
  Hostile local processes on the broker socket (tests/integration/ipcwire.py
  speaks doc/ipc-protocol.md): a process that is not a session (uid nobody),
  malformed and out-of-order messages, and a "session" that asks for a
  pooled connection without its password.
  Secrets: after logins, the broker's memory (/proc/PID/mem) and every log
  hold no password and no AUTHENTICATE data.
  Resource limits: cache_size and the broker's fd limit are refusals
  (NO [UNAVAILABLE]), never a crash or a busy loop.

Each test asserts the broker survived and other clients were not affected.
"""

import base64
import os
import pwd
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (Dovecot, Proxy, RawClient, imap_login, proc_cpu_seconds,  # noqa: E402
                         proc_fd_count, read_memory, wait_until)
from test_core import ProxyTest  # noqa: E402
import ipcwire  # noqa: E402

# The sanitizer pass of make check (tests/run-all step 7) sets IMAPPROXY_SAN=1:
# ASan makes every process several times bigger and slower, so the counts below
# are scaled down there (the code paths are the same).
SAN = os.environ.get('IMAPPROXY_SAN') == '1'
NO_AUTH_PENALTY = 'service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n'
IDLE_CONNECTIONS = int(os.environ.get('HOSTILE_IDLE_CONNECTIONS') or (500 if SAN else 2000))


class Hostile(ProxyTest):
    USERS = {'alice': 'pw', 'bob': 'bobpw'}

    def login_each(self, clients, user='alice', password='pw'):
        """LOGIN on every client; (ok, refused with NO [UNAVAILABLE], all
        answers). Any other answer fails the test."""
        answers = [c.login(user, password, tag='e%d' % i)[1] for i, c in enumerate(clients)]
        ok = [a for a in answers if re.match(rb'^e\d+ OK', a)]
        refused = [a for a in answers if re.match(rb'^e\d+ NO \[UNAVAILABLE\]', a)]
        self.assertEqual(len(ok) + len(refused), len(answers), answers)
        return ok, refused, answers

    def setUp(self):
        super().setUp()
        # Dovecot slows down failed logins per client IP by itself (anvil's
        # auth penalty: 4.5 s from the second failure here, up to 15 s), and
        # every backend login comes from 127.0.0.1: switched off (its socket
        # mode 0), so that these tests measure the proxy's own delays.
        if self._testMethodName in ('test_c_login_flood', 'test_g_no_connection_without_the_password'):
            self.px.stop()
            self.dc.stop()
            sub = os.path.join(self.tmp, 'trusted')
            os.makedirs(sub)
            self.dc = Dovecot(sub, users=self.USERS, messages=5,
                              extra_conf=NO_AUTH_PENALTY)
            self.start_proxy()

    def assertServes(self, what=''):
        """The broker is alive and a normal client logs in and reads mail."""
        self.assertTrue(self.px.broker.alive(), 'broker died %s' % what)
        m = self.login()
        self.select_fetch(m)
        self.logout(m)

    def wire(self):
        return ipcwire.Wire(self.px.broker_socket)

    # (a) ---------------------------------------------------------------
    def test_a_slowloris_before_login(self):
        """client_prelogin_timeout bounds the whole pre-login dialogue: a client
        that sends a byte every 0.4 s (never a whole command) is cut off like a
        silent one, and so is one that keeps sending complete NOOPs."""
        self.px.stop()
        self.start_proxy(client_prelogin_timeout=3)
        trickle = self.raw()
        chatty = self.raw()
        t0 = time.monotonic()
        closed = {}
        n = 0
        while time.monotonic() - t0 < 10 and len(closed) < 2:
            for name, c in (('trickle', trickle), ('chatty', chatty)):
                if name in closed:
                    continue
                try:
                    if name == 'trickle':
                        c.send(b'x')
                    else:
                        n += 1
                        c.send(b'n%d NOOP\r\n' % n)
                except OSError:
                    closed[name] = time.monotonic() - t0
                    continue
                got = c.read_available(wait=0.2)
                if c.eof:
                    closed[name] = time.monotonic() - t0
                    self.assertIn(b'* BYE ', got + b''.join(d for w, d in c.transcript if w == 'S'),
                                  '%s: no BYE before the close: %s' % (name, c.dump()))
        self.assertEqual(sorted(closed), ['chatty', 'trickle'],
                         'client_prelogin_timeout 3: still connected after 10 s: %r' % closed)
        for name, dt in closed.items():
            self.assertGreaterEqual(dt, 2.5, '%s closed too early (%.1fs)' % (name, dt))
            self.assertLess(dt, 8, '%s closed too late (%.1fs)' % (name, dt))
        print('    [a] slow-loris closed after %.1fs, NOOP loop after %.1fs (timeout 3 s)'
              % (closed['trickle'], closed['chatty']))
        self.assertServes()

    # (b) ---------------------------------------------------------------
    def test_b_hostile_bytes_before_login(self):
        """Malformed and oversized input before login: each gets a BAD (or, for a
        line over max_prelogin_line, a BAD and a BYE), never a continuation
        request, a crash or a hang; the same connection goes on where it can."""
        self.px.stop()
        self.start_proxy(login_failure_delay=100, login_max_failures=20)
        r = self.raw()
        cases = [
            # (bytes, the connection survives)
            (b'b1 LOGIN "alice\r\n', True),                        # unterminated quoted string
            (b'b2 LOGIN "al\\ice" pw\r\n', True),                  # bad escape
            (b'b3 ID ' + b'(' * 10000 + b'\r\n', True),            # deep nesting
            (b'b5 LOGIN {9223372036854775808}\r\n', True),         # 2^63
            (b'b6 LOGIN {18446744073709551615}\r\n', True),        # 2^64-1
            (b'b7 LOGIN {18446744073709551616}\r\n', True),        # 2^64
            (b'b8 LOGIN {99999999999999999999999999}\r\n', True),
            (b'b9 LOGIN {-1}\r\n', True),                          # negative
            (b'b10 LOGIN alice {-9223372036854775808+}\r\n', True),
            (b'b11 NOOP\x00\r\n', True),                            # NUL outside a literal
            (b'b12 LOGIN alice "p\x00w"\r\n', True),
            (b'b13 LOGIN alice {3+}\r\np\x00w\r\n', True),          # NUL inside a literal password
            (b'\x00\x00\x00\r\n', True),
            (b'b14 NOOP\rx\r\n', True),                            # CR without LF
            (b'b15 AUTHENTICATE PLAIN !!!!\r\n', True),            # invalid base64 (SASL-IR)
            (b'b16 AUTHENTICATE PLAIN ====\r\n', True),
            (b'b17 AUTHENTICATE PLAIN YWxpY2U\r\n', True),         # unpadded
            (b'b18 AUTHENTICATE PLAIN AGFsaWNl\x00cHc=\r\n', True),
        ]
        for data, _ in cases:
            tag = data.split(b' ', 1)[0] if data[:1] == b'b' else b'*'
            r.send(data)
            got = b''
            while True:  # up to the answer: tagged, or an untagged BAD
                line = r.readline(timeout=5)
                got += line
                if line.startswith(tag + b' ') or line.startswith(b'* BAD '):
                    break
            got += r.read_available(wait=0.05)
            self.assertFalse(r.eof, 'closed after %r: %s' % (data[:60], r.dump()))
            self.assertNotRegex(got, rb'(\A|\r\n)\+ ', 'continuation after %r' % data[:60])
            self.assertRegex(got, rb'\A((%s|\*) (BAD|NO) [^\r\n]*\r\n)+\Z' % re.escape(tag),
                             'answer to %r: %r' % (data[:60], got))
            _, tagged = r.command('ok', 'NOOP')
            self.assertRegex(tagged, rb'^ok OK ', 'NOOP after %r: %s' % (data[:60], r.dump()))

        # Continuation answers: invalid base64, over-long, NUL, for PLAIN and LOGIN.
        for mech, answer in (('PLAIN', b'!!!!'), ('PLAIN', b'A' * 5000), ('PLAIN', b'AG\x00Fs'),
                             ('LOGIN', b'!!!!'), ('PLAIN', b'=')):
            r.send('c1 AUTHENTICATE %s\r\n' % mech)
            self.assertRegex(r.readline(), rb'^\+ ', r.dump())
            r.send(answer + b'\r\n')
            _, tagged = r.read_tagged('c1')
            self.assertRegex(tagged, rb'^c1 (BAD|NO) ', 'answer %r to AUTHENTICATE %s: %s'
                             % (answer[:20], mech, r.dump()))
        self.assertEqual(self.dc.logins(), 0, 'a malformed login reached the backend as a login')

        # 1 MB line: BAD and the connection closes (max_prelogin_line 40960).
        big = self.raw()
        t0 = time.monotonic()
        try:
            big.send(b'm1 LOGIN alice ' + b'x' * (1 << 20) + b'\r\n')
        except OSError:
            pass  # the session may close before it has read it all
        rest = big.read_until_close(timeout=10)
        self.assertRegex(rest, rb'\A(m1|\*) BAD [^\r\n]*\r\n\* BYE ', big.dump())
        print('    [b] 1 MB line refused and closed in %.2fs' % (time.monotonic() - t0))

        # 1 MB of literal data announced with LITERAL+ beyond the pre-login cap.
        lit = self.raw()
        lit.send(b'm2 LOGIN alice {1048576+}\r\n')
        got = lit.read_available(wait=0.5)
        self.assertRegex(got, rb'\A(m2|\*) BAD ', lit.dump())
        self.assertServes()

    def test_b2_hostile_bytes_after_login(self):
        """After login the relay frames what it forwards: absurd literals, deep
        nesting and NUL bytes end that client's session (or get the server's
        BAD), never the broker; the connection is not pooled dirty."""
        for data in (b'x1 APPEND INBOX {18446744073709551615}\r\n',
                     b'x1 APPEND INBOX {18446744073709551616}\r\n',
                     b'x1 APPEND INBOX {-1}\r\n',
                     b'x1 SEARCH ' + b'(' * 5000 + b'ALL' + b')' * 5000 + b'\r\n',
                     b'x1 NOOP\x00\r\n',
                     b'x1 SELECT "INBOX\r\n'):
            r = self.raw()
            _, tagged = r.login('alice', 'pw')
            self.assertRegex(tagged, rb'^L1 OK ', r.dump())
            r.send(data)
            got = r.read_available(wait=1.0)
            if not r.eof:
                try:
                    _, tagged = r.command('x2', 'NOOP', timeout=5)
                    self.assertRegex(tagged, rb'^x2 (OK|BAD) ', r.dump())
                except (EOFError, socket.timeout):
                    pass  # closed by the proxy: fine, as long as nothing else suffers
            self.assertNotIn(b'\x00', got)
            r.close()
        self.assertServes('after hostile bytes after login')

    # (c) ---------------------------------------------------------------
    def test_c_login_flood(self):
        """Ten pipelined wrong LOGINs per client from 20 clients at once: each
        failure is answered no sooner than login_failure_delay after it was
        received, the third ends the connection, and the backend sees at most
        three attempts per connection. A legitimate user logs in meanwhile."""
        self.px.stop()
        self.start_proxy(login_failure_delay=400, login_max_failures=3)
        results = {}

        def flood(i):
            try:
                c = RawClient(self.px.port, timeout=10)
                t0 = time.monotonic()
                c.send(b''.join(b'f%d LOGIN alice wrong%d\r\n' % (k, k) for k in range(10)))
                got = c.read_until_close(timeout=15)
                results[i] = (time.monotonic() - t0, got)
                c.close()
            except Exception as e:  # noqa: BLE001 - reported below
                results[i] = (None, repr(e).encode())

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        self.assertServes('during a login flood')
        legit = time.monotonic() - t0
        for t in threads:
            t.join(30)
        for i, (dt, got) in sorted(results.items()):
            self.assertIsNotNone(dt, 'flood client %d: %r' % (i, got))
            nos = re.findall(rb'(?m)^f\d+ NO ', got)
            self.assertEqual(len(nos), 3, 'client %d: %r' % (i, got))
            self.assertRegex(got, rb'\* BYE [^\r\n]*\r\n\Z', 'client %d: %r' % (i, got))
            self.assertGreaterEqual(dt, 1.1, 'client %d: 3 failures in %.2fs (delay 400 ms)' % (i, dt))
        self.assertEqual(len(results), 20)
        failed = len(re.findall(r'auth failed|Authentication failed|auth_failed|password mismatch',
                                self.dc.log()))
        print('    [c] 20 flooding clients: 3 NO + BYE each; legitimate login took %.2fs; '
              'dovecot logged %d auth failures' % (legit, failed))

    # (d) ---------------------------------------------------------------
    def test_d_thousands_never_log_in(self):
        """IDLE_CONNECTIONS (2000) connections that never log in (fork-server
        sessions, each connected to the broker) while a normal client works;
        afterwards the broker's fds return to where they were."""
        self.px.stop()
        self.start_proxy(fork_server=True, client_prelogin_timeout=120)
        bpid = self.px.broker.popen.pid
        fds_before = proc_fd_count(bpid)
        conns = []
        t0 = time.monotonic()
        try:
            for i in range(IDLE_CONNECTIONS):
                s = socket.create_connection(('127.0.0.1', self.px.port), timeout=30)
                conns.append(s)
            greeted = 0
            for s in conns:
                buf = b''
                while b'\r\n' not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                if buf.startswith(b'* OK '):
                    greeted += 1
            t_open = time.monotonic() - t0
            self.assertEqual(greeted, len(conns), 'greetings')
            peers = proc_fd_count(bpid) - fds_before
            self.assertGreaterEqual(peers, IDLE_CONNECTIONS * 0.95,
                                    'broker peers while %d sessions wait' % IDLE_CONNECTIONS)
            t1 = time.monotonic()
            self.assertServes('with %d idle pre-login sessions' % IDLE_CONNECTIONS)
            t_login = time.monotonic() - t1
            cpu0 = proc_cpu_seconds(bpid)
            time.sleep(1.0)
            cpu_idle = proc_cpu_seconds(bpid) - cpu0
        finally:
            for s in conns:
                s.close()
        wait_until(lambda: proc_fd_count(bpid) <= fds_before + 2, 30, 0.2,
                   'broker fds back to normal')
        print('    [d] %d pre-login connections open and greeted in %.1fs; broker +%d fds; '
              'login meanwhile %.2fs; broker CPU while they wait %.2fs/s'
              % (len(conns), t_open, peers, t_login, cpu_idle))
        self.assertLess(cpu_idle, 0.5, 'broker busy while sessions only wait')
        self.assertServes('after the idle connections left')

    # (e) ---------------------------------------------------------------
    def test_e_not_a_session_is_refused(self):
        """A local process that is not root, not the broker's uid and not in
        broker_socket_group connects to the broker socket (made world-writable
        here, so that only SO_PEERCRED stands in its way): refused."""
        os.chmod(self.px.broker_socket, 0o666)
        nobody = pwd.getpwnam('nobody')
        code = ('import sys; sys.path.insert(0, %r); import ipcwire\n'
                'w = ipcwire.Wire(%r, timeout=5)\n'
                'try:\n'
                '    print("hello", w.hello())\n'
                'except (EOFError, ConnectionResetError, BrokenPipeError) as e:\n'
                '    print("refused", type(e).__name__)\n'
                % (os.path.dirname(os.path.abspath(__file__)), self.px.broker_socket))

        def demote():
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        # The system Python: the one running the tests may live where nobody cannot read.
        python = '/usr/bin/python3' if os.access('/usr/bin/python3', os.X_OK) else sys.executable
        out = subprocess.run([python, '-c', code], preexec_fn=demote, capture_output=True,
                             timeout=30, cwd='/')
        self.assertIn(b'refused', out.stdout, 'uid nobody on the broker socket: %r %r'
                      % (out.stdout, out.stderr))
        wait_until(lambda: 'uid %d: not a session' % nobody.pw_uid in self.px.broker_log(), 5,
                   what='refusal in the broker log')
        # Positive control: the same code as root gets its hello-reply.
        out = subprocess.run([python, '-c', code], capture_output=True, timeout=30)
        self.assertIn(b'hello (%d,' % ipcwire.PROTO_VERSION, out.stdout, (out.stdout, out.stderr))
        self.assertServes()

    # (f) ---------------------------------------------------------------
    def test_f_malformed_wire_messages(self):
        """Malformed or out-of-order messages cost only that peer its connection:
        a logged-in client keeps working and a pooled connection stays pooled."""
        m = self.login('bob')
        m.select('INBOX')
        self.logout(m)  # bob's connection is now pooled
        busy = self.login()  # alice, relaying throughout
        self.assertEqual(busy.select('INBOX')[0], 'OK')

        hello = ipcwire.message(ipcwire.HELLO, ipcwire.HELLO_FMT.pack(ipcwire.PROTO_VERSION, ipcwire.ROLE_SESSION))
        checkout = ipcwire.message(ipcwire.CHECKOUT, ipcwire.checkout_payload('alice', 'pw'))
        bad = {
            'short header': (False, b'\x01\x00'),
            'empty datagram': (False, b''),
            'unknown type': (False, ipcwire.message(99, b'')),
            'type 0': (False, ipcwire.message(0, b'')),
            'hello wrong length': (False, ipcwire.message(ipcwire.HELLO, b'\x02\x00\x00\x00')),
            'hello wrong version': (False, ipcwire.message(ipcwire.HELLO, ipcwire.HELLO_FMT.pack(1, 1))),
            'hello unknown role': (False, ipcwire.message(ipcwire.HELLO, ipcwire.HELLO_FMT.pack(ipcwire.PROTO_VERSION, 7))),
            'hello with fd flag': (False, ipcwire.message(ipcwire.HELLO, ipcwire.HELLO_FMT.pack(ipcwire.PROTO_VERSION, 1),
                                                          flags=ipcwire.HDR_F_FD)),
            'hello carrying an fd': ('fd', hello),
            'len beyond datagram': (False, ipcwire.HDR.pack(ipcwire.HELLO, 0, 1 << 31) + b'\0' * 8),
            'oversized datagram': (False, hello + b'\0' * 70000),
            'checkout before hello': (False, checkout),
            'hello twice': (True, hello),
            'checkin before checkout': (True, ipcwire.message(
                ipcwire.CHECKIN, ipcwire.CHECKIN_FMT.pack(1, 1, 0), has_fd=True)),
            'checkout-ok from a session': (True, ipcwire.message(
                ipcwire.CHECKOUT_OK, ipcwire.CHECKOUT_OK_FMT.pack(1, 0, 0, b''), has_fd=True)),
            'user without NUL': (True, ipcwire.message(ipcwire.CHECKOUT, ipcwire.checkout_payload(
                'A' * ipcwire.USER_MAX, 'pw'))),
            'password without NUL': (True, ipcwire.message(ipcwire.CHECKOUT, ipcwire.checkout_payload(
                'alice', 'P' * ipcwire.PASSWORD_MAX))),
            'checkout flags unknown': (True, ipcwire.message(ipcwire.CHECKOUT, ipcwire.checkout_payload(
                'alice', 'pw', flags=0x80))),
            'checkout truncated': (True, checkout[:-1]),
        }
        for name, (after_hello, data) in bad.items():
            with self.wire() as w:
                if after_hello is True:
                    w.hello()
                fds = []
                if after_hello == 'fd' or data[2:4] == b'\x01\x00':
                    fds = [os.open('/dev/null', os.O_RDONLY)]
                try:
                    w.send_raw(data, fds=fds)
                except OSError as e:  # the kernel refused it (e.g. EMSGSIZE): nothing reached the broker
                    print('    [f] %s: not sendable (%s)' % (name, e))
                    continue
                finally:
                    for fd in fds:
                        os.close(fd)
                if name == 'empty datagram':
                    continue  # a zero-length datagram reads as EOF: the broker forgets the peer
                self.assertTrue(w.dropped(), 'broker kept a peer that sent: %s' % name)
        self.assertTrue(self.px.broker.alive(), 'broker died on malformed wire messages')
        # The logged-in client was not affected, the pooled connection survived.
        self.assertEqual(busy.noop()[0], 'OK')
        self.assertEqual(busy.fetch('1', '(FLAGS)')[0], 'OK')
        self.logout(busy)
        m = self.login('bob')
        self.assertReused(m, True, 'bob after the malformed messages')
        self.logout(m)
        log = self.px.broker_log()
        self.assertGreaterEqual(len(re.findall(r'session \d+: dropping', log)), 10, log[-3000:])

    # (g) ---------------------------------------------------------------
    def test_g_no_connection_without_the_password(self):
        """Straight on the broker socket: a 'session' that knows alice's name but
        not her password never obtains her pooled connection, whatever it
        claims (wrong, empty, prefix, longer password, other authzid, case of
        the name); with the right password it does (positive control)."""
        m = self.login()
        m.select('INBOX')
        self.logout(m)  # alice's connection is pooled
        logins0 = self.dc.logins('alice', settle=True)
        attempts = [('alice', 'wrong', ''), ('alice', '', ''), ('alice', 'p', ''), ('alice', 'pwx', ''),
                    ('alice', 'PW', ''), ('alice', ' pw', ''),
                    ('bob', 'bobpw', 'alice'), ('alice', 'wrong', 'alice'), ('alice', 'pw\n', '')]
        with self.wire() as w:
            w.hello()
            for user, password, authzid in attempts:
                kind, ans = w.checkout(user, password, authzid)
                if kind == 'ok':
                    ticket, flags, _caps, fd = ans
                    os.close(fd)
                    self.fail('checkout %r/%r authzid %r: got a connection (reused=%s)'
                              % (user, password, authzid, bool(flags & ipcwire.LEASE_F_REUSED)))
                self.assertIn(ans[0], (ipcwire.FAIL_NO, ipcwire.FAIL_BAD), (user, password, ans))
        # None of that touched alice's pooled connection ...
        self.assertEqual(self.dc.logins('alice', settle=True), logins0, 'a wrong password logged in')
        with self.wire() as w:
            w.hello()
            kind, ans = w.checkout('alice', 'pw')
            self.assertEqual(kind, 'ok', ans)
            ticket, flags, caps, fd = ans
            self.assertTrue(flags & ipcwire.LEASE_F_REUSED, 'the pooled connection was gone')
            # ... and it is a live, logged-in IMAP connection.
            s = socket.socket(fileno=os.dup(fd))
            s.settimeout(5)
            s.sendall(b'w1 NOOP\r\n')
            self.assertRegex(s.recv(4096), rb'w1 OK ')
            s.close()
            w.checkin(ticket, fd, clean=True)
        # A session cannot return a socket it was not lent, nor someone else's ticket.
        with self.wire() as w:
            w.hello()
            kind, ans = w.checkout('alice', 'pw')
            self.assertEqual(kind, 'ok', ans)
            ticket, _f, _c, fd = ans
            other = socket.socket()
            w.checkin(ticket, os.dup(other.fileno()))
            other.close()
            os.close(fd)
            self.assertTrue(w.dropped(), 'checkin of a foreign socket was accepted')
        self.assertServes()

    # (h) ---------------------------------------------------------------
    def test_h_no_secret_in_broker_memory_or_logs(self):
        """Logins by LOGIN, AUTHENTICATE PLAIN (SASL-IR and continuation) and
        AUTHENTICATE LOGIN, right and wrong passwords, fresh and reused, with
        debug logging: afterwards no password and no AUTHENTICATE payload is in
        any log, nor anywhere in the broker's memory (/proc/PID/mem)."""
        secret = 'Sekr1t-' + os.urandom(6).hex()
        wrong = 'Wr0ng-' + os.urandom(6).hex()
        self.px.stop()
        self.dc.stop()
        sub = os.path.join(self.tmp, 'h')
        os.makedirs(sub)
        self.dc = Dovecot(sub, users={'carol': secret, 'alice': 'pw'}, messages=1, extra_conf=NO_AUTH_PENALTY)
        os.environ['IMAPPROXY_LOG_LEVEL'] = 'debug'
        try:
            self.start_proxy(login_failure_delay=100)
        finally:
            del os.environ['IMAPPROXY_LOG_LEVEL']
        # Before any login, the one secret the broker has is the pool's HMAC
        # key (with a core and the pool's digests, a password could be tested
        # offline): it lives in a page kept out of core dumps.
        dontdump, mapping = [], None
        with open('/proc/%d/smaps' % self.px.broker.popen.pid) as f:
            for ln in f:
                if ln.startswith('VmFlags:'):
                    # anonymous ones only (the kernel's [vvar] pages have dd too),
                    # and not MAP_NORESERVE ones ("nr": ASan's shadow memory)
                    fl = ln.split()[1:]
                    if 'dd' in fl and 'nr' not in fl and len(mapping) == 5:
                        dontdump.append(mapping[0])
                elif not ln.split()[0].endswith(':'):
                    mapping = ln.split()
        self.assertEqual(len(dontdump), 1,
                         'want one MADV_DONTDUMP mapping (the HMAC key) in the idle broker: %r' % dontdump)
        plain = base64.b64encode(b'\0carol\0' + secret.encode()).decode()
        plain_wrong = base64.b64encode(b'\0carol\0' + wrong.encode()).decode()
        for round_ in range(2):
            r = self.raw()
            _, t = r.login('carol', secret)
            self.assertRegex(t, rb'^L1 OK', r.dump())
            r.command('o', 'LOGOUT')
            r = self.raw()
            _, t = r.command('a1', 'AUTHENTICATE PLAIN ' + plain)
            self.assertRegex(t, rb'^a1 OK', r.dump())
            r.command('o', 'LOGOUT')
            r = self.raw()
            r.send('a2 AUTHENTICATE PLAIN\r\n')
            r.readline()
            r.send(plain + '\r\n')
            _, t = r.read_tagged('a2')
            self.assertRegex(t, rb'^a2 OK', r.dump())
            r.command('o', 'LOGOUT')
            r = self.raw()
            r.send('a3 AUTHENTICATE LOGIN\r\n')
            r.readline()
            r.send(base64.b64encode(b'carol') + b'\r\n')
            r.readline()
            r.send(base64.b64encode(secret.encode()) + b'\r\n')
            _, t = r.read_tagged('a3')
            self.assertRegex(t, rb'^a3 OK', r.dump())
            r.command('o', 'LOGOUT')
            r = self.raw()
            _, t = r.login('carol', wrong)
            self.assertRegex(t, rb'^L1 NO', r.dump())
            _, t = r.command('a4', 'AUTHENTICATE PLAIN ' + plain_wrong)
            self.assertRegex(t, rb'^a4 NO', r.dump())
            r.close()
        wait_until(lambda: self.px.broker_log().count('carol') >= 4, 5, what='broker log lines')
        time.sleep(0.3)
        needles = {
            'password': secret.encode(), 'wrong password': wrong.encode(),
            'PLAIN message': plain.encode(), 'wrong PLAIN message': plain_wrong.encode(),
            'LOGIN password base64': base64.b64encode(secret.encode()),
            'raw PLAIN message': b'\0carol\0' + secret.encode(),
            # the password as the broker sends it to Dovecot (quoted LOGIN argument)
            'password in a LOGIN command': b' "' + secret.encode(),
        }
        logs = {'broker log': self.px.broker_log().encode(),
                'session log': self.px.listener_log().encode()}
        for lname, text in logs.items():
            for nname, needle in needles.items():
                self.assertNotIn(needle, text, '%s found in the %s' % (nname, lname))
        self.assertIn(b'carol', logs['broker log'], 'the broker did log the logins (control)')
        pid = self.px.broker.popen.pid
        regions = read_memory(pid)
        total = sum(len(b) for _, b in regions)
        self.assertGreater(total, 100000, 'read too little of the broker memory to mean anything')
        # Control: something the broker does keep (the user name) is found.
        self.assertTrue(any(b'carol' in b for _, b in regions), 'user name not found: reading broken?')
        found = []
        for nname, needle in needles.items():
            for rname, data in regions:
                i = data.find(needle)
                if i >= 0:
                    found.append('%s in %s at +%#x: %r' % (nname, rname, i, data[max(0, i - 40):i + 60]))
        self.assertEqual(found, [], 'secrets left in the broker memory (%d bytes read)' % total)
        print('    [h] %d KB of broker memory and all logs: no password, no AUTHENTICATE data'
              % (total // 1024))

    # (i) ---------------------------------------------------------------
    def test_i_cache_size_refusal(self):
        """Beyond cache_size a login gets NO [UNAVAILABLE] at once; as soon as a
        connection is returned, logins work again."""
        self.px.stop()
        self.start_proxy(cache_size=3)
        held = [self.login() for _ in range(3)]
        for m in held:
            self.assertEqual(m.select('INBOX')[0], 'OK')
        r = self.raw()
        t0 = time.monotonic()
        _, tagged = r.login('bob', 'bobpw')
        self.assertRegex(tagged, rb'^L1 NO \[UNAVAILABLE\]', r.dump())
        self.assertLess(time.monotonic() - t0, 3.0)
        self.logout(held.pop())
        m = imap_login(self.px.port, 'bob', 'bobpw')
        self.logout(m)
        for m in held:
            self.logout(m)
        self.assertIn('cache_size (3)', self.px.broker_log())

    def test_i2_fd_limit_refusal(self):
        """The broker out of file descriptors (its RLIMIT_NOFILE lowered under
        it): sessions it cannot accept get NO [UNAVAILABLE] at LOGIN, the broker
        neither crashes nor spins, and it recovers when fds are free again."""
        bpid = self.px.broker.popen.pid
        base = proc_fd_count(bpid)
        limit = base + 6
        orig = resource.prlimit(bpid, resource.RLIMIT_NOFILE)
        resource.prlimit(bpid, resource.RLIMIT_NOFILE, (limit, orig[1]))  # the soft limit only
        clients = []
        try:
            for i in range(20):
                clients.append(self.raw())
            time.sleep(0.5)
            cpu0 = proc_cpu_seconds(bpid)
            time.sleep(2.0)
            cpu = proc_cpu_seconds(bpid) - cpu0
            ok, refused, answers = self.login_each(clients)
            self.assertGreater(len(refused), 0, 'no refusal at RLIMIT_NOFILE %d' % limit)
            self.assertLess(cpu, 0.5, 'broker CPU %.2fs in 2 s while out of fds: a busy loop' % cpu)
            self.assertTrue(self.px.broker.alive())
        finally:
            for c in clients:
                c.close()
            self.raws.clear()
            resource.prlimit(bpid, resource.RLIMIT_NOFILE, orig)
        print('    [i2] RLIMIT_NOFILE %d: %d logins OK, %d NO [UNAVAILABLE]; broker CPU %.2fs in 2 s'
              % (limit, len(ok), len(refused), cpu))
        self.assertIn('refusing sessions', self.px.broker_log())
        wait_until(lambda: proc_fd_count(bpid) <= base + 3, 10, 0.1, 'broker fds released')
        self.assertServes('after fds were freed')

    def test_i3_max_peers_refusal(self):
        """Started with a small RLIMIT_NOFILE, the broker caps its sessions so
        that the pool keeps its fds: the sessions beyond get NO [UNAVAILABLE]."""
        self.px.stop()
        px = LimitedProxy(self.tmp, self.dc, nofile=200, cache_size=100)
        self.px = px
        clients = [self.raw() for _ in range(60)]
        ok, refused, answers = self.login_each(clients)
        self.assertEqual(len(answers), 60)
        self.assertGreater(len(refused), 0, answers)
        self.assertGreater(len(ok), 0, answers)
        for c in clients:
            c.close()
        self.raws.clear()
        self.assertIn('max_peers reached', self.px.broker_log())
        print('    [i3] RLIMIT_NOFILE 200, cache_size 100: %d sessions served, %d refused'
              % (len(ok), len(refused)))
        # The sessions exit, and the broker sees them go, a moment after their
        # clients closed: until then the cap still refuses.
        bpid = self.px.broker.popen.pid
        wait_until(lambda: proc_fd_count(bpid) < 40, 15, 0.1,
                   'the broker to see the sessions leave')
        self.assertServes()
        # Local connections that never say hello count against the cap too:
        # they hold broker fds like sessions do.
        silent = []
        try:
            for _ in range(len(ok) + 5):
                u = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                u.connect(px.broker_socket)
                silent.append(u)
            _, tagged = self.raw().login('alice', 'pw')
            self.assertRegex(tagged, rb'^L1 NO \[UNAVAILABLE\]', 'a login past %d silent peers' % len(silent))
        finally:
            for u in silent:
                u.close()
        wait_until(lambda: proc_fd_count(bpid) < 40, 15, 0.1, 'the broker to see the silent peers leave')
        self.assertServes()


class LimitedProxy(Proxy):
    """A Proxy whose broker starts under `prlimit --nofile=N`."""

    def __init__(self, tmpdir, dovecot, nofile, **conf):
        self.nofile = nofile
        super().__init__(tmpdir, dovecot, **conf)

    def start_broker(self, timeout=10.0):
        import imapfixture
        real = imapfixture.BROKER
        wrapper = os.path.join(self.dir, 'broker-limited')
        with open(wrapper, 'w') as f:
            f.write('#!/bin/sh\nulimit -n %d || exit 1\nexec %s "$@"\n' % (self.nofile, real))
        os.chmod(wrapper, 0o755)
        imapfixture.BROKER = wrapper
        try:
            super().start_broker(timeout)
        finally:
            imapfixture.BROKER = real


if __name__ == '__main__':
    unittest.main()
