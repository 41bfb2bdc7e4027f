#!/usr/bin/env python3
"""Protocol fidelity (issue 4): every IMAP client works through the proxy as if it
were the server.  Run through tests/integration/run.py (`-k test_fidelity`).

Each test gets a fresh private Dovecot and, when it starts one, a fresh proxy, so
Dovecot's login counts belong to that test alone ("a backend login" = an
`imap-login: Info: Login: user=<X>` line in Dovecot's log; a reused pooled
connection produces none; test_core's Validation tests show that counting is
real).  The Dovecot here also has:

- a master user (`master`/`masterpw`, passdb `master = yes`): AUTHENTICATE PLAIN
  with authzid=bob, authcid=master logs in as bob (proxy authentication, authzid);
- `login_trusted_networks = 127.0.0.0/8` and `imap_id_log = *`: Dovecot logs every
  ID it receives (`ID sent: name=...`) and takes x-originating-ip as the client
  address (`rip=` in the Login line);
- the imap_zlib plugin (advertises COMPRESS=DEFLATE after login) and, when openssl
  is available, TLS (advertises STARTTLS): both must be filtered by the proxy;
- `auth_username_chars =` (user names with spaces, quotes, backslashes, UTF-8);
- no per-IP auth penalty (anvil-auth-penalty unreachable): a failed login is not
  followed by seconds of delay for every later login from 127.0.0.1.

Tests that need a program which cannot be installed skip; everything else fails
with a message saying what the proxy did instead of the contract.
"""

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (Proxy, children_of, imap_login, quote, read_log, tail,  # noqa: E402
                         wait_until, FixtureError)
from fixturecase import FixtureCase  # noqa: E402

MESSAGES = 5
MASTER_USER, MASTER_PW = 'master', 'masterpw'

# Capabilities the proxy may (or must) drop from the backend's lists.
FILTERABLE_EXACT = {'STARTTLS', 'LOGINDISABLED', 'SASL-IR', 'LOGIN-REFERRALS'}
FILTERABLE_PREFIX = ('AUTH=', 'COMPRESS=')
# ... and of those, what must never be shown to a client.
FORBIDDEN_EXACT = {'STARTTLS', 'LOGINDISABLED'}
FORBIDDEN_PREFIX = ('COMPRESS=',)


def b64(data):
    if isinstance(data, str):
        data = data.encode('utf-8')
    return base64.b64encode(data)


def filterable(cap):
    return cap in FILTERABLE_EXACT or cap.startswith(FILTERABLE_PREFIX)


def forbidden(cap):
    return cap in FORBIDDEN_EXACT or cap.startswith(FORBIDDEN_PREFIX)


def caps_in(line):
    """Capabilities (upper case set) of a `[CAPABILITY ...]` response code or a
    `* CAPABILITY ...` line; None if the line has neither."""
    m = re.search(rb'\[CAPABILITY ([^\]]*)\]', line) or re.match(rb'\* CAPABILITY ([^\r\n]*)', line)
    if not m:
        return None
    return {c.decode('ascii', 'replace').upper() for c in m.group(1).split()}


def is_reuse(untagged):
    return any(u.startswith(b'* OK [XPROXYREUSE]') for u in untagged)


def make_cert(directory):
    """Self-signed certificate for Dovecot's STARTTLS; None if no tool is available."""
    cert, key = os.path.join(directory, 'cert.pem'), os.path.join(directory, 'key.pem')
    openssl = shutil.which('openssl')
    try:
        if openssl:
            subprocess.run([openssl, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj',
                            '/CN=localhost', '-days', '2', '-keyout', key, '-out', cert],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                           check=True)
        elif shutil.which('certtool'):
            subprocess.run(['certtool', '--generate-privkey', '--outfile', key],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                           check=True)
            tmpl = os.path.join(directory, 'cert.tmpl')
            with open(tmpl, 'w') as f:
                f.write('cn = localhost\nexpiration_days = 2\ntls_www_server\n')
            subprocess.run(['certtool', '--generate-self-signed', '--load-privkey', key,
                            '--template', tmpl, '--outfile', cert],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                           check=True)
        else:
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    os.chmod(key, 0o644)  # read by Dovecot's login processes; a throw-away test key
    return cert, key


