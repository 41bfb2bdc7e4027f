"""nspawnlib.py -- real systemd as PID 1 in systemd-nspawn, for tests and bench.

Owns: the throw-away container that tests/nspawn/check-nspawn and
bench/spawn-profiles boot, and the imapproxy + Dovecot set-up inside it.

    with Container(workdir) as c:      # overlay over the cached tree, booted
        install_imapproxy(c)           # make install DESTDIR=<overlay> ...
        c.run('systemctl', 'enable', '--now', 'imapproxy-session.socket')

The tree (tests/nspawn/build-tree: debootstrap --variant=minbase bookworm
plus systemd and Dovecot, cached under /var/cache/imapproxy-test) is the
read-only lower layer of an overlay mount; everything the run writes goes
to an upper layer under `workdir` that is deleted afterwards. The container
runs `systemd-nspawn -D ROOT --register=no --keep-unit --private-network -b`
(its own loopback only; fixed ports inside cannot collide with anything on
the host). Commands run inside with `nsenter -t <PID 1> -a`. Stopping sends
SIGTERM to nspawn (a clean halt inside), SIGKILL after a timeout, then
unmounts the overlay and checks that no mount under `workdir` is left.
Root only.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD_TREE = os.path.join(HERE, 'build-tree')

# Inside the container: Dovecot on a port of its own, imapproxy on the
# shipped 127.0.0.1:143 (imapproxy-session.socket / imapproxy-forkserver.socket).
DOVECOT_PORT = 1143
PROXY_PORT = 143
DOVECOT_LOG = '/var/log/dovecot-test.log'
TEST_USERS = {'alice': 'alice-pw-7Hq2', 'bob': 'bob-pw-9Xk4', 'carol': 'carol-pw-3Vm8'}
IN_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'


# The sandboxing of imapproxy-session@.service in groups, as (group,
# settings when on, settings when off): every sandboxing setting the unit
# has is in exactly one group, and so is ProtectKernelTunables=, which the
# unit leaves out because of what it costs (bench/README.md). bench/spawn-profiles measures them; a drop-in from
# session_dropin() sets every one of them explicitly, on or off.
SANDBOX_GROUPS = [
    ('user', ['User=imapproxy', 'Group=imapproxy', 'UMask=0077', 'RemoveIPC=yes',
              'CapabilityBoundingSet=', 'NoNewPrivileges=yes', 'RestrictSUIDSGID=yes'],
             ['User=', 'Group=', 'UMask=0022', 'RemoveIPC=no', 'CapabilityBoundingSet=~',
              'NoNewPrivileges=no', 'RestrictSUIDSGID=no']),
    ('userns', ['PrivateUsers=yes'], ['PrivateUsers=no']),
    ('fs', ['ProtectSystem=strict', 'ProtectHome=yes', 'PrivateTmp=yes', 'PrivateMounts=yes',
            'ProtectProc=invisible', 'ProcSubset=pid'],
           ['ProtectSystem=no', 'ProtectHome=no', 'PrivateTmp=no', 'PrivateMounts=no',
            'ProtectProc=default', 'ProcSubset=all']),
    ('devices', ['PrivateDevices=yes'], ['PrivateDevices=no']),
    ('kernel', ['ProtectKernelTunables=yes', 'ProtectKernelModules=yes', 'ProtectKernelLogs=yes',
                'ProtectControlGroups=yes', 'ProtectClock=yes', 'ProtectHostname=yes',
                'RestrictNamespaces=yes', 'RestrictRealtime=yes', 'LockPersonality=yes',
                'MemoryDenyWriteExecute=yes'],
               ['ProtectKernelTunables=no', 'ProtectKernelModules=no', 'ProtectKernelLogs=no',
                'ProtectControlGroups=no', 'ProtectClock=no', 'ProtectHostname=no',
                'RestrictNamespaces=no', 'RestrictRealtime=no', 'LockPersonality=no',
                'MemoryDenyWriteExecute=no']),
    ('seccomp', ['SystemCallArchitectures=native', 'SystemCallFilter=@system-service',
                 'SystemCallFilter=~@privileged @resources', 'SystemCallErrorNumber=EPERM'],
                ['SystemCallArchitectures=', 'SystemCallFilter=']),
    ('network', ['PrivateNetwork=yes', 'RestrictAddressFamilies=AF_UNIX'],
                ['PrivateNetwork=no', 'RestrictAddressFamilies=']),
]
SESSION_DROPIN_DIR = '/etc/systemd/system/imapproxy-session@.service.d'


def session_dropin(groups_on, comment, settings_off=()):
    """Drop-in text for imapproxy-session@.service: the groups in groups_on
    as shipped, all others off; and within the groups that are on, the
    settings named in settings_off (e.g. "ProtectClock") off too."""
    lines = ['# %s' % comment, '[Service]']
    for name, son, soff in SANDBOX_GROUPS:
        if name not in groups_on:
            lines += soff
            continue
        off = {x.split('=', 1)[0]: x for x in soff}
        for x in son:
            key = x.split('=', 1)[0]
            if key in settings_off:
                if key in off:
                    lines.append(off[key])
            else:
                lines.append(x)
    return '\n'.join(lines) + '\n'


def sandbox_settings():
    """Every setting name in SANDBOX_GROUPS."""
    return set(x.split('=', 1)[0] for _, son, _ in SANDBOX_GROUPS for x in son)


class NspawnError(Exception):
    pass


def build_tree():
    """Path of the cached tree, building it first if needed (minutes, once)."""
    r = subprocess.run([BUILD_TREE], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise NspawnError('tests/nspawn/build-tree failed (exit %d)' % r.returncode)
    return r.stdout.strip().splitlines()[-1]


def mounts_under(path):
    """Mount points at or below path, as the host sees them."""
    path = os.path.realpath(path)
    out = []
    with open('/proc/self/mountinfo') as f:
        for line in f:
            mp = line.split()[4].replace('\\040', ' ')
            if mp == path or mp.startswith(path + '/'):
                out.append(mp)
    return out


class Container:
    def __init__(self, tree=None, workdir=None, boot_timeout=90.0):
        self.tree = tree or build_tree()
        self.own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix='imapproxy-nspawn-', dir='/var/tmp')
        self.root = os.path.join(self.workdir, 'root')
        self.log_path = os.path.join(self.workdir, 'nspawn.log')
        self.boot_timeout = boot_timeout
        self.proc = None
        self.pid1 = None
        self.mounted = False

    # -- life cycle

    def mount(self):
        for d in ('upper', 'work', 'root'):
            os.makedirs(os.path.join(self.workdir, d), exist_ok=True)
        opts = 'lowerdir=%s,upperdir=%s,workdir=%s' % (
            self.tree, os.path.join(self.workdir, 'upper'), os.path.join(self.workdir, 'work'))
        subprocess.run(['mount', '-t', 'overlay', 'overlay', '-o', opts, self.root], check=True)
        self.mounted = True

    def boot(self):
        if not self.mounted:
            self.mount()
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(
            # --machine: nspawn's lock and propagation directories in
            # /run/systemd/nspawn are named after it (default: "root").
            ['systemd-nspawn', '-q', '-D', self.root, '--machine=imapproxy-test-%d' % os.getpid(),
             '--register=no', '--keep-unit',
             '--private-network', '-b', '--console=passive'],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, env={'PATH': os.environ.get('PATH', IN_PATH), 'LANG': 'C.UTF-8'})
        deadline = time.monotonic() + self.boot_timeout
        while self.pid1 is None:
            if self.proc.poll() is not None:
                raise NspawnError('systemd-nspawn exited with %d:\n%s' % (self.proc.returncode, self.log()))
            if time.monotonic() > deadline:
                raise NspawnError('no PID 1 in the container after %.0f s' % self.boot_timeout)
            self.pid1 = self._child_of(self.proc.pid)
            if self.pid1 is None:
                time.sleep(0.05)
        # PID 1 answers only once it has set up its private socket: until then
        # systemctl prints nothing (or "offline").
        while True:
            left = max(1.0, deadline - time.monotonic())
            r = self.run('systemctl', 'is-system-running', '--wait', check=False, timeout=left)
            self.boot_state = r.stdout.strip()
            if self.boot_state not in ('', 'offline') or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if self.boot_state not in ('running', 'degraded'):
            raise NspawnError('systemd in the container: %r\n%s' % (self.boot_state, self.log()))
        return self.boot_state

    @staticmethod
    def _child_of(ppid):
        for d in os.listdir('/proc'):
            if not d.isdigit():
                continue
            try:
                with open('/proc/%s/stat' % d) as f:
                    st = f.read()
            except OSError:
                continue
            fields = st[st.rindex(')') + 2:].split()
            if int(fields[1]) == ppid:
                try:
                    with open('/proc/%s/comm' % d) as f:
                        if f.read().strip() == 'systemd':
                            return int(d)
                except OSError:
                    pass
        return None

    def stop(self, timeout=30.0):
        """Halt the container, unmount, remove the work directory.
        Returns a list of problems (empty when everything was cleaned up)."""
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)   # nspawn: orderly halt inside
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append('container did not halt within %.0f s: killed' % timeout)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
        if self.pid1 is not None and os.path.exists('/proc/%d' % self.pid1):
            problems.append('container PID 1 (%d) still exists' % self.pid1)
        if self.mounted:
            r = subprocess.run(['umount', self.root], stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                problems.append('umount %s: %s' % (self.root, r.stderr.strip()))
                subprocess.run(['umount', '-l', self.root], stderr=subprocess.DEVNULL)
            self.mounted = False
        left = mounts_under(self.workdir)
        if left:
            problems.append('mounts left under %s: %s' % (self.workdir, ' '.join(left)))
        elif self.own_workdir and not os.environ.get('IMAPPROXY_NSPAWN_KEEP'):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    def __enter__(self):
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def log(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read()[-4000:].decode('utf-8', 'replace')
        except OSError:
            return ''

    # -- inside

    def run(self, *argv, check=True, timeout=60.0, input=None):
        """argv inside the container (all its namespaces); CompletedProcess, text."""
        env = {'PATH': IN_PATH, 'LANG': 'C.UTF-8', 'SYSTEMD_PAGER': '', 'SYSTEMD_COLORS': '0',
               'TERM': 'dumb'}
        r = subprocess.run(['nsenter', '-t', str(self.pid1), '-a', '--'] + list(argv),
                           input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise NspawnError('in container: %s: exit %d\n%s%s' % (
                ' '.join(argv), r.returncode, r.stdout, r.stderr))
        return r

    def path(self, p):
        """Host path of the container's file p (through the overlay)."""
        return os.path.join(self.root, p.lstrip('/'))

    def write(self, p, text, mode=0o644):
        hp = self.path(p)
        os.makedirs(os.path.dirname(hp), exist_ok=True)
        with open(hp, 'w') as f:
            f.write(text)
        os.chmod(hp, mode)

    def wait_until(self, pred, timeout=10.0, what='condition'):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise NspawnError('timed out after %.0f s waiting for %s' % (timeout, what))
            time.sleep(0.1)


