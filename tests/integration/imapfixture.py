#!/usr/bin/env python3
"""imapfixture -- private Dovecot and imapproxy instances for integration tests.

Python 3 standard library only.  Everything started here is stopped again by
stop(), by the context managers, and (as a last resort) at interpreter exit;
every child runs in its own process group and the whole group is killed.

    with tempfile.TemporaryDirectory() as tmp:
        dc = Dovecot(tmp, users={'alice': 'pw'}, messages=5)
        px = Proxy(tmp, dc, cache_expiration_time=300)
        m = imap_login(px.port, 'alice', 'pw')
        ...
        px.stop(); dc.stop()

Also what the tests share around them: IMAP clients (RawClient, imap_login),
/proc inspection, network namespaces (NetNS), scripted backends (FakeBackend),
test certificates made with certtool (make_ca, make_cert) and launchers
(socket_activate). fixturecase.FixtureCase builds a test's set-up and
tear-down on them.

Environment overrides: IMAPPROXY_BROKER, IMAPPROXY_SESSION (binary paths),
DOVECOT (dovecot binary), DOVEADM (doveadm binary).
"""

import atexit
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, '..', '..'))
BROKER = os.environ.get('IMAPPROXY_BROKER') or os.path.join(REPO, 'broker', 'imapproxy-broker')
SESSION = os.environ.get('IMAPPROXY_SESSION') or os.path.join(REPO, 'session', 'imapproxy-session')
DOVECOT = os.environ.get('DOVECOT') or shutil.which('dovecot') or '/usr/sbin/dovecot'
DOVEADM = os.environ.get('DOVEADM') or shutil.which('doveadm') or '/usr/bin/doveadm'
SOCKET_ACTIVATE = shutil.which('systemd-socket-activate') or '/usr/bin/systemd-socket-activate'
CERTTOOL = shutil.which('certtool') or '/usr/bin/certtool'

# Environment variables that must not leak from our own supervisor into children.
_SCRUB_ENV = ('NOTIFY_SOCKET', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'WATCHDOG_PID',
              'WATCHDOG_USEC')

# Sanitizer / crash markers looked for in the logs of our own binaries.
CRASH_MARKERS = ('AddressSanitizer', 'LeakSanitizer', 'UndefinedBehaviorSanitizer',
                 'runtime error:', 'Segmentation fault', 'core dumped', 'stack smashing',
                 'double free', 'malloc(): ', 'free(): ')

_live = []  # every started _Proc, for the atexit safety net


class FixtureError(Exception):
    pass


# ------------------------------------------------------------------ helpers

def free_port(host='127.0.0.1'):
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=5.0, interval=0.02, what=None):
    """Poll pred() until it returns a true value; return it, or raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise FixtureError('timed out after %.1fs waiting for %s' % (timeout, what or pred))
        time.sleep(interval)


def tail(text, n=40):
    """The last n lines of text (for failure messages and diagnostics)."""
    return '\n'.join(text.splitlines()[-n:])


def read_log(path):
    """A log file as text ('' while it does not exist yet)."""
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
    except FileNotFoundError:
        return ''


def child_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    if extra:
        env.update(extra)
    return env


def tcp_listening(port, host='127.0.0.1'):
    """True when something LISTENs on host:port (reads /proc/net/tcp: no side effects,
    unlike connect(), which would make an inetd-style listener spawn a child)."""
    want = '%s:%04X' % (''.join('%02X' % b for b in reversed(socket.inet_aton(host))), port)
    want_any = '00000000:%04X' % port
    try:
        with open('/proc/net/tcp') as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[3] == '0A' and parts[1] in (want, want_any):
                    return True
    except OSError:
        pass
    return False


class _Proc:
    """A child in its own process group; stop() kills the whole group."""

    def __init__(self, argv, log_path, name, env=None, stdin=subprocess.DEVNULL, pass_fds=()):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, 'ab', buffering=0)
        self.popen = subprocess.Popen(argv, stdin=stdin, stdout=self._log, stderr=self._log,
                                      env=child_env(env), start_new_session=True,
                                      close_fds=True, pass_fds=pass_fds)
        self.pid = self.popen.pid
        _live.append(self)

    # The leader is never reaped before its process group has been SIGKILLed:
    # while it is a zombie its pid (= the group id) cannot be reused, so
    # killpg() can never hit an unrelated process group.

    def alive(self):
        """True while the leader runs (does not reap it)."""
        if self.popen.returncode is not None:
            return False
        try:
            r = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return r is None

    def send_signal(self, sig):
        if self.alive():
            os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        """Wait (without reaping) until the leader exits; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def reap(self):
        """SIGKILL what is left of the group, reap the leader, return its exit status
        (negative: killed by that signal)."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
        try:
            self._log.close()
        except OSError:
            pass
        if self in _live:
            _live.remove(self)
        return self.popen.returncode

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Signal the process group, wait up to timeout, then SIGKILL the rest.
        Returns the leader's exit status."""
        if self.popen.returncode is None and self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            self.wait_exit(timeout)
        return self.reap()

    def log(self):
        return read_log(self.log_path)


@atexit.register
def _kill_everything():
    for p in list(_live):
        try:
            p.stop(signal.SIGKILL, timeout=2.0)
        except Exception:  # noqa: BLE001 - last-resort cleanup
            pass
    for ns in list(_live_ns):  # after the processes that ran inside them
        try:
            ns.close()
        except Exception:  # noqa: BLE001 - last-resort cleanup
            pass


