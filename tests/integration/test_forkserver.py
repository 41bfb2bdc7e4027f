#!/usr/bin/env python3
"""The session's --fork-server mode: one long-lived parent on a listening
socket (systemd Accept=no, systemd-socket-activate without -a) forks one
process per client without exec. Clients must not see any difference."""

import imaplib
import os
import socket
import tempfile
import threading
import time
import unittest

import imapfixture as fx


class ForkServer(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix='imapproxy-fork-')
        cls.dc = fx.Dovecot(cls.tmp.name, users={'alice': 'pw-a', 'bob': 'pw-b'}, messages=3)
        cls.dc.start()

    @classmethod
    def tearDownClass(cls):
        cls.dc.stop()
        cls.tmp.cleanup()

    def setUp(self):
        self.px = None

    def tearDown(self):
        if self.px:
            self.px.stop()

    def start(self, session_args=(), **conf):
        self.px = fx.Proxy(self.tmp.name, self.dc, fork_server=True, session_args=session_args, **conf)
        return self.px

    def session_parent(self):
        """PID of the --fork-server parent: the listener exec'd it in place."""
        return self.px.listener.pid

    def page_view(self, user, pw):
        m = imaplib.IMAP4('127.0.0.1', self.px.port)
        typ, _ = m.login(user, pw)
        self.assertEqual(typ, 'OK')
        reused = 'XPROXYREUSE' in m.untagged_responses
        typ, data = m.select('INBOX')
        self.assertEqual((typ, data[0]), ('OK', b'3'))
        typ, data = m.fetch('1:*', '(FLAGS)')
        self.assertEqual(typ, 'OK')
        self.assertEqual(len(data), 3)
        self.assertEqual(m.logout()[0], 'BYE')
        return reused

    def test_a_login_twice_reuses(self):
        before = self.dc.logins('alice')
        self.start()
        self.assertFalse(self.page_view('alice', 'pw-a'))
        self.assertTrue(self.page_view('alice', 'pw-a'), 'second login through the fork server not reused')
        self.assertEqual(self.dc.logins('alice') - before, 1)

    def test_b_concurrent_clients_and_parent_survives(self):
        self.start()
        parent = self.session_parent()
        errors = []

        def worker(u, pw):
            try:
                for _ in range(5):
                    self.page_view(u, pw)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
        ts = [threading.Thread(target=worker, args=a) for a in (('alice', 'pw-a'), ('bob', 'pw-b')) * 3]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        self.assertEqual(errors, [])
        # A client that vanishes mid-command kills only its own child.
        s = socket.create_connection(('127.0.0.1', self.px.port), timeout=5)
        s.recv(4096)
        s.sendall(b'a LOGIN {10}\r\n')
        s.close()
        time.sleep(0.3)
        self.assertTrue(os.path.exists('/proc/%d' % parent), 'the fork-server parent died')
        self.assertTrue(self.page_view('alice', 'pw-a'))

    def test_c_reexec_keeps_serving(self):
        # After --reexec-after connections the parent execs itself (fresh
        # address-space layout and stack canary) and goes on with the same socket.
        self.start(session_args=['--reexec-after', '2'])
        parent = self.session_parent()

        def text_mapping():
            with open('/proc/%d/maps' % parent) as f:
                for line in f:
                    if 'imapproxy-session' in line:  # ' (deleted)' after a rebuild
                        return line.split()[0]
            return None
        # systemd-socket-activate listens, and execs the session in place at
        # the first connection.
        self.page_view('bob', 'pw-b')
        fx.wait_until(lambda: 'imapproxy-session' in os.readlink('/proc/%d/exe' % parent),
                      timeout=5, what='the listener to exec the session')
        with open('/proc/%d/stat' % parent) as f:
            start_before = f.read().split()[21]
        mapping_before = text_mapping()
        self.assertIsNotNone(mapping_before)
        for _ in range(5):
            self.page_view('bob', 'pw-b')
        time.sleep(0.2)
        with open('/proc/%d/stat' % parent) as f:
            self.assertEqual(f.read().split()[21], start_before, 'same process (exec keeps the pid)')
        with open('/proc/%d/cmdline' % parent, 'rb') as f:
            self.assertIn(b'--fork-server', f.read())
        with open('/proc/sys/kernel/randomize_va_space') as f:
            aslr = f.read().strip() != '0'
        if aslr:
            # The exec really happened: a PIE is mapped at a new random address.
            self.assertNotEqual(text_mapping(), mapping_before, 'the parent did not re-exec itself')
        self.assertTrue(self.page_view('bob', 'pw-b'))

    def test_e_sighup_reloads(self):
        # SIGHUP (systemctl reload): the parent checks the configuration and
        # re-execs itself, same pid, same socket; a configuration that does not
        # load is refused with its file, line and key, and the parent goes on as
        # it was. A burst of SIGHUPs (some arriving while the new image starts,
        # with SIGHUP blocked) does not kill it.
        import signal
        self.start()
        parent = self.session_parent()
        self.page_view('bob', 'pw-b')   # the listener execs the session in place
        fx.wait_until(lambda: 'imapproxy-session' in os.readlink('/proc/%d/exe' % parent),
                      timeout=5, what='the listener to exec the session')

        def text_mapping():
            with open('/proc/%d/maps' % parent) as f:
                for line in f:
                    if 'imapproxy-session' in line:
                        return line.split()[0]
            return None
        with open('/proc/sys/kernel/randomize_va_space') as f:
            aslr = f.read().strip() != '0'
        reloads = lambda: self.px.listener_log().count('SIGHUP: configuration checked, re-executing')  # noqa: E731
        before = text_mapping()
        os.kill(parent, signal.SIGHUP)
        fx.wait_until(lambda: reloads() == 1, timeout=5, what='the reload log line')
        if aslr:
            fx.wait_until(lambda: text_mapping() not in (None, before), timeout=5, what='the re-exec')
        self.assertTrue(self.page_view('bob', 'pw-b'))
        # A bad line: refused, named, nothing re-executed.
        with open(self.px.conf_path, 'a') as f:
            f.write('no_such_key 1\n')
        before = text_mapping()
        os.kill(parent, signal.SIGHUP)
        fx.wait_until(lambda: 'reload refused' in self.px.listener_log(), timeout=5, what='the refusal')
        self.assertRegex(self.px.listener_log(), r'reload refused, the running configuration stays: .*'
                                                 r'imapproxy\.conf:\d+: no_such_key: unknown')
        self.assertTrue(self.page_view('bob', 'pw-b'))
        self.assertEqual(text_mapping(), before, 're-executed despite a bad configuration')
        self.assertEqual(reloads(), 1)
        # Fixed again, then a burst.
        self.px.write_conf()
        for _ in range(30):
            os.kill(parent, signal.SIGHUP)
        fx.wait_until(lambda: reloads() >= 2, timeout=5, what='reloads after the burst')
        time.sleep(0.3)
        self.assertTrue(os.path.exists('/proc/%d' % parent) and self.px.listener.alive(),
                        'a burst of SIGHUPs killed the fork server:\n' + self.px.listener_log()[-2000:])
        self.assertTrue(self.page_view('bob', 'pw-b'))

    def test_d_refuses_without_listening_socket(self):
        # Run directly, with no LISTEN_FDS: a clear error, exit 2.
        import subprocess
        p = subprocess.run([os.path.abspath(fx.SESSION), '--fork-server', '-f', '/dev/null'],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn(b'--fork-server needs a listening socket', p.stderr)


if __name__ == '__main__':
    unittest.main()