class FidelityTest(FixtureCase):
    """Fresh Dovecot per test (configured as described in the module docstring);
    tests start the proxy themselves with the configuration they need.
    fixturecase.FixtureCase stops everything and checks the proxy's logs."""

    TMP_PREFIX = 'imapproxy-fid-'
    TMP_MODE = 0o755
    MESSAGES = MESSAGES
    START_DOVECOT = False    # setUp starts it with the configuration below
    RAW_TRANSCRIPTS = 4
    _cert = None

    @classmethod
    def setUpClass(cls):
        cls._cert = make_cert(cls.mkdtemp())

    def setUp(self):
        super().setUp()
        master = os.path.join(self.tmp, 'master-users')
        with open(master, 'w') as f:
            f.write('%s:{PLAIN}%s::::::\n' % (MASTER_USER, MASTER_PW))
        os.chmod(master, 0o644)
        extra = '''
auth_username_chars =
login_trusted_networks = 127.0.0.0/8
imap_id_log = *
mail_plugins = $mail_plugins zlib
protocol imap {
  mail_plugins = $mail_plugins imap_zlib
}
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%%u %s
  master = yes
  result_success = continue
}
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
''' % master
        if self._cert:
            extra += 'ssl = yes\nssl_cert = <%s\nssl_key = <%s\n' % self._cert
        self.start_dovecot(extra_conf=extra)

    def diagnostics(self):
        text = super().diagnostics()
        if self.px:
            text = 'proxy config:\n%s\n%s' % (read_log(self.px.conf_path), text)
        return text

    # ------------------------------------------------------------ helpers

    def start_proxy(self, optional=None, **conf):
        """Start broker + listener. conf: config keys the test depends on (a refusal
        fails the test, naming them). optional: keys that only speed the test up
        (e.g. login_failure_delay); dropped if the proxy refuses them."""
        if self.px:
            rcs = self.px.stop()
            self.assertEqual(self.px.crash_report(), [], 'crash report of the previous proxy')
            self.assertEqual(rcs.get('broker'), 0, 'previous broker\'s exit status after SIGTERM')
            self.px = None
        if optional:
            try:
                self.px = Proxy(self.tmp, self.dc, **dict(conf, **optional))
                return self.px
            except FixtureError:
                pass
        try:
            self.px = Proxy(self.tmp, self.dc, **conf)
        except FixtureError as e:
            self.fail('the proxy did not start with configuration %r: %s' % (conf, e))
        return self.px

    def direct(self, **kw):
        return self.raw(port=self.dc.port, **kw)

    def login_ok(self, r, user='alice', password=None, tag='L1'):
        untagged, tagged = r.login(user, password or self.USERS[user], tag=tag)
        self.assertRegex(tagged, rb'^%s OK' % tag.encode(), 'LOGIN %s: %s' % (user, r.dump()))
        return untagged, tagged

    def logout_raw(self, r, tag='Z9'):
        r.send('%s LOGOUT\r\n' % tag)
        rest = r.read_until_close(timeout=10)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\n%s OK [^\r\n]*\r\n\Z' % tag.encode(),
                         'bytes after LOGOUT: %r' % rest[-300:])

    def assertReuse(self, untagged, expected, what, r=None):
        got = is_reuse(untagged)
        if expected:
            self.assertTrue(got, '%s: expected `* OK [XPROXYREUSE]` before the tagged OK; untagged: '
                            '%r%s' % (what, untagged, '\n' + r.dump() if r else ''))
        else:
            self.assertFalse(got, '%s: unexpected XPROXYREUSE; untagged: %r%s'
                             % (what, untagged, '\n' + r.dump() if r else ''))

    def subject_of_first(self, r, tag='S1'):
        """SELECT INBOX, then the Subject header of message 1 (bytes)."""
        untagged, tagged = r.command(tag + 'a', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^%sa OK' % tag.encode(), r.dump())
        data, tagged = self.read_with_literals(r, tag + 'b', 'FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        self.assertRegex(tagged, rb'^%sb OK' % tag.encode(), r.dump())
        m = re.search(rb'Subject: ([^\r\n]*)', data)
        self.assertIsNotNone(m, 'no Subject in %r' % data)
        return m.group(1)

    @staticmethod
    def read_exact(r, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(r.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout('wanted %d bytes, have %d' % (n, len(r.buf)))
            if not r._fill(left):
                raise EOFError('connection closed after %d of %d bytes' % (len(r.buf), n))
        data, r.buf = r.buf[:n], r.buf[n:]
        return data

    def read_with_literals(self, r, tag, text=None, timeout=10.0):
        """Send `tag text` (if text) and read up to the tagged response, literals
        included. Returns (everything before the tagged line as bytes, tagged line)."""
        if text is not None:
            r.send(b'%s %s\r\n' % (tag.encode(), text.encode() if isinstance(text, str) else text))
        out = []
        while True:
            line = r.readline(timeout)
            if line.startswith(tag.encode() + b' '):
                return b''.join(out), line
            out.append(line)
            while True:
                m = re.search(rb'~?\{(\d+)\}\r\n\Z', line)
                if not m:
                    break
                out.append(self.read_exact(r, int(m.group(1)), timeout))
                line = r.readline(timeout)
                out.append(line)

    def direct_append(self, msg, user='alice'):
        """APPEND msg to user's INBOX straight on Dovecot (not through the proxy)."""
        m = imap_login(self.dc.port, user, self.USERS[user])
        try:
            typ, data = m.append('INBOX', None, None, msg)
            self.assertEqual(typ, 'OK', data)
        finally:
            m.logout()


def b64_plain(authzid, authcid, password):
    return b64('%s\0%s\0%s' % (authzid, authcid, password)).decode()


# ====================================================================== SASL, LOGIN

class Authenticate(FidelityTest):

    def test_a1_prelogin_capabilities(self):
        """Greeting and pre-login CAPABILITY: the backend's pre-login list without
        STARTTLS/LOGINDISABLED/COMPRESS, plus AUTH=PLAIN AUTH=LOGIN SASL-IR XIMAPPROXY."""
        self.start_proxy()
        d = self.direct()
        direct_pre = caps_in(d.greeting)
        d.close()
        self.assertIsNotNone(direct_pre, d.greeting)
        if self._cert:
            self.assertIn('STARTTLS', direct_pre, 'fixture: Dovecot should offer STARTTLS')
        r = self.raw()
        greet = caps_in(r.greeting)
        self.assertIsNotNone(greet, 'the greeting must carry [CAPABILITY ...]: %r' % r.greeting)
        untagged, tagged = r.command('c1', 'CAPABILITY')
        self.assertRegex(tagged, rb'^c1 OK', r.dump())
        lines = [u for u in untagged if u.startswith(b'* CAPABILITY ')]
        self.assertEqual(len(lines), 1, r.dump())
        cap = caps_in(lines[0])
        self.assertEqual(greet, cap, 'greeting and CAPABILITY list differ')
        for want in ('IMAP4REV1', 'AUTH=PLAIN', 'AUTH=LOGIN', 'SASL-IR', 'XIMAPPROXY'):
            self.assertIn(want, cap, 'pre-login CAPABILITY: %s' % sorted(cap))
        self.assertEqual(sorted(c for c in cap if forbidden(c)), [],
                         'capabilities the proxy cannot pass through are advertised')
        missing = {c for c in direct_pre if not filterable(c)} - cap
        self.assertEqual(missing, set(), 'backend pre-login capabilities missing from the proxy\'s')
        extra = cap - direct_pre - {'XIMAPPROXY', 'AUTH=PLAIN', 'AUTH=LOGIN', 'SASL-IR'}
        self.assertEqual(extra, set(), 'capabilities the backend does not have')

    def _auth_plain_ir(self, r, tag, authzid, user, password):
        return r.command(tag, 'AUTHENTICATE PLAIN ' + b64_plain(authzid, user, password))

    def test_a2_authenticate_plain_sasl_ir(self):
        self.start_proxy()
        for i in range(2):
            r = self.raw()
            untagged, tagged = self._auth_plain_ir(r, 'a%d' % i, '', 'alice', 'pw')
            self.assertRegex(tagged, rb'^a%d OK \[CAPABILITY [^\]]*IMAP4rev1' % i,
                             'AUTHENTICATE PLAIN with SASL-IR (run %d): %s' % (i + 1, r.dump()))
            self.assertReuse(untagged, i == 1, 'AUTHENTICATE PLAIN run %d' % (i + 1), r)
            self.assertIn(b'for alice', self.subject_of_first(r))
            self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 1, 'backend logins for two AUTHENTICATE PLAIN')

    def test_a3_authenticate_plain_continuation(self):
        self.start_proxy()
        r = self.raw()
        r.send(b'p1 AUTHENTICATE PLAIN\r\n')
        line = r.readline()
        self.assertRegex(line, rb'\A\+ ?\r\n\Z', 'continuation request for AUTHENTICATE PLAIN '
                         'without initial response: %s' % r.dump())
        r.send(b64('\0alice\0pw') + b'\r\n')
        untagged, tagged = r.read_tagged('p1')
        self.assertRegex(tagged, rb'^p1 OK \[CAPABILITY ', r.dump())
        self.assertReuse(untagged, False, 'first login', r)
        self.assertIn(b'for alice', self.subject_of_first(r))
        self.logout_raw(r)
        # The same credentials with LOGIN share the pool entry.
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'LOGIN after AUTHENTICATE PLAIN', r)
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 1)

    def test_a4_authenticate_login(self):
        self.start_proxy()
        for i in range(2):
            r = self.raw()
            r.send(b'l%d AUTHENTICATE LOGIN\r\n' % i)
            p1 = r.readline()
            self.assertRegex(p1, rb'\A\+ [A-Za-z0-9+/=]+\r\n\Z', r.dump())
            self.assertEqual(base64.b64decode(p1[2:].strip()), b'Username:', p1)
            r.send(b64('alice') + b'\r\n')
            p2 = r.readline()
            self.assertRegex(p2, rb'\A\+ [A-Za-z0-9+/=]+\r\n\Z', r.dump())
            self.assertEqual(base64.b64decode(p2[2:].strip()), b'Password:', p2)
            r.send(b64('pw') + b'\r\n')
            untagged, tagged = r.read_tagged('l%d' % i)
            self.assertRegex(tagged, rb'^l%d OK \[CAPABILITY ' % i, r.dump())
            self.assertReuse(untagged, i == 1, 'AUTHENTICATE LOGIN run %d' % (i + 1), r)
            self.assertIn(b'for alice', self.subject_of_first(r))
            self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 1)

    def test_a5_cancel_invalid_base64_unknown_mechanism(self):
        """`*` cancels (tagged BAD), invalid base64 is BAD, an unknown mechanism is
        refused without a continuation; the connection stays usable."""
        self.start_proxy(optional={'login_failure_delay': 100})
        r = self.raw()
        r.send(b'x1 AUTHENTICATE PLAIN\r\n')
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(b'*\r\n')
        _, tagged = r.read_tagged('x1')
        self.assertRegex(tagged, rb'^x1 BAD', 'cancelled AUTHENTICATE PLAIN: %s' % r.dump())
        r.send(b'x2 AUTHENTICATE LOGIN\r\n')
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(b64('alice') + b'\r\n')
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(b'*\r\n')
        _, tagged = r.read_tagged('x2')
        self.assertRegex(tagged, rb'^x2 BAD', 'AUTHENTICATE LOGIN cancelled at the password: %s'
                         % r.dump())
        _, tagged = r.command('x3', 'NOOP')
        self.assertRegex(tagged, rb'^x3 OK', r.dump())
        self.login_ok(r, tag='x4')
        self.logout_raw(r)

        r = self.raw()
        _, tagged = r.command('y1', 'AUTHENTICATE PLAIN !!!not*base64!!!')
        self.assertRegex(tagged, rb'^y1 BAD', 'invalid base64 initial response: %s' % r.dump())
        r.send(b'y2 AUTHENTICATE PLAIN\r\n')
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(b'%%%% not base64 %%%%\r\n')
        _, tagged = r.read_tagged('y2')
        self.assertRegex(tagged, rb'^y2 BAD', 'invalid base64 continuation: %s' % r.dump())
        _, tagged = r.command('y3', 'NOOP')
        self.assertRegex(tagged, rb'^y3 OK', 'connection unusable after invalid base64: %s' % r.dump())
        self.login_ok(r, tag='y4')
        self.logout_raw(r)

        r = self.raw()
        r.send(b'z1 AUTHENTICATE X-UNKNOWN-MECH\r\n')
        line = r.readline()
        self.assertRegex(line, rb'^z1 (NO|BAD) ', 'unknown SASL mechanism: %s' % r.dump())
        _, tagged = r.command('z2', 'NOOP')
        self.assertRegex(tagged, rb'^z2 OK', r.dump())
        self.assertEqual(self.dc.logins('alice'), 1, 'both good logins share one backend login')

    def test_a6_authzid_empty_or_same_shares_pool_with_login(self):
        self.start_proxy()
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, False, 'first LOGIN', r)
        self.logout_raw(r)
        for i, authzid in enumerate(('alice', '')):
            r = self.raw()
            untagged, tagged = self._auth_plain_ir(r, 'z%d' % i, authzid, 'alice', 'pw')
            self.assertRegex(tagged, rb'^z%d OK' % i, r.dump())
            self.assertReuse(untagged, True, 'AUTHENTICATE PLAIN authzid=%r after LOGIN' % authzid, r)
            self.assertIn(b'for alice', self.subject_of_first(r))
            self.logout_raw(r)
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'LOGIN after AUTHENTICATE', r)
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 1)

    def test_a7_authzid_other_user_reaches_backend(self):
        """authzid=bob, authcid=master: the backend logs bob in (Dovecot master user);
        such a connection is never lent to alice, nor to LOGIN bob <master password>,
        and alice's is never lent to it."""
        self.start_proxy(optional={'login_failure_delay': 100})
        r = self.raw()
        untagged, tagged = self._auth_plain_ir(r, 'm1', 'bob', MASTER_USER, MASTER_PW)
        self.assertRegex(tagged, rb'^m1 OK', 'AUTHENTICATE PLAIN authzid=bob authcid=master: %s'
                         % r.dump())
        self.assertReuse(untagged, False, 'first login', r)
        self.assertIn(b'for bob', self.subject_of_first(r), 'authzid bob must get bob\'s mailbox')
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('bob'), 1, 'Dovecot should have logged bob in (authzid)')
        self.assertEqual(self.dc.logins(MASTER_USER), 0)

        r = self.raw()
        untagged, _ = self.login_ok(r, 'alice')
        self.assertReuse(untagged, False, 'alice after a pooled bob-via-master connection', r)
        self.assertIn(b'for alice', self.subject_of_first(r))
        self.logout_raw(r)

        r = self.raw()
        untagged, tagged = self._auth_plain_ir(r, 'm2', 'bob', MASTER_USER, MASTER_PW)
        self.assertRegex(tagged, rb'^m2 OK', r.dump())
        self.assertIn(b'for bob', self.subject_of_first(r),
                      'authzid bob got someone else\'s connection')
        print('    [a7] second authzid=bob login %s' %
              ('reused the pooled connection' if is_reuse(untagged) else 'logged in anew'))
        self.logout_raw(r)

        for tag, user in (('n1', 'bob'), ('n2', MASTER_USER)):
            r = self.raw()
            untagged, tagged = r.login(user, MASTER_PW, tag=tag)
            self.assertRegex(tagged, rb'^%s NO' % tag.encode(),
                             'LOGIN %s <master password> must fail (a pooled authzid connection '
                             'must not be lent to it): %s' % (user, r.dump()))
            self.assertReuse(untagged, False, 'failed login', r)
            r.close()

        r = self.raw()
        untagged, tagged = self._auth_plain_ir(r, 'm3', 'alice', MASTER_USER, MASTER_PW)
        self.assertRegex(tagged, rb'^m3 OK', r.dump())
        self.assertIn(b'for alice', self.subject_of_first(r))
        self.assertReuse(untagged, False, 'authzid=alice via master (alice\'s pooled connection was '
                         'opened with her own password)', r)
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 2)