# ------------------------------------------------------------------ imapproxy + Dovecot

DOVECOT_CONF = '''# written by tests/nspawn/nspawnlib.py: Dovecot as the backend of imapproxy
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0 secs
log_path = {log}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
# the mail files belong to the system user dovecot (uid < 500)
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u /etc/dovecot/test-passwd
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home=/var/lib/imaptest/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
'''


def install_imapproxy(c, make=None):
    """make install into the overlay root (the build as it is: make -o all),
    with the paths of a distribution package: prefix=/usr, sysconfdir=/etc,
    unitdir=/usr/lib/systemd/system. Returns the make output."""
    argv = [make or os.environ.get('MAKE') or 'make', '-s', '--no-print-directory', '-C', REPO,
            '-o', 'all', 'install', 'DESTDIR=' + c.root, 'prefix=/usr', 'sysconfdir=/etc',
            'unitdir=/usr/lib/systemd/system']
    env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL')}
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if r.returncode != 0:
        raise NspawnError('%s:\n%s' % (' '.join(argv), r.stdout))
    return r.stdout


def configure_backend(c):
    """Point the installed /etc/imapproxy.conf at Dovecot's port inside and
    set Dovecot up (own config, test users); restart Dovecot, wait for it."""
    conf = c.path('/etc/imapproxy.conf')
    with open(conf) as f:
        text = f.read()
    text, n = re.subn(r'(?m)^server_port\s+\S+', 'server_port %d' % DOVECOT_PORT, text)
    if n == 0:
        text += '\nserver_port %d\n' % DOVECOT_PORT
    text, n = re.subn(r'(?m)^server_hostname\s+\S+', 'server_hostname 127.0.0.1', text)
    if n == 0:
        text += 'server_hostname 127.0.0.1\n'
    with open(conf, 'w') as f:
        f.write(text)
    c.write('/etc/dovecot/dovecot.conf', DOVECOT_CONF.format(log=DOVECOT_LOG, port=DOVECOT_PORT))
    c.write('/etc/dovecot/test-passwd',
            ''.join('%s:{PLAIN}%s::::::\n' % (u, p) for u, p in TEST_USERS.items()), 0o640)
    c.run('chgrp', 'dovecot', '/etc/dovecot/test-passwd')
    c.run('install', '-d', '-o', 'dovecot', '-g', 'dovecot', '-m', '0755', '/var/lib/imaptest')
    c.run('systemctl', 'restart', 'dovecot.service')
    c.wait_until(lambda: listening(c, DOVECOT_PORT), 15, 'Dovecot on port %d' % DOVECOT_PORT)


def listening(c, port):
    """Whether something listens on 127.0.0.1:port inside (from /proc/net/tcp)."""
    r = c.run('cat', '/proc/net/tcp', check=False)
    want = ':%04X' % port
    for line in r.stdout.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[1].endswith(want) and f[3] == '0A':
            return True
    return False


def dovecot_logins(c, user=None):
    try:
        with open(c.path(DOVECOT_LOG), 'rb') as f:
            data = f.read().decode('utf-8', 'replace')
    except OSError:
        return 0
    pat = r'imap-login: Info: Login: user=<%s>' % (re.escape(user) if user else '[^>]*')
    return len(re.findall(pat, data))
