#!/usr/bin/env python3
"""Launcher integration tests: imapproxy-session started by each real launcher
it supports, in front of the broker and a private Dovecot.  Run through
tests/integration/run.py.

  - systemd-socket-activate -a (systemd Accept=yes without StandardInput=socket):
    LISTEN_FDS=1/LISTEN_PID, the client connection on fd 3, fd 0 /dev/null;
    REMOTE_ADDR (-E) becomes x-originating-ip with forward_client_id;
  - systemd-socket-activate -a --inetd: the client connection on fd 0/1;
  - xinetd: the client socket on fd 0, 1 *and 2*; the session must write no log
    text to the client (debug logging on, broker unreachable) -- every byte the
    client receives is IMAP; the shipped units/xinetd/imapproxy stanza is
    accepted by xinetd and serves logins.

Every launch drives a real double login: the second login shows
`* OK [XPROXYREUSE]` and Dovecot logs exactly one backend login.
"""

import os
import pwd
import grp
import re
import shutil
import socket
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imapfixture import (REPO, SESSION, Proxy, _Proc, free_port, quote, read_log,  # noqa: E402
                         socket_activate, tail, tcp_listening, wait_until, FixtureError)
from fixturecase import FixtureCase  # noqa: E402

XINETD = shutil.which('xinetd') or '/usr/sbin/xinetd'
SHIPPED_STANZA = os.path.join(REPO, 'units', 'xinetd', 'imapproxy')
MESSAGES = 3
FAKE_CLIENT = '198.51.100.7'

DOVECOT_EXTRA = '''
login_trusted_networks = 127.0.0.0/8
imap_id_log = *
'''


# ------------------------------------------------------------------ /proc helpers

def children(pid):
    """Direct children of pid (all threads)."""
    out = []
    try:
        tasks = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return out
    for t in tasks:
        try:
            with open('/proc/%d/task/%s/children' % (pid, t)) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def session_children(pid):
    """Children of a launcher that run imapproxy-session."""
    want = os.path.realpath(SESSION)
    found = []
    for c in children(pid):
        try:
            if os.path.realpath(os.readlink('/proc/%d/exe' % c)) == want:
                found.append(c)
        except OSError:
            pass
    return found


def fd_target(pid, fd):
    try:
        return os.readlink('/proc/%d/fd/%d' % (pid, fd))
    except OSError:
        return None


def initial_environ(pid):
    """The environment pid was exec'd with (/proc/PID/environ shows the original
    block even after unsetenv())."""
    with open('/proc/%d/environ' % pid, 'rb') as f:
        items = f.read().split(b'\0')
    env = {}
    for it in items:
        if b'=' in it:
            k, v = it.split(b'=', 1)
            env[k.decode(errors='replace')] = v.decode(errors='replace')
    return env


def tcp_socket_inode(local_port, remote_port):
    """Inode of the 127.0.0.1:local_port <-> :remote_port TCP socket (server side)."""
    with open('/proc/net/tcp') as f:
        next(f)
        for line in f:
            p = line.split()
            if int(p[1].split(':')[1], 16) == local_port and int(p[2].split(':')[1], 16) == remote_port:
                return p[9]
    return None


# ------------------------------------------------------------------ IMAP byte checker

def imap_violations(data, tags):
    """Lines of data (server->client bytes) that are not IMAP responses: each line
    must start with '* ', '+ ' or one of the client's tags and a space; literals
    ({N}) are skipped; the stream must end with CRLF. Returns a list of problems."""
    bad = []
    tags = [t.encode() if isinstance(t, str) else t for t in tags]
    pos = 0
    while pos < len(data):
        start = pos
        first = True
        while True:  # one response, possibly with literals
            eol = data.find(b'\r\n', pos)
            if eol < 0:
                bad.append('unterminated trailing data: %r' % data[pos:pos + 200])
                return bad
            line = data[pos:eol]
            if first:
                ok = line.startswith((b'* ', b'+ ')) or line == b'+' or any(
                    line.startswith(t + b' ') for t in tags)
                if not ok:
                    bad.append('not an IMAP response line: %r' % line[:200])
                first = False
            pos = eol + 2
            m = re.search(rb'\{(\d+)\+?\}$', line)
            if not m:
                break
            pos += int(m.group(1))
        if pos == start:
            break
    return bad


