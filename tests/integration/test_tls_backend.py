#!/usr/bin/env python3
"""Backend TLS: the broker speaks STARTTLS or implicit TLS to a real Dovecot
(ssl = yes, a 993-style listener), verifies its certificate, and lends TLS
connections through its relay exactly like plain ones.

A private CA and server certificate are made by the test with certtool
(gnutls-bin); a second, unrelated CA plays the attacker.  "A backend login" is
a `imap-login: Info: Login: user=<X>` line in Dovecot's log; Dovecot adds
`TLS` to it when the connection was encrypted, which is how the tests see that
TLS was really used.  Run through tests/integration/run.py.
"""

import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (Proxy, imap_login, make_ca, make_cert, proc_fd_count,  # noqa: E402
                         proc_rss_kb, read_memory, session_pid_for, wait_until, FixtureError, BROKER)
from fixturecase import FixtureCase  # noqa: E402

SERVER_NAME = 'imap.test.example'
LOGIN_LINE_RE = re.compile(r'imap-login: Info: Login: user=<([^>]*)>.*')


def make_server_cert(d, ca_pem, ca_key):
    pem, key = make_cert(d, 'server', ca_pem, ca_key,
                         'cn = %s\ndns_name = %s\nip_address = 127.0.0.1\nip_address = 127.0.0.2\n'
                         'tls_www_server\nsigning_key\nexpiration_days = 2\n' % (SERVER_NAME, SERVER_NAME))
    os.chmod(key, 0o644)  # read by Dovecot's login processes; a throw-away test key
    return pem, key


def make_client_cert(d, ca_pem, ca_key, name):
    return make_cert(d, name, ca_pem, ca_key,
                     'cn = %s\ntls_www_client\nsigning_key\nexpiration_days = 2\n' % name)


class FakeServer:
    """A tiny IMAP server that offers no STARTTLS and records every byte it gets."""

    def __init__(self, caps='IMAP4rev1 LITERAL+ AUTH=PLAIN'):
        self.caps = caps
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self.connections = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._client, args=(c,), daemon=True).start()

    def _client(self, c):
        c.settimeout(10)
        try:
            c.sendall(b'* OK [CAPABILITY %s] fake ready\r\n' % self.caps.encode())
            buf = b''
            while True:
                data = c.recv(4096)
                if not data:
                    return
                with self.lock:
                    self.received.append(data)
                buf += data
                while b'\r\n' in buf:
                    line, buf = buf.split(b'\r\n', 1)
                    parts = line.split(b' ', 2)
                    tag = parts[0]
                    cmd = parts[1].upper() if len(parts) > 1 else b''
                    if cmd == b'CAPABILITY':
                        c.sendall(b'* CAPABILITY %s\r\n%s OK done\r\n' % (self.caps.encode(), tag))
                    elif cmd == b'LOGOUT':
                        c.sendall(b'* BYE bye\r\n%s OK done\r\n' % tag)
                        return
                    else:
                        c.sendall(b'%s OK whatever you say\r\n' % tag)  # a careless server
        except OSError:
            pass
        finally:
            c.close()

    def data(self):
        with self.lock:
            return b''.join(self.received)

    def stop(self):
        self.stopping = True
        self.sock.close()


