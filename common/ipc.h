/*
 * ipc.h -- codec and socket I/O for the broker wire protocol (ipc-proto.h).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ipc-proto.h"

typedef struct IpcMessage {
        IpcType type;
        int fd; /* received fd (owned by the message) or -EBADF */
        union {
                struct ipc_hello hello;
                struct ipc_hello_reply hello_reply;
                struct ipc_checkout checkout;
                struct ipc_checkout_ok checkout_ok;
                struct ipc_checkout_fail checkout_fail;
                struct ipc_checkin checkin;
                struct ipc_trace trace;
                struct ipc_admin admin;
                struct ipc_admin_stats admin_stats;
                struct ipc_admin_conn admin_conn;
                struct ipc_admin_done admin_done;
                struct ipc_trace_event trace_event;
        } u;
} IpcMessage;

const char *ipc_type_to_string(IpcType t);
size_t ipc_payload_size(IpcType t); /* 0 for an unknown type */
bool ipc_type_carries_fd(IpcType t);

/* Pure codec. ipc_encode() writes header+payload into buf. ipc_decode()
 * validates one whole datagram (header, length, fd presence, NUL-terminated
 * strings, enum ranges, reserved fields) and copies the payload into *ret.
 * Both return 0 or -errno: -EPROTO for any malformed input, -EMSGSIZE if
 * the buffer is too small. ipc_decode() never touches ret->fd. */
int ipc_encode(IpcType type, const void *payload, size_t payload_len, void *buf, size_t bufsize,
               size_t *ret_len);
int ipc_decode(const void *buf, size_t len, bool has_fd, IpcMessage *ret);

/* The project's only sendmsg()/recvmsg() on the broker socket.
 * ipc_send(): sends one message; if fd >= 0 it is passed and, on success,
 * closed (ownership moves to the peer). On failure fd is left open.
 * ipc_recv(): receives one message. Returns 0, -EAGAIN (non-blocking, no
 * data), -ECONNRESET (peer closed), -EPROTO (malformed; any fds received are
 * closed), or another -errno. On success ret->fd holds the fd if the type
 * carries one. Never leaks an fd. */
int ipc_send(int sock, IpcType type, const void *payload, size_t payload_len, int fd);
int ipc_recv(int sock, IpcMessage *ret);

/* ipc_send() of a message without fd that never blocks: -EAGAIN when the
 * socket's send buffer is full (the caller drops or queues it). */
int ipc_send_nowait(int sock, IpcType type, const void *payload, size_t payload_len);

/* Close the fd a message holds and wipe secrets in it. */
void ipc_message_done(IpcMessage *m);

/* Connect to the broker socket at path (SOCK_SEQPACKET, CLOEXEC, blocking). */
int ipc_connect(const char *path, int *ret_fd);
