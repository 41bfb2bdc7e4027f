#!/usr/bin/env python3
"""demo.py -- imapproxy demo: a private Dovecot (user demo / password demo, a few
messages), imapproxy-broker and a systemd-socket-activate listener spawning
imapproxy-session, all on loopback.  Runs until Ctrl-C / SIGTERM, then stops
everything it started and removes its temporary directory.

    python3 tests/integration/demo.py [--port 1143] [--ttl 300]

Used by scripts/imapproxy-run when the config file sets no server_hostname.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imapfixture  # noqa: E402
from imapfixture import Dovecot, Proxy, FixtureError  # noqa: E402

CLIENT = '''python3 -c 'import imaplib
for i in (1, 2):
    m = imaplib.IMAP4("127.0.0.1", {port}); t, d = m.login("demo", "demo")
    r = "XPROXYREUSE" in m.untagged_responses
    print("login %d: %s %s  %s" % (i, t, d[0].decode().rsplit("] ", 1)[-1], "* OK [XPROXYREUSE]: pooled backend connection reused" if r else "(new backend connection)"))
    m.select("INBOX"); print("   INBOX:", m.search(None, "ALL")[1][0].decode()); m.logout()'
'''


class Stop(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description='imapproxy demo (private Dovecot + broker + listener)')
    ap.add_argument('--port', type=int, default=1143, help='client port on 127.0.0.1 (default 1143)')
    ap.add_argument('--ttl', type=int, default=300, help='cache_expiration_time (s)')
    ap.add_argument('--messages', type=int, default=3)
    args = ap.parse_args()

    def on_signal(signum, frame):
        raise Stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = tempfile.mkdtemp(prefix='imapproxy-demo-')
    dc = px = None
    try:
        dc = Dovecot(tmp, users={'demo': 'demo'}, messages=args.messages)
        px = Proxy(tmp, dc, port=args.port, cache_expiration_time=args.ttl)
        print('imapproxy demo is running:')
        print('  Dovecot (backend)  127.0.0.1:%d   user demo, password demo, %d messages'
              % (dc.port, args.messages))
        print('  imapproxy          127.0.0.1:%d   (broker socket %s)' % (px.port, px.broker_socket))
        print('  config             %s' % px.conf_path)
        print('  logs               %s (broker), %s (sessions), %s (dovecot)'
              % (px.broker_log_path, px.listener_log_path, dc.log_path))
        print()
        print('Log in twice through the proxy; the second login reuses the pooled backend')
        print('connection ([XPROXYREUSE]) and Dovecot logs no second login:')
        print()
        print(CLIENT.format(port=px.port))
        print('or:  curl -s --user demo:demo "imap://127.0.0.1:%d/INBOX;MAILINDEX=1"' % px.port)
        print()
        print('Ctrl-C stops everything.')
        sys.stdout.flush()
        while True:
            time.sleep(1)
            if not px.broker.alive():
                print('demo: the broker exited (rc=%s); log:\n%s' % (
                    px.broker.reap(), px.broker_log()[-3000:]), file=sys.stderr)
                return 1
            if not px.listener.alive():
                print('demo: the listener exited; log:\n%s' % px.listener_log()[-3000:],
                      file=sys.stderr)
                return 1
            if not dc.proc.alive():
                print('demo: dovecot exited; log:\n%s' % dc.log()[-3000:], file=sys.stderr)
                return 1
    except (KeyboardInterrupt, Stop):
        print('\nstopping...')
        return 0
    except FixtureError as e:
        print('demo: %s' % e, file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if px:
            px.stop()
        if dc:
            dc.stop()
        imapfixture._kill_everything()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