class FakeSession:
    """Speaks the broker protocol (common/ipc-proto.h) like imapproxy-session does,
    so that a test can check in whatever socket it likes."""

    def __init__(self, path):
        hdr = open(os.path.join(os.path.dirname(__file__), '..', '..', 'common', 'ipc-proto.h')).read()
        self.version = int(re.search(r'#define IPC_PROTO_VERSION (\d+)', hdr).group(1))
        names = re.findall(r'X\((IPC_[A-Z_]+),', hdr)
        self.type = {n: i + 1 for i, n in enumerate(names)}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.send('IPC_HELLO', struct.pack('=II', self.version, 1))  # role: IPC_ROLE_SESSION
        t, _, _ = self.recv()
        assert t == self.type['IPC_HELLO_REPLY'], t

    def send(self, name, payload, fd=None):
        msg = struct.pack('=HHI', self.type[name], 1 if fd is not None else 0, len(payload)) + payload
        if fd is None:
            self.sock.send(msg)
        else:
            socket.send_fds(self.sock, [msg], [fd])

    def recv(self):
        data, fds, _, _ = socket.recv_fds(self.sock, 16384, 1)
        t, _, n = struct.unpack('=HHI', data[:8])
        return t, data[8:8 + n], fds

    def checkout(self, user, password):
        self.send('IPC_CHECKOUT', struct.pack('=IIII256s256s2048s64s64s4096s', 0, 0, 0, 0, user.encode(), b'',
                                               password.encode(), b'', b'', b''))
        t, payload, fds = self.recv()
        assert t == self.type['IPC_CHECKOUT_OK'] and len(fds) == 1, (t, payload[:100])
        ticket, flags = struct.unpack('=QI', payload[:12])
        return ticket, bool(flags & 1), socket.socket(fileno=fds[0])

    def checkin(self, ticket, sock, clean=True):
        self.send('IPC_CHECKIN', struct.pack('=QII', ticket, 1 if clean else 2, 0), sock.fileno())

    def close(self):
        self.sock.close()


def imap_noop(sock, tag=b'N1'):
    sock.settimeout(10)
    sock.sendall(tag + b' NOOP\r\n')
    buf = b''
    while b'\r\n' not in buf or not buf.split(b'\r\n')[-2].startswith(tag + b' '):
        chunk = sock.recv(4096)
        if not chunk:
            return buf + b'<EOF>'
        buf += chunk
    return buf