# ------------------------------------------------------------------ base

class LauncherTest(FixtureCase):
    """Fresh Dovecot per test; the tests start the broker and their launchers.
    fixturecase.FixtureCase stops everything (the launchers in self.procs) and
    checks the logs: the proxy's, and those in self.logs."""

    TMP_PREFIX = 'imapproxy-lt-'
    MESSAGES = MESSAGES
    DOVECOT_EXTRA = DOVECOT_EXTRA

    def setUp(self):
        super().setUp()
        self.logs = []     # (name, path) of the launchers' own logs

    def crash_lines(self):
        crashes = super().crash_lines()
        for name, path in self.logs:
            for line in read_log(path).splitlines():
                if re.search(r'AddressSanitizer|LeakSanitizer|runtime error:|'
                             r'Segmentation fault|core dumped', line):
                    crashes.append('%s: %s' % (name, line))
        return crashes

    def diagnostics(self):
        out = [super().diagnostics()]
        for name, path in self.logs:
            out.append('%s (%s):\n%s' % (name, path, tail(read_log(path))))
        return '\n'.join(out)

    # -- helpers

    def broker_only(self, **conf):
        """Broker (no listener of the fixture's) for the launchers started here."""
        self.px = Proxy(self.tmp, self.dc, start=False, **conf)
        self.px.start_broker()
        return self.px

    def start_socket_activate(self, extra_args=(), inetd=False, env=None, attempts=5):
        """systemd-socket-activate -a [--inetd] [extra_args] imapproxy-session, as the
        fixture's listener (so px.stop() and crash_report() cover it)."""
        px = self.px
        args = list(extra_args) + (['--inetd'] if inetd else []) + [
            os.path.abspath(SESSION), '-f', px.conf_path]
        px.port, px.listener = socket_activate(args, px.listener_log_path, 'listener', env=env,
                                               attempts=attempts)
        return px.port

    def double_login(self, port, user='alice', during_first=None):
        """Login, SELECT/FETCH, LOGOUT twice: one backend login, the second reused.
        during_first(m) runs while the first session is logged in."""
        base = self.dc.logins(user)
        m = self.imap(user, port=port)
        caps = [c.upper() for c in m.capabilities]
        self.assertIn('XIMAPPROXY', caps, 'greeting capabilities: not the proxy?')
        self.assertReused(m, False, 'first login')
        if during_first:
            during_first(m)
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins(user), base + 1, 'dovecot logins after the first session')
        m = self.imap(user, port=port)
        self.assertReused(m, True, 'second login')
        self.select_fetch(m)
        self.logout(m)
        self.assertEqual(self.dc.logins(user), base + 1, 'dovecot logins after two sessions')
        self.assertEqual(self.dc.connections(user), 1, 'doveadm who: the pooled connection')

    def one_session_child(self, launcher_pid):
        return wait_until(lambda: session_children(launcher_pid), 3.0,
                          what='an imapproxy-session child of pid %d' % launcher_pid)[0]

    # -- xinetd

    def xinetd_names(self):
        if os.geteuid() == 0:
            return 'root', 'root'
        return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name

    def shipped_stanza(self, path, server, port):
        """The shipped xinetd stanza at path with port, bind, user, group, server and
        server_args set for this test (each must be set exactly once there)."""
        user, group = self.xinetd_names()
        with open(path) as f:
            text = f.read()
        subst = {'port': str(port), 'bind': '127.0.0.1', 'user': user, 'group': group,
                 'server': os.path.abspath(server), 'server_args': '-f ' + self.px.conf_path}
        for key, value in subst.items():
            text, n = re.subn(r'(?m)^(\s*%s\s*=\s*).*$' % key, lambda m: m.group(1) + value, text)
            self.assertEqual(n, 1, 'the shipped stanza should set %s once' % key)
        return text

    def start_xinetd(self, services, name='xinetd', ports=()):
        """xinetd -dontfork with a private config: a defaults section (service log to
        a file) and the given service stanzas. Returns (proc, own log path)."""
        d = os.path.join(self.tmp, name)
        os.makedirs(d)
        conf, own_log = os.path.join(d, 'xinetd.conf'), os.path.join(d, 'xinetd-own.log')
        svc_log = os.path.join(d, 'xinetd.log')
        with open(conf, 'w') as f:
            f.write('defaults\n{\n\tlog_type = FILE %s\n\tlog_on_success = PID HOST EXIT\n'
                    '\tlog_on_failure = HOST\n}\n\n' % svc_log)
            f.write(services)
        self.logs += [('%s own log' % name, own_log), ('%s service log' % name, svc_log),
                      ('%s stderr' % name, os.path.join(d, 'stderr'))]
        p = _Proc([XINETD, '-dontfork', '-stayalive', '-filelog', own_log,
                   '-pidfile', os.path.join(d, 'pid'), '-f', conf],
                  os.path.join(d, 'stderr'), name)
        self.procs.append(p)

        def started():
            if not p.alive():
                raise FixtureError('xinetd exited:\n%s\n%s' % (read_log(own_log), p.log()))
            return 'Started working' in read_log(own_log)
        wait_until(started, 10.0, what='xinetd to start (%s)' % own_log)
        try:  # xinetd binds before it says so: a port not listening by now never will
            wait_until(lambda: all(tcp_listening(x) for x in ports), 2.0)
        except FixtureError:
            raise FixtureError('xinetd does not listen on %s; its log:\n%s' % (ports, read_log(own_log))) from None
        return p, own_log

    def xinetd_service(self, name, port, server_args, env=None):
        user, group = self.xinetd_names()
        s = ('service %s\n{\n\ttype = UNLISTED\n\tsocket_type = stream\n\tprotocol = tcp\n'
             '\tport = %d\n\tbind = 127.0.0.1\n\twait = no\n\tuser = %s\n\tgroup = %s\n'
             '\tserver = %s\n\tserver_args = %s\n\tcps = 1000 1\n\tinstances = 100\n'
             '\tdisable = no\n' % (name, port, user, group, os.path.abspath(SESSION), server_args))
        if env:
            s += '\tenv = %s\n' % env
        return s + '}\n\n'