# ====================================================================== credentials

SPECIAL_USERS = {
    'sp ace"quo\\te': 'p ä"s\\s w',
    'jürgen.ß': 'pä ss"wö\\rd',
}


def _lit(s):
    b = s.encode('utf-8')
    return b'{%d}\r\n' % len(b), b


class Credentials(FidelityTest):
    USERS = dict(SPECIAL_USERS)

    def _do_login(self, r, how, user, pw):
        """Log in with one client encoding; returns (untagged, tagged)."""
        ub, pb = user.encode('utf-8'), pw.encode('utf-8')
        qu = quote(user).encode('utf-8')
        qp = quote(pw).encode('utf-8')
        if how == 'quoted':
            return r.command('t1', (b'LOGIN ' + qu + b' ' + qp).decode('utf-8'))
        if how == 'sync literals':
            r.send(b't1 LOGIN {%d}\r\n' % len(ub))
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(ub + b' {%d}\r\n' % len(pb))
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(pb + b'\r\n')
            return r.read_tagged('t1')
        if how == 'LITERAL+':
            r.send(b't1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n' % (len(ub), ub, len(pb), pb))
            return r.read_tagged('t1')
        if how == 'quoted user, literal password':
            r.send(b't1 LOGIN ' + qu + b' {%d}\r\n' % len(pb))
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(pb + b'\r\n')
            return r.read_tagged('t1')
        if how == 'AUTHENTICATE PLAIN SASL-IR':
            return r.command('t1', 'AUTHENTICATE PLAIN ' + b64(b'\0' + ub + b'\0' + pb).decode())
        if how == 'AUTHENTICATE PLAIN continuation':
            r.send(b't1 AUTHENTICATE PLAIN\r\n')
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(b64(b'\0' + ub + b'\0' + pb) + b'\r\n')
            return r.read_tagged('t1')
        if how == 'AUTHENTICATE LOGIN':
            r.send(b't1 AUTHENTICATE LOGIN\r\n')
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(b64(ub) + b'\r\n')
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(b64(pb) + b'\r\n')
            return r.read_tagged('t1')
        raise AssertionError(how)

    HOWS = ('quoted', 'sync literals', 'LITERAL+', 'quoted user, literal password',
            'AUTHENTICATE PLAIN SASL-IR', 'AUTHENTICATE PLAIN continuation', 'AUTHENTICATE LOGIN')

    def test_b1_special_characters_every_encoding_one_pool_entry(self):
        """User names and passwords with spaces, double quotes, backslashes and UTF-8,
        sent quoted, as literals (sync, LITERAL+) and via AUTHENTICATE: all log in,
        and all share one backend login per user."""
        # the fixture's Dovecot takes every one of these directly (the test's premise)
        for user, pw in SPECIAL_USERS.items():
            d = self.direct()
            _, tagged = self._do_login(d, 'LITERAL+', user, pw)
            self.assertRegex(tagged, rb'^t1 OK', 'direct Dovecot login of %r: %s' % (user, d.dump()))
            d.close()
        direct_logins = self.dc.logins()
        self.start_proxy()
        for user, pw in SPECIAL_USERS.items():
            for i, how in enumerate(self.HOWS):
                with self.subTest(user=user, encoding=how):
                    r = self.raw()
                    untagged, tagged = self._do_login(r, how, user, pw)
                    self.assertRegex(tagged, rb'^t1 OK', '%s login of %r: %s' % (how, user, r.dump()))
                    self.assertReuse(untagged, i > 0, '%s login of %r (login %d of this user)'
                                     % (how, user, i + 1), r)
                    subj = self.subject_of_first(r)
                    self.assertIn(b'for ' + user.encode('utf-8'), subj, 'wrong mailbox')
                    self.logout_raw(r)
        for user in SPECIAL_USERS:
            self.assertEqual(self.dc.logins(user) - 1, 1, 'backend logins through the proxy for %r '
                             '(%d encodings)' % (user, len(self.HOWS)))
        self.assertEqual(self.dc.logins() - direct_logins, len(SPECIAL_USERS))


# ====================================================================== failures, proxy auth

class LoginFailures(FidelityTest):

    def test_c1_retry_after_failure_with_delay(self):
        self.start_proxy(login_failure_delay=800, login_max_failures=3)
        r = self.raw()
        t0 = time.monotonic()
        _, tagged = r.login('alice', 'wrong', tag='f1')
        dt = time.monotonic() - t0
        self.assertRegex(tagged, rb'^f1 NO ', r.dump())
        self.assertGreaterEqual(dt, 0.75, 'failed login answered after %.2fs with '
                                'login_failure_delay 800 (ms)' % dt)
        untagged, tagged = r.login('alice', 'pw', tag='f2')
        self.assertRegex(tagged, rb'^f2 OK', 'retry on the same connection: %s' % r.dump())
        untagged, tagged = r.command('f3', 'SELECT INBOX')
        self.assertIn(b'* %d EXISTS\r\n' % MESSAGES, untagged, r.dump())
        self.logout_raw(r)

    def test_c2_max_failures_disconnects(self):
        """login_max_failures 3: the third failure (LOGIN, AUTHENTICATE, LOGIN) ends the
        connection with `* BYE`; every failure waits login_failure_delay."""
        self.start_proxy(login_failure_delay=800, login_max_failures=3)
        r = self.raw()
        t0 = time.monotonic()
        _, tagged = r.login('alice', 'wrong1', tag='g1')
        self.assertRegex(tagged, rb'^g1 NO ', r.dump())
        t1 = time.monotonic()
        _, tagged = r.command('g2', 'AUTHENTICATE PLAIN ' + b64_plain('', 'alice', 'wrong2'))
        self.assertRegex(tagged, rb'^g2 NO ', r.dump())
        t2 = time.monotonic()
        r.send(b'g3 LOGIN alice wrong3\r\n')
        rest = r.read_until_close(timeout=8)
        t3 = time.monotonic()
        for n, dt in ((1, t1 - t0), (2, t2 - t1), (3, t3 - t2)):
            self.assertGreaterEqual(dt, 0.75, 'failure %d answered after %.2fs (delay 800 ms)' % (n, dt))
        self.assertRegex(rest, rb'(\A|\r\n)\* BYE [^\r\n]*\r\n\Z',
                         'after the 3rd failure: `* BYE` then close; got %r' % rest)
        self.assertRegex(rest, rb'\A(g3 NO [^\r\n]*\r\n)?\* BYE', rest)
        # the proxy still serves the next client
        r = self.raw()
        self.login_ok(r)
        self.logout_raw(r)