@unittest.skipUnless(shutil.which('certtool'), 'certtool (gnutls-bin) is not installed')
class TlsBackendTest(FixtureCase):
    """The tests start Dovecot (with the test CA's server certificate) and the
    proxy themselves; fixturecase.FixtureCase stops them and checks the proxy's
    logs. The temp directory goes at once: some tests put big messages in it."""

    TMP_PREFIX = 'imapproxy-tlsb-'
    MESSAGES = 3
    START_DOVECOT = False

    @classmethod
    def setUpClass(cls):
        cls._classtmp = cls.mkdtemp()
        os.chmod(cls._classtmp, 0o755)
        cls.ca_pem, ca_key = make_ca(cls._classtmp, 'testca')
        cls.cert = make_server_cert(cls._classtmp, cls.ca_pem, ca_key)
        cls.rogue_ca_pem, _ = make_ca(cls._classtmp, 'rogueca')
        # client certificates: the one Dovecot trusts (its own CA) and a second
        # whose key is used to make a mismatching pair
        cls.client_ca_pem, client_ca_key = make_ca(cls._classtmp, 'clientca')
        cls.client = make_client_cert(cls._classtmp, cls.client_ca_pem, client_ca_key, 'proxyclient')
        cls.other_client = make_client_cert(cls._classtmp, cls.client_ca_pem, client_ca_key, 'otherclient')

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers

    def start_dovecot(self, **kw):
        return super().start_dovecot(tls=self.cert, **kw)

    def start_proxy(self, **conf):
        conf.setdefault('tls_ca_file', self.ca_pem)
        return super().start_proxy(**conf)

    def tls_logins(self, user='alice'):
        """(all, over TLS) Dovecot logins of user."""
        text = self.dc.settled_log()
        lines = [m.group(0) for m in LOGIN_LINE_RE.finditer(text) if m.group(1) == user]
        return len(lines), sum(1 for line in lines if ', TLS' in line)

    def session(self, user='alice', reused=None):
        m = imap_login(self.px.port, user, self.USERS[user])
        if reused is not None:
            self.assertEqual('XPROXYREUSE' in m.untagged_responses, reused, m.untagged_responses)
        typ, data = m.select('INBOX')
        self.assertEqual((typ, data), ('OK', [b'3']))
        typ, data = m.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        self.assertEqual(typ, 'OK')
        self.assertIn(b'Test message 3 for %s' % user.encode(), b''.join(
            d[1] for d in data if isinstance(d, tuple)))
        self.assertEqual(m.logout()[0], 'BYE')

    def expect_unavailable(self):
        r = self.raw()
        _, tagged = r.login('alice', 'pw')
        self.assertTrue(tagged.startswith(b'L1 NO [UNAVAILABLE]'), tagged)
        return tagged

    def big_message(self, mb=50):
        """A message of mb MiB straight into alice's maildir (base64 lines of random data)."""
        import base64
        size_target = mb * 1024 * 1024
        raw = base64.encodebytes(os.urandom(size_target * 3 // 4 + 1024)).replace(b'\n', b'\r\n')
        msg = (b'From: big@example.org\r\nSubject: a big message\r\n'
               b'Message-ID: <big@example.org>\r\n\r\n' + raw[:size_target])
        md = os.path.join(self.dc.dir, 'home', 'alice', 'Maildir', 'cur')
        path = os.path.join(md, '%d.Mbig.imapfixture,S=%d:2,' % (int(time.time()), len(msg)))
        with open(path, 'wb') as f:
            f.write(msg)
        self.dc._chown(path)
        return msg

    # -- tests

    def test_a_starttls_verified_and_pooled(self):
        """server_tls starttls: one TLS login at Dovecot serves five client logins."""
        self.start_dovecot()
        self.start_proxy(server_tls='starttls')
        for i in range(5):
            self.session(reused=i > 0)
        self.assertEqual(self.tls_logins(), (1, 1), 'one Dovecot login, over TLS')
        self.assertIn('verifying the certificate for 127.0.0.1', self.px.broker_log())
        # the proxy's greeting shows what holds after STARTTLS: no STARTTLS, logins allowed
        r = self.raw()
        self.assertNotIn(b'STARTTLS', r.greeting)
        self.assertIn(b'AUTH=PLAIN', r.greeting)

    def test_b_implicit_tls_by_name_and_two_users(self):
        """server_tls implicit on the imaps port, certificate checked against tls_server_name."""
        self.start_dovecot()
        self.start_proxy(server_tls='implicit', server_port=self.dc.imaps_port, tls_server_name=SERVER_NAME)
        for i in range(3):
            self.session('alice', reused=i > 0)
            self.session('bob', reused=i > 0)
        self.assertEqual(self.tls_logins('alice'), (1, 1))
        self.assertEqual(self.tls_logins('bob'), (1, 1))

    def test_c_wrong_hostname_refused(self):
        self.start_dovecot()
        self.start_proxy(server_tls='starttls', tls_server_name='mail.elsewhere.example')
        self.expect_unavailable()
        log = wait_until(lambda: 'TLS certificate verification failed' in self.px.broker_log()
                         and self.px.broker_log(), what='verification failure in the broker log')
        self.assertRegex(log, r'TLS certificate verification failed for mail\.elsewhere\.example: .*'
                              r'(does not match|hostname)')
        self.assertEqual(self.tls_logins(), (0, 0), 'no login may reach the server')

    def test_d_unknown_ca_refused(self):
        self.start_dovecot()
        self.start_proxy(server_tls='implicit', server_port=self.dc.imaps_port, tls_ca_file=self.rogue_ca_pem)
        self.expect_unavailable()
        log = wait_until(lambda: 'TLS certificate verification failed' in self.px.broker_log()
                         and self.px.broker_log(), what='verification failure in the broker log')
        self.assertRegex(log, r'TLS certificate verification failed for 127\.0\.0\.1: .*'
                              r'(issuer is unknown|NOT trusted)')
        self.assertEqual(self.tls_logins(), (0, 0), 'no login may reach the server')

    def test_e_logindisabled_means_starttls(self):
        """server_tls none (the default), but Dovecot says LOGINDISABLED: STARTTLS anyway."""
        # Dovecot treats a client on its own address as secure; on 127.0.0.2, reached
        # from 127.0.0.1, ssl = required makes it say LOGINDISABLED.
        self.start_dovecot(ssl='required', address='127.0.0.2')
        with socket.create_connection(('127.0.0.2', self.dc.port), timeout=5) as s:
            self.assertIn(b'LOGINDISABLED', s.recv(1024), 'fixture: Dovecot should say LOGINDISABLED')
        self.start_proxy(server_hostname='127.0.0.2', tls_server_name=SERVER_NAME)
        r = self.raw()
        self.assertNotIn(b'LOGINDISABLED', r.greeting)
        self.session(reused=False)
        self.session(reused=True)
        self.assertEqual(self.tls_logins(), (1, 1))
        self.assertEqual(self.px.broker_log().count('says LOGINDISABLED: using STARTTLS'), 1)

    def test_f_starttls_required_but_not_offered(self):
        """No STARTTLS on offer: no credentials ever leave the broker (also for force_tls yes)."""
        for conf in ({'server_tls': 'starttls'}, {'force_tls': 'yes'}):
            with self.subTest(**conf):
                self.fake = FakeServer()
                self.px = Proxy(self.tmp, None, server_port=self.fake.port, **conf)
                r = self.raw()
                _, tagged = r.command('L1', 'LOGIN alice s3cretpassw0rd')
                self.assertTrue(tagged.startswith(b'L1 NO'), tagged)
                wait_until(lambda: 'does not offer STARTTLS' in self.px.broker_log(),
                           what='refusal in the broker log')
                got = self.fake.data()
                self.assertGreaterEqual(self.fake.connections, 1)
                self.assertNotIn(b's3cretpassw0rd', got)
                self.assertNotRegex(got, rb'(?i)\b(LOGIN|AUTHENTICATE)\b', got)
                r.close()
                self.px.stop()
                self.fake.stop()
                self.fake = None

    def test_g_50mb_fetch_through_the_relay(self):
        self.start_dovecot()
        msg = self.big_message()
        want = hashlib.sha256(msg).hexdigest()
        self.start_proxy(server_tls='starttls')
        for i in range(2):
            m = imap_login(self.px.port, 'alice', 'pw')
            typ, data = m.select('INBOX')
            self.assertEqual(int(data[0]), 4)
            typ, data = m.search(None, 'LARGER', '1000000')  # maildir order is not creation order
            self.assertEqual(len(data[0].split()), 1, data)
            t0 = time.monotonic()
            typ, data = m.fetch(data[0].decode(), '(BODY.PEEK[])')
            dt = time.monotonic() - t0
            self.assertEqual(typ, 'OK')
            got = data[0][1]
            self.assertEqual(len(got), len(msg))
            self.assertEqual(hashlib.sha256(got).hexdigest(), want, '50 MB message corrupted')
            print('    [g] 50 MB FETCH through the TLS relay: %.2f s, %.0f MB/s' % (dt, len(msg) / dt / 1e6))
            self.assertEqual(m.logout()[0], 'BYE')
        self.assertEqual(self.tls_logins(), (1, 1), 'the second FETCH used the pooled connection')

    def test_h_kick_of_idle_tls_connection_noticed(self):
        self.start_dovecot()
        self.start_proxy(server_tls='starttls')
        self.session()
        wait_until(lambda: self.dc.connections('alice') == 1, what='one pooled connection')
        fds = proc_fd_count(self.px.broker.pid)
        self.dc.kick('alice')
        self.dc.wait_logouts(1, 'alice')
        wait_until(lambda: 'closed while idle' in self.px.broker_log(), what='broker noticing the kick')
        # the socketpair and the TCP connection are gone too (3 fds per idle TLS connection)
        wait_until(lambda: proc_fd_count(self.px.broker.pid) <= fds - 3,
                   what='broker fds %d -> %d' % (fds, fds - 3))
        self.session(reused=False)
        self.assertEqual(self.tls_logins(), (2, 2))

    def test_i_expiry_and_dirty_checkin(self):
        self.start_dovecot()
        self.start_proxy(server_tls='starttls', cache_expiration_time=2)
        self.session()
        t0 = time.monotonic()
        self.dc.wait_logouts(1, 'alice', timeout=8)
        self.assertGreaterEqual(time.monotonic() - t0, 1.5, 'expired before cache_expiration_time')
        # a connection made unreusable (ENABLE) is closed at LOGOUT, TLS side included
        m = imap_login(self.px.port, 'alice', 'pw')
        self.assertNotIn('XPROXYREUSE', m.untagged_responses)
        m._simple_command('ENABLE', 'CONDSTORE')
        self.assertEqual(m.logout()[0], 'BYE')
        self.dc.wait_logouts(2, 'alice', timeout=3)
        self.session(reused=False)
        self.assertEqual(self.tls_logins(), (3, 3))

    def test_j_session_dies_holding_a_tls_connection(self):
        self.start_dovecot()
        self.start_proxy(server_tls='starttls')
        # a client that vanishes mid-response: the next login still works
        r = self.raw()
        r.login('alice', 'pw')
        r.command('S1', 'SELECT INBOX')
        r.send('F1 FETCH 1:* (BODY.PEEK[])\r\n')
        r.close()
        time.sleep(0.3)
        self.session()
        fds = proc_fd_count(self.px.broker.pid)
        # a session killed while it holds the lent pair end: the relay closes the TLS side
        r = self.raw()
        _, tagged = r.login('alice', 'pw', tag='K1')
        self.assertTrue(tagged.startswith(b'K1 OK'), tagged)
        # this client's own session: earlier ones may still be exiting (slowly under ASan)
        pid = session_pid_for(self.px.listener, r.sock)
        before = self.dc.logouts('alice')
        os.kill(pid, signal.SIGKILL)
        self.dc.wait_logouts(before + 1, 'alice', timeout=5)
        wait_until(lambda: 'went away holding the connection of alice' in self.px.broker_log(),
                   what='broker noticing the dead session')
        wait_until(lambda: proc_fd_count(self.px.broker.pid) <= fds - 3, what='relay fds closed')
        self.session(reused=False)


    def test_k_verification_off_is_loud(self):
        """tls_verify_server no: an unknown CA is accepted, and the log says so."""
        self.start_dovecot()
        self.start_proxy(server_tls='implicit', server_port=self.dc.imaps_port, tls_ca_file=self.rogue_ca_pem,
                   tls_verify_server='no')
        self.session()
        log = self.px.broker_log()
        self.assertIn("tls_verify_server no: the backend's certificate is NOT checked", log)
        self.assertIn('NOT verifying the certificate of 127.0.0.1', log)
        self.assertEqual(self.tls_logins(), (1, 1))


    def test_l_slow_reader_backpressure(self):
        """A client that stops reading mid-FETCH: the relay stops reading the server
        (bounded buffers), the broker's memory does not grow, nothing is lost."""
        self.start_dovecot()
        msg = self.big_message(20)
        self.start_proxy(server_tls='starttls')
        r = self.raw()
        r.login('alice', 'pw')
        r.command('S1', 'SELECT INBOX')
        _, tagged = r.command('S2', 'SEARCH LARGER 1000000')
        seq = int([u for u in _ if u.startswith(b'* SEARCH')][0].split()[2])
        rss0 = proc_rss_kb(self.px.broker.pid)
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        r.send('F1 FETCH %d (BODY.PEEK[])\r\n' % seq)
        head = r.readline(timeout=10)
        self.assertRegex(head, rb'^\* %d FETCH \(BODY\[\] \{%d\}\r\n$' % (seq, len(msg)))
        time.sleep(1.5)  # not reading: everything backs up to Dovecot
        grown = proc_rss_kb(self.px.broker.pid) - rss0
        print('    [l] broker RSS growth while the client does not read: %d KiB' % grown)
        # Under ASan (make check's sanitizer pass) freed memory stays resident in
        # the allocator's quarantine, so RSS only bounds the buffering loosely.
        bound = 131072 if os.environ.get('IMAPPROXY_SAN') == '1' else 4096
        self.assertLess(grown, bound, 'the relay buffered what the client did not read')
        data = bytearray(r.buf)
        r.buf = b''
        r.sock.settimeout(20)
        while len(data) < len(msg) + 3:
            chunk = r.sock.recv(1 << 20)
            self.assertTrue(chunk, 'EOF mid-literal after %d bytes' % len(data))
            data += chunk
        data = bytes(data)
        self.assertEqual(hashlib.sha256(data[:len(msg)]).hexdigest(), hashlib.sha256(msg).hexdigest())
        r.buf = data[len(msg):]
        self.assertEqual(r.readline(), b')\r\n')
        self.assertTrue(r.readline().startswith(b'F1 OK'))
        r.command('Z', 'LOGOUT')
        m = imap_login(self.px.port, 'alice', 'pw')
        self.assertIn('XPROXYREUSE', m.untagged_responses, 'the connection is reusable afterwards')
        self.assertEqual(m.logout()[0], 'BYE')


    def test_m_checkin_of_the_socketpair_end(self):
        """The broker lends one end of its relay's socketpair: only that very socket
        (SO_COOKIE) may come back; the right one is pooled and lent again."""
        self.start_dovecot()
        self.start_proxy(server_tls='starttls')
        fs = FakeSession(self.px.broker_socket)
        try:
            ticket, reused, a = fs.checkout('alice', 'pw')
            self.assertFalse(reused)
            self.assertEqual(a.family, socket.AF_UNIX, 'a TLS connection is lent as a socketpair end')
            self.assertIn(b'N1 OK', imap_noop(a), 'IMAP through the relay')
            fs.checkin(ticket, a)  # the very socket: pooled
            a.close()
            ticket, reused, a = fs.checkout('alice', 'pw')
            self.assertTrue(reused, 'the checked-in TLS connection is lent again')
            self.assertIn(b'N2 OK', imap_noop(a, b'N2'))
            other, other2 = socket.socketpair()
            fs.checkin(ticket, other)  # not the socket we were lent
            wait_until(lambda: 'returned a socket it was not lent' in self.px.broker_log(),
                       what='the broker refusing a foreign socket')
            other.close()
            other2.close()
            a.close()  # the relay notices and closes the TLS connection
            self.dc.wait_logouts(1, 'alice', timeout=5)
        finally:
            fs.close()
        self.assertEqual(self.tls_logins(), (1, 1))
        self.session(reused=False)

    # -- client certificate towards the backend (tls_cert_file / tls_key_file)

    def client_cert_dovecot(self, **kw):
        """Dovecot that refuses every login without a certificate from clientca."""
        return self.start_dovecot(tls_client_ca=self.client_ca_pem, **kw)

    def test_n_client_cert_starttls_and_implicit_pooled(self):
        """Dovecot requires a client certificate: with tls_cert_file/tls_key_file the
        logins work (STARTTLS and implicit TLS) and the connection is pooled."""
        self.client_cert_dovecot()
        for conf in ({'server_tls': 'starttls'},
                     {'server_tls': 'implicit', 'server_port': self.dc.imaps_port}):
            with self.subTest(**conf):
                before = self.tls_logins()
                self.start_proxy(tls_cert_file=self.client[0], tls_key_file=self.client[1], **conf)
                self.assertIn('; with a client certificate', self.px.broker_log())
                self.session(reused=False)
                self.session(reused=True)
                after = self.tls_logins()
                self.assertEqual((after[0] - before[0], after[1] - before[1]), (1, 1),
                                 'one Dovecot login over TLS for two client logins')
                self.assertEqual(self.px.stop().get('broker'), 0)
                self.px = None
        # the combined form: key and certificate in one file (tls_key_file unset)
        both = os.path.join(self.tmp, 'both.pem')
        with open(both, 'w') as f:
            f.write(open(self.client[0]).read() + open(self.client[1]).read())
        self.start_proxy(server_tls='starttls', tls_cert_file=both)
        self.session(reused=False)

    def test_o_client_cert_missing_refused_cleanly(self):
        """The same Dovecot, no client certificate: a clean NO, and the broker says why."""
        self.client_cert_dovecot()
        for conf in ({'server_tls': 'starttls'},
                     {'server_tls': 'implicit', 'server_port': self.dc.imaps_port}):
            with self.subTest(**conf):
                self.start_proxy(login_failure_delay=0, **conf)  # not 2 s per refusal
                r = self.raw()
                _, tagged = r.login('alice', 'pw')
                self.assertTrue(tagged.startswith(b'L1 NO'), tagged)
                self.assertNotIn(b'pw', tagged)
                log = wait_until(lambda: 'login alice failed' in self.px.broker_log() and self.px.broker_log(),
                                 what='the reason in the broker log')
                print('    [o] %s: client sees %r; broker: %s' % (
                    conf['server_tls'], tagged.decode(errors='replace').strip(),
                    [line for line in log.splitlines() if 'login alice failed' in line][-1]))
                # Dovecot's reason, passed on: "Client didn't present valid SSL certificate"
                self.assertRegex(log, r'login alice failed: .*(?i:valid SSL certificate)')
                self.assertRegex(tagged, rb'(?i)certificate')
                # the connection is still usable for the next client: same answer, no hang
                r2 = self.raw()
                _, tagged = r2.login('alice', 'pw')
                self.assertTrue(tagged.startswith(b'L1 NO'), tagged)
                self.assertEqual(self.tls_logins(), (0, 0), 'no login got through')
                r.close()
                r2.close()
                self.raws = []
                self.assertEqual(self.px.stop().get('broker'), 0)
                self.px = None

    def check_config(self):
        p = subprocess.run([BROKER, '-f', self.px.conf_path, '--check-config'], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        return p.returncode, p.stdout.decode(errors='replace')

    def test_p_bad_client_key_refused_at_start(self):
        """A key that does not belong to the certificate, or a key file that cannot be
        read: --check-config and the broker's start-up fail, naming the key file."""
        missing = os.path.join(self.tmp, 'no-such.key')
        garbage = os.path.join(self.tmp, 'garbage.key')
        with open(garbage, 'w') as f:
            f.write('-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n')
        for name, key in (('mismatch', self.other_client[1]), ('missing', missing), ('garbage', garbage)):
            with self.subTest(key=name):
                self.px = Proxy(self.tmp, None, start=False, server_tls='starttls',
                                tls_ca_file=self.ca_pem, tls_cert_file=self.client[0], tls_key_file=key)
                rc, out = self.check_config()
                print('    [p] %s: --check-config rc %d: %s' % (name, rc, out.strip().splitlines()[-1]))
                self.assertEqual(rc, 1, out)
                self.assertIn('tls_key_file %s' % key, out)
                with self.assertRaises(FixtureError):
                    self.px.start_broker(timeout=5)
                self.assertIn('tls_key_file %s' % key, self.px.broker_log())
                self.px.stop()
                self.px = None
        # and the good pair passes
        self.px = Proxy(self.tmp, None, start=False, server_tls='starttls', tls_ca_file=self.ca_pem,
                        tls_cert_file=self.client[0], tls_key_file=self.client[1])
        rc, out = self.check_config()
        self.assertEqual(rc, 0, out)
        self.px = None

    def tls_desc(self):
        """The broker's debug line for the last backend handshake."""
        m = wait_until(lambda: re.findall(r'TLS up: (\S+)', self.px.broker_log()), what='TLS up in the broker log')
        return m[-1]

    def test_q_protocol_versions(self):
        """tls_no_tlsv1_2 yes means TLS 1.3; a broker limited to TLS 1.2 (tls_ciphers)
        cannot reach a Dovecot that insists on TLS 1.3.  (Dovecot 2.3 cannot cap its
        highest version, so "Dovecot speaks only 1.2" is not testable here.)"""
        dbg = {'IMAPPROXY_LOG_LEVEL': 'debug'}
        self.start_dovecot()
        # the default: TLS 1.3; tls_ciphers without 1.3: TLS 1.2 (so the check below can fail)
        for conf, want in (({}, 'TLS1.3'), ({'tls_ciphers': 'NORMAL:-VERS-TLS1.3'}, 'TLS1.2'),
                           ({'tls_no_tlsv1.2': 'yes'}, 'TLS1.3')):
            with self.subTest(want=want, **conf):
                self.px = Proxy(self.tmp, self.dc, broker_env=dbg, server_tls='starttls',
                                tls_ca_file=self.ca_pem, **conf)
                self.session(reused=False)
                self.assertTrue(self.tls_desc().startswith('(%s' % want), self.tls_desc())
                self.assertEqual(self.px.stop().get('broker'), 0)
                self.px = None
        self.dc.stop()
        self.dc = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.start_dovecot(extra_conf='ssl_min_protocol = TLSv1.3\n')
        self.start_proxy(server_tls='starttls', tls_ciphers='NORMAL:-VERS-TLS1.3', broker_env=dbg)
        tagged = self.expect_unavailable()
        log = wait_until(lambda: 'TLS handshake failed' in self.px.broker_log() and self.px.broker_log(),
                         what='handshake failure in the broker log')
        print('    [q] TLS 1.2 only vs TLS 1.3 only: %r; %s' % (
            tagged.decode().strip(), [x for x in log.splitlines() if 'TLS handshake failed' in x][-1]))
        self.assertEqual(self.tls_logins(), (0, 0))
        self.assertEqual(self.px.stop().get('broker'), 0)
        self.px = None
        self.start_proxy(server_tls='starttls', broker_env=dbg, **{'tls_no_tlsv1.2': 'yes'})
        self.session(reused=False)
        self.assertTrue(self.tls_desc().startswith('(TLS1.3'), self.tls_desc())

    def test_r_no_password_in_broker_memory_over_tls(self):
        """STARTTLS and implicit TLS to Dovecot, fresh and reused logins by
        LOGIN and AUTHENTICATE PLAIN: afterwards neither the password nor the
        PLAIN message is anywhere in the broker's memory (GnuTLS encrypts the
        LOGIN command the broker builds in a secret page; its record buffers
        must not keep the plaintext)."""
        import base64
        secret = 'TlsSekr1t-' + os.urandom(6).hex()
        self.USERS = dict(self.USERS, carol=secret)
        self.start_dovecot()
        plain = base64.b64encode(b'\0carol\0' + secret.encode())
        for conf in ({'server_tls': 'starttls'},
                     {'server_tls': 'implicit', 'server_port': self.dc.imaps_port,
                      'tls_server_name': SERVER_NAME}):
            with self.subTest(**conf):
                self.start_proxy(**conf)
                for i in range(2):
                    self.session('carol', reused=i > 0)
                    r = self.raw()
                    _, tagged = r.command('a1', 'AUTHENTICATE PLAIN ' + plain.decode())
                    self.assertTrue(tagged.startswith(b'a1 OK'), r.dump())
                    r.command('z', 'LOGOUT')
                    r.close()
                self.assertGreaterEqual(self.tls_logins('carol')[1], 1)
                time.sleep(0.3)
                regions = read_memory(self.px.broker.popen.pid)
                self.assertTrue(any(b'carol' in b for _, b in regions), 'user name not found: reading broken?')
                found = ['%s in %s' % (what, name) for name, data in regions
                         for what, needle in (('password', secret.encode()), ('PLAIN message', plain))
                         if needle in data]
                self.assertEqual(found, [], 'secrets left in the broker memory')
                self.assertEqual(self.px.stop().get('broker'), 0)
                self.px = None


if __name__ == '__main__':
    unittest.main()