def socket_activate(args, log_path, name, env=None, attempts=5, timeout=10.0):
    """`systemd-socket-activate -l 127.0.0.1:PORT -a ARGS...` on a free port, tried
    again on another one if the port got taken meanwhile (the launcher exits).
    log_path may contain '{port}'. Returns (port, _Proc) once it listens."""
    for _ in range(attempts):
        port = free_port()
        p = _Proc([SOCKET_ACTIVATE, '-l', '127.0.0.1:%d' % port, '-a'] + list(args),
                  log_path.format(port=port), name, env=env)
        try:
            wait_until(lambda: tcp_listening(port) or not p.alive(), timeout,
                       what='systemd-socket-activate on %d' % port)
        except FixtureError:
            p.stop()
            raise
        if p.alive():
            return port, p
        p.stop()
    raise FixtureError('systemd-socket-activate did not listen:\n%s' % p.log())


def _name_of_uid(uid):
    return pwd.getpwuid(uid).pw_name


def _name_of_gid(gid):
    return grp.getgrgid(gid).gr_name


# ------------------------------------------------------------------ Dovecot

class Dovecot:
    """A private Dovecot (imap only, plaintext, loopback) under tmpdir.

    Works as root (mail files owned by the 'dovecot' user, or 'nobody') and as
    an ordinary user (everything runs as that user; rootless Dovecot).

    tls=(cert_file, key_file) turns TLS on: STARTTLS on `port` and implicit
    TLS on `imaps_port` (a free port).  Without tls nothing changes (ssl = no,
    no imaps listener).  address (default 127.0.0.1) is where Dovecot listens:
    Dovecot trusts a client whose address equals its own, so to make it say
    LOGINDISABLED (ssl='required', or disable_plaintext_auth) listen on
    127.0.0.2 and connect from 127.0.0.1.
    tls_client_ca=PATH (with tls) makes Dovecot ask for a client certificate
    signed by that CA and refuse every login without a valid one
    (ssl_verify_client_cert, auth_ssl_require_client_cert; no CRL needed).
    """

    LOGIN_RE = re.compile(r'imap-login: Info: Login: user=<([^>]*)>')
    LOGOUT_RE = re.compile(r'imap\(([^)]*)\)[^:]*: Info: (?:Logged out|Disconnected)')

    def __init__(self, tmpdir, users=None, messages=5, port=None, auth_failure_delay=0,
                 extra_conf='', start=True, netns=None, tls=None, ssl='yes', imaps_port=None,
                 address='127.0.0.1', tls_client_ca=None):
        # netns: a NetNS to run in; Dovecot then listens on its inner address.
        self.netns = netns
        self.address = netns.inner if netns else address
        self.tmpdir = os.path.abspath(tmpdir)
        self.dir = os.path.join(self.tmpdir, 'dovecot')
        self.users = dict(users or {'alice': 'pw'})
        self.messages = messages
        self.port = port or free_port(address if not netns else '127.0.0.1')
        self.conf = os.path.join(self.dir, 'dovecot.conf')
        self.log_path = os.path.join(self.dir, 'dovecot.log')
        self.stderr_path = os.path.join(self.dir, 'dovecot.stderr')
        self.proc = None
        self.auth_failure_delay = auth_failure_delay
        self.extra_conf = extra_conf
        self.tls = tls
        self.ssl = ssl if tls else 'no'
        self.tls_client_ca = tls_client_ca if tls else None
        self.imaps_port = 0
        while tls and self.imaps_port in (0, self.port):  # two free_port() calls can agree
            self.imaps_port = imaps_port or free_port(address if not netns else '127.0.0.1')
        self._setup_ids()
        self._write_files()
        if start:
            self.start()

    # -- setup

    def _setup_ids(self):
        if os.geteuid() == 0:
            for name in ('dovecot', 'nobody'):
                try:
                    pw = pwd.getpwnam(name)
                    self.mail_uid, self.mail_gid = pw.pw_uid, pw.pw_gid
                    break
                except KeyError:
                    continue
            else:
                raise FixtureError('no dovecot or nobody user to own the mail files')
            self.rootless = False
        else:
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()
            self.rootless = True

    def _chown(self, path):
        if os.geteuid() == 0:
            os.chown(path, self.mail_uid, self.mail_gid)

    def _write_files(self):
        # The mail processes run as mail_uid: tmpdir must be traversable.
        os.chmod(self.tmpdir, 0o755)
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        for sub in ('run', 'state', 'home'):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        os.chmod(os.path.join(self.dir, 'home'), 0o755)
        passwd = os.path.join(self.dir, 'passwd')
        with open(passwd, 'w', encoding='utf-8') as f:
            for u, p in self.users.items():
                # Dovecot's passwd-file looks names up with " and \ escaped by a
                # backslash (user names with them need `auth_username_chars =`).
                f.write('%s:{PLAIN}%s::::::\n' % (
                    u.replace('\\', '\\\\').replace('"', '\\"'), p))
        os.chmod(passwd, 0o644)  # test passwords only; read by the auth process
        for u in self.users:
            self._make_maildir(u)

        if self.rootless:
            me, mygroup = _name_of_uid(os.getuid()), _name_of_gid(os.getgid())
            identity = '''
default_login_user = {me}
default_internal_user = {me}
default_internal_group = {grp}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
  user = {me}
}}
service auth {{
  user = {me}
}}
service auth-worker {{
  user = {me}
}}
'''.format(me=me, grp=mygroup)
        else:
            identity = ''
        conf = '''# written by tests/integration/imapfixture.py
base_dir = {d}/run
state_dir = {d}/state
instance_name = imapfixture-{port}
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
debug_log_path = {d}/dovecot.log
listen = {addr}
protocols = imap
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = {afd} secs
first_valid_uid = {uid}
last_valid_uid = 0
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
shutdown_clients = yes
{identity}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {addr}
    port = {port}
  }}
  inet_listener imaps {{
    address = {addr}
    port = {imaps_port}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{extra}
'''.format(d=self.dir, port=self.port, uid=self.mail_uid, gid=self.mail_gid, addr=self.address,
           afd=self.auth_failure_delay, identity=identity, extra=self.extra_conf,
           imaps_port=self.imaps_port,
           ssl=('ssl = %s\nssl_cert = <%s\nssl_key = <%s' % (self.ssl, self.tls[0], self.tls[1])
                + ('\nssl_ca = <%s\nssl_verify_client_cert = yes\nssl_require_crl = no\n'
                   'auth_ssl_require_client_cert = yes' % self.tls_client_ca if self.tls_client_ca else '')
                if self.tls else 'ssl = no'))
        with open(self.conf, 'w') as f:
            f.write(conf)

    def _make_maildir(self, user):
        home = os.path.join(self.dir, 'home', user)
        md = os.path.join(home, 'Maildir')
        for p in (home, md, md + '/cur', md + '/new', md + '/tmp'):
            os.makedirs(p, exist_ok=True)
            os.chmod(p, 0o700)
            self._chown(p)
        now = int(time.time())
        for i in range(1, self.messages + 1):
            body = ('From: Sender <sender@example.org>\r\n'
                    'To: {u} <{u}@example.org>\r\n'
                    'Subject: Test message {i} for {u}\r\n'
                    'Date: Mon, 01 Jan 2024 00:00:{i:02d} +0000\r\n'
                    'Message-ID: <imapfixture-{i}-{u}@example.org>\r\n'
                    '\r\n'
                    'Hello {u}, this is message number {i}.\r\n').format(u=user, i=i % 60)
            body = body.encode('utf-8')  # S= is the size in bytes (UTF-8 user names)
            name = '%d.M%dP%d.imapfixture,S=%d:2,' % (now, i, os.getpid(), len(body))
            path = os.path.join(md, 'cur', name)
            with open(path, 'wb') as f:
                f.write(body)
            self._chown(path)

    # -- life cycle

    def start(self, timeout=15.0):
        if self.proc and self.proc.alive():
            return
        argv = [DOVECOT, '-F', '-c', self.conf]
        if self.netns:
            argv = self.netns.exec_argv(argv)
        self.proc = _Proc(argv, self.stderr_path, 'dovecot')

        def ready():
            if not self.proc.alive():
                raise FixtureError('dovecot exited (rc=%s):\n%s\n%s' % (
                    self.proc.reap(), self.proc.log(), self.log()))
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    s.settimeout(2)
                    return s.recv(512).startswith(b'* OK')
            except OSError:
                return False
        try:
            wait_until(ready, timeout, 0.05, 'dovecot on %s port %d' % (self.address, self.port))
        except FixtureError:
            self.stop()
            raise

    def stop(self):
        if self.proc:
            self.proc.stop(signal.SIGTERM, timeout=10.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- log inspection

    def log(self):
        return read_log(self.log_path)

    def settled_log(self, quiet=0.15, timeout=3.0):
        """The log once it has stopped growing for `quiet` seconds (the log process
        writes asynchronously: a client may see OK before the line is written)."""
        deadline = time.monotonic() + timeout
        prev = self.log()
        while True:
            time.sleep(quiet)
            cur = self.log()
            if cur == prev or time.monotonic() > deadline:
                return cur
            prev = cur

    def logins(self, user=None, settle=True):
        """Successful IMAP logins Dovecot logged (all users, or one)."""
        text = self.settled_log() if settle else self.log()
        return sum(1 for u in self.LOGIN_RE.findall(text) if user is None or u == user)

    def logouts(self, user=None, settle=True):
        """Ended IMAP sessions (Logged out / Disconnected) Dovecot logged."""
        text = self.settled_log() if settle else self.log()
        return sum(1 for u in self.LOGOUT_RE.findall(text) if user is None or u == user)

    def wait_logins(self, n, user=None, timeout=5.0):
        return wait_until(lambda: self.logins(user, settle=False) >= n, timeout,
                          what='%d dovecot logins of %s' % (n, user or 'anyone'))

    def wait_logouts(self, n, user=None, timeout=5.0):
        return wait_until(lambda: self.logouts(user, settle=False) >= n, timeout,
                          what='%d dovecot logouts of %s' % (n, user or 'anyone'))

    # -- doveadm

    def doveadm(self, *args, check=True):
        r = subprocess.run([DOVEADM, '-c', self.conf] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=child_env(), timeout=20)
        if check and r.returncode != 0:
            raise FixtureError('doveadm %s failed (rc=%d): %s' % (
                ' '.join(args), r.returncode, r.stderr.decode(errors='replace')))
        return r

    def kick(self, user):
        """Disconnect every IMAP connection of user (doveadm kick)."""
        r = self.doveadm('kick', user, check=False)
        # doveadm kick exits 68 (EX_NOUSER) when the user has no connection
        if r.returncode not in (0, 68):
            raise FixtureError('doveadm kick %s failed (rc=%d): %s' % (
                user, r.returncode, r.stderr.decode(errors='replace')))
        return r.stdout.decode(errors='replace')

    def pids(self, user):
        """Process ids of user's IMAP processes, per Dovecot's anvil (doveadm who -1)."""
        r = self.doveadm('who', '-1', user, check=False)
        if r.returncode not in (0, 68):
            raise FixtureError('doveadm who failed: %s' % r.stderr.decode(errors='replace'))
        lines = r.stdout.decode(errors='replace').splitlines()
        if not lines:
            return []
        col = lines[0].split().index('pid')
        return [int(f[col]) for f in (l.split() for l in lines[1:]) if f and f[0] == user]

    def connections(self, user):
        """Number of live IMAP connections of user, per Dovecot's anvil (doveadm who)."""
        r = self.doveadm('who', '-1', user, check=False)
        if r.returncode not in (0, 68):
            raise FixtureError('doveadm who failed: %s' % r.stderr.decode(errors='replace'))
        n = 0
        for line in r.stdout.decode(errors='replace').splitlines()[1:]:
            f = line.split()
            if f and f[0] == user:
                n += 1
        return n


# ------------------------------------------------------------------ imapproxy

class Proxy:
    """imapproxy-broker + systemd-socket-activate spawning imapproxy-session.

    conf keywords become config lines; defaults suit tests. inetd=True uses
    `--inetd` (client socket on fd 0/1), inetd=False passes LISTEN_FDS=1 fd 3.
    """

    def __init__(self, tmpdir, dovecot, inetd=True, start=True, port=None,
                 listen_address='127.0.0.1', fork_server=False, session_args=(),
                 wrap=(), broker_env=None, listener_env=None, **conf):
        if not os.path.isdir(tmpdir):
            raise FixtureError('no such directory: %s' % tmpdir)
        self.dir = os.path.join(os.path.abspath(tmpdir), 'proxy-%d' % free_port())
        os.makedirs(self.dir)
        self.dovecot = dovecot
        self.inetd = inetd
        # fork_server: one long-lived `imapproxy-session --fork-server` gets the
        # listening socket (Accept=no) and forks per connection.
        self.fork_server = fork_server
        self.session_args = list(session_args)
        # wrap: argv prefix for broker and listener (e.g. nsenter into a mount
        # namespace); *_env: extra environment (NOTIFY_SOCKET, JOURNAL_STREAM...)
        self.wrap = list(wrap)
        self.broker_env = dict(broker_env or {})
        self.listener_env = dict(listener_env or {})
        self.broker_socket = os.path.join(self.dir, 'broker.sock')
        self.conf_path = os.path.join(self.dir, 'imapproxy.conf')
        self.broker_log_path = os.path.join(self.dir, 'broker.log')
        self.listener_log_path = os.path.join(self.dir, 'listener.log')
        self.settings = {
            'server_hostname': dovecot.address if dovecot else '127.0.0.1',
            'server_port': dovecot.port if dovecot else 143,
            'cache_expiration_time': 300,
            'cache_size': 100,
            'broker_socket': self.broker_socket,
            'backend_timeout': 10,
            'client_prelogin_timeout': 30,
        }
        self.settings.update(conf)
        self.write_conf()
        self.broker = None
        self.killed_with = None
        self.listener = None
        self.port = None
        self.fixed_port = port
        self.listen_address = listen_address
        for b in (BROKER, SESSION):
            if not os.access(b, os.X_OK):
                raise FixtureError('binary missing: %s (run make)' % b)
        if start:
            self.start()

    def write_conf(self):
        with open(self.conf_path, 'w') as f:
            f.write('# written by tests/integration/imapfixture.py\n')
            for k, v in self.settings.items():
                if v is not None:
                    f.write('%s %s\n' % (k, v))

    def start(self):
        try:
            self.start_broker()
            self.start_listener()
        except BaseException:
            self.stop()
            raise

    # -- broker

    def broker_ready(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(1)
            s.connect(self.broker_socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def start_broker(self, timeout=10.0):
        if self.broker and self.broker.alive():
            raise FixtureError('broker already running')
        self.killed_with = None  # signal a test sent with kill_broker()
        self.broker = _Proc(self.wrap + [BROKER, '-f', self.conf_path], self.broker_log_path, 'broker',
                            env=self.broker_env)

        def ready():
            if not self.broker.alive():
                raise FixtureError('broker exited (rc=%s); log:\n%s' % (
                    self.broker.reap(), self.broker_log()))
            return self.broker_ready()
        wait_until(ready, timeout, 0.02, 'broker socket %s' % self.broker_socket)

    def kill_broker(self, sig=signal.SIGKILL, timeout=5.0):
        """Send sig to the broker (only the broker) and wait for it to exit; returns rc."""
        if not self.broker:
            return None
        self.killed_with = sig
        self.broker.send_signal(sig)
        if not self.broker.wait_exit(timeout):
            self.broker.reap()
            raise FixtureError('broker did not exit within %.0fs after signal %d' % (timeout, sig))
        rc = self.broker.reap()  # leftovers of its group are SIGKILLed, the log is closed
        return rc

    def broker_log(self):
        return read_log(self.broker_log_path)

    # -- listener

    def start_listener(self, timeout=10.0, attempts=5):
        """systemd-socket-activate on a free port (retrying if the port got taken),
        or on the fixed port given to the constructor."""
        if self.fixed_port:
            attempts = 1
        for _ in range(attempts):
            port = self.fixed_port or free_port()
            addr = self.listen_address
            argv = self.wrap + [SOCKET_ACTIVATE, '-l', '%s:%d' % ('[%s]' % addr if ':' in addr else addr, port)]
            # systemd-socket-activate passes its children only what -E names
            for k in sorted(self.listener_env):
                argv += ['-E', k]
            if self.fork_server:
                argv += [os.path.abspath(SESSION), '--fork-server'] + self.session_args
            else:
                argv.append('-a')
                if self.inetd:
                    argv.append('--inetd')
                argv += [os.path.abspath(SESSION)] + self.session_args
            argv += ['-f', self.conf_path]
            self.listener = _Proc(argv, self.listener_log_path, 'listener', env=self.listener_env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                # systemd-socket-activate logs "Listening on ADDR as 3." once it listens.
                if (tcp_listening(port, addr) if ':' not in addr else
                        'Listening on ' in self.listener_log()):
                    self.port = port
                    return
                if not self.listener.alive():
                    break
                time.sleep(0.02)
            self.listener.stop()
        raise FixtureError('systemd-socket-activate did not listen; log:\n%s' % self.listener_log())

    def listener_log(self):
        """stderr of systemd-socket-activate and of every session it spawned."""
        return read_log(self.listener_log_path)

    def crash_report(self):
        """Lines in the broker/session logs that look like crashes or sanitizer reports."""
        bad = []
        for name, text in (('broker', self.broker_log()), ('session', self.listener_log())):
            for line in text.splitlines():
                if any(m in line for m in CRASH_MARKERS) or re.search(
                        r'(?i)(killed by signal|exited with signal|terminated by signal|'
                        r'dumped core|signal (SEGV|ABRT|BUS|ILL|FPE))', line) or re.search(
                        # systemd-socket-activate logs si_status, which is the signal
                        # number for a killed child (the session exits 0, 1 or 2).
                        r'Child \d+ died with code (4|6|7|8|11|31)$', line):
                    bad.append('%s: %s' % (name, line))
        return bad

    def stop(self):
        rcs = {}
        if self.listener:
            rcs['listener'] = self.listener.stop(signal.SIGTERM, 5.0)
        if self.broker:
            rcs['broker'] = self.broker.stop(signal.SIGTERM, 10.0)
        return rcs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------ IMAP clients

def imap_login(port, user, password, timeout=10.0):
    """imaplib client logged in as user; raises imaplib.IMAP4.error on NO."""
    m = imaplib.IMAP4('127.0.0.1', port, timeout=timeout)
    try:
        m.login(user, password)
    except BaseException:
        try:
            m.shutdown()
        except OSError:
            pass
        raise
    return m


class RawClient:
    """Byte-level IMAP client. Every read has a timeout; nothing can hang."""

    def __init__(self, port, host='127.0.0.1', timeout=5.0, greeting=True, source=None):
        self.timeout = timeout
        # source: local address to connect from (e.g. '127.0.0.2'), any port
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b''
        self.eof = False
        self.transcript = []  # ('C'|'S', bytes)
        self.greeting = self.readline() if greeting else None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(('C', data))
        self.sock.sendall(data)

    def _fill(self, timeout):
        """Read once more into buf. Returns False on EOF/reset."""
        if self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b''
        if not chunk:
            self.eof = True
            return False
        self.transcript.append(('S', chunk))
        self.buf += chunk
        return True

    def readline(self, timeout=None):
        """One CRLF-terminated line (bytes, with CRLF). Raises on timeout/EOF."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while b'\r\n' not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout('no complete line within %.1fs; have %r' % (timeout, self.buf))
            if not self._fill(left):
                raise EOFError('connection closed; partial data %r' % self.buf)
        line, self.buf = self.buf.split(b'\r\n', 1)
        return line + b'\r\n'

    def command(self, tag, text, timeout=None):
        """Send 'tag text' and read until the tagged response.
        Returns (untagged_lines, tagged_line) as bytes lines with CRLF."""
        self.send('%s %s\r\n' % (tag, text))
        return self.read_tagged(tag, timeout)

    def read_tagged(self, tag, timeout=None):
        if isinstance(tag, str):
            tag = tag.encode()
        untagged = []
        while True:
            line = self.readline(timeout)
            if line.startswith(tag + b' '):
                return untagged, line
            untagged.append(line)

    def read_until_close(self, timeout=None):
        """Everything until the peer closes (bytes). Raises socket.timeout if it does not."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout('peer did not close within %.1fs; got %r' % (timeout, self.buf))
            if not self._fill(left):
                data, self.buf = self.buf, b''
                return data

    def read_available(self, wait=0.3):
        """Whatever arrives within `wait` seconds (bytes; may be empty)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if not self._fill(left):
                    break
            except socket.timeout:
                break
        data, self.buf = self.buf, b''
        return data

    def login(self, user, password, tag='L1'):
        return self.command(tag, 'LOGIN %s %s' % (quote(user), quote(password)))

    def dump(self):
        """Transcript for failure messages."""
        out = []
        for who, data in self.transcript:
            for line in data.split(b'\r\n'):
                if line:
                    out.append('%s: %r' % (who, line[:300]))
        return '\n'.join(out[-60:])


def quote(s):
    return '"%s"' % s.replace('\\', '\\\\').replace('"', '\\"')


# ------------------------------------------------------------------ processes, fds, sockets

def proc_fds(pid):
    """{fd: target} of a live process ('socket:[123]', '/dev/null', ...)."""
    out = {}
    d = '/proc/%d/fd' % pid
    for name in os.listdir(d):
        try:
            out[int(name)] = os.readlink(os.path.join(d, name))
        except OSError:
            pass  # closed meanwhile
    return out


def children_of(ppid):
    """Pids whose parent is ppid."""
    kids = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the fields follow the last ')'
        fields = stat[stat.rfind(')') + 2:].split()
        if len(fields) > 1 and int(fields[1]) == ppid:
            kids.append(int(name))
    return kids


TCP_STATES = {'01': 'ESTABLISHED', '02': 'SYN_SENT', '03': 'SYN_RECV', '04': 'FIN_WAIT1',
              '05': 'FIN_WAIT2', '06': 'TIME_WAIT', '07': 'CLOSE', '08': 'CLOSE_WAIT',
              '09': 'LAST_ACK', '0A': 'LISTEN', '0B': 'CLOSING'}


def _hexaddr(h):
    ip, port = h.split(':')
    if len(ip) == 8:
        addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(ip)[::-1])
    else:
        raw = bytes.fromhex(ip)
        addr = socket.inet_ntop(socket.AF_INET6, b''.join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return addr, int(port, 16)


def tcp_sockets():
    """{inode: (local (addr, port), remote (addr, port), state)} of this network namespace."""
    out = {}
    for path in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if len(p) > 9 and p[9] != '0':
                        out[int(p[9])] = (_hexaddr(p[1]), _hexaddr(p[2]), TCP_STATES.get(p[3], p[3]))
        except OSError:
            pass
    return out


def socket_fds(pid):
    """{fd: inode} of the sockets a process holds."""
    out = {}
    for fd, target in proc_fds(pid).items():
        m = re.match(r'socket:\[(\d+)\]$', target)
        if m:
            out[fd] = int(m.group(1))
    return out


def tcp_fds(pid, remote_port=None):
    """[(fd, local, remote, state)] of the TCP sockets a process holds, optionally only
    those whose peer port is remote_port."""
    tcp = tcp_sockets()
    out = []
    for fd, ino in sorted(socket_fds(pid).items()):
        if ino in tcp:
            local, remote, state = tcp[ino]
            if remote_port is None or remote[1] == remote_port:
                out.append((fd, local, remote, state))
    return out


def fd_report(pid, backend_port):
    """What a broker or session holds: total fds, its backend connections (by state) and
    the rest. Used to prove that nothing leaks over repeated fault cycles."""
    fds = proc_fds(pid)
    backend = tcp_fds(pid, backend_port)
    return {'total': len(fds), 'backend': [b[3] for b in backend],
            'other': len(fds) - len(backend), 'fds': fds}


def session_pid_for(listener, sock, timeout=5.0):
    """Pid of the session (a child of listener) serving the client socket sock."""
    lport = sock.getsockname()[1]

    def find():
        tcp = tcp_sockets()
        for kid in children_of(listener.pid):
            try:
                for ino in socket_fds(kid).values():
                    t = tcp.get(ino)
                    if t and t[1][1] == lport and t[0][1] == sock.getpeername()[1]:
                        return kid
            except OSError:
                continue
        return None
    return wait_until(find, timeout, 0.02, 'the session of client port %d' % lport)


def proc_cpu_seconds(pid):
    """User + system CPU time a process has used so far."""
    with open('/proc/%d/stat' % pid) as f:
        stat = f.read()
    fields = stat[stat.rfind(')') + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def read_memory(pid, max_region=1 << 30):
    """Every readable private/anonymous mapping of pid (skipping huge reserved
    regions such as ASan's shadow), as one list of (name, bytes)."""
    out = []
    with open('/proc/%d/maps' % pid) as maps, open('/proc/%d/mem' % pid, 'rb', 0) as mem:
        for line in maps:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split('-'))
            perms = parts[1]
            name = parts[5] if len(parts) > 5 else '[anon]'
            if 'r' not in perms or hi - lo > max_region or name in ('[vvar]', '[vsyscall]'):
                continue
            try:
                mem.seek(lo)
                out.append((name, mem.read(hi - lo)))
            except (OSError, ValueError, OverflowError):
                continue  # unreadable (guard pages, PROT_NONE parts)
    return out


def proc_fd_count(pid):
    """Number of open descriptors of a process."""
    return len(os.listdir('/proc/%d/fd' % pid))


def proc_rss_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ network namespace

IP = shutil.which('ip') or '/usr/sbin/ip'
IPTABLES = shutil.which('iptables') or '/usr/sbin/iptables'
_live_ns = []
_ns_counter = [0]


def netns_available():
    """None when NetNS can work here, else why not."""
    if os.geteuid() != 0:
        return 'needs root'
    for tool in (IP, IPTABLES):
        if not os.access(tool, os.X_OK):
            return '%s is not installed' % tool
    return None


def _run(argv, check=True):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20,
                       env=child_env())
    if check and r.returncode != 0:
        raise FixtureError('%s failed (rc=%d): %s' % (' '.join(argv), r.returncode,
                                                        r.stderr.decode(errors='replace').strip()))
    return r


class NetNS:
    """A private network namespace joined to ours by a veth pair: our side is `outer`,
    the namespace side `inner`, a /30 of 10.0.0.0/8 that no route of ours overlaps.

    cut(port, 'drop') silently drops TCP to and from port inside the namespace
    (the peer sees ETIMEDOUT after TCP_USER_TIMEOUT); cut(port, 'reset') answers
    every packet to port with a TCP RST (ECONNRESET); heal() removes the rules.
    close() (also at exit) deletes the namespace, which takes the veth pair with it.
    Names carry our pid: namespaces left by a dead test run are removed on creation.
    """

    PREFIX = 'imapfx-'

    def __init__(self):
        why = netns_available()
        if why:
            raise FixtureError('network namespace: %s' % why)
        self._reap_stale()
        _ns_counter[0] += 1
        n = _ns_counter[0]
        self.name = '%s%d-%d' % (self.PREFIX, os.getpid(), n)
        self.veth = 'ifx%d%c%d' % (os.getpid(), 'o', n)      # ours (<= 15 chars)
        self.veth_in = 'ifx%d%c%d' % (os.getpid(), 'i', n)   # moved into the namespace
        self.outer, self.inner = self._pick_subnet()
        self.closed = False
        _live_ns.append(self)
        try:
            _run([IP, 'netns', 'add', self.name])
            _run([IP, 'link', 'add', self.veth, 'type', 'veth', 'peer', 'name', self.veth_in])
            _run([IP, 'link', 'set', self.veth_in, 'netns', self.name])
            _run([IP, 'addr', 'add', self.outer + '/30', 'dev', self.veth])
            _run([IP, 'link', 'set', self.veth, 'up'])
            _run([IP, '-n', self.name, 'addr', 'add', self.inner + '/30', 'dev', self.veth_in])
            _run([IP, '-n', self.name, 'link', 'set', self.veth_in, 'up'])
            _run([IP, '-n', self.name, 'link', 'set', 'lo', 'up'])
        except BaseException:
            self.close()
            raise

    @classmethod
    def _reap_stale(cls):
        r = _run([IP, 'netns', 'list'], check=False)
        for line in r.stdout.decode(errors='replace').splitlines():
            m = re.match(r'(%s(\d+)-\d+)' % re.escape(cls.PREFIX), line)
            if m and int(m.group(2)) != os.getpid() and not os.path.exists('/proc/%s' % m.group(2)):
                _run([IP, 'netns', 'del', m.group(1)], check=False)

    @staticmethod
    def _pick_subnet():
        import ipaddress
        import random
        used = []
        for args in (['-4', 'route', 'show', 'table', 'all'], ['-4', 'addr', 'show']):
            text = _run([IP] + args, check=False).stdout.decode(errors='replace')
            for m in re.finditer(r'(\d+\.\d+\.\d+\.\d+(?:/\d+)?)', text):
                try:
                    used.append(ipaddress.ip_network(m.group(1), strict=False))
                except ValueError:
                    pass
        rnd = random.Random()
        for _ in range(200):
            net = ipaddress.ip_network('10.%d.%d.%d/30' % (rnd.randrange(100, 250), rnd.randrange(256),
                                                           4 * rnd.randrange(64)))
            if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
                hosts = list(net.hosts())
                return str(hosts[0]), str(hosts[1])
        raise FixtureError('no free private /30 for a veth pair')

    def exec_argv(self, argv):
        return [IP, 'netns', 'exec', self.name] + list(argv)

    def iptables(self, *args):
        return _run(self.exec_argv([IPTABLES, '-w', '5'] + list(args)))

    def cut(self, port, mode):
        """Cut TCP port inside the namespace: mode 'drop' or 'reset'."""
        if mode == 'drop':
            self.iptables('-I', 'INPUT', '-p', 'tcp', '--dport', str(port), '-j', 'DROP')
            self.iptables('-I', 'OUTPUT', '-p', 'tcp', '--sport', str(port), '-j', 'DROP')
        elif mode == 'reset':
            self.iptables('-I', 'INPUT', '-p', 'tcp', '--dport', str(port), '-j', 'REJECT',
                          '--reject-with', 'tcp-reset')
            # Whatever the server still sends must not reach the peer (or it could
            # answer a keepalive probe before the peer writes).
            self.iptables('-I', 'OUTPUT', '-p', 'tcp', '--sport', str(port), '--tcp-flags', 'RST', 'NONE',
                          '-j', 'DROP')
        else:
            raise ValueError(mode)

    def heal(self):
        self.iptables('-F', 'INPUT')
        self.iptables('-F', 'OUTPUT')

    def rules(self):
        return self.iptables('-S').stdout.decode(errors='replace')

    def close(self):
        if self.closed:
            return
        self.closed = True
        _run([IP, 'netns', 'del', self.name], check=False)
        _run([IP, 'link', 'del', self.veth], check=False)  # normally gone with the namespace
        if self in _live_ns:
            _live_ns.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------ certificates

def certtool(*args):
    """Run certtool (gnutls-bin); FixtureError with its output if it fails."""
    r = subprocess.run([CERTTOOL] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=60)
    if r.returncode != 0:
        raise FixtureError('certtool %s: %s' % (' '.join(args), r.stdout.decode(errors='replace')))


def make_ca(directory, name, cn=None):
    """A test CA (ECDSA, self-signed, valid 2 days) as directory/NAME.pem and
    NAME.key; returns (pem, key)."""
    key, pem, tmpl = (os.path.join(directory, name + ext) for ext in ('.key', '.pem', '.tmpl'))
    with open(tmpl, 'w') as f:
        f.write('cn = "%s"\nca\ncert_signing_key\nexpiration_days = 2\n' % (cn or name))
    certtool('--generate-privkey', '--key-type=ecdsa', '--outfile', key)
    certtool('--generate-self-signed', '--load-privkey', key, '--template', tmpl, '--outfile', pem)
    return pem, key


def make_cert(directory, name, ca_pem, ca_key, template):
    """A certificate (ECDSA key) signed by the CA ca_pem/ca_key, made from a
    certtool template text, as directory/NAME.pem and NAME.key; returns (pem, key)."""
    key, pem, tmpl = (os.path.join(directory, name + ext) for ext in ('.key', '.pem', '.tmpl'))
    with open(tmpl, 'w') as f:
        f.write(template)
    certtool('--generate-privkey', '--key-type=ecdsa', '--outfile', key)
    certtool('--generate-certificate', '--load-privkey', key, '--load-ca-certificate', ca_pem,
             '--load-ca-privkey', ca_key, '--template', tmpl, '--outfile', pem)
    return pem, key


# ------------------------------------------------------------------ scripted fake backend

class FakeConn:
    """One accepted connection of a FakeBackend, handed to a behaviour function."""

    def __init__(self, server, sock, n):
        self.server = server
        self.sock = sock
        self.n = n
        self.buf = b''
        self.received = b''
        self.sent = 0
        self.accepted_at = time.monotonic()
        self.closed_by_peer_at = None
        self.log = []

    def send(self, data):
        self.sock.sendall(data)
        self.sent += len(data)

    def readline(self, timeout=10.0):
        """One line from the peer (bytes with CRLF), or None on EOF/timeout."""
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.server.stopping:
                return None
            chunk = self._recv(min(left, 0.2))
            if chunk is None:
                continue
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return line + b'\n'

    def _recv(self, timeout):
        """Bytes read (also kept in received), b'' when the peer closed, None on timeout."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return None
        except OSError:
            chunk = b''
        if not chunk:
            self.closed_by_peer_at = time.monotonic()
        self.received += chunk
        return chunk

    def wait_closed(self, timeout=60.0):
        """Read and discard until the peer closes; True if it did within timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.server.stopping:
            if self._recv(0.2) == b'':
                return True
        return False

    def forward(self, port, host='127.0.0.1', swallow_greeting=False):
        """Relay both ways to a real server until either side closes."""
        up = socket.create_connection((host, port), timeout=10)
        try:
            if swallow_greeting:
                g = b''
                while b'\n' not in g:
                    c = up.recv(4096)
                    if not c:
                        return
                    g += c
                rest = g.split(b'\n', 1)[1]
                if rest:
                    self.send(rest)
            if self.buf:
                up.sendall(self.buf)
                self.buf = b''
            import selectors
            sel = selectors.DefaultSelector()
            sel.register(self.sock, selectors.EVENT_READ, up)
            sel.register(up, selectors.EVENT_READ, self.sock)
            self.sock.setblocking(True)
            up.setblocking(True)
            while not self.server.stopping:
                for key, _ in sel.select(0.2):
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b''
                    if not data:
                        if key.fileobj is self.sock:
                            self.closed_by_peer_at = time.monotonic()
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            up.close()


class FakeBackend:
    """A scripted IMAP server on a free loopback port, one thread per connection.

    Each accepted connection runs the next function of `plan` (a list, consumed
    in accept order), or `default` when the plan is empty: behaviour(conn) with a
    FakeConn. `conns` keeps every FakeConn for assertions (what the peer sent, when
    it closed). The behaviour's return closes the connection.
    """

    def __init__(self, default):
        self.default = default
        self.plan = []
        self.conns = []
        self.stopping = False
        self.lock = threading.Lock()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(('127.0.0.1', 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.threads = []
        self.errors = []
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    def push(self, *behaviours):
        with self.lock:
            self.plan.extend(behaviours)

    def _accept_loop(self):
        while not self.stopping:
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                fn = self.plan.pop(0) if self.plan else self.default
                c = FakeConn(self, s, len(self.conns))
                self.conns.append(c)
            t = threading.Thread(target=self._serve, args=(c, fn), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c, fn):
        try:
            fn(c)
        except (OSError, EOFError):
            pass  # the peer went away: that is what most faults provoke
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append('connection %d: %r' % (c.n, e))
        finally:
            try:
                c.sock.close()
            except OSError:
                pass

    def wait_conns(self, n, timeout=5.0):
        return wait_until(lambda: len(self.conns) >= n, timeout, what='%d connections to the fake backend' % n)

    def stop(self):
        self.stopping = True
        try:
            self.lsock.close()
        except OSError:
            pass
        for t in self.threads + [self.acceptor]:
            t.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------ self-check

def _selftest():
    """python3 imapfixture.py: start a Dovecot, exercise it, stop it."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix='imapfixture-') as tmp:
        with Dovecot(tmp, users={'alice': 'pw', 'bob': 'pw2'}, messages=3) as dc:
            print('dovecot on port', dc.port)
            m = imap_login(dc.port, 'alice', 'pw')
            typ, data = m.select('INBOX')
            print('select', typ, data)
            print('fetch', m.fetch('1:*', '(FLAGS)'))
            print('connections(alice) =', dc.connections('alice'))
            m.logout()
            print('logins(alice) =', dc.logins('alice'), 'logouts(alice) =', dc.logouts('alice'))
    return 0


if __name__ == '__main__':
    sys.exit(_selftest())