class ProxyAuth(FidelityTest):
    SECRET = 'Sh4red-s3cret'

    def test_d1_shared_secret(self):
        """auth_shared_secret: any user logs in with the secret; the proxy logs in to
        the backend as that user with AUTHENTICATE PLAIN authcid=<cfg user>. Only the
        exact secret works."""
        self.start_proxy(auth_sasl_plain_username=MASTER_USER, auth_sasl_plain_password=MASTER_PW,
                         auth_shared_secret=self.SECRET, optional={'login_failure_delay': 100})
        for user, again in (('alice', False), ('bob', False), ('alice', True)):
            r = self.raw()
            untagged, tagged = r.login(user, self.SECRET, tag='s1')
            self.assertRegex(tagged, rb'^s1 OK', 'LOGIN %s <shared secret>: %s' % (user, r.dump()))
            self.assertReuse(untagged, again, 'LOGIN %s with the secret' % user, r)
            self.assertIn(b'for ' + user.encode(), self.subject_of_first(r))
            self.logout_raw(r)
        r = self.raw()
        untagged, tagged = r.command('s2', 'AUTHENTICATE PLAIN ' + b64_plain('', 'bob', self.SECRET))
        self.assertRegex(tagged, rb'^s2 OK', 'AUTHENTICATE PLAIN with the secret: %s' % r.dump())
        self.assertReuse(untagged, True, 'AUTHENTICATE PLAIN bob with the secret', r)
        self.logout_raw(r)
        self.assertEqual((self.dc.logins('alice'), self.dc.logins('bob')), (1, 1))
        log_before = self.dc.settled_log()

        s = self.SECRET
        bad = [('empty', 'LOGIN alice ""'),
               ('quoted empty, other user', 'LOGIN anyuser ""'),
               ('prefix', 'LOGIN alice %s' % quote(s[:-1])),
               ('one character', 'LOGIN alice %s' % quote(s[:1])),
               ('secret plus extra', 'LOGIN alice %s' % quote(s + 'x')),
               ('secret plus space', 'LOGIN alice %s' % quote(s + ' ')),
               ('other case', 'LOGIN alice %s' % quote(s.swapcase())),
               ('AUTHENTICATE prefix', 'AUTHENTICATE PLAIN ' + b64_plain('', 'alice', s[:-1]))]
        for what, cmd in bad:
            with self.subTest(variant=what):
                r = self.raw()
                untagged, tagged = r.command('b1', cmd)
                self.assertRegex(tagged, rb'^b1 NO', '%s must fail: %s' % (what, r.dump()))
                self.assertReuse(untagged, False, what, r)
                r.close()
        # prefix as a literal
        r = self.raw()
        r.send(b'b2 LOGIN alice {%d}\r\n' % (len(s) - 1))
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.send(s[:-1].encode() + b'\r\n')
        _, tagged = r.read_tagged('b2')
        self.assertRegex(tagged, rb'^b2 NO', 'literal prefix of the secret: %s' % r.dump())
        self.assertEqual((self.dc.logins('alice'), self.dc.logins('bob')), (1, 1))
        new = self.dc.settled_log()[len(log_before):]
        self.assertNotRegex(new, r'Login: ', 'a wrong secret reached a backend login')


# ====================================================================== capabilities, ID

class Capabilities(FidelityTest):

    def _direct_post_login_caps(self):
        d = self.direct()
        _, tagged = d.login('alice', 'pw', tag='d1')
        d.close()
        caps = caps_in(tagged)
        self.assertIsNotNone(caps, tagged)
        self.assertIn('COMPRESS=DEFLATE', caps, 'fixture: Dovecot should offer COMPRESS=DEFLATE')
        return caps

    def _check_post(self, caps, direct, what):
        self.assertIsNotNone(caps, '%s: the tagged OK of LOGIN must carry [CAPABILITY ...]' % what)
        self.assertEqual(sorted(c for c in caps if forbidden(c)), [],
                         '%s: advertises what the proxy cannot pass through' % what)
        missing = {c for c in direct if not filterable(c)} - caps
        self.assertEqual(missing, set(), '%s: backend post-login capabilities missing' % what)
        extra = caps - direct - {'XIMAPPROXY'}
        self.assertEqual(extra, set(), '%s: capabilities the backend does not have' % what)

    def test_e1_login_ok_capabilities_fresh_and_reused(self):
        """LOGIN's tagged OK carries the backend's post-login list (filtered: no
        COMPRESS=DEFLATE) on a fresh and on a reused connection; on reuse `* OK
        [XPROXYREUSE]` and the tagged OK come in one read."""
        direct = self._direct_post_login_caps()
        self.start_proxy()
        r = self.raw()
        untagged, tagged = self.login_ok(r)
        self.assertReuse(untagged, False, 'first login', r)
        self._check_post(caps_in(tagged), direct, 'fresh login')
        self.logout_raw(r)

        r = self.raw()
        r.send(b'L2 LOGIN alice pw\r\n')
        # The first recv() (no sleep before it): both lines were written at once.
        r.sock.settimeout(5)
        data = r.sock.recv(65536)
        r.transcript.append(('S', data))
        self.assertRegex(data, rb'\A\* OK \[XPROXYREUSE\][^\r\n]*\r\nL2 OK [^\r\n]*\r\n\Z',
                         'the first recv() after a reused LOGIN must hold `* OK [XPROXYREUSE]` and '
                         'the tagged OK (one write); got %r' % data)
        self._check_post(caps_in(data.split(b'\r\n')[1]), direct, 'reused login')
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 2, 'one direct + one through the proxy')

    def test_e2_postlogin_capability_command_filtered(self):
        """CAPABILITY after login (relayed): COMPRESS=DEFLATE is not advertised."""
        direct = self._direct_post_login_caps()
        self.start_proxy()
        for i in range(2):
            r = self.raw()
            self.login_ok(r)
            untagged, tagged = r.command('c1', 'CAPABILITY')
            self.assertRegex(tagged, rb'^c1 OK', r.dump())
            lines = [u for u in untagged if u.startswith(b'* CAPABILITY ')]
            self.assertEqual(len(lines), 1, r.dump())
            self._check_post(caps_in(lines[0]), direct, 'CAPABILITY after login (run %d)' % (i + 1))
            self.logout_raw(r)

    def test_e3_compress_without_advertisement(self):
        """A client that sends COMPRESS DEFLATE although it is not advertised: either
        a tagged NO/BAD and the session goes on uncompressed, or a tagged OK and the
        session really goes on compressed (as it would with the server)."""
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        _, tagged = r.command('z1', 'COMPRESS DEFLATE')
        self.assertRegex(tagged, rb'^z1 (OK|NO|BAD) ', r.dump())
        if not tagged.startswith(b'z1 OK'):
            _, tagged = r.command('z2', 'NOOP')
            self.assertRegex(tagged, rb'^z2 OK', r.dump())
            self.logout_raw(r)
            return
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        dec = zlib.decompressobj(-15)
        r.send(comp.compress(b'z2 NOOP\r\n') + comp.flush(zlib.Z_SYNC_FLUSH))
        plain = dec.decompress(r.buf)
        r.buf = b''
        deadline = time.monotonic() + 5
        while b'z2 ' not in plain:
            self.assertLess(time.monotonic(), deadline, 'no answer to a compressed NOOP after '
                            'COMPRESS DEFLATE OK: %r' % plain)
            if not r._fill(deadline - time.monotonic()):
                self.fail('closed after COMPRESS DEFLATE OK; decompressed %r' % plain)
            try:
                plain += dec.decompress(r.buf)
            except zlib.error as e:
                self.fail('the client got `z1 OK` to COMPRESS DEFLATE, but the answer to its '
                          'compressed NOOP is not deflate data (%s): %r' % (e, r.buf[:200]))
            r.buf = b''
        self.assertRegex(plain, rb'(\A|\n)z2 OK', plain)


class Id(FidelityTest):

    def test_f1_id_before_login_answered_by_proxy(self):
        self.start_proxy()
        r = self.raw()
        for tag, arg in (('i1', 'NIL'), ('i2', '("name" "fidelity" "version" "1.0")')):
            untagged, tagged = r.command(tag, 'ID ' + arg)
            self.assertRegex(tagged, rb'^%s OK' % tag.encode(), r.dump())
            self.assertEqual(len([u for u in untagged if u.startswith(b'* ID ')]), 1, r.dump())
        self.login_ok(r)
        self.logout_raw(r)
        self.assertEqual(self.dc.logins(), 1)

    def test_f2_id_after_login_relayed(self):
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        untagged, tagged = r.command('i1', 'ID ("name" "fidelity-after-login")')
        self.assertRegex(tagged, rb'^i1 OK', r.dump())
        self.assertTrue(any(u.startswith(b'* ID ("name" "Dovecot"') for u in untagged),
                        'ID after login must be answered by the backend: %s' % r.dump())
        self.assertRegex(self.dc.settled_log(), r'ID sent: name=fidelity-after-login',
                         'Dovecot did not see the ID')
        self.logout_raw(r)

    def test_f3_id_30k_before_and_after_login(self):
        self.start_proxy()
        big = 'ID (' + ' '.join('"k%03d" "%s"' % (i, chr(ord('a') + i % 26) * 1000)
                                for i in range(30)) + ')'
        self.assertGreater(len(big), 30000)
        r = self.raw()
        untagged, tagged = r.command('j1', big)
        self.assertRegex(tagged, rb'^j1 OK', '30 KB ID before login: %s' % r.dump())
        _, tagged = r.command('j2', 'NOOP')
        self.assertRegex(tagged, rb'^j2 OK', r.dump())
        self.login_ok(r, tag='j3')
        untagged, tagged = r.command('j4', big)
        self.assertRegex(tagged, rb'^j4 OK', '30 KB ID after login: %s' % r.dump())
        _, tagged = r.command('j5', 'NOOP')
        self.assertRegex(tagged, rb'^j5 OK', r.dump())
        self.logout_raw(r)

    def test_f4_forward_client_id(self):
        """forward_client_id yes: a new backend connection gets the client's ID plus
        x-originating-ip/-port and x-connected-ip/-port before LOGIN (Dovecot trusts
        127.0.0.0/8, so the client's address becomes rip= in its Login line)."""
        self.start_proxy(forward_client_id='yes')
        r = self.raw(source='127.0.0.2')
        sport = r.sock.getsockname()[1]
        _, tagged = r.command('i1', 'ID ("name" "fidelity-client" "version" "4.2")')
        self.assertRegex(tagged, rb'^i1 OK', r.dump())
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, False, 'first login', r)
        self.assertFalse(any(u.startswith(b'* ID ') for u in untagged),
                         'the backend\'s ID answer leaked to the client: %s' % r.dump())
        self.logout_raw(r)
        log = self.dc.settled_log()
        ids = [ln for ln in log.splitlines() if 'ID sent:' in ln and 'fidelity-client' in ln]
        self.assertEqual(len(ids), 1, 'Dovecot\'s ID log lines:\n%s' % '\n'.join(
            ln for ln in log.splitlines() if 'ID sent' in ln))
        line = ids[0]
        for want in ('name=fidelity-client', 'version=4.2', 'x-originating-ip=127.0.0.2',
                     'x-originating-port=%d' % sport, 'x-connected-ip=127.0.0.1',
                     'x-connected-port=%d' % self.px.port):
            self.assertRegex(line, r'[:,] %s(,|:)' % re.escape(want), 'ID sent to the backend')
        self.assertRegex(log, r'Login: user=<alice>, [^\n]*rip=127\.0\.0\.2,',
                         'Dovecot should see the client address (x-originating-ip)')

    def test_f5_preauth_command(self):
        """preauth_command goes to every new backend connection before login; its
        answer is not shown to the client."""
        self.start_proxy(preauth_command='ID ("name" "preauth-test")')
        r1, r2 = self.raw(), self.raw()
        for r in (r1, r2):
            untagged, _ = self.login_ok(r)
            self.assertFalse(any(u.startswith(b'* ID') for u in untagged),
                             'the answer to preauth_command leaked: %s' % r.dump())
        self.logout_raw(r1)
        self.logout_raw(r2)
        r3 = self.raw()
        untagged, _ = self.login_ok(r3)
        self.assertReuse(untagged, True, 'third login', r3)
        self.logout_raw(r3)
        log = self.dc.settled_log()
        self.assertEqual(self.dc.logins('alice'), 2)
        self.assertEqual(len(re.findall(r'ID sent: name=preauth-test', log)), 2,
                         'one preauth_command per new backend connection; ID lines:\n%s'
                         % '\n'.join(ln for ln in log.splitlines() if 'ID sent' in ln))