# ------------------------------------------------------------------ tests

class Launchers(LauncherTest):

    # 1. systemd Accept=yes without StandardInput=socket -------------------
    def test_l1_socket_activate_fd3(self):
        """systemd-socket-activate -a without --inetd: the session serves the client
        on fd 3 (LISTEN_FDS=1, LISTEN_PID=its pid; fd 0 is /dev/null)."""
        self.broker_only()
        port = self.start_socket_activate()

        def check_fds(m):
            pid = self.one_session_child(self.px.listener.pid)
            env = initial_environ(pid)
            self.assertEqual(env.get('LISTEN_FDS'), '1', 'launcher environment')
            self.assertEqual(env.get('LISTEN_PID'), str(pid), 'launcher environment')
            self.assertEqual(fd_target(pid, 0), '/dev/null', 'fd 0 of the session')
            client_port = m.sock.getsockname()[1]
            inode = tcp_socket_inode(port, client_port)
            self.assertIsNotNone(inode, 'the accepted TCP connection in /proc/net/tcp')
            self.assertEqual(fd_target(pid, 3), 'socket:[%s]' % inode,
                             'fd 3 of the session must be the client connection')
        self.double_login(port, during_first=check_fds)
        self.double_login(port, user='bob')

    def test_l2_socket_activate_fd3_remote_addr(self):
        """REMOTE_ADDR (as systemd sets it for Accept=yes) is the client address the
        broker forwards with forward_client_id (x-originating-ip; Dovecot trusts
        127.0.0.0/8 and logs it as rip=); no port is invented for it."""
        self.broker_only(forward_client_id='yes')
        port = self.start_socket_activate(['-E', 'REMOTE_ADDR=' + FAKE_CLIENT])
        ports = []
        self.double_login(port, during_first=lambda m: ports.append(m.sock.getsockname()[1]))
        log = self.dc.settled_log()
        ids = [ln for ln in log.splitlines() if 'ID sent:' in ln]
        self.assertEqual(len(ids), 1, 'one ID per new backend connection:\n%s' % '\n'.join(ids))
        line = ids[0]
        for want in ('x-originating-ip=%s' % FAKE_CLIENT, 'x-connected-ip=127.0.0.1',
                     'x-connected-port=%d' % port):
            self.assertRegex(line, r'[:,] %s(,|:|$)' % re.escape(want), 'ID sent to the backend')
        self.assertNotIn('x-originating-port=%d' % ports[0], line,
                         'the real peer port must not be paired with REMOTE_ADDR')
        self.assertRegex(log, r'Login: user=<alice>, [^\n]*rip=%s,' % re.escape(FAKE_CLIENT),
                         'Dovecot should see REMOTE_ADDR as the client address')

    # 2. systemd-socket-activate --inetd ------------------------------------
    def test_l3_socket_activate_inetd(self):
        """systemd-socket-activate -a --inetd: the client connection on fd 0 and 1."""
        self.broker_only()
        port = self.start_socket_activate(inetd=True)

        def check_fds(m):
            pid = self.one_session_child(self.px.listener.pid)
            inode = tcp_socket_inode(port, m.sock.getsockname()[1])
            self.assertIsNotNone(inode)
            for fd in (0, 1):
                self.assertEqual(fd_target(pid, fd), 'socket:[%s]' % inode, 'fd %d' % fd)
            self.assertNotIn('LISTEN_FDS', initial_environ(pid))
        self.double_login(port, during_first=check_fds)

    # 3. xinetd ----------------------------------------------------------------
    def test_l4_xinetd_double_login(self):
        """Real xinetd (private config, nowait stream service): double login."""
        self.broker_only()
        port = free_port()
        xi, own = self.start_xinetd(
            self.xinetd_service('imapproxy-it', port, '-f ' + self.px.conf_path), ports=[port])
        self.double_login(port)
        self.double_login(port, user='bob')
        self.assertNotRegex(read_log(own), r'(?m)ERROR|FAIL', 'xinetd own log')

    def test_l5_xinetd_no_log_text_to_client(self):
        """Under xinetd fd 2 is the client socket: with debug logging on and (second
        service) the broker unreachable, every byte the client receives is IMAP.
        Control: the same session with stderr on a pipe does log those lines."""
        self.broker_only(login_failure_delay=0)
        nobroker = os.path.join(self.tmp, 'no-broker.sock')
        p_ok, p_nb = free_port(), free_port()
        while p_nb == p_ok:
            p_nb = free_port()
        env = 'IMAPPROXY_LOG_LEVEL=debug'
        self.start_xinetd(
            self.xinetd_service('imapproxy-it', p_ok, '-f ' + self.px.conf_path, env) +
            self.xinetd_service('imapproxy-it-nobroker', p_nb,
                                '-f %s -s %s' % (self.px.conf_path, nobroker), env),
            ports=[p_ok, p_nb])
        xinetd_pid = self.procs[-1].pid

        # Control: debug lines and the broker warning do get logged on a stderr pipe.
        for sock_path, want in ((self.px.broker_socket, r'debug: relay alice'),
                                (nobroker, r'warning: cannot reach the broker')):
            a, b = socket.socketpair()
            try:
                pr = subprocess.Popen([SESSION, '-f', self.px.conf_path, '-s', sock_path],
                                      stdin=b, stdout=b, stderr=subprocess.PIPE,
                                      env=dict(os.environ, IMAPPROXY_LOG_LEVEL='debug'))
                b.close()
                a.settimeout(5)
                a.sendall(b'c1 LOGIN alice pw\r\nc2 NOOP\r\nc3 LOGOUT\r\n')
                try:
                    while a.recv(65536):
                        pass
                except socket.timeout:
                    pass
                try:
                    _, err = pr.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    pr.kill()
                    _, err = pr.communicate()
            finally:
                a.close()
            self.assertRegex(err.decode(errors='replace'), want,
                             'control: the session should log this on a stderr pipe')

        tags = []

        def cmd(r, tag, text, want):
            tags.append(tag)
            _, t = r.command(tag, text)
            self.assertRegex(t, want, r.dump())

        def with_broker(r):
            """Wrong password, login, select, fetch (a literal too), logout."""
            cmd(r, 'a1', 'LOGIN alice %s' % quote('wrong'), rb'^a1 NO ')
            cmd(r, 'a2', 'CAPABILITY', rb'^a2 OK')
            cmd(r, 'a3', 'LOGIN alice pw', rb'^a3 OK')
            for i, c in enumerate(('SELECT INBOX', 'FETCH 1:* (FLAGS)',
                                   'FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]', 'NOOP'), 4):
                cmd(r, 'a%d' % i, c, ('^a%d OK' % i).encode())
            tags.append('a8')
            r.send('a8 LOGOUT\r\n')
            r.read_until_close(5.0)

        def without_broker(r):
            """Broker unreachable: greeting, NO [UNAVAILABLE], logout."""
            cmd(r, 'b1', 'LOGIN alice pw', rb'^b1 NO \[UNAVAILABLE\]')
            tags.append('b2')
            r.send('b2 LOGOUT\r\n')
            r.read_until_close(5.0)

        r = self.raw(p_ok)
        pid = self.one_session_child(xinetd_pid)
        inode = tcp_socket_inode(p_ok, r.sock.getsockname()[1])
        self.assertIsNotNone(inode)
        for fd in (0, 1, 2):
            self.assertEqual(fd_target(pid, fd), 'socket:[%s]' % inode,
                             'premise: xinetd gives the client socket on fd %d' % fd)
        self.assertEqual(initial_environ(pid).get('IMAPPROXY_LOG_LEVEL'), 'debug',
                         'premise: xinetd env = reached the session')
        errors = []
        for rc, dialogue in ((r, with_broker), (None, without_broker)):
            try:
                if rc is None:
                    rc = self.raw(p_nb)
                dialogue(rc)
            except (OSError, EOFError, AssertionError) as e:  # socket.timeout is an OSError
                errors.append('%s: %s: %s' % (dialogue.__name__, type(e).__name__, e))
        # The bytes first: log text on the socket is the likeliest cause of a dialogue error.
        for rc in self.raws:
            data = b''.join(d for who, d in rc.transcript if who == 'S')
            bad = imap_violations(data, tags)
            self.assertEqual(bad, [], 'non-IMAP bytes sent to the client:\n%s' % rc.dump())
            self.assertTrue(data.startswith(b'* OK '), rc.dump())
            self.assertNotRegex(data, rb'imapproxy-session\[|debug:|warning:', rc.dump())
        self.assertEqual(errors, [], 'IMAP dialogues under xinetd')
        self.assertEqual(len(self.raws), 2)
        self.assertEqual(self.dc.logins('alice'), 1)

    def test_l6_xinetd_shipped_stanza(self):
        """units/xinetd/imapproxy, with port/bind/server/server_args/user/group
        adjusted, is accepted by xinetd without errors or warnings and serves
        logins."""
        self.broker_only()
        port = free_port()
        text = self.shipped_stanza(SHIPPED_STANZA, SESSION, port)
        self.assertRegex(text, r'(?m)^service \S+\s*$', 'the shipped stanza names a service')
        _, own = self.start_xinetd(text, name='xinetd-shipped', ports=[port])
        log = read_log(own)
        self.assertRegex(log, r'Started working: 1 available service\b', log)
        self.assertNotRegex(log, r'(?m)(ERROR|WARNING):', 'xinetd complains about the stanza:\n' + log)
        self.double_login(port)


if __name__ == '__main__':
    unittest.main()
