#!/usr/bin/env python3
"""Operations: configuration drop-ins, Debian's shipped configuration,
journald logging, sd_notify/watchdog and reload.  Run through
tests/integration/run.py.

  - FILE.d/*.conf drop-ins are read by broker and session after the main file,
    in byte order, later values win; an error names the drop-in file and line;
    --check-config says where each value came from;
  - the broker starts with Debian's shipped example imapproxy.conf (package
    imapproxy), unchanged, with a drop-in pointing it at the test Dovecot, and
    a login goes through it.
"""

import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import BROKER, Proxy, RawClient, free_port, imap_login  # noqa: E402
from test_core import ProxyTest, tail  # noqa: E402

DEBIAN_EXAMPLE = '/usr/share/doc/imapproxy/examples/imapproxy.conf'


def write(path, text):
    with open(path, 'w') as f:
        f.write(text)


class DropIns(ProxyTest):
    START_PROXY = False

    def test_a_dropins_override_main_file_for_broker_and_session(self):
        dead_port = free_port()  # nothing listens there
        px = self.start_proxy(start=False, server_port=dead_port, login_max_failures=3)
        d = px.conf_path + '.d'
        os.makedirs(d)
        # read in byte order: 10 then 20; 20 wins for server_port
        write(os.path.join(d, '20-backend.conf'), 'server_port %d\n' % self.dc.port)
        write(os.path.join(d, '10-backend.conf'), 'server_port %d\nlogin_max_failures 2\n' % dead_port)
        write(os.path.join(d, '30-session.conf'), '# session limits\nlogin_max_failures 1\n')
        write(os.path.join(d, 'disabled.conf.off'), 'server_port %d\n' % dead_port)
        px.start()

        m = self.login('alice')            # the broker reached Dovecot: 20-backend.conf won
        self.logout(m)
        r = self.rawc()                    # the session read 30-session.conf: one failure ends it
        _, tagged = r.login('alice', 'wrong')
        self.assertTrue(tagged.startswith(b'L1 NO'), tagged)
        rest = r.read_until_close(timeout=10)
        self.assertIn(b'* BYE', rest, r.dump())

        out = subprocess.run([BROKER, '-f', px.conf_path, '--check-config'], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        text = out.stdout.decode()
        self.assertIn('# %s/20-backend.conf:1\nserver_port %d\n' % (d, self.dc.port), text)
        self.assertIn('# %s/30-session.conf:2\nlogin_max_failures 1\n' % d, text)
        self.assertIn('# %s:' % px.conf_path, text)
        self.assertIn('# default\nclient_idle_timeout 1800\n', text)

    def test_b_bad_dropin_is_named_and_refused(self):
        px = self.start_proxy(start=False)
        d = px.conf_path + '.d'
        os.makedirs(d)
        write(os.path.join(d, '50-bad.conf'), '# comment\n\ncache_size lots\n')
        out = subprocess.run([BROKER, '-f', px.conf_path, '--check-config'], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=20)
        self.assertEqual(out.returncode, 1, out)
        self.assertIn('%s/50-bad.conf:3: cache_size: invalid value \'lots\'' % d, out.stderr.decode())
        # the session refuses to serve with it, and says why in its log
        # the broker would not start with it: sessions alone
        px.killed_with = 'broker never started'  # tearDown: no exit status to check
        write(px.conf_path, 'server_hostname 127.0.0.1\n')
        px.start_listener()
        with RawClient(px.port, greeting=False) as r:
            data = r.read_until_close(timeout=10)
        self.assertIn(b'* BYE [UNAVAILABLE]', data)
        self.assertIn('50-bad.conf:3: cache_size', px.listener_log())


class DebianConfig(ProxyTest):
    START_PROXY = False

    def test_debian_shipped_example_config(self):
        self.assertTrue(os.path.exists(DEBIAN_EXAMPLE),
                        '%s missing: scripts/install-deps installs package imapproxy' % DEBIAN_EXAMPLE)
        px = self.start_proxy(start=False)
        shutil.copy(DEBIAN_EXAMPLE, px.conf_path)   # unchanged
        os.makedirs(px.conf_path + '.d')
        write(os.path.join(px.conf_path + '.d', 'test.conf'),
              'server_hostname 127.0.0.1\nserver_port %d\nbroker_socket %s\n'
              % (self.dc.port, px.broker_socket))
        px.start()
        m = imap_login(px.port, 'alice', 'pw')
        self.select_fetch(m)
        self.logout(m)
        m = imap_login(px.port, 'alice', 'pw')
        self.assertReused(m, True, 'second login through the Debian config')
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)
        log = px.broker_log()
        # what Debian's file asks for and we do not do is said, once per key
        for key in ('proc_username', 'chroot_directory', 'stat_filename'):
            self.assertIn('%s:' % px.conf_path, log)
            self.assertIn(key, log, tail(log))


if __name__ == '__main__':
    unittest.main()