# ====================================================================== state

def normalise(untagged, tagged):
    out = []
    for ln in untagged:
        if re.match(rb'\* \d+ RECENT\r\n', ln):
            continue
        ln = ln.replace(b' \\Recent', b'').replace(b'\\Recent ', b'').replace(b'\\Recent', b'')
        # Dovecot shows HIGHESTMODSEQ on every SELECT once any session used CONDSTORE
        # on the mailbox; its value moves with every STORE of either session.
        out.append(re.sub(rb'\[HIGHESTMODSEQ \d+\]', b'[HIGHESTMODSEQ n]', ln))
    t = re.sub(rb'^\S+ ', b'TAG ', tagged)
    t = re.sub(rb' \([0-9.]+ \+ [0-9.+ ]+secs\)', b'', t)
    out.append(t)
    return out


class State(FidelityTest):

    SEQ = ('SELECT INBOX', 'STORE 1 +FLAGS (\\Flagged)', 'STORE 1 -FLAGS (\\Flagged)',
           'FETCH 1:2 (FLAGS)', 'UID FETCH 1 (FLAGS)', 'LIST "" "*"', 'NOOP')

    def _run_seq(self, r, prefix):
        return [normalise(*r.command('%s%d' % (prefix, i), c)) for i, c in enumerate(self.SEQ)]

    def test_g1_enable_does_not_leak(self):
        """After a session that ENABLEd QRESYNC / CONDSTORE / UTF8=ACCEPT, a plain
        session of the same user sees exactly what a direct connection sees (no
        HIGHESTMODSEQ, MODSEQ, [CLOSED], UTF-8 mailbox names)."""
        d = self.direct()
        self.login_ok(d, tag='d0')
        _, tagged = d.command('d1', 'CREATE "&AMQ-rger"')  # "Ärger" in modified UTF-7
        self.assertRegex(tagged, rb'^d1 OK', d.dump())
        d.close()
        self.start_proxy()
        # QRESYNC and CONDSTORE leak visibly (MODSEQ in STORE's FETCH responses,
        # `* OK [CLOSED]`); Dovecot 2.3 does not implement UTF8=ACCEPT (ENABLE says
        # OK, enables nothing), so that round only shows ENABLE of it does no harm.
        for ext in ('QRESYNC', 'CONDSTORE', 'UTF8=ACCEPT'):
            with self.subTest(enable=ext):
                r = self.raw()
                self.login_ok(r)
                _, tagged = r.command('e1', 'ENABLE ' + ext)
                self.assertRegex(tagged, rb'^e1 OK', r.dump())
                _, tagged = r.command('e2', 'SELECT INBOX')
                self.assertRegex(tagged, rb'^e2 OK', r.dump())
                self.logout_raw(r)

                r = self.raw()
                self.login_ok(r)
                via_proxy = self._run_seq(r, 'p')
                self.logout_raw(r)
                d = self.direct()
                self.login_ok(d)
                direct = self._run_seq(d, 'q')
                d.close()
                for cmd, a, b in zip(self.SEQ, via_proxy, direct):
                    self.assertEqual(a, b, 'after ENABLE %s in an earlier session, `%s` through the '
                                     'proxy differs from a direct connection' % (ext, cmd))

    def test_g2_unfinished_command_is_not_reused(self):
        """A client that vanishes in the middle of IDLE, an APPEND literal, or with an
        announced literal: that backend connection is closed, the next login is new."""
        self.start_proxy()

        def idle(r):
            _, tagged = r.command('x1', 'SELECT INBOX')
            self.assertRegex(tagged, rb'^x1 OK', r.dump())
            r.send(b'x2 IDLE\r\n')
            self.assertRegex(r.readline(), rb'^\+', r.dump())

        def append_mid_literal(r):
            r.send(b'x1 APPEND INBOX {200}\r\n')
            self.assertRegex(r.readline(), rb'^\+', r.dump())
            r.send(b'Subject: cut\r\n\r\n')

        def literal_not_sent(r):
            r.send(b'x1 UID SEARCH SUBJECT {5}\r\n')
            self.assertRegex(r.readline(), rb'^\+', r.dump())

        def literal_plus_mid(r):
            r.send(b'x1 APPEND INBOX {200+}\r\nSubject: cut\r\n')
            time.sleep(0.3)

        cases = [('IDLE', idle), ('APPEND mid-literal', append_mid_literal),
                 ('literal announced, not sent', literal_not_sent),
                 ('LITERAL+ mid-literal', literal_plus_mid)]
        for name, action in cases:
            with self.subTest(case=name):
                r = self.raw()
                self.login_ok(r)  # takes the one pooled connection, if any
                action(r)
                logins = self.dc.logins('alice')
                logouts = self.dc.logouts('alice')
                r.close()
                try:
                    self.dc.wait_logouts(logouts + 1, 'alice', timeout=3)
                    closed = True
                except FixtureError:
                    closed = False
                r = self.raw()
                untagged, _ = self.login_ok(r)
                self.assertReuse(untagged, False, 'the backend connection of a client that vanished '
                                 '(%s) was pooled and lent to the next login' % name, r)
                self.assertTrue(closed, 'client vanished (%s): its backend connection was not closed '
                                'within 3 s (nor lent to the next login)' % name)
                self.assertEqual(self.dc.logins('alice'), logins + 1)
                _, tagged = r.command('y1', 'NOOP')
                self.assertRegex(tagged, rb'^y1 OK', r.dump())
                self.logout_raw(r)  # pooled for the next case

    def test_h1_updates_while_pooled(self):
        """The mailbox changes while alice's connection waits in the pool: the next
        session's first response has no stray EXISTS/EXPUNGE; SELECT shows the truth."""
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        _, tagged = r.command('a1', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^a1 OK', r.dump())
        self.logout_raw(r)

        d = imap_login(self.dc.port, 'alice', 'pw')
        try:
            d.select('INBOX')
            d.append('INBOX', None, None, b'Subject: arrived while pooled\r\n\r\nhello\r\n')
            d.store('1', '+FLAGS', '(\\Deleted)')
            d.expunge()
        finally:
            d.logout()
        time.sleep(0.2)

        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'second session', r)
        self.assertFalse(any(re.match(rb'\* \d+ (EXISTS|EXPUNGE|RECENT|FETCH)', u) for u in untagged),
                         'mailbox updates in the LOGIN response: %s' % r.dump())
        untagged, tagged = r.command('b1', 'NOOP')
        self.assertRegex(tagged, rb'^b1 OK', r.dump())
        self.assertEqual(untagged, [], 'first NOOP of the reused session must be quiet: %s' % r.dump())
        untagged, tagged = r.command('b2', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^b2 OK', r.dump())
        self.assertIn(b'* %d EXISTS\r\n' % MESSAGES, untagged, '5 - 1 expunged + 1 appended: %s'
                      % r.dump())
        self.assertFalse(any(re.match(rb'\* \d+ EXPUNGE', u) for u in untagged), r.dump())
        data, tagged = self.read_with_literals(r, 'b3', 'FETCH %d (BODY.PEEK[HEADER.FIELDS (SUBJECT)])'
                                               % MESSAGES)
        self.assertIn(b'arrived while pooled', data)
        self.logout_raw(r)

    def test_i1_max_idle_per_user(self):
        self.start_proxy(max_idle_per_user=2)
        ms = [self.imap() for _ in range(4)]
        self.assertEqual(self.dc.logins('alice'), 4)
        for m in ms:
            self.logout(m)
        try:
            self.dc.wait_logouts(2, 'alice', timeout=5)
        except FixtureError:
            self.fail('4 sessions ended with max_idle_per_user 2: Dovecot logged %d logouts, '
                      'expected 2' % self.dc.logouts('alice'))
        time.sleep(0.5)
        self.assertEqual(self.dc.logouts('alice'), 2, 'at most 2 stay pooled, the others end')
        self.assertEqual(self.dc.connections('alice'), 2, 'doveadm who')
        ms = [self.imap() for _ in range(3)]
        self.assertEqual(['XPROXYREUSE' in m.untagged_responses for m in ms], [True, True, False],
                         'two reuse the pooled connections, the third logs in')
        for m in ms:
            self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 5)


