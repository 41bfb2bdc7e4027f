"""fixturecase -- FixtureCase, the unittest.TestCase most integration tests build on.

It owns a test's life cycle around imapfixture's objects, so that each test file
states only what differs:

  - setUp: a fresh temp directory (self.tmp; removed at the end of the class,
    so that the runner's diagnostics, called on failure, can still read the
    logs in it), then Dovecot (START_DOVECOT, USERS, MESSAGES, DOVECOT_EXTRA)
    and the proxy (START_PROXY, PROXY_CONF) when the class asks for them,
    through start_dovecot() and start_proxy(), which tests call too;
  - tearDown: closes the clients a test made through its helpers (self.raws,
    self.imaps, self.socks), stops extra launchers (self.procs, imapfixture
    _Procs), the proxy, a fake backend (self.fake), Dovecot and a network
    namespace (self.ns), also when the test failed half-way; then asserts that
    the proxy's logs hold no crash or sanitizer report (crash_lines()) and that
    the broker, when one was started and no test killed it, exited 0 on SIGTERM;
  - diagnostics(): the last lines of every log and the raw clients' transcripts;
  - helpers: raw(), imap(), logout(), select_fetch(), assertReused().

Subclasses add their own logs to crash_lines() and diagnostics().
"""

import os
import shutil
import signal
import tempfile
import unittest

from imapfixture import Dovecot, Proxy, RawClient, imap_login, tail


class FixtureCase(unittest.TestCase):
    TMP_PREFIX = 'imapproxy-it-'
    TMP_MODE = None          # chmod of self.tmp (e.g. 0o755: read by other users)
    USERS = {'alice': 'pw', 'bob': 'bobpw'}
    MESSAGES = 5             # in every user's INBOX
    DOVECOT_EXTRA = ''
    START_DOVECOT = True
    START_PROXY = False
    PROXY_CONF = {}
    BROKER_LOG_LINES = 40    # in diagnostics()
    RAW_TRANSCRIPTS = None   # how many (the last ones) diagnostics() shows; None: all
    _tmpdirs = []            # one list for every subclass: removed by tearDownClass

    @classmethod
    def mkdtemp(cls, prefix=None):
        d = tempfile.mkdtemp(prefix=prefix or cls.TMP_PREFIX)
        FixtureCase._tmpdirs.append(d)
        if cls.TMP_MODE is not None:
            os.chmod(d, cls.TMP_MODE)
        return d

    @classmethod
    def tearDownClass(cls):
        for d in FixtureCase._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        FixtureCase._tmpdirs.clear()

    def setUp(self):
        self.tmp = self.mkdtemp()
        self.dc = None
        self.px = None
        self.fake = None
        self.ns = None
        self.raws = []
        self.imaps = []
        self.socks = []
        self.procs = []
        if self.START_DOVECOT:
            self.start_dovecot()
        if self.START_PROXY:
            self.start_proxy(**self.PROXY_CONF)

    def start_dovecot(self, **kw):
        kw.setdefault('extra_conf', self.DOVECOT_EXTRA)
        self.dc = Dovecot(self.tmp, users=self.USERS, messages=self.MESSAGES, **kw)
        return self.dc

    def start_proxy(self, **conf):
        self.px = Proxy(self.tmp, self.dc, **conf)
        return self.px

    def tearDown(self):
        rcs = self.stop_all()
        # Checked after stop(): a sanitizer build reports leaks at exit.
        self.assertEqual(self.crash_lines(), [], 'crash or sanitizer report in the proxy logs')
        if self.px and self.px.broker and self.px.killed_with is None:
            self.assertEqual(rcs.get('broker'), 0, 'broker exit status after SIGTERM')

    def stop_all(self):
        """Close and stop everything the test started; returns the proxy's exit statuses."""
        for r in self.raws:
            r.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        for m in self.imaps:
            try:
                m.shutdown()
            except OSError:
                pass
        for p in self.procs:
            p.stop(signal.SIGTERM, 5.0)
        rcs = self.px.stop() if self.px else {}
        if self.fake:
            self.fake.stop()
        if self.dc:
            self.dc.stop()
        if self.ns:
            self.ns.close()
        return rcs

    def crash_lines(self):
        """Crash or sanitizer lines in the logs tearDown checks (subclasses add theirs)."""
        return self.px.crash_report() if self.px else []

    def diagnostics(self):
        out = []
        if self.px:
            out.append('broker log (%s):\n%s' % (self.px.broker_log_path,
                                                tail(self.px.broker_log(), self.BROKER_LOG_LINES)))
            out.append('session/listener log:\n%s' % tail(self.px.listener_log()))
        for p in self.procs:
            out.append('%s log (%s):\n%s' % (p.name, p.log_path, tail(p.log())))
        if self.dc:
            out.append('dovecot log:\n%s' % tail(self.dc.log()))
        for r in self.raws[-self.RAW_TRANSCRIPTS if self.RAW_TRANSCRIPTS else 0:]:
            out.append('raw transcript:\n%s' % r.dump())
        return '\n'.join(out)

    # -- clients (closed by tearDown)

    def raw(self, port=None, **kw):
        """RawClient to port (default: the proxy's)."""
        r = RawClient(port or self.px.port, **kw)
        self.raws.append(r)
        return r

    def imap(self, user='alice', password=None, port=None):
        """imaplib client logged in as user at port (default: the proxy's)."""
        m = imap_login(port or self.px.port, user, password or self.USERS[user])
        self.imaps.append(m)
        return m

    def logout(self, m):
        typ, data = m.logout()
        self.assertEqual(typ, 'BYE', data)
        if m in self.imaps:
            self.imaps.remove(m)

    # -- checks

    def select_fetch(self, m, n=None):
        """SELECT INBOX and FETCH every message's FLAGS: n (default MESSAGES) messages."""
        n = self.MESSAGES if n is None else n
        typ, data = m.select('INBOX')
        self.assertEqual(typ, 'OK', data)
        self.assertEqual(int(data[0]), n, 'EXISTS after SELECT INBOX')
        typ, data = m.fetch('1:*', '(FLAGS)')
        self.assertEqual(typ, 'OK', data)
        self.assertEqual(len([d for d in data if d]), n, data)

    def assertReused(self, m, reused, what=''):
        """m's LOGIN was (or was not) answered from the pool: `* OK [XPROXYREUSE]`."""
        has = 'XPROXYREUSE' in m.untagged_responses
        if reused:
            self.assertTrue(has, '%s: expected `* OK [XPROXYREUSE]` before the LOGIN OK; untagged: %r'
                            % (what, m.untagged_responses))
        else:
            self.assertFalse(has, '%s: unexpected XPROXYREUSE on a fresh backend login; untagged: %r'
                             % (what, m.untagged_responses))
