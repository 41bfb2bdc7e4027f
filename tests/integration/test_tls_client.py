#!/usr/bin/env python3
"""Client TLS integration tests: STARTTLS on the plain listener and implicit TLS
(993-style) terminated in the session, in front of the broker and a private
Dovecot, with a CA and server certificate made by certtool for the test.
Run through tests/integration/run.py.

  - STARTTLS with imaplib (socket activation, --inetd): advertised only with a
    certificate, capabilities asked again after the handshake show no STARTTLS
    and the proxy's AUTH= mechanisms, a second STARTTLS is refused, logins go
    through to Dovecot and the second one reuses the pooled connection;
  - implicit TLS with imaplib.IMAP4_SSL against imapproxy-session-tls on
    LISTEN_FDS fd 3, and against `imapproxy-session --implicit-tls` (inetd);
  - curl imaps:// and curl --ssl-reqd imap:// (STARTTLS) fetch a message;
  - login_requires_tls: LOGINDISABLED and no AUTH= before TLS, LOGIN and
    AUTHENTICATE refused with NO [PRIVACYREQUIRED] (Dovecot sees nothing),
    accepted after STARTTLS;
  - no certificate: no STARTTLS in the capabilities, STARTTLS gets BAD;
  - the STARTTLS command injection: "a STARTTLS\\r\\nb LOGIN ..." in one write,
    b is never executed (no answer to b, no Dovecot login, still not logged in
    after the handshake);
  - resumption across two session processes (Python ssl session=, TLS 1.3 and
    1.2), and its control: without listen_tls_ticket_key_file each process has
    its own key and nothing resumes;
  - the TLS fork server takes up a rotated ticket key before its next fork
    (old tickets get a full handshake, new ones resume, also in per-connection
    sessions), a key file that appears after its start, and keeps its key when
    the file goes away or is broken (one warning per change); SIGHUP makes it
    load a renewed certificate (and refuse a broken one);
  - a 3 MB message APPENDed and FETCHed back through client TLS, intact.
"""

import hashlib
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (BROKER, SESSION, SOCKET_ACTIVATE, Proxy, RawClient, _Proc,  # noqa: E402
                         certtool, free_port, make_ca, make_cert, socket_activate,
                         tcp_listening, wait_until)
from fixturecase import FixtureCase  # noqa: E402

SESSION_TLS = os.environ.get('IMAPPROXY_SESSION_TLS') or os.path.join(
    os.path.dirname(SESSION), 'imapproxy-session-tls')
CURL = shutil.which('curl') or '/usr/bin/curl'
MESSAGES = 3
SHIPPED_TLS_STANZA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'units', 'xinetd',
                                  'imapproxy-tls')


def make_pki(d):
    """A CA and a server certificate for 127.0.0.1/localhost (ECDSA), made by
    certtool; returns (ca, cert, key) paths."""
    ca, ca_key = make_ca(d, 'ca', cn='imapproxy test CA')
    cert, key = make_cert(d, 'srv', ca, ca_key,
                          'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\n'
                          'tls_www_server\nsigning_key\nencryption_key\nexpiration_days = 2\n')
    os.chmod(key, 0o644)  # the test's key; read by sessions that may run as another user
    return ca, cert, key