# ====================================================================== relay

class Relay(FidelityTest):

    def _select(self, r, tag='s0'):
        _, tagged = r.command(tag, 'SELECT INBOX')
        self.assertRegex(tagged, rb'^%s OK' % tag.encode(), r.dump())

    def _append_sync(self, r, tag, msg, prefix=b'{'):
        r.send(b'%s APPEND INBOX %s%d}\r\n' % (tag.encode(), prefix, len(msg)))
        line = r.readline()
        self.assertRegex(line, rb'^\+', 'continuation for the APPEND literal: %s' % r.dump())
        r.send(msg + b'\r\n')
        _, tagged = r.read_tagged(tag, timeout=20)
        self.assertRegex(tagged, rb'^%s OK \[APPENDUID \d+ \d+\]' % tag.encode(), r.dump())
        return int(re.search(rb'APPENDUID \d+ (\d+)', tagged).group(1))

    def _fetch_body(self, r, tag, uid, item=b'BODY.PEEK[]'):
        data, tagged = self.read_with_literals(r, tag, b'UID FETCH %d (%s)' % (uid, item), timeout=20)
        self.assertRegex(tagged, rb'^%s OK' % tag.encode(), r.dump())
        m = re.search(rb'~?\{(\d+)\}\r\n', data)
        self.assertIsNotNone(m, 'no literal in the FETCH response: %r' % data[:300])
        return data[m.end():m.end() + int(m.group(1))]

    def test_j1_literals_up_to_the_limit_both_directions(self):
        limit = 1 << 20
        self.start_proxy(max_literal_size=limit)
        r = self.raw(timeout=20)
        self.login_ok(r)
        self._select(r)
        head = b'Subject: exactly the limit\r\n\r\n'
        line = b'%s\r\n' % (b'L' * 62)
        body = line * ((limit - len(head)) // len(line))
        msg = head + body + b'x' * (limit - len(head) - len(body) - 2) + b'\r\n'
        self.assertEqual(len(msg), limit)
        uid = self._append_sync(r, 'a1', msg)
        self.assertEqual(self._fetch_body(r, 'a2', uid), msg,
                         'a message of max_literal_size bytes fetched back through the proxy')
        r.send(b'a3 APPEND INBOX {%d}\r\n' % (limit + 1))
        line = r.readline()
        self.assertRegex(line, rb'^(a3|\*) (NO|BAD) ', 'a literal over max_literal_size must be '
                         'refused without a continuation: %s' % r.dump())
        # Then either the session goes on, or it ends with `* BYE` (the contract leaves
        # that open; a client never sent the literal, so going on is possible).
        rest = r.read_available(wait=0.5)
        if re.search(rb'(\A|\r\n)\* BYE ', rest):
            print('    [j1] a refused over-long literal ends the session: %r' % (line + rest))
            return
        _, tagged = r.command('a4', 'NOOP')
        self.assertRegex(tagged, rb'^a4 OK', 'usable after a refused literal: %s' % r.dump())

    def test_j2_literal_plus_and_minus(self):
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        self._select(r)
        msg = b'Subject: literal plus\r\nMessage-ID: <lp@example.org>\r\n\r\nbody\r\n'
        r.send(b'p1 APPEND INBOX {%d+}\r\n%s\r\n' % (len(msg), msg))
        untagged, tagged = r.read_tagged('p1')
        self.assertRegex(tagged, rb'^p1 OK', r.dump())
        self.assertFalse(any(u.startswith(b'+') for u in untagged), 'continuation for LITERAL+')
        r.send(b'p2 UID SEARCH SUBJECT {7+}\r\nliteral HEADER Message-ID {16+}\r\n<lp@example.org>\r\n')
        untagged, tagged = r.read_tagged('p2')
        self.assertRegex(tagged, rb'^p2 OK', r.dump())
        self.assertTrue(any(re.match(rb'\* SEARCH \d+\r\n', u) for u in untagged), r.dump())

        # LITERAL- `{n-}`: Dovecot does not implement it; through the proxy the
        # client must get exactly the backend's answers (same tags, same results).
        seq = b'm1 APPEND INBOX {5-}\r\nhello\r\nm2 NOOP\r\n'

        def tagged_of(client):
            client.send(seq)
            got = []
            while True:
                line = client.readline()
                if re.match(rb'^[^*+]', line):
                    got.append(tuple(line.split(b' ', 2)[:2]))
                if line.startswith(b'm2 '):
                    return got
        d = self.direct()
        self.login_ok(d)
        self._select(d)
        want = tagged_of(d)
        got = tagged_of(r)
        self.assertEqual(got, want, '`{5-}` through the proxy vs. direct: %s' % r.dump())
        _, tagged = r.command('m3', 'NOOP')
        self.assertRegex(tagged, rb'^m3 OK', r.dump())

    def test_j3_sync_literal_refused_by_backend(self):
        """APPEND to a missing mailbox with a synchronising literal: Dovecot answers
        `NO [TRYCREATE]` instead of `+`; the client is not expected to send the
        literal, and the connection goes on."""
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        r.send(b'n1 APPEND no-such-mailbox {20}\r\n')
        line = r.readline()
        self.assertRegex(line, rb'^n1 NO \[TRYCREATE\]', 'expected the backend\'s NO instead of `+`: '
                         '%s' % r.dump())
        _, tagged = r.command('n2', 'NOOP')
        self.assertRegex(tagged, rb'^n2 OK', 'after a refused literal: %s' % r.dump())
        self._append_sync(r, 'n3', b'Subject: after refusal\r\n\r\nok\r\n')
        self.logout_raw(r)
        r = self.raw()
        self.login_ok(r)
        _, tagged = r.command('n4', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^n4 OK', r.dump())
        self.logout_raw(r)

    def test_j4_binary_append_and_fetch(self):
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        self._select(r)
        payload = bytes(b for b in range(256) if b not in (10, 13)) * 4
        msg = (b'Subject: binary\r\nContent-Type: application/octet-stream\r\n'
               b'Content-Transfer-Encoding: binary\r\n\r\n' + payload + b'\r\nend\x00\xff\r\n')
        uid = self._append_sync(r, 'b1', msg, prefix=b'~{')
        self.assertEqual(self._fetch_body(r, 'b2', uid, b'BINARY.PEEK[]'), msg,
                         'BINARY[] through the proxy differs from what was appended')
        r.send(b'b3 APPEND INBOX ~{%d+}\r\n%s\r\n' % (len(msg), msg))
        _, tagged = r.read_tagged('b3')
        self.assertRegex(tagged, rb'^b3 OK \[APPENDUID', r.dump())
        uid2 = int(re.search(rb'APPENDUID \d+ (\d+)', tagged).group(1))
        self.assertEqual(self._fetch_body(r, 'b4', uid2, b'BINARY.PEEK[]'), msg)
        self.logout_raw(r)

    def _uid_set(self, length):
        parts, n, i = [], 0, 1
        while n < length:
            s = str(i)
            parts.append(s)
            n += len(s) + 1
            i += 2
        return ','.join(parts)

    def test_j5_long_command_lines(self):
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        self._select(r)
        seq = self._uid_set(60000)
        untagged, tagged = r.command('u1', 'UID SEARCH UID ' + seq)
        self.assertRegex(tagged, rb'^u1 OK', 'a 60 KB command line: %s' % r.dump())
        self.assertTrue(any(u.startswith(b'* SEARCH') for u in untagged), r.dump())
        self.logout_raw(r)

        # A line over max_command_line (and well under Dovecot's own limit): BAD.
        self.start_proxy(max_command_line=16384)
        r = self.raw()
        self.login_ok(r)
        self._select(r)
        r.send(b'u2 UID SEARCH UID %s\r\n' % self._uid_set(30000).encode())
        line = r.readline()
        while line.startswith(b'* ') and not line.startswith((b'* BAD', b'* BYE')):
            line = r.readline()
        self.assertRegex(line, rb'^(u2|\*) BAD ', 'a 30 KB line with max_command_line 16384: %s'
                         % r.dump())
        r.send(b'u3 NOOP\r\n')
        try:
            _, tagged = r.read_tagged('u3')
            self.assertRegex(tagged, rb'^u3 OK', r.dump())
        except EOFError:
            self.assertIn(b'* BYE', b''.join(d for w, d in r.transcript if w == 'S'),
                          'closed after an over-long line without `* BYE`')

    def test_j6_idle_sees_new_mail(self):
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        self._select(r)
        r.send(b'i1 IDLE\r\n')
        self.assertRegex(r.readline(), rb'^\+ ', r.dump())
        self.direct_append(b'Subject: during idle\r\n\r\nnew\r\n')
        got = []
        deadline = time.monotonic() + 8
        while not any(re.match(rb'\* %d EXISTS' % (MESSAGES + 1), g) for g in got):
            self.assertLess(time.monotonic(), deadline, 'no EXISTS during IDLE: %s' % r.dump())
            got.append(r.readline(timeout=8))
        r.send(b'DONE\r\n')
        _, tagged = r.read_tagged('i1')
        self.assertRegex(tagged, rb'^i1 OK', r.dump())
        _, tagged = r.command('i2', 'NOOP')
        self.assertRegex(tagged, rb'^i2 OK', r.dump())
        self.logout_raw(r)
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'after a finished IDLE', r)
        self.logout_raw(r)

    def test_j7_50mb_append_and_fetch(self):
        self.start_proxy()
        r = self.raw(timeout=60)
        self.login_ok(r)
        self._select(r)
        head = b'Subject: fifty megabytes\r\nMessage-ID: <fifty@example.org>\r\n\r\n'
        line = b'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/\r\n'
        msg = head + line * ((50 * 1024 * 1024) // len(line))
        want = hashlib.sha256(msg).hexdigest()
        t0 = time.monotonic()
        r.send(b'f1 APPEND INBOX {%d}\r\n' % len(msg))
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.sock.settimeout(60)
        r.sock.sendall(msg)  # not through send(): keeps 50 MB out of the transcript
        r.send(b'\r\n')
        _, tagged = r.read_tagged('f1', timeout=60)
        self.assertRegex(tagged, rb'^f1 OK \[APPENDUID', r.dump())
        uid = int(re.search(rb'APPENDUID \d+ (\d+)', tagged).group(1))
        t1 = time.monotonic()
        r.send(b'f2 UID FETCH %d (BODY.PEEK[])\r\n' % uid)
        first = r.readline(timeout=60)
        m = re.search(rb'\{(\d+)\}\r\n\Z', first)
        self.assertIsNotNone(m, first)
        n = int(m.group(1))
        self.assertEqual(n, len(msg))
        h = hashlib.sha256()
        take = r.buf[:n]
        r.buf = r.buf[n:]
        h.update(take)
        left = n - len(take)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while left:
            k = r.sock.recv_into(view, min(left, len(buf)))
            if not k:
                self.fail('connection closed with %d bytes of the literal left' % left)
            h.update(view[:k])
            left -= k
        rest = r.readline(timeout=30)
        self.assertRegex(rest, rb'^\)\r\n$|^ ', rest)
        _, tagged = r.read_tagged('f2', timeout=30)
        self.assertRegex(tagged, rb'^f2 OK', tagged)
        t2 = time.monotonic()
        self.assertEqual(h.hexdigest(), want, '50 MB message fetched back differs (sha256)')
        print('    [j7] 50 MB APPEND %.1fs, FETCH %.1fs' % (t1 - t0, t2 - t1))
        self.logout_raw(r)

    def test_j7b_client_leaves_in_the_middle_of_a_big_fetch(self):
        """A client that resets its connection 1 MB into a 16 MB literal being
        relayed to it. It left at a command boundary, so its session reads
        and drops the other 15 MB, sees the FETCH completed, deselects and
        returns the connection; the next client gets that same connection and
        it is in step: its own FETCH answers are exactly Dovecot's."""
        self.start_proxy()
        r = self.raw(timeout=60)
        self.login_ok(r)
        self._select(r)
        msg = b'Subject: sixteen\r\n\r\n' + b'x' * (16 << 20) + b'\r\n'
        r.send(b'f1 APPEND INBOX {%d}\r\n' % len(msg))
        self.assertRegex(r.readline(), rb'^\+', r.dump())
        r.sock.settimeout(60)
        r.sock.sendall(msg)
        r.send(b'\r\n')
        _, tagged = r.read_tagged('f1', timeout=60)
        uid = int(re.search(rb'APPENDUID \d+ (\d+)', tagged).group(1))
        logins = self.dc.logins('alice')
        r.send(b'f2 UID FETCH %d (BODY.PEEK[])\r\n' % uid)
        got = len(r.buf)
        while got < (1 << 20):
            k = r.sock.recv(65536)
            self.assertTrue(k, 'closed after %d bytes' % got)
            got += len(k)
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))  # RST
        r.close()
        wait_until(lambda: 'died with code 0' in self.px.listener_log(), 10,
                   what='the session to end; log: ' + self.px.listener_log()[-1500:])
        r2 = self.raw()
        self.login_ok(r2)
        self._select(r2, tag='s2')
        want = self.direct()
        self.login_ok(want)
        self._select(want, tag='s2')
        for rc in (r2, want):
            rc.send(b'g1 FETCH 1:5 (UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n')
        got2, want2 = r2.read_tagged('g1'), want.read_tagged('g1')
        self.assertEqual(got2[0], want2[0], 'the reused connection is out of step')
        self.assertRegex(got2[1], rb'^g1 OK')
        self.assertEqual(self.dc.logins('alice'), logins + 1,
                         'one new login (the direct one): the drained connection was reused')
        self.logout_raw(r2)

    def test_j8_pipelined_commands_with_literals(self):
        self.start_proxy()
        r = self.raw()
        self.login_ok(r)
        msg = b'Subject: pipelined\r\n\r\nin one write\r\n'
        r.send(b'p1 SELECT INBOX\r\np2 APPEND INBOX {%d+}\r\n%s\r\np3 NOOP\r\n'
               b'p4 UID FETCH 1:* (FLAGS)\r\np5 SEARCH SUBJECT "pipelined"\r\np6 LOGOUT\r\n'
               % (len(msg), msg))
        data = r.read_until_close(timeout=10)
        lines = data.split(b'\r\n')
        tags = [ln.split(b' ', 1)[0] for ln in lines if ln and not ln.startswith(b'*')]
        # Dovecot itself runs pipelined commands in parallel (p5 may finish before p2):
        # every command answered once, LOGOUT last.
        self.assertEqual(sorted(tags), [b'p1', b'p2', b'p3', b'p4', b'p5', b'p6'], data)
        self.assertEqual(tags[0], b'p1', data)
        self.assertTrue(all(re.match(rb'^p\d OK', ln) for ln in lines if ln.startswith(b'p')), data)
        self.assertRegex(data, rb'\r\n\* BYE [^\r\n]*\r\np6 OK [^\r\n]*\r\n\Z', data)
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'after pipelined LOGOUT', r)
        _, tagged = r.command('q1', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^q1 OK', r.dump())
        untagged, tagged = r.command('q2', 'SEARCH SUBJECT "pipelined"')
        self.assertIn(b'* SEARCH %d\r\n' % (MESSAGES + 1), untagged, r.dump())
        self.logout_raw(r)

    def test_j9_logout_while_commands_run(self):
        """LOGOUT sent behind a slow FETCH and a NOOP: their tagged responses come
        first, then `* BYE` and the LOGOUT's OK; the connection is pooled."""
        big = b'Subject: big\r\n\r\n' + b'%s\r\n' % (b'B' * 78) * 60000  # ~4.8 MB
        self.direct_append(big)
        self.start_proxy()
        r = self.raw(timeout=20)
        self.login_ok(r)
        self._select(r)
        r.send(b'x1 FETCH 1:* (BODY.PEEK[])\r\nx2 NOOP\r\nx3 LOGOUT\r\n')
        data = r.read_until_close(timeout=20)
        pos = {k: data.find(k) for k in (b'\r\nx1 OK', b'\r\nx2 OK', b'\r\n* BYE ', b'\r\nx3 OK')}
        self.assertTrue(all(v >= 0 for v in pos.values()), 'missing responses: %r; end %r'
                        % (pos, data[-300:]))
        self.assertEqual(sorted(pos, key=pos.get), list(pos), 'order of responses: %r' % pos)
        self.assertRegex(data, rb'\r\nx3 OK [^\r\n]*\r\n\Z')
        self.assertTrue(big in data, 'the big message did not arrive intact')
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'after LOGOUT behind running commands', r)
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 2, 'one direct, one through the proxy')


