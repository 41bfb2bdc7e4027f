#!/usr/bin/env python3
"""imapproxyctl against a running broker, a real Dovecot and real clients.

stats (exact counters after logins with reuse, --json), list (users, ages, no
secrets), flush (all, one user, lent connections), trace (a user's protocol
lines with the LOGIN password absent), and who may use it: a uid that is not
root nor in admin_group is refused, and a session-role connection that sends
an admin request is dropped. "A backend login" is a Dovecot `Login:` log
line, as in test_core.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import Proxy, RawClient, imap_login, wait_until, REPO  # noqa: E402
from fixturecase import FixtureCase  # noqa: E402

CTL = os.environ.get('IMAPPROXYCTL') or os.path.join(REPO, 'ctl', 'imapproxyctl')
ALICE_PW = 'Al1ce-S3cret'
BOB_PW = 'B0b-S3cret'

# common/ipc-proto.h, IPC_PROTO_VERSION 3 (little-endian, as on this host)
IPC_VERSION = 3
T_HELLO, T_HELLO_REPLY, T_CHECKOUT, T_TRACE, T_ADMIN = 1, 2, 3, 7, 8
ROLE_SESSION, ROLE_ADMIN = 1, 2


def ipc_msg(mtype, payload):
    return struct.pack('<HHI', mtype, 0, len(payload)) + payload


class CtlBase(FixtureCase):
    """Dovecot + proxy per test (fixturecase.FixtureCase); the tests' own
    subprocesses (self.children) are killed in tearDown."""

    TMP_PREFIX = 'imapproxy-ctl-'
    TMP_MODE = 0o711  # so that `nobody` can reach the broker socket
    USERS = {'alice': ALICE_PW, 'bob': BOB_PW}
    MESSAGES = 3
    START_PROXY = True
    PROXY_CONF = {'login_failure_delay': 0}

    def setUp(self):
        self.children = []
        super().setUp()

    def tearDown(self):
        for p in self.children:
            if p.poll() is None:
                p.kill()
            p.wait()
        super().tearDown()

    # -- helpers

    def ctl(self, *args, check=True, prefix=(), use_socket=False):
        where = ['-s', self.px.broker_socket] if use_socket else ['-f', self.px.conf_path]
        r = subprocess.run(list(prefix) + [CTL] + where + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=20)
        if check:
            self.assertEqual(r.returncode, 0, 'imapproxyctl %s: %s%s' % (' '.join(args), r.stdout, r.stderr))
        return r

    def stats(self):
        return json.loads(self.ctl('stats', '--json').stdout)

    def stats_refused_to_nobody(self):
        """imapproxyctl stats as nobody:nogroup straight at the socket: must fail."""
        r = self.ctl('stats', check=False, use_socket=True,
                     prefix=['setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups'])
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertEqual(r.stdout, '')
        return r

    def session(self, user, pw, select=True):
        m = imap_login(self.px.port, user, pw)
        m.reused = 'XPROXYREUSE' in m.untagged_responses  # select() clears them
        if select:
            typ, _ = m.select('INBOX')
            self.assertEqual(typ, 'OK')
        return m

    def once(self, user, pw):
        m = self.session(user, pw)
        reused = m.reused
        self.assertEqual(m.logout()[0], 'BYE')
        # the session returns the connection before it answers LOGOUT; wait
        # until the broker has it back in the pool
        wait_until(lambda: self.stats()['lent'] == 0, 5, what='connection back in the pool')
        return reused


class Ctl(CtlBase):

    # -- stats

    def test_a0_socket_from_a_drop_in(self):
        """imapproxyctl -f FILE reads FILE.d/*.conf like the daemons: a
        broker_socket set in a drop-in wins over the main file's."""
        conf = os.path.join(self.tmp, 'ctl-dropin.conf')
        with open(conf, 'w') as f:
            f.write('broker_socket %s\n' % os.path.join(self.tmp, 'nothing-here.sock'))
        os.makedirs(conf + '.d', exist_ok=True)
        with open(os.path.join(conf + '.d', 'socket.conf'), 'w') as f:
            f.write('broker_socket %s\n' % self.px.broker_socket)
        r = subprocess.run([CTL, '-f', conf, 'stats'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=20)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('logins', r.stdout)

    def test_a_stats_counts_logins_and_reuses(self):
        self.assertFalse(self.once('alice', ALICE_PW))
        self.assertTrue(self.once('alice', ALICE_PW))
        self.assertTrue(self.once('alice', ALICE_PW))
        self.assertFalse(self.once('bob', BOB_PW))
        with self.assertRaises(Exception):
            imap_login(self.px.port, 'alice', 'wrong')
        self.assertEqual(self.dc.logins(), 2, 'dovecot logins')

        s = self.stats()
        want = {'clients': 0, 'peak_clients': 1, 'clients_total': 5, 'lent': 0, 'peak_lent': 1,
                'idle': 2, 'peak_idle': 2, 'pending': 0, 'logins': 4, 'reuses': 2, 'hit_ratio': 0.5,
                'backend_logins': 2, 'login_failures': 1, 'backend_errors': 0, 'expired': 0, 'dead': 0,
                'dirty': 0, 'flushed': 0}
        got = {k: s.get(k) for k in want}
        self.assertEqual(got, want)

        # one held session: current and peak values move
        m = self.session('bob', BOB_PW)
        s = self.stats()
        self.assertEqual((s['clients'], s['lent'], s['idle'], s['logins'], s['reuses']), (1, 1, 1, 5, 3))
        text = self.ctl('stats').stdout
        self.assertRegex(text, r'(?m)^logins\s+5$')
        self.assertRegex(text, r'(?m)^reuses\s+3$')
        self.assertRegex(text, r'(?m)^hit ratio\s+60\.0%$')
        self.assertRegex(text, r'(?m)^backend lent\s+1 now, 1 peak$')
        m.logout()

    def test_b_stats_counts_expiry(self):
        self.px.stop()
        self.px = Proxy(self.tmp, self.dc, cache_expiration_time=1, login_failure_delay=0)
        self.once('alice', ALICE_PW)
        wait_until(lambda: self.stats()['expired'] == 1, 10, what='expiry counted')
        s = self.stats()
        self.assertEqual((s['idle'], s['expired'], s['peak_idle']), (0, 1, 1))

    # -- list

    def test_c_list_shows_users_and_no_secrets(self):
        self.once('bob', BOB_PW)
        m = self.session('alice', ALICE_PW)
        time.sleep(1.1)
        r = self.ctl('list', '--json')
        conns = json.loads(r.stdout)
        by_user = {c['user']: c for c in conns}
        self.assertEqual(sorted(by_user), ['alice', 'bob'], r.stdout)
        a, b = by_user['alice'], by_user['bob']
        self.assertEqual(a['state'], 'lent')
        self.assertGreater(a['session_pid'], 0)
        self.assertEqual(b['state'], 'idle')
        self.assertEqual(b['session_pid'], 0)
        self.assertGreaterEqual(b['idle_seconds'], 1.0)
        self.assertGreaterEqual(b['age_seconds'], b['idle_seconds'])
        for c in conns:
            self.assertEqual(c['backend'], '127.0.0.1:%d' % self.dc.port)
        text = self.ctl('list').stdout
        self.assertRegex(text, r'(?m)^idle\s+bob\s+127\.0\.0\.1:%d\s' % self.dc.port)
        self.assertRegex(text, r'(?m)^lent\s+alice\s')
        self.assertIn('1 idle, 1 lent', text)
        for out in (r.stdout, text):
            for secret in (ALICE_PW, BOB_PW):
                self.assertNotIn(secret, out)
        m.logout()

    # -- flush

    def test_d_flush_all_logs_out_idle_connections(self):
        self.once('alice', ALICE_PW)
        self.once('bob', BOB_PW)
        self.assertEqual(self.dc.logins(), 2)
        r = self.ctl('flush')
        self.assertIn('all users: 2 idle connections logged out; 0 lent connections', r.stdout)
        self.dc.wait_logouts(2)
        s = self.stats()
        self.assertEqual((s['idle'], s['flushed']), (0, 2))
        self.assertFalse(self.once('alice', ALICE_PW), 'login after flush must be fresh')
        self.assertEqual(self.dc.logins('alice'), 2)

    def test_e_flush_user_only_that_user(self):
        self.once('alice', ALICE_PW)
        self.once('bob', BOB_PW)
        r = self.ctl('flush', 'alice', '--json')
        self.assertEqual(json.loads(r.stdout), {'user': 'alice', 'idle_closed': 1, 'lent_marked': 0})
        self.dc.wait_logouts(1, 'alice')
        self.assertFalse(self.once('alice', ALICE_PW), 'alice: fresh login after flush alice')
        self.assertTrue(self.once('bob', BOB_PW), 'bob: still pooled after flush alice')
        self.assertEqual((self.dc.logins('alice'), self.dc.logins('bob')), (2, 1))
        self.assertEqual(self.dc.logouts('bob'), 0)

    def test_f_flush_marks_lent_connections(self):
        m = self.session('alice', ALICE_PW)
        r = self.ctl('flush', 'alice')
        self.assertIn('1 lent connection marked: it will be closed, not pooled, when its session ends', r.stdout)
        conns = json.loads(self.ctl('list', '--json').stdout)
        self.assertEqual([(c['user'], c['no_reuse']) for c in conns], [('alice', True)])
        typ, data = m.fetch('1', '(FLAGS)')  # the session itself goes on
        self.assertEqual(typ, 'OK', data)
        m.logout()
        self.dc.wait_logouts(1, 'alice')
        self.assertEqual(self.stats()['idle'], 0)
        self.assertFalse(self.once('alice', ALICE_PW), 'fresh login after the flushed one came back')

    # -- trace

    def test_g_trace_shows_commands_without_the_password(self):
        tr = subprocess.Popen([CTL, '-f', self.px.conf_path, 'trace', 'alice'], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        self.children.append(tr)
        self.assertIn('tracing alice', tr.stderr.readline())
        m = self.session('alice', ALICE_PW)
        m.fetch('1', '(BODY[])')
        m.append('INBOX', None, None, ('Subject: t\r\n\r\nbody with %s\r\n' % ALICE_PW).encode())
        m.logout()
        # LOGIN with a literal password, then credentials again after login
        c = RawClient(self.px.port)
        c.send('r1 LOGIN alice {%d}\r\n' % len(ALICE_PW))
        self.assertTrue(c.readline().startswith(b'+'))
        c.send(ALICE_PW + '\r\n')
        c.read_tagged('r1')
        c.command('r2', 'LOGIN alice %s' % ALICE_PW)
        c.command('r3', 'AUTHENTICATE PLAIN')
        c.command('r4', 'NOOP')
        c.close()
        self.once('bob', BOB_PW)  # not traced
        wait_until(lambda: self.stats()['clients'] == 0, 5, what='sessions gone')
        time.sleep(0.3)
        tr.send_signal(signal.SIGINT)
        out, _ = tr.communicate(timeout=10)

        self.assertNotIn(ALICE_PW, out, 'password in the trace')
        self.assertRegex(out, r'alice\[\d+\] C: \S+ SELECT INBOX')
        self.assertRegex(out, r'alice\[\d+\] S: \S+ OK \[READ-WRITE\]')
        self.assertRegex(out, r'C: \S+ APPEND INBOX \{\d+\}\[\d+ bytes\]')
        self.assertRegex(out, r'S: \* 1 FETCH .*\{\d+\}\[\d+ bytes\]')
        self.assertRegex(out, r'\*: \S+ logged in as alice \(credentials not shown\): new backend connection')
        self.assertRegex(out, r'\*: r1 logged in as alice .*cache hit')
        self.assertIn('C: r2 LOGIN [redacted]', out)
        self.assertIn('C: r3 AUTHENTICATE PLAIN', out)
        self.assertIn('C: r4 NOOP', out)
        self.assertNotIn('bob', out)
        traced = [c for c in json.loads(self.ctl('list', '--json').stdout) if c['traced']]
        self.assertEqual(traced, [], 'a trace that ended leaves no traced lease behind')

    def test_l_slow_trace_reader_never_blocks_the_broker(self):
        # an admin that asks for a trace and then never reads
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        s.connect(self.px.broker_socket)
        s.send(ipc_msg(T_HELLO, struct.pack('<II', IPC_VERSION, ROLE_ADMIN)))
        s.recv(65536)
        s.send(ipc_msg(T_ADMIN, struct.pack('<II', 4, 0) + b'alice'.ljust(256, b'\0')))
        s.recv(65536)  # admin-done: tracing
        try:
            c = RawClient(self.px.port, timeout=20)
            _, ok = c.command('L', 'LOGIN alice %s' % ALICE_PW)
            self.assertIn(b'OK', ok)
            n = 1500  # 3000 trace lines: far more than the socket and the queue of 256 hold
            c.send(''.join('n%d NOOP\r\n' % i for i in range(n)))
            c.read_tagged('n%d' % (n - 1), timeout=30)
            t0 = time.monotonic()
            st = self.stats()  # the broker still answers, at once
            self.assertLess(time.monotonic() - t0, 5)
            # The session's trace lines reach the broker a little after the
            # client's answers (on a loaded machine, after the first stats).
            deadline = time.monotonic() + 15
            while st['trace_dropped'] == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
                st = self.stats()
            self.assertGreater(st['trace_dropped'], 0, 'no trace line was dropped: %r' % st)
            c.command('Z', 'LOGOUT')
            c.close()
        finally:
            s.close()
        self.assertFalse(self.once('bob', BOB_PW))

    # -- who may use it

    def test_h_nobody_cannot_connect(self):
        r = self.stats_refused_to_nobody()
        self.assertIn('Permission denied', r.stderr)

    def test_i_session_role_cannot_send_admin_messages(self):
        def hello(role):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5)
            s.connect(self.px.broker_socket)
            s.send(ipc_msg(T_HELLO, struct.pack('<II', IPC_VERSION, role)))
            reply = s.recv(65536)
            self.assertEqual(struct.unpack('<H', reply[:2])[0], T_HELLO_REPLY)
            return s
        admin_stats = ipc_msg(T_ADMIN, struct.pack('<II', 1, 0) + b'\0' * 256)
        # a session asks for stats: dropped, nothing answered
        s = hello(ROLE_SESSION)
        s.send(admin_stats)
        self.assertEqual(s.recv(65536), b'', 'session-role peer got an answer to an admin request')
        s.close()
        # a session that was not asked to trace sends a trace line: dropped
        s = hello(ROLE_SESSION)
        s.send(ipc_msg(T_TRACE, struct.pack('<IIII', 1, 0, 0, 0) + b'x\0'.ljust(512, b'\0')))
        self.assertEqual(s.recv(65536), b'')
        s.close()
        # an admin may not check out connections
        s = hello(ROLE_ADMIN)
        s.send(ipc_msg(T_CHECKOUT, struct.pack('<IIII', 0, 0, 0, 0) + b'alice'.ljust(256, b'\0') +
                       b'\0' * 256 + ALICE_PW.encode().ljust(2048, b'\0') + b'\0' * (64 + 64 + 4096)))
        self.assertEqual(s.recv(65536), b'', 'admin-role peer got an answer to a checkout')
        s.close()
        # the broker is fine, and the same admin request over an admin hello works
        s = hello(ROLE_ADMIN)
        s.send(admin_stats)
        self.assertEqual(len(s.recv(65536)), 8 + 128)
        s.close()
        self.assertFalse(self.once('alice', ALICE_PW))
        self.assertEqual(self.px.broker_log().count(': dropping: Protocol error'), 3, 'three peers dropped')


class CtlGroups(CtlBase):
    """broker_socket_group lets `nogroup` reach the socket as a session would;
    only admin_group (here adm, as a supplementary group) makes an admin."""

    PROXY_CONF = {'login_failure_delay': 0, 'broker_socket_group': 'nogroup', 'admin_group': 'adm'}

    def test_j_session_group_is_not_admin(self):
        r = self.stats_refused_to_nobody()
        self.assertIn('permission denied', r.stderr)
        self.assertIn('refused: not root and not in admin_group adm', self.px.broker_log())

    def test_k_admin_group_member_is_admin(self):
        self.once('alice', ALICE_PW)
        r = self.ctl('stats', '--json', use_socket=True,
                     prefix=['setpriv', '--reuid=nobody', '--regid=nogroup', '--groups=adm'])
        self.assertEqual(json.loads(r.stdout)['logins'], 1)