class TlsClientTest(FixtureCase):
    """Fresh Dovecot per test; the PKI and ticket key are made once per class.
    fixturecase.FixtureCase stops everything (the implicit-TLS listeners in
    self.procs) and checks the logs: the proxy's and the listeners'."""

    TMP_PREFIX = 'imapproxy-tls-'
    MESSAGES = MESSAGES

    @classmethod
    def setUpClass(cls):
        cls.pki = cls.mkdtemp('imapproxy-pki-')
        os.chmod(cls.pki, 0o755)
        cls.ca, cls.cert, cls.key = make_pki(cls.pki)
        cls.ticket_key = os.path.join(cls.pki, 'ticket.key')
        cls.write_ticket_key()

    @classmethod
    def write_ticket_key(cls):
        """imapproxy-session-tls --write-ticket-key, as the shipped timer runs it."""
        subprocess.run([SESSION_TLS, '--write-ticket-key', cls.ticket_key], check=True, timeout=30)
        st = os.stat(cls.ticket_key)
        assert st.st_size == 64 and (st.st_mode & 0o777) == 0o600, (st.st_size, oct(st.st_mode))
        assert not os.path.exists(cls.ticket_key + '.new')
        with open(cls.ticket_key, 'rb') as f:
            return f.read()

    def crash_lines(self):
        crashes = super().crash_lines()
        for p in self.procs:
            crashes += [l for l in p.log().splitlines()
                        if re.search(r'AddressSanitizer|runtime error:|Segmentation fault|'
                                     r'died with code (4|6|7|8|11|31)$', l)]
        return crashes

    # -- set-up helpers

    def tls_conf(self, **extra):
        conf = {'listen_tls_cert_file': self.cert, 'listen_tls_key_file': self.key,
                'listen_tls_ticket_key_file': self.ticket_key, 'login_failure_delay': 0}
        conf.update(extra)
        return conf

    def implicit_listener(self, name='implicit', fd3=True, program=None, args=()):
        """systemd-socket-activate -a [--inetd] running the TLS session directly
        (imapproxy-session-tls, LISTEN_FDS fd 3 by default): port 993's set-up."""
        argv = ([] if fd3 else ['--inetd']) + [os.path.abspath(program or SESSION_TLS)] + list(args)
        port, p = socket_activate(argv + ['-f', self.px.conf_path],
                                  os.path.join(self.tmp, name + '-{port}.log'), name)
        self.procs.append(p)
        return port, p

    def ctx(self, maxver=None):
        c = ssl.create_default_context(cafile=self.ca)
        if maxver:
            c.maximum_version = maxver
        return c

    def starttls_client(self, port, ctx=None):
        m = imaplib.IMAP4('127.0.0.1', port, timeout=10)
        self.imaps.append(m)
        before = [c.upper() for c in m.capabilities]
        typ, data = m.starttls(ssl_context=ctx or self.ctx())  # asks CAPABILITY again
        self.assertEqual(typ, 'OK', data)
        return m, before

    def ssl_client(self, port, ctx=None):
        m = imaplib.IMAP4_SSL('127.0.0.1', port, ssl_context=ctx or self.ctx(), timeout=10)
        self.imaps.append(m)
        return m

    def login_select_logout(self, m, user='alice'):
        typ, data = m.login(user, self.USERS[user])
        self.assertEqual(typ, 'OK', data)
        reused = 'XPROXYREUSE' in m.untagged_responses
        typ, data = m.select('INBOX')
        self.assertEqual(typ, 'OK', data)
        self.assertEqual(int(data[0]), MESSAGES)
        typ, data = m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        self.assertEqual(typ, 'OK', data)
        self.assertIn(b'Test message 1', data[0][1])
        typ, data = m.logout()
        self.assertEqual(typ, 'BYE', data)
        self.imaps.remove(m)
        return reused

    def spawned_pids(self, log):
        return [int(x) for x in re.findall(r'Spawned .* as PID (\d+)', log)]

    # -- tests

    def test_t1_starttls_login_and_reuse(self):
        """STARTTLS (imaplib, socket activation --inetd): advertised with a
        certificate; after the handshake CAPABILITY shows no STARTTLS but the
        AUTH= mechanisms; a second STARTTLS gets BAD; two logins through to Dovecot,
        the second reuses the pooled connection."""
        self.start_proxy(**self.tls_conf())
        for i in range(2):
            m, before = self.starttls_client(self.px.port)
            self.assertIn('STARTTLS', before)
            self.assertIn('AUTH=PLAIN', before)
            after = [c.upper() for c in m.capabilities]
            self.assertNotIn('STARTTLS', after, 'STARTTLS offered again after the handshake')
            self.assertIn('AUTH=PLAIN', after)
            self.assertIn('XIMAPPROXY', after)
            self.assertIn(m.sock.version(), ('TLSv1.3', 'TLSv1.2'))
            with self.assertRaisesRegex(imaplib.IMAP4.error, r'STARTTLS command error: BAD'):
                m._simple_command('STARTTLS')
            self.assertEqual(self.login_select_logout(m), i == 1,
                             'XPROXYREUSE on login %d' % (i + 1))
        self.assertEqual(self.dc.logins('alice'), 1, 'one backend login for two client logins')

    def test_t2_implicit_tls_fd3_and_flag(self):
        """Implicit TLS: imapproxy-session-tls on LISTEN_FDS fd 3, and the plaintext
        program with --implicit-tls under --inetd (it execs the TLS program); the
        greeting comes over TLS without STARTTLS; logins reuse the pool."""
        self.start_proxy(**self.tls_conf())
        p_tls, _ = self.implicit_listener('implicit-fd3')
        p_flag, _ = self.implicit_listener('implicit-flag', fd3=False, program=SESSION,
                                           args=['--implicit-tls'])
        seen = []
        for port in (p_tls, p_flag, p_tls):
            m = self.ssl_client(port)
            caps = [c.upper() for c in m.capabilities]
            self.assertNotIn('STARTTLS', caps)
            self.assertIn('AUTH=PLAIN', caps)
            seen.append(self.login_select_logout(m, 'bob'))
        self.assertEqual(seen, [False, True, True], 'XPROXYREUSE per login')
        self.assertEqual(self.dc.logins('bob'), 1)

    def test_t3_curl_imaps_and_starttls(self):
        """curl imaps:// (implicit TLS) and curl --ssl-reqd imap:// (STARTTLS) fetch
        message 1 through the proxy; one Dovecot login serves both."""
        self.start_proxy(**self.tls_conf())
        p_tls, _ = self.implicit_listener()
        for url, extra in (('imaps://127.0.0.1:%d/INBOX;UID=1' % p_tls, []),
                           ('imap://127.0.0.1:%d/INBOX;UID=1' % self.px.port, ['--ssl-reqd'])):
            r = subprocess.run([CURL, '-sS', '--max-time', '20', '--cacert', self.ca,
                                '-u', 'alice:pw'] + extra + [url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            self.assertEqual(r.returncode, 0, '%s: %s' % (url, r.stderr.decode(errors='replace')))
            self.assertIn(b'Subject: Test message 1 for alice', r.stdout, url)
        # curl closes without LOGOUT: the connection may or may not be pooled;
        # what matters is that both transfers went through the proxy.
        self.assertGreaterEqual(self.dc.logins('alice'), 1)
        self.assertEqual(len(self.spawned_pids(self.procs[0].log())), 1, 'imaps:// went to the TLS listener')

    def test_t4_login_requires_tls(self):
        """login_requires_tls: before TLS, LOGINDISABLED and STARTTLS, no AUTH=;
        LOGIN and AUTHENTICATE get NO [PRIVACYREQUIRED] and reach nobody; after
        STARTTLS the login works."""
        self.start_proxy(**self.tls_conf(login_requires_tls='yes'))
        r = RawClient(self.px.port)
        self.raws.append(r)
        caps = r.greeting.decode().upper()
        self.assertIn('LOGINDISABLED', caps)
        self.assertIn('STARTTLS', caps)
        self.assertNotIn('AUTH=', caps)
        _, t = r.command('a1', 'LOGIN alice pw')
        self.assertRegex(t, rb'^a1 NO \[PRIVACYREQUIRED\]')
        _, t = r.command('a2', 'AUTHENTICATE PLAIN AGFsaWNlAHB3')
        self.assertRegex(t, rb'^a2 NO \[PRIVACYREQUIRED\]')
        u, t = r.command('a3', 'CAPABILITY')
        self.assertIn(b'LOGINDISABLED', b''.join(u))
        self.assertEqual(self.dc.logins(), 0, 'a refused login reached Dovecot')
        m, before = self.starttls_client(self.px.port)
        self.assertIn('LOGINDISABLED', before)
        after = [c.upper() for c in m.capabilities]
        self.assertNotIn('LOGINDISABLED', after)
        self.assertIn('AUTH=PLAIN', after)
        self.login_select_logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)
        # implicit TLS counts as TLS
        p_tls, _ = self.implicit_listener()
        m = self.ssl_client(p_tls)
        self.assertNotIn('LOGINDISABLED', [c.upper() for c in m.capabilities])
        self.assertTrue(self.login_select_logout(m), 'reuse over implicit TLS')

    def test_t5_no_certificate_no_starttls(self):
        """Without listen_tls_cert_file STARTTLS is neither advertised nor accepted."""
        self.start_proxy()
        r = RawClient(self.px.port)
        self.raws.append(r)
        self.assertNotIn(b'STARTTLS', r.greeting.upper())
        u, t = r.command('a1', 'CAPABILITY')
        self.assertNotIn(b'STARTTLS', b''.join(u).upper())
        self.assertRegex(t, rb'^a1 OK')
        _, t = r.command('a2', 'STARTTLS')
        self.assertRegex(t, rb'^a2 BAD')
        _, t = r.command('a3', 'LOGIN alice pw')  # the plain session goes on working
        self.assertRegex(t, rb'^a3 OK')

    def test_t6_starttls_injection(self):
        """"a STARTTLS\\r\\nb LOGIN alice pw\\r\\n" in one write: a gets OK, b is
        dropped: after the handshake nothing answers b, the session is still not
        logged in, and Dovecot saw no login."""
        self.start_proxy(**self.tls_conf())
        sock = socket.create_connection(('127.0.0.1', self.px.port), timeout=10)
        self.socks.append(sock)
        f = b''
        while b'\r\n' not in f:
            chunk = sock.recv(4096)
            self.assertTrue(chunk, 'greeting')
            f += chunk
        sock.sendall(b'a STARTTLS\r\nb LOGIN alice pw\r\nc NOOP\r\n')
        got = b''
        while b'\r\n' not in got:  # exactly the tagged OK, nothing after it in the clear
            chunk = sock.recv(1)
            self.assertTrue(chunk, 'answer to STARTTLS')
            got += chunk
        self.assertRegex(got, rb'^a OK')
        tls = self.ctx().wrap_socket(sock, server_hostname='127.0.0.1')
        self.socks.append(tls)
        tls.sendall(b'd CAPABILITY\r\ne SELECT INBOX\r\nf NOOP\r\n')
        data = b''
        deadline = time.monotonic() + 10
        while not re.search(rb'(?m)^f ', data) and time.monotonic() < deadline:
            try:
                chunk = tls.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
        time.sleep(0.3)  # a late answer to b would show up too
        tls.settimeout(0.3)
        try:
            data += tls.recv(65536)
        except (socket.timeout, ssl.SSLError, OSError):
            pass
        self.assertNotRegex(data, rb'(?m)^[bc] ', 'an injected command was executed:\n%r' % data)
        self.assertRegex(data, rb'(?m)^d OK')
        self.assertRegex(data, rb'AUTH=PLAIN', 'still before login: pre-login capabilities')
        self.assertRegex(data, rb'(?m)^e BAD', 'SELECT must fail: not logged in')
        self.assertRegex(data, rb'(?m)^f OK')
        self.assertEqual(self.dc.logins(), 0, 'the injected LOGIN reached Dovecot')

    def resume_pair(self, port, ctx, starttls=False, between=None, port2=None):
        """Two connections, each served by a new session process; returns
        (first reused, second reused). The second (to port2 if given) offers
        the first's session."""
        def connect(session=None, port=port):
            sock = socket.create_connection(('127.0.0.1', port), timeout=10)
            self.socks.append(sock)
            if starttls:
                r = sock.recv(4096)
                self.assertTrue(r.startswith(b'* OK'), r)
                sock.sendall(b's STARTTLS\r\n')
                self.assertTrue(sock.recv(4096).startswith(b's OK'))
            tls = ctx.wrap_socket(sock, server_hostname='127.0.0.1', session=session)
            self.socks.append(tls)
            # A command round trip: TLS 1.3 tickets arrive after the handshake.
            buf = b''
            if not starttls:
                while b'\r\n' not in buf:
                    buf += tls.recv(4096)
            tls.sendall(b'n NOOP\r\n')
            buf = b''
            while not re.search(rb'(?m)^n OK', buf):
                chunk = tls.recv(4096)
                self.assertTrue(chunk)
                buf += chunk
            out = (tls.session, tls.session_reused)
            tls.sendall(b'z LOGOUT\r\n')
            tls.close()
            return out
        sess, r1 = connect()
        if between:
            between()
        _, r2 = connect(sess, port2 or port)
        return r1, r2

    def test_t7_resumption_across_processes(self):
        """TLS resumption between two session processes (listen_tls_ticket_key_file,
        written by imapproxy-session-tls --write-ticket-key): implicit TLS 1.3 and
        1.2, and STARTTLS; a new master key (rotation) refuses older tickets;
        control: without the key file each process has its own ticket key and
        nothing resumes."""
        self.start_proxy(**self.tls_conf())
        p_tls, proc = self.implicit_listener()
        self.assertEqual(self.resume_pair(p_tls, self.ctx()), (False, True), 'TLS 1.3 implicit')
        self.assertEqual(self.resume_pair(p_tls, self.ctx(ssl.TLSVersion.TLSv1_2)), (False, True),
                         'TLS 1.2 implicit')
        self.assertEqual(self.resume_pair(self.px.port, self.ctx(), starttls=True), (False, True),
                         'TLS 1.3 after STARTTLS')
        pids = wait_until(lambda: len(self.spawned_pids(proc.log())) >= 4 and self.spawned_pids(proc.log()),
                          5.0, what='4 spawned sessions')
        self.assertEqual(len(set(pids)), len(pids), 'each connection had its own session process')
        # Rotation: a ticket issued under the old master key is not accepted.
        k1 = open(self.ticket_key, 'rb').read()
        self.assertEqual(self.resume_pair(p_tls, self.ctx(), between=lambda: self.assertNotEqual(
            self.write_ticket_key(), k1)), (False, False), 'a ticket from before the rotation was accepted')
        self.assertEqual(self.resume_pair(p_tls, self.ctx()), (False, True), 'resumption after the rotation')
        # Control: no shared key -> no resumption across processes.
        self.px.settings.pop('listen_tls_ticket_key_file')
        self.px.write_conf()
        self.assertEqual(self.resume_pair(p_tls, self.ctx()), (False, False),
                         'resumed without a shared ticket key?')

    def test_t9_fork_servers(self):
        """Fork-server sessions (Accept=no): imapproxy-session-tls --fork-server
        serves implicit TLS (one key load, one fork per client; without a ticket key
        file the parent's random key still resumes between its children), and a
        child of imapproxy-session --fork-server hands a STARTTLS client over
        (--client-fd) to imapproxy-session-tls."""
        conf = self.tls_conf()
        del conf['listen_tls_ticket_key_file']
        self.px = Proxy(self.tmp, self.dc, fork_server=True, **conf)
        port = free_port()
        p = _Proc([SOCKET_ACTIVATE, '-l', '127.0.0.1:%d' % port, os.path.abspath(SESSION_TLS), '--fork-server',
                   '-f', self.px.conf_path], os.path.join(self.tmp, 'tls-fork.log'), 'tls-fork')
        self.procs.append(p)
        wait_until(lambda: tcp_listening(port) or not p.alive(), 10.0, what='TLS fork server')
        self.assertTrue(p.alive(), p.log())
        self.assertEqual(self.resume_pair(port, self.ctx()), (False, True), 'resumption within one fork server')
        seen = []
        for i in range(2):
            m = self.ssl_client(port)
            seen.append(self.login_select_logout(m))
            m, before = self.starttls_client(self.px.port)
            self.assertIn('STARTTLS', before)
            self.assertNotIn('STARTTLS', [c.upper() for c in m.capabilities])
            seen.append(self.login_select_logout(m))
        self.assertEqual(seen, [False, True, True, True])
        self.assertEqual(self.dc.logins('alice'), 1)

    def test_t11_fork_server_ticket_key_rotation(self):
        """imapproxy-session-tls --fork-server (imapproxy-forkserver-tls.service)
        takes up a rotated listen_tls_ticket_key_file before its next fork, as
        sessions started per connection do: a ticket from before the rotation
        gets a clean full handshake, the new key's tickets resume, also in a
        per-connection session that reads the file itself (so the fork server
        really uses the file's key, not just some key of its own). Started
        before the file exists, it picks the file up when it appears; a file
        that goes away leaves the key in use. One stat() per connection, one
        log line per change."""
        key = os.path.join(self.tmp, 'ticket.key')      # not there yet
        self.start_proxy(**self.tls_conf(listen_tls_ticket_key_file=key))
        p_conn, _ = self.implicit_listener()            # per connection: reads the file every time
        port = free_port()
        fork = _Proc([SOCKET_ACTIVATE, '-l', '127.0.0.1:%d' % port, os.path.abspath(SESSION_TLS), '--fork-server',
                      '-f', self.px.conf_path], os.path.join(self.tmp, 'tls-fork.log'), 'tls-fork')
        self.procs.append(fork)
        wait_until(lambda: tcp_listening(port) or not fork.alive(), 10.0, what='TLS fork server')
        self.assertTrue(fork.alive(), fork.log())
        ctx = self.ctx()

        def rotate():
            subprocess.run([SESSION_TLS, '--write-ticket-key', key], check=True, timeout=30)

        # No file yet: the parent's random key resumes between its children only.
        self.assertEqual(self.resume_pair(port, ctx), (False, True), 'no key file: within the fork server')
        self.assertEqual(self.resume_pair(port, ctx, port2=p_conn), (False, False),
                         'no key file: a per-connection session resumed a fork-server ticket?')
        rotate()    # the file appears
        self.assertEqual(self.resume_pair(port, ctx, port2=p_conn), (False, True),
                         'the fork server did not take up the new key file')
        # Rotation while it runs: the old ticket is refused cleanly, the new key works everywhere.
        self.assertEqual(self.resume_pair(port, ctx, between=rotate), (False, False),
                         'a ticket from before the rotation was accepted')
        self.assertEqual(self.resume_pair(port, ctx), (False, True), 'resumption with the new key')
        self.assertEqual(self.resume_pair(port, ctx, port2=p_conn), (False, True),
                         'fork server and per-connection sessions disagree on the key after rotation')
        self.assertEqual(self.resume_pair(p_conn, ctx, port2=port), (False, True),
                         'a per-connection ticket was not accepted by the fork server')
        # The file goes away, or is not a key: the fork server keeps its key
        # (and says so once per change, not per connection).
        os.unlink(key)
        for _ in range(2):
            self.assertEqual(self.resume_pair(port, ctx), (False, True), 'key file removed: key kept')
        with open(key, 'wb') as f:
            f.write(b'x' * 10)
        for _ in range(2):
            self.assertEqual(self.resume_pair(port, ctx), (False, True), 'a 10-byte key file: key kept')
        # A full IMAP session through the fork server after all that.
        self.assertFalse(self.login_select_logout(self.ssl_client(port)))
        log = fork.log()
        self.assertEqual(len(re.findall(r'ticket.key changed: new TLS session ticket master key', log)), 2, log)
        self.assertEqual(len(re.findall(r'ticket.key changed but cannot be read: No such file or directory; '
                                        r'keeping the key in use', log)), 1, log)
        self.assertEqual(len(re.findall(r'ticket.key changed but is not exactly 64 bytes; keeping the key in use',
                                        log)), 1, log)

    def test_t12_fork_server_reload_renewed_certificate(self):
        """systemctl reload of imapproxy-forkserver-tls.service (SIGHUP): the TLS
        fork server loads a renewed certificate and key without a restart (same
        pid); a certificate that does not load is refused with the reason and
        the running one stays."""
        cert, key = os.path.join(self.tmp, 'cert.pem'), os.path.join(self.tmp, 'key.pem')
        shutil.copyfile(self.cert, cert)
        shutil.copyfile(self.key, key)
        self.px = Proxy(self.tmp, self.dc, **self.tls_conf(listen_tls_cert_file=cert, listen_tls_key_file=key))
        port = free_port()
        fork = _Proc([SOCKET_ACTIVATE, '-l', '127.0.0.1:%d' % port, os.path.abspath(SESSION_TLS), '--fork-server',
                      '-f', self.px.conf_path], os.path.join(self.tmp, 'tls-fork.log'), 'tls-fork')
        self.procs.append(fork)
        wait_until(lambda: tcp_listening(port) or not fork.alive(), 10.0, what='TLS fork server')
        self.assertFalse(self.login_select_logout(self.ssl_client(port)))  # execs the session in place
        wait_until(lambda: 'imapproxy-session-tls' in os.readlink('/proc/%d/exe' % fork.pid), 5.0,
                   what='the listener to exec the session')
        # Renewal: another CA's certificate and key at the same paths, then SIGHUP.
        pki2 = os.path.join(self.tmp, 'pki2')
        os.mkdir(pki2)
        ca2, cert2, key2 = make_pki(pki2)
        shutil.copyfile(cert2, cert + '.new')
        os.rename(cert + '.new', cert)
        shutil.copyfile(key2, key + '.new')
        os.rename(key + '.new', key)
        with self.assertRaises(ssl.SSLError, msg='the new certificate before the reload?'):
            self.ssl_client(port, ssl.create_default_context(cafile=ca2))
        fork.send_signal(signal.SIGHUP)
        wait_until(lambda: 'SIGHUP: configuration checked, re-executing' in fork.log(), 5.0, what='the reload')
        self.assertTrue(self.login_select_logout(self.ssl_client(port, ssl.create_default_context(cafile=ca2))))
        # A broken certificate: refused, the renewed one stays.
        with open(cert, 'w') as f:
            f.write('-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n')
        fork.send_signal(signal.SIGHUP)
        wait_until(lambda: 'reload refused' in fork.log(), 5.0, what='the refusal')
        self.assertRegex(fork.log(), r'listen_tls_cert_file .*cert\.pem / listen_tls_key_file .*key\.pem: ')
        self.assertTrue(self.login_select_logout(self.ssl_client(port, ssl.create_default_context(cafile=ca2))))
        self.assertTrue(fork.alive())
        self.assertEqual(fork.log().count('SIGHUP: configuration checked'), 1, fork.log())

    def test_t10_broker_checks_client_tls_files(self):
        """The broker loads the sessions' client-TLS files: --check-config and
        start-up fail on a certificate that does not load, a key that does not
        match it, or a priority string GnuTLS rejects, naming the key; a ticket key
        file of the wrong size is a warning."""
        other_key = os.path.join(self.tmp, 'other.key')
        certtool('--generate-privkey', '--key-type=ecdsa', '--outfile', other_key)
        short = os.path.join(self.tmp, 'short.key')
        with open(short, 'wb') as f:
            f.write(b'x' * 10)
        base = {'server_hostname': '127.0.0.1', 'server_port': self.dc.port,
                'broker_socket': os.path.join(self.tmp, 'b.sock')}

        def check(**conf):
            path = os.path.join(self.tmp, 'check.conf')
            with open(path, 'w') as f:
                for k, v in dict(base, **conf).items():
                    f.write('%s %s\n' % (k, v))
            r = subprocess.run([BROKER, '--check-config', '-f', path], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=30)
            return r.returncode, r.stderr.decode(errors='replace')
        rc, err = check(listen_tls_cert_file=self.cert, listen_tls_key_file=self.key,
                        listen_tls_ticket_key_file=self.ticket_key)
        self.assertEqual((rc, err), (0, ''), 'a good client-TLS configuration')
        rc, err = check(listen_tls_cert_file=os.path.join(self.tmp, 'missing.pem'), listen_tls_key_file=self.key)
        self.assertEqual(rc, 1)
        self.assertRegex(err, r'listen_tls_cert_file .*missing\.pem')
        rc, err = check(listen_tls_cert_file=self.cert, listen_tls_key_file=other_key)
        self.assertEqual(rc, 1, 'a key that does not match the certificate')
        self.assertRegex(err, r'listen_tls_key_file .*other\.key')
        rc, err = check(listen_tls_cert_file=self.cert, listen_tls_key_file=self.key,
                        listen_tls_priority='NORMAL:+NO-SUCH-THING')
        self.assertEqual(rc, 1)
        self.assertRegex(err, r'listen_tls_priority: .*NO-SUCH-THING')
        rc, err = check(listen_tls_cert_file=self.cert, listen_tls_key_file=self.key,
                        listen_tls_ticket_key_file=short)
        self.assertEqual(rc, 0)
        self.assertRegex(err, r'warning: listen_tls_ticket_key_file .*not exactly 64 bytes')
        rc, err = check(login_requires_tls='yes')
        self.assertEqual(rc, 0)
        self.assertRegex(err, r'warning: login_requires_tls is set but listen_tls_cert_file is not')

    def test_t8_large_message_through_tls(self):
        """A 3 MB message APPENDed through client TLS and FETCHed back intact
        (both directions: the relay reads and writes many TLS records)."""
        self.start_proxy(**self.tls_conf())
        p_tls, _ = self.implicit_listener()
        line = b'0123456789abcdefghijklmnopqrstuvwxyz' * 2 + b'\r\n'
        body = (b'From: big@example.org\r\nSubject: big one\r\n\r\n' +
                line * (3 * 1024 * 1024 // len(line)))
        digest = hashlib.sha256(body).hexdigest()
        m = self.ssl_client(p_tls)
        self.assertEqual(m.login('alice', 'pw')[0], 'OK')
        typ, data = m.append('INBOX', None, None, body)
        self.assertEqual(typ, 'OK', data)
        self.assertEqual(m.select('INBOX')[0], 'OK')
        typ, data = m.fetch(str(MESSAGES + 1), '(BODY.PEEK[])')
        self.assertEqual(typ, 'OK')
        got = data[0][1]
        self.assertEqual(len(got), len(body))
        self.assertEqual(hashlib.sha256(got).hexdigest(), digest)
        typ, _ = m.noop()
        self.assertEqual(typ, 'OK')
        m.logout()
        self.imaps.remove(m)


from test_launchers import LauncherTest  # noqa: E402  (the xinetd helpers)


class TlsXinetd(LauncherTest):
    def test_x1_xinetd_shipped_tls_stanza(self):
        """units/xinetd/imapproxy-tls, with port/bind/server/server_args/user/group
        adjusted, is accepted by xinetd without complaint and serves implicit TLS:
        two IMAP4_SSL logins, the second from the pool."""
        ca, cert, key = make_pki(self.tmp)
        self.broker_only(listen_tls_cert_file=cert, listen_tls_key_file=key)
        port = free_port()
        text = self.shipped_stanza(SHIPPED_TLS_STANZA, SESSION_TLS, port)
        _, own = self.start_xinetd(text, name='xinetd-tls', ports=[port])
        log = open(own).read()
        self.assertRegex(log, r'Started working: 1 available service\b', log)
        self.assertNotRegex(log, r'(?m)(ERROR|WARNING):', 'xinetd complains about the stanza:\n' + log)
        ctx = ssl.create_default_context(cafile=ca)
        seen = []
        for _ in range(2):
            m = imaplib.IMAP4_SSL('127.0.0.1', port, ssl_context=ctx, timeout=10)
            self.imaps.append(m)
            self.assertNotIn('STARTTLS', m.capabilities)
            self.assertEqual(m.login('alice', 'pw')[0], 'OK')
            seen.append('XPROXYREUSE' in m.untagged_responses)
            self.assertEqual(m.select('INBOX')[0], 'OK')
            self.assertEqual(m.logout()[0], 'BYE')
            self.imaps.remove(m)
        self.assertEqual(seen, [False, True])
        self.assertEqual(self.dc.logins('alice'), 1)


if __name__ == '__main__':
    unittest.main()
