#!/usr/bin/env python3
"""Operations: configuration drop-ins, Debian's shipped configuration,
journald logging, sd_notify/watchdog and reload.  Run through
tests/integration/run.py.

  - FILE.d/*.conf drop-ins are read by broker and session after the main file,
    in byte order, later values win; an error names the drop-in file and line;
    --check-config says where each value came from;
  - the broker starts with Debian's shipped example imapproxy.conf (package
    imapproxy), unchanged, with a drop-in pointing it at the test Dovecot, and
    a login goes through it;
  - a real systemd-journald in a private mount namespace (our directories
    bound over /run/systemd, /run/log and /var/log/journal) receives broker
    and session messages over the native protocol: MESSAGE_IDs and
    IMAPPROXY_* fields on the right events, binary-safe values;
  - no password and no AUTHENTICATE data in any log (stderr, session logs,
    the journal) after LOGIN quoted/literal, AUTHENTICATE PLAIN with and
    without SASL-IR, AUTHENTICATE LOGIN, and failures of each;
  - sd_notify to a NOTIFY_SOCKET of our own: READY=1, STATUS=, WATCHDOG=1
    pings at half of WATCHDOG_USEC, RELOADING=1 + MONOTONIC_USEC, STOPPING=1;
  - SIGHUP reload: a changed value applies, pooled and lent connections
    survive, a bad file or a restart-only change is refused and the running
    configuration stays.
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (BROKER, Proxy, RawClient, _Proc, free_port, imap_login,  # noqa: E402
                         tail, wait_until, FixtureError)
from test_core import ProxyTest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'common'))

JOURNALD = next((p for p in ('/lib/systemd/systemd-journald', '/usr/lib/systemd/systemd-journald')
                 if os.path.exists(p)), None)
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'common', 'message-ids.h')


def message_ids():
    """{'LOGIN_NEW': '0928...', ...} from common/message-ids.h"""
    ids = {}
    with open(HEADER) as f:
        for m in re.finditer(r'#define IMAPPROXY_MSGID_(\w+)\s+"([0-9a-f]{32})"', f.read()):
            ids[m.group(1)] = m.group(2)
    return ids

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
        r = self.raw()                    # the session read 30-session.conf: one failure ends it
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


# ------------------------------------------------------------------ journald

class PrivateJournal:
    """systemd-journald in its own mount namespace: tmp directories bound over
    /run/systemd, /run/log and /var/log/journal, so the host is untouched and
    our programs, started with `wrap` (nsenter), find it at the usual place."""

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, 'journal-ns')
        self.run_systemd = os.path.join(self.dir, 'run-systemd')
        self.run_log = os.path.join(self.dir, 'run-log')
        self.var_log = os.path.join(self.dir, 'var-log-journal')
        for d in (self.run_systemd, self.run_log, self.var_log):
            os.makedirs(d)
        script = ('set -e; mount --bind %s /run/systemd; mount --bind %s /run/log; '
                  'mount --bind %s /var/log/journal; exec %s'
                  % (self.run_systemd, self.run_log, self.var_log, JOURNALD))
        self.proc = _Proc(['unshare', '-m', '--propagation', 'private', 'sh', '-c', script],
                          os.path.join(self.dir, 'journald.log'), 'journald')
        sock = os.path.join(self.run_systemd, 'journal', 'socket')
        try:
            wait_until(lambda: os.path.exists(sock) or not self.proc.alive(), 10, what='journald socket')
        except FixtureError:
            self.stop()
            raise
        if not self.proc.alive():
            raise FixtureError('journald exited: %s' % self.proc.log())
        self.wrap = ['nsenter', '-t', str(self.proc.pid), '-m', '--']

    def entries(self):
        out = subprocess.run(self.wrap + ['journalctl', '-o', 'json', '--no-pager', '--all'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        res = []
        for line in out.stdout.decode('utf-8', 'replace').splitlines():
            try:
                res.append(json.loads(line))
            except ValueError:
                pass
        return res

    def export(self):
        """Every field of every entry, as text (journalctl -o export)."""
        out = subprocess.run(self.wrap + ['journalctl', '-o', 'export', '--no-pager'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        return out.stdout

    def raw_files(self):
        data = b''
        for root in (self.run_log, self.var_log):
            for dp, _, files in os.walk(root):
                for f in files:
                    with open(os.path.join(dp, f), 'rb') as fh:
                        data += fh.read()
        return data

    def stop(self):
        self.proc.stop(signal.SIGTERM, 5.0)


def journal_stream(path):
    """JOURNAL_STREAM value naming the file at path, as systemd sets it for a
    service whose stderr is connected to the journal."""
    open(path, 'ab').close()
    st = os.stat(path)
    return '%d:%d' % (st.st_dev, st.st_ino)


def field(e, k):
    v = e.get(k)
    if isinstance(v, list):  # non-UTF-8 or binary field: list of byte values
        return bytes(v).decode('utf-8', 'replace')
    return v


# Passwords and SASL blobs of the login set: none may appear in any log.
SECRETS = {
    'alice': 'Alice-Secret-7a1',
    'bob': 'Bob-Secret-9c2',
    'carol': 'Carol-Secret-3e4',
}
WRONG = ['Wrong-Quoted-x81', 'Wrong-Literal-x82', 'Wrong-PlainIR-x83', 'Wrong-Plain-x84', 'Wrong-Login-x85']


def b64(data):
    return base64.b64encode(data).decode()


def login_set(port):
    """LOGIN quoted and literal, AUTHENTICATE PLAIN with and without SASL-IR,
    AUTHENTICATE LOGIN, each once right and once wrong. Returns the secrets
    that went over the wire (passwords and base64 blobs)."""
    secrets = list(SECRETS.values()) + WRONG
    blobs = []

    fails = [0]

    def session(steps):
        # Each failure from its own loopback address: with forward_client_id
        # Dovecot sees that address, and its failed-login penalty (per
        # address, doubling up to 15 s) does not pile up.
        failing = any(e is not None and e.endswith(b' NO') for _, e in steps)
        if failing:
            fails[0] += 1
        with RawClient(port, timeout=15, source='127.0.0.%d' % (10 + fails[0]) if failing else None) as r:
            for send, expect in steps:
                if isinstance(send, str):
                    send = send.encode()
                r.send(send)
                line = r.readline(timeout=15)
                while expect is not None and not re.match(expect, line):
                    line = r.readline(timeout=15)
            r.send(b'Z LOGOUT\r\n')
            r.read_until_close(timeout=10)

    def ok(tag):
        return (tag + r' OK').encode()

    def no(tag):
        return (tag + r' NO').encode()

    a, b, c = SECRETS['alice'], SECRETS['bob'], SECRETS['carol']
    # LOGIN quoted, right and wrong
    session([('q1 LOGIN alice "%s"\r\n' % a, ok('q1'))])
    session([('q2 LOGIN alice "%s"\r\n' % WRONG[0], no('q2'))])
    # LOGIN with synchronising literals
    session([('l1 LOGIN {3}\r\n', rb'\+'), ('bob {%d}\r\n' % len(b), rb'\+'), (b + '\r\n', ok('l1'))])
    session([('l2 LOGIN {3}\r\n', rb'\+'), ('bob {%d}\r\n' % len(WRONG[1]), rb'\+'),
             (WRONG[1] + '\r\n', no('l2'))])
    # AUTHENTICATE PLAIN with SASL-IR
    for user, pw, tag, want in (('carol', c, 'p1', ok), ('carol', WRONG[2], 'p2', no)):
        blob = b64(b'\0' + user.encode() + b'\0' + pw.encode())
        blobs.append(blob)
        session([('%s AUTHENTICATE PLAIN %s\r\n' % (tag, blob), want(tag))])
    # AUTHENTICATE PLAIN with a continuation, with an authorisation identity too
    for user, pw, tag, want in (('alice', a, 'p3', ok), ('alice', WRONG[3], 'p4', no)):
        blob = b64(user.encode() + b'\0' + user.encode() + b'\0' + pw.encode())
        blobs.append(blob)
        session([('%s AUTHENTICATE PLAIN\r\n' % tag, rb'\+'), (blob + '\r\n', want(tag))])
    # AUTHENTICATE LOGIN
    for user, pw, tag, want in (('bob', b, 'g1', ok), ('bob', WRONG[4], 'g2', no)):
        pblob = b64(pw.encode())
        blobs.append(pblob)
        session([('%s AUTHENTICATE LOGIN\r\n' % tag, rb'\+'), (b64(user.encode()) + '\r\n', rb'\+'),
                 (pblob + '\r\n', want(tag))])
    return secrets + blobs


# Dovecot takes the client address from the proxy's ID (forward_client_id)
# only from trusted networks.
TRUSTED = 'login_trusted_networks = 127.0.0.0/8\n'


class NoSecretsInLogs(ProxyTest):
    USERS = SECRETS
    START_PROXY = False
    DOVECOT_EXTRA = TRUSTED

    def check_logs(self, texts, secrets):
        joined = b'\n'.join(t if isinstance(t, bytes) else t.encode('utf-8', 'replace') for t in texts)
        for u in ('alice', 'bob', 'carol'):  # the logs are not empty: the check can fail
            self.assertIn(u.encode(), joined, 'no log line names %s: nothing was logged?' % u)
        low = joined.lower()
        for sec in secrets:
            i = low.find(sec.lower().encode())
            if i >= 0:
                self.fail('secret %r found in a log: ...%r...' % (sec, joined[max(0, i - 200):i + 60]))

    def test_stderr_and_session_logs(self):
        env = {'IMAPPROXY_LOG_LEVEL': 'debug'}
        px = self.start_proxy(broker_env=env, listener_env=env, login_failure_delay=0,
                              login_max_failures=5, forward_client_id='yes')
        secrets = login_set(px.port)
        self.assertEqual(self.dc.logins('alice'), 1, 'pooled connections were reused')
        px.stop()
        self.check_logs([px.broker_log(), px.listener_log(), self.dc.log()], secrets)

    @unittest.skipUnless(os.geteuid() == 0 and JOURNALD and shutil.which('nsenter'),
                         'needs root, systemd-journald and nsenter')
    def test_journal(self):
        jr = PrivateJournal(self.tmp)
        try:
            px = self.start_proxy(start=False, wrap=jr.wrap, login_failure_delay=0, login_max_failures=5,
                                  forward_client_id='yes')
            env = {'IMAPPROXY_LOG_LEVEL': 'debug'}
            px.broker_env = dict(env, JOURNAL_STREAM=journal_stream(px.broker_log_path))
            px.listener_env = dict(env, JOURNAL_STREAM=journal_stream(px.listener_log_path))
            px.start()
            secrets = login_set(px.port)
            px.stop()
            ids = message_ids()
            wait_until(lambda: any(field(e, 'MESSAGE_ID') == ids['BROKER_STOPPING'] for e in jr.entries()),
                       10, what='the broker stop in the journal')
            export = jr.export()
            self.assertIn(b'SYSLOG_IDENTIFIER=imapproxy-session', export)
            self.check_logs([px.broker_log(), px.listener_log(), export, jr.raw_files()], secrets)
        finally:
            jr.stop()


@unittest.skipUnless(os.geteuid() == 0 and JOURNALD and shutil.which('nsenter'),
                     'needs root, systemd-journald and nsenter')
class Journal(ProxyTest):
    START_PROXY = False
    USERS = {'alice': 'pw', 'bob': 'bobpw'}

    def test_events_and_fields(self):
        ids = message_ids()
        jr = PrivateJournal(self.tmp)
        self.addCleanup(jr.stop)
        px = self.start_proxy(start=False, wrap=jr.wrap, login_failure_delay=0, cache_expiration_time=300)
        px.broker_env = {'JOURNAL_STREAM': journal_stream(px.broker_log_path), 'IMAPPROXY_LOG_LEVEL': 'debug'}
        px.listener_env = {'JOURNAL_STREAM': journal_stream(px.listener_log_path), 'IMAPPROXY_LOG_LEVEL': 'debug'}
        px.start()
        backend = '127.0.0.1:%d' % self.dc.port

        m = self.login('alice')                  # miss
        self.logout(m)
        m = self.login('alice')                  # hit
        self.logout(m)
        r = self.raw()                          # failure, a user name with a newline (literal)
        r.send(b'f1 LOGIN {5}\r\n')
        r.readline()
        r.send(b'ev\nil "wrong"\r\n')
        _, tagged = r.read_tagged('f1', timeout=10)
        self.assertTrue(tagged.startswith(b'f1 NO'), r.dump())
        self.dc.kick('alice')                    # the pooled one dies
        m = self.login('bob')
        self.logout(m)
        with open(px.conf_path, 'a') as f:       # bob's pooled connection expires after a reload
            f.write('cache_expiration_time 1\n')
        px.broker.send_signal(signal.SIGHUP)
        self.dc.wait_logouts(1, 'bob', timeout=10)
        px.stop()

        def entries():
            return [e for e in jr.entries() if field(e, 'SYSLOG_IDENTIFIER') in
                    ('imapproxy-broker', 'imapproxy-session')]
        wait_until(lambda: any(field(e, 'MESSAGE_ID') == ids['BROKER_STOPPING'] for e in entries()),
                   10, what='the broker stop in the journal')
        es = entries()

        def find(name, **want):
            for e in es:
                if field(e, 'MESSAGE_ID') != ids[name]:
                    continue
                if all(field(e, k) == v for k, v in want.items()):
                    return e
            self.fail('no %s entry with %r in the journal:\n%s' % (name, want, '\n'.join(
                '%s %s' % (field(e, 'MESSAGE_ID'), field(e, 'MESSAGE')) for e in es)))

        find('BROKER_STARTED', IMAPPROXY_BACKEND=backend, SYSLOG_IDENTIFIER='imapproxy-broker')
        e = find('LOGIN_NEW', IMAPPROXY_USER='alice', IMAPPROXY_CACHE='miss', IMAPPROXY_CLIENT='127.0.0.1',
                 IMAPPROXY_BACKEND=backend, PRIORITY='6')
        self.assertRegex(field(e, 'IMAPPROXY_SESSION_PID'), r'^\d+$')
        find('LOGIN_CACHED', IMAPPROXY_USER='alice', IMAPPROXY_CACHE='hit', IMAPPROXY_CLIENT='127.0.0.1',
             PRIORITY='7')
        # binary-safe form: the newline arrives intact, in the field and in MESSAGE
        e = find('LOGIN_FAILED', IMAPPROXY_USER='ev\nil', IMAPPROXY_CLIENT='127.0.0.1', PRIORITY='5')
        self.assertIn('ev\nil', field(e, 'MESSAGE'))
        find('BACKEND_DEAD', IMAPPROXY_USER='alice', IMAPPROXY_CACHE='dead', IMAPPROXY_BACKEND=backend)
        e = find('CONFIG_RELOADED', IMAPPROXY_CONFIG=px.conf_path)
        self.assertIn('cache_expiration_time', field(e, 'IMAPPROXY_CHANGED'))
        find('CACHE_EXPIRED', IMAPPROXY_USER='bob', IMAPPROXY_CACHE='expired')
        find('BROKER_STOPPING', SYSLOG_IDENTIFIER='imapproxy-broker')
        # sessions log natively too, every line with the client address
        sess = [e for e in es if field(e, 'SYSLOG_IDENTIFIER') == 'imapproxy-session']
        self.assertTrue(any(field(e, 'IMAPPROXY_CLIENT') == '127.0.0.1' and field(e, 'IMAPPROXY_USER') == 'alice'
                            for e in sess), 'no session entry with the client and user fields:\n%s' % sess[:5])
        # nothing fell back to stderr: the journal took every message
        self.assertNotIn('login alice', px.broker_log())
        self.assertEqual(px.listener_log().count('imapproxy-session['), 0, px.listener_log())


@unittest.skipUnless(os.geteuid() == 0 and shutil.which('unshare'), 'needs root and unshare')
class JournalFallback(ProxyTest):
    START_PROXY = False

    def test_no_journald_falls_back_to_stderr(self):
        # An empty tmpfs over /run/systemd in a mount namespace of their own:
        # no journal socket, whatever the host runs.
        wrap = ['unshare', '-m', '--propagation', 'private', 'sh', '-c',
                'mount -t tmpfs tmpfs /run/systemd && exec "$@"', 'sh']
        px = self.start_proxy(start=False, wrap=wrap)
        px.broker_env = {'JOURNAL_STREAM': journal_stream(px.broker_log_path)}
        px.listener_env = {'IMAPPROXY_LOG_TARGET': 'journal', 'IMAPPROXY_LOG_LEVEL': 'debug'}
        px.start()
        m = self.login('alice')
        self.logout(m)
        # journal stream on stderr: "<priority>text", as systemd expects there
        wait_until(lambda: '<6>login alice: new backend connection' in px.broker_log(), 5,
                   what='the login line on stderr')
        self.assertIn('<6>imapproxy-broker ready', px.broker_log())
        wait_until(lambda: re.search(r'imapproxy-session\[\d+\]: debug: ', px.listener_log()), 5,
                   what='session lines on stderr')


# ------------------------------------------------------------------ sd_notify, watchdog, reload

class NotifySocket:
    """A NOTIFY_SOCKET of our own: collects what the broker sends."""

    def __init__(self, tmp):
        self.path = os.path.join(tmp, 'notify.sock')
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.msgs = []  # (monotonic time, text)

    def drain(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return self.msgs
            self.msgs.append((time.monotonic(), data.decode('utf-8', 'replace')))

    def wait_for(self, pred, timeout=10, what=None):
        return wait_until(lambda: any(pred(m) for _, m in self.drain()), timeout, what=what)

    def close(self):
        self.sock.close()


class Notify(ProxyTest):
    START_PROXY = False

    def test_ready_status_watchdog_reloading_stopping(self):
        ns = NotifySocket(self.tmp)
        self.addCleanup(ns.close)
        px = self.start_proxy(start=False)
        px.broker_env = {'NOTIFY_SOCKET': ns.path, 'WATCHDOG_USEC': '400000'}
        px.start()
        ns.wait_for(lambda m: 'READY=1' in m.split('\n'), what='READY=1')
        m = self.login('alice')
        self.logout(m)
        ns.wait_for(lambda m: m.startswith('STATUS=') and '1 logins' in m, what='STATUS= after a login')

        # WATCHDOG=1 at half of WATCHDOG_USEC (0.2 s): several within 1.5 s
        t0 = time.monotonic()
        time.sleep(1.5)
        pings = [t for t, m in ns.drain() if m == 'WATCHDOG=1' and t >= t0]
        self.assertGreaterEqual(len(pings), 4, 'WATCHDOG=1 pings in 1.5 s at WATCHDOG_USEC=0.4 s: %r' % pings)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        self.assertLess(min(gaps), 0.4, gaps)  # never the full interval: half of it, give or take load

        n = len(ns.drain())
        px.broker.send_signal(signal.SIGHUP)
        ns.wait_for(lambda m: 'RELOADING=1' in m, what='RELOADING=1')
        later = [m for _, m in ns.drain()[n:] if m != 'WATCHDOG=1']
        i = next(i for i, m in enumerate(later) if 'RELOADING=1' in m)
        self.assertRegex(later[i], r'(?m)^MONOTONIC_USEC=\d+$')
        usec = int(re.search(r'MONOTONIC_USEC=(\d+)', later[i]).group(1))
        self.assertLess(abs(usec / 1e6 - time.monotonic()), 30, 'MONOTONIC_USEC is CLOCK_MONOTONIC')
        ns.wait_for(lambda m: m == 'READY=1', what='READY=1 after the reload')
        later = [m for _, m in ns.drain()[n:] if m != 'WATCHDOG=1']
        self.assertTrue(any('READY=1' in m for m in later[i + 1:]), later)

        px.broker.send_signal(signal.SIGTERM)
        ns.wait_for(lambda m: 'STOPPING=1' in m, what='STOPPING=1')
        px.broker.wait_exit(10)

    def test_no_watchdog_without_watchdog_usec(self):
        ns = NotifySocket(self.tmp)
        self.addCleanup(ns.close)
        px = self.start_proxy(start=False)
        px.broker_env = {'NOTIFY_SOCKET': ns.path}
        px.start()
        ns.wait_for(lambda m: 'READY=1' in m.split('\n'), what='READY=1')
        time.sleep(0.5)
        self.assertFalse([m for _, m in ns.drain() if 'WATCHDOG' in m])


class Reload(ProxyTest):
    PROXY_CONF = {'cache_expiration_time': 300, 'backend_timeout': 10}

    def reload(self, **changes):
        self.px.settings.update(changes)
        self.px.write_conf()
        self.hup()

    def hup(self):
        n = self.px.broker_log().count('reload')
        self.px.broker.send_signal(signal.SIGHUP)
        wait_until(lambda: self.px.broker_log().count('reload') > n, 10, what='the reload in the broker log')
        self.assertTrue(self.px.broker.alive())
        return self.px.broker_log()

    def test_a_changed_value_applies(self):
        m = self.login('alice')
        self.logout(m)
        time.sleep(1.5)
        self.assertEqual(self.dc.logouts('alice'), 0, 'pooled for 300 s')
        self.reload(cache_expiration_time=1)
        log = self.px.broker_log()
        self.assertIn('configuration reloaded from %s: cache_expiration_time changed' % self.px.conf_path, log)
        # idle for 1.5 s already: expired at once under the new value
        self.dc.wait_logouts(1, 'alice', timeout=5)

    def test_b_pooled_and_lent_connections_survive(self):
        m = self.login('alice')
        self.logout(m)                     # alice: pooled
        held = self.login('bob')           # bob: lent
        self.reload(backend_timeout=11, max_idle_per_user=4)
        self.assertIn('backend_timeout, max_idle_per_user changed', self.px.broker_log())
        self.select_fetch(held)            # the lent one works on
        self.logout(held)
        m = self.login('alice')
        self.assertReused(m, True, 'alice after the reload')
        self.logout(m)
        m = self.login('bob')
        self.assertReused(m, True, 'bob, lent during the reload, returned to the pool')
        self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)
        self.assertEqual(self.dc.logins('bob'), 1)

    def test_c_bad_file_refused_old_one_kept(self):
        m = self.login('alice')
        self.logout(m)
        with open(self.px.conf_path, 'a') as f:
            f.write('cache_expiration_time 1\ncache_size lots\n')
        lines = open(self.px.conf_path).read().count('\n')
        log = self.hup()
        self.assertIn('reload refused, the running configuration stays: %s:%d: cache_size: invalid value'
                      % (self.px.conf_path, lines), log)
        # Sessions read the files themselves at every start: with the broken
        # file they would answer BYE [UNAVAILABLE] (hence --check-config before
        # a reload, imapproxy-broker(8)). Put the old file back, without a
        # reload: the broker must still run what it ran before.
        self.px.write_conf()
        time.sleep(1.5)                    # cache_expiration_time 1 was not applied either
        m = self.login('alice')
        self.assertReused(m, True, 'alice after a refused reload')
        self.logout(m)

    def test_d_bad_dropin_and_restart_only_key_refused(self):
        m = self.login('alice')
        self.logout(m)
        d = self.px.conf_path + '.d'
        os.makedirs(d)
        write(os.path.join(d, '10-bad.conf'), 'max_idle_per_user 0\n')
        log = self.hup()
        self.assertIn('%s/10-bad.conf:1: max_idle_per_user' % d, log)
        os.unlink(os.path.join(d, '10-bad.conf'))
        write(os.path.join(d, '20-backend.conf'), 'server_port %d\n' % free_port())
        log = self.hup()
        self.assertIn('reload refused, the running configuration stays: server_port changed, which needs a restart',
                      log)
        os.unlink(os.path.join(d, '20-backend.conf'))
        write(os.path.join(d, '25-tls.conf'), 'server_tls starttls\n')
        log = self.hup()
        self.assertIn('reload refused, the running configuration stays: server_tls changed, which needs a restart',
                      log)
        os.unlink(os.path.join(d, '25-tls.conf'))
        write(os.path.join(d, '26-client-tls.conf'), 'listen_tls_cert_file %s/missing.pem\n'
              'listen_tls_key_file %s/missing.key\n' % (self.tmp, self.tmp))
        log = self.hup()
        self.assertIn('reload refused, the running configuration stays: the client TLS settings do not load', log)
        os.unlink(os.path.join(d, '26-client-tls.conf'))
        m = self.login('alice')            # still the old backend, still pooled
        self.assertReused(m, True, 'alice after refused reloads')
        self.logout(m)
        write(os.path.join(d, '30-ok.conf'), 'cache_size 50\n')
        log = self.hup()
        self.assertIn('cache_size changed', log)


if __name__ == '__main__':
    unittest.main()