# ====================================================================== timeouts

class Timeouts(FidelityTest):

    def test_k1_prelogin_timeout(self):
        self.start_proxy(client_prelogin_timeout=2)
        r = self.raw()
        t0 = time.monotonic()
        try:
            rest = r.read_until_close(timeout=6)
        except socket.timeout:
            self.fail('client_prelogin_timeout 2: the connection was not closed within 6 s; got %r'
                      % r.buf)
        dt = time.monotonic() - t0
        self.assertGreaterEqual(dt, 1.5, 'closed too early: %r' % rest)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\n\Z', 'pre-login timeout: `* BYE` then close; '
                         'got %r after %.1fs' % (rest, dt))

    def test_k2_idle_timeout_pools_clean(self):
        self.start_proxy(client_idle_timeout=2)
        r = self.raw()
        self.login_ok(r)
        _, tagged = r.command('t1', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^t1 OK', r.dump())
        t0 = time.monotonic()
        try:
            rest = r.read_until_close(timeout=8)
        except socket.timeout:
            self.fail('client_idle_timeout 2: an idle logged-in client was not disconnected within '
                      '8 s; got %r' % r.buf)
        dt = time.monotonic() - t0
        self.assertGreaterEqual(dt, 1.5, 'closed too early: %r' % rest)
        self.assertRegex(rest, rb'\A\* BYE [^\r\n]*\r\n\Z', 'idle timeout: `* BYE` then close; '
                         'got %r after %.1fs' % (rest, dt))
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, True, 'login after an idle-timed-out session', r)
        untagged, tagged = r.command('t2', 'FETCH 1 (FLAGS)')
        self.assertRegex(tagged, rb'^t2 (BAD|NO) ', 'the reused connection must be unselected: %s'
                         % r.dump())
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 1)


    def _imap_children(self):
        """PIDs of this Dovecot's imap (post-login) processes."""
        out = []
        for pid in children_of(self.dc.proc.pid):
            try:
                with open('/proc/%d/cmdline' % pid, 'rb') as f:
                    cmd = f.read()
            except OSError:
                continue
            if cmd.split(b'\0')[0].endswith(b'/imap'):
                out.append(pid)
        return out

    def test_k3_backend_response_timeout(self):
        # A real backend that stops answering mid-command: its imap process is
        # frozen with SIGSTOP. The session must give up after
        # backend_response_timeout, tell the client, and not pool the connection.
        self.start_proxy(backend_response_timeout=2)
        r = self.raw()
        self.login_ok(r)
        _, tagged = r.command('t1', 'SELECT INBOX')
        self.assertRegex(tagged, rb'^t1 OK', r.dump())
        pids = self._imap_children()
        self.assertEqual(len(pids), 1, 'expected one imap process for the pooled user, got %r' % pids)
        os.kill(pids[0], signal.SIGSTOP)
        try:
            r.send(b't2 NOOP\r\n')
            t0 = time.monotonic()
            try:
                rest = r.read_until_close(timeout=10)
            except socket.timeout:
                self.fail('backend_response_timeout 2: the client was not answered within 10 s; got %r'
                          % r.buf)
            dt = time.monotonic() - t0
            self.assertGreaterEqual(dt, 1.5, 'gave up too early: %r' % rest)
            self.assertLess(dt, 8, 'gave up too late (%.1fs)' % dt)
            self.assertRegex(rest, rb'\* BYE [^\r\n]*\r\n\Z', 'a stalled backend: `* BYE`, then close; '
                             'got %r' % rest)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        r = self.raw()
        untagged, _ = self.login_ok(r)
        self.assertReuse(untagged, False, 'login after a backend that stopped answering', r)
        self.logout_raw(r)
        self.assertEqual(self.dc.logins('alice'), 2)


    def test_k4_stalled_upload_is_not_a_backend_timeout(self):
        # backend_response_timeout is about the server: a client that pauses in
        # the middle of an APPEND literal (LITERAL+) for longer than it must not
        # be told the server is not responding.
        self.start_proxy(backend_response_timeout=2)
        r = self.raw()
        self.login_ok(r)
        msg = b'Subject: slow upload\r\n\r\n' + b'x' * 200 + b'\r\n'
        r.send(b'u1 APPEND INBOX {%d+}\r\n' % len(msg) + msg[:50])
        time.sleep(3.5)
        r.send(msg[50:] + b'\r\n')
        _, tagged = r.read_tagged(b'u1', timeout=10)
        self.assertRegex(tagged, rb'^u1 OK', 'a client pausing mid-upload was cut off: %s' % r.dump())
        self.logout_raw(r)


