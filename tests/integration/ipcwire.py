#!/usr/bin/env python3
"""ipcwire -- the broker wire protocol (doc/ipc-protocol.md) in Python, for tests
that talk to the broker socket directly: as a hostile session would.

    w = Wire(path)                       # AF_UNIX SOCK_SEQPACKET connect
    w.hello()                            # -> (version, flags, caps)
    kind, ans = w.checkout('alice', 'pw')    # ('ok', (ticket, flags, caps, fd))
                                             # or ('fail', (status, text))
    w.checkin(ticket, fd, clean=True)    # fd is closed here after sending
    w.send_raw(b'...', fds=())           # anything at all
    w.dropped()                          # True if the broker closed on us

Host byte order, fixed-size payloads (common/ipc-proto.h is the reference:
the sizes below are checked against the numbers in doc/ipc-protocol.md by
test_hostile's positive controls, which cannot pass if a layout is wrong).
"""

import os
import re
import socket
import struct

def _proto_version():
    """IPC_PROTO_VERSION from common/ipc-proto.h, so that a bump needs no edit here."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'common', 'ipc-proto.h')
    with open(path) as f:
        m = re.search(r'^#define IPC_PROTO_VERSION (\d+)', f.read(), re.M)
    return int(m.group(1))


PROTO_VERSION = _proto_version()
ROLE_SESSION = 1  # IpcRole: hello's second word
USER_MAX, PASSWORD_MAX, ADDR_MAX, CAPS_MAX, TEXT_MAX, ID_MAX = 256, 2048, 64, 2048, 1024, 4096

HELLO, HELLO_REPLY, CHECKOUT, CHECKOUT_OK, CHECKOUT_FAIL, CHECKIN = range(1, 7)
HDR_F_FD = 0x1
CHECKOUT_F_FRESH = 0x1
LEASE_F_REUSED = 0x1
FAIL_NO, FAIL_BAD, FAIL_UNAVAILABLE = 1, 2, 3
CONN_CLEAN, CONN_DIRTY = 1, 2

HDR = struct.Struct('=HHI')
HELLO_FMT = struct.Struct('=II')
HELLO_REPLY_FMT = struct.Struct('=II%ds' % CAPS_MAX)
CHECKOUT_FMT = struct.Struct('=IIII%ds%ds%ds%ds%ds%ds' % (USER_MAX, USER_MAX, PASSWORD_MAX,
                                                        ADDR_MAX, ADDR_MAX, ID_MAX))
CHECKOUT_OK_FMT = struct.Struct('=QII%ds' % CAPS_MAX)
CHECKOUT_FAIL_FMT = struct.Struct('=II%ds' % TEXT_MAX)
CHECKIN_FMT = struct.Struct('=QII')
assert CHECKOUT_FMT.size == 16 + 2 * USER_MAX + PASSWORD_MAX + 2 * ADDR_MAX + ID_MAX
MSG_MAX = HDR.size + max(CHECKOUT_FMT.size, CHECKOUT_OK_FMT.size)


def cstr(b):
    return b.split(b'\0', 1)[0].decode('utf-8', 'replace')


def message(mtype, payload, has_fd=False, flags=None):
    if flags is None:
        flags = HDR_F_FD if has_fd else 0
    return HDR.pack(mtype, flags, len(payload)) + payload


def checkout_payload(user, password, authzid='', flags=0, client_id=''):
    def b(s):
        return s.encode() if isinstance(s, str) else s
    return CHECKOUT_FMT.pack(flags, 0, 0, 0, b(user), b(authzid), b(password), b'127.0.0.1',
                             b'127.0.0.1', b(client_id))


class Wire:
    def __init__(self, path, timeout=15.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data, fds=()):
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def recv(self):
        """(type, payload bytes, fd or None); raises EOFError if the broker closed."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MSG_MAX + 1, 4)
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError('broker closed the connection')
        mtype, _f, length = HDR.unpack_from(data)
        extra = fds[1:]
        for fd in extra:
            os.close(fd)
        return mtype, data[HDR.size:HDR.size + length], (fds[0] if fds else None)

    def dropped(self, timeout=3.0):
        """True if the broker closes this connection (EOF/reset) within timeout,
        False if it is still open. Any message that arrives first is discarded."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data, fds, _f, _a = socket.recv_fds(self.sock, MSG_MAX + 1, 4)
                for fd in fds:
                    os.close(fd)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def hello(self, version=PROTO_VERSION):
        self.send_raw(message(HELLO, HELLO_FMT.pack(version, ROLE_SESSION)))
        mtype, payload, fd = self.recv()
        if fd is not None:
            os.close(fd)
        if mtype != HELLO_REPLY:
            raise AssertionError('expected hello-reply, got type %d' % mtype)
        v, flags, caps = HELLO_REPLY_FMT.unpack(payload)
        return v, flags, cstr(caps)

    def checkout(self, user, password, authzid='', fresh=False):
        self.send_raw(message(CHECKOUT, checkout_payload(
            user, password, authzid, CHECKOUT_F_FRESH if fresh else 0)))
        mtype, payload, fd = self.recv()
        if mtype == CHECKOUT_OK:
            ticket, flags, _r, caps = CHECKOUT_OK_FMT.unpack(payload)
            if fd is None:
                raise AssertionError('checkout-ok without an fd')
            return 'ok', (ticket, flags, cstr(caps), fd)
        if fd is not None:
            os.close(fd)
        if mtype == CHECKOUT_FAIL:
            status, _r, text = CHECKOUT_FAIL_FMT.unpack(payload)
            return 'fail', (status, cstr(text))
        raise AssertionError('unexpected answer type %d to checkout' % mtype)

    def checkin(self, ticket, fd, clean=True):
        self.send_raw(message(CHECKIN, CHECKIN_FMT.pack(ticket, CONN_CLEAN if clean else CONN_DIRTY, 0),
                              has_fd=True), fds=[fd])
        os.close(fd)