# ====================================================================== real clients

class RealClients(FidelityTest):

    def _run(self, argv, timeout=30, env=None, ok=(0,)):
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           env=env)
        out = r.stdout.decode('utf-8', 'replace')
        err = r.stderr.decode('utf-8', 'replace')
        self.assertIn(r.returncode, ok, '%s: rc=%d\nstdout:\n%s\nstderr:\n%s' % (
            ' '.join(argv), r.returncode, tail(out, 30), tail(err, 30)))
        return out, err

    def _direct_subjects(self, user='alice'):
        m = imap_login(self.dc.port, user, self.USERS[user])
        try:
            m.select('INBOX', readonly=True)
            typ, data = m.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
            return [d[1].decode('utf-8', 'replace').strip() for d in data if isinstance(d, tuple)]
        finally:
            m.logout()

    def test_l1_imaplib(self):
        self.start_proxy()
        for run in (1, 2):
            m = self.imap()
            self.assertEqual('XPROXYREUSE' in m.untagged_responses, run == 2,
                             'imaplib run %d: reuse? untagged %r' % (run, m.untagged_responses))
            typ, data = m.select('INBOX')
            self.assertEqual((typ, int(data[0])), ('OK', MESSAGES + run - 1))
            typ, data = m.search(None, 'ALL')
            self.assertEqual(len(data[0].split()), MESSAGES + run - 1)
            typ, data = m.fetch('1', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
            self.assertIn(b'Test message 1 for alice', data[0][1])
            typ, data = m.append('INBOX', '(\\Seen)', None,
                                 b'Subject: imaplib run %d\r\n\r\nhello\r\n' % run)
            self.assertEqual(typ, 'OK', data)
            tag = m._new_tag()
            m.send(tag + b' IDLE\r\n')
            self.assertTrue(m.readline().startswith(b'+'), 'IDLE continuation')
            m.send(b'DONE\r\n')
            typ, data = m._command_complete('IDLE', tag)
            self.assertEqual(typ, 'OK', data)
            self.logout(m)
        self.assertEqual(self.dc.logins('alice'), 1)
        self.assertEqual(sum(s.startswith('Subject: imaplib run') for s in self._direct_subjects()), 2)

    def test_l2_curl(self):
        curl = shutil.which('curl')
        if not curl:
            self.skipTest('curl is not installed (apt-get install curl)')
        self.start_proxy()
        base = 'imap://127.0.0.1:%d' % self.px.port
        up = os.path.join(self.tmp, 'upload.eml')
        for run in (1, 2):
            out, _ = self._run([curl, '-sS', '--max-time', '15', '--user', 'alice:pw', base + '/'])
            self.assertRegex(out, r'(?m)^\* LIST .*INBOX', out)
            out, _ = self._run([curl, '-sS', '--max-time', '15', '--user', 'alice:pw',
                                base + '/INBOX;MAILINDEX=1'])
            self.assertIn('Subject: Test message 1 for alice', out)
            with open(up, 'wb') as f:
                f.write(b'From: curl@example.org\r\nSubject: curl upload %d\r\n\r\nup\r\n' % run)
            self._run([curl, '-sS', '--max-time', '15', '--user', 'alice:pw', '-T', up,
                       base + '/INBOX'])
            self.assertEqual(self.dc.logins('alice'), 1, 'curl run %d: backend logins' % run)
        subj = self._direct_subjects()
        self.assertEqual([s for s in subj if s.startswith('Subject: curl upload')],
                         ['Subject: curl upload 1', 'Subject: curl upload 2'], subj)

    def test_l3_mbsync(self):
        mbsync = shutil.which('mbsync')
        if not mbsync:
            self.skipTest('mbsync is not installed (apt-get install isync)')
        self.start_proxy()
        local = os.path.join(self.tmp, 'maildir')
        os.makedirs(local)
        cfg = os.path.join(self.tmp, 'mbsyncrc')
        with open(cfg, 'w') as f:
            f.write('''IMAPAccount proxy
Host 127.0.0.1
Port %d
User alice
Pass pw
SSLType None
AuthMechs LOGIN
Timeout 15

IMAPStore remote
Account proxy

MaildirStore local
Path %s/
Inbox %s/INBOX
SubFolders Verbatim

Channel ch
Far :remote:
Near :local:
Patterns INBOX
Create Both
Sync All
SyncState *
''' % (self.px.port, local, local))
        inbox = os.path.join(local, 'INBOX')

        def local_msgs():
            out = []
            for sub in ('new', 'cur'):
                p = os.path.join(inbox, sub)
                if os.path.isdir(p):
                    for n in os.listdir(p):
                        with open(os.path.join(p, n), 'rb') as fh:
                            out.append(fh.read())
            return out
        self._run([mbsync, '-c', cfg, '-a'])
        msgs = local_msgs()
        self.assertEqual(len(msgs), MESSAGES, 'mbsync run 1 pulled %d messages' % len(msgs))
        self.assertEqual(self.dc.logins('alice'), 1)
        name = '%d_1.fidelity.localhost:2,S' % int(time.time())
        with open(os.path.join(inbox, 'cur', name), 'wb') as fh:
            fh.write(b'From: local@example.org\nSubject: from mbsync\n\nwritten locally\n')
        self._run([mbsync, '-c', cfg, '-a'])
        self.assertEqual(self.dc.logins('alice'), 1, 'mbsync run 2 should reuse the pooled connection')
        subj = self._direct_subjects()
        self.assertIn('Subject: from mbsync', subj, 'the local message did not reach Dovecot')
        self.assertEqual(len(subj), MESSAGES + 1)

    def test_l4_fetchmail(self):
        fetchmail = shutil.which('fetchmail')
        if not fetchmail:
            self.skipTest('fetchmail is not installed (apt-get install fetchmail)')
        self.start_proxy()
        home = os.path.join(self.tmp, 'fetchmail-home')
        os.makedirs(home, mode=0o700)
        out = os.path.join(self.tmp, 'fetched.mbox')
        rc = os.path.join(home, 'fetchmailrc')
        with open(rc, 'w') as f:
            f.write('''set no bouncemail
poll 127.0.0.1 service %d protocol IMAP auth password timeout 15
  user "alice" password "pw"
  keep fetchall
  sslproto ''
  mda "/bin/sh -c 'cat >> %s'"
''' % (self.px.port, out))
        os.chmod(rc, 0o600)
        env = dict(os.environ, FETCHMAILHOME=home, HOME=home)
        for run in (1, 2):
            self._run([fetchmail, '-f', rc, '--nosyslog', '--idfile', os.path.join(home, 'ids'),
                       '--pidfile', os.path.join(home, 'pid')], env=env)
            with open(out, 'rb') as fh:
                got = len(re.findall(rb'(?m)^Subject: Test message \d for alice', fh.read()))
            self.assertEqual(got, MESSAGES * run, 'fetchmail run %d: messages delivered' % run)
            self.assertEqual(self.dc.logins('alice'), 1, 'fetchmail run %d: backend logins' % run)


if __name__ == '__main__':
    unittest.main()
