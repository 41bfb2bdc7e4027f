/*
 * fd-util.c -- file descriptor helpers shared by broker and session.
 *
 * DESCRIPTION
 *	safe_close() never retries close() on EINTR (on Linux the fd is gone
 *	either way) and preserves errno. fd_write_all() is the one place that
 *	loops over partial writes. Owns no state.
 * ERRORS
 *	0 or -errno. Never logs, never exits.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fd-util.h"

int safe_close(int fd) {
        if (fd >= 0) {
                int saved = errno;
                (void) close(fd);
                errno = saved;
        }
        return -EBADF;
}

int fd_set_nonblock(int fd, bool nonblock) {
        int flags = fcntl(fd, F_GETFL);
        if (flags < 0)
                return -errno;
        int nflags = nonblock ? flags | O_NONBLOCK : flags & ~O_NONBLOCK;
        if (nflags != flags && fcntl(fd, F_SETFL, nflags) < 0)
                return -errno;
        return 0;
}

int fd_set_cloexec(int fd, bool cloexec) {
        int flags = fcntl(fd, F_GETFD);
        if (flags < 0)
                return -errno;
        int nflags = cloexec ? flags | FD_CLOEXEC : flags & ~FD_CLOEXEC;
        if (nflags != flags && fcntl(fd, F_SETFD, nflags) < 0)
                return -errno;
        return 0;
}

int fd_set_nodelay(int fd) {
        int one = 1;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
                return -errno;
        return 0;
}

int fd_set_keepalive(int fd) {
        int one = 1;
        if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0)
                return -errno;
        return 0;
}

/* A TCP connection whose peer has not acknowledged data for `seconds` is
 * dead (TCP_USER_TIMEOUT: the socket fails with ETIMEDOUT), and an idle one
 * is probed so that this holds while nothing is sent: the first keepalive
 * after seconds/2, then every seconds/4; with TCP_USER_TIMEOUT set the
 * kernel gives up once `seconds` have passed without an answer. */
int fd_set_link_timeout(int fd, unsigned seconds) {
        unsigned ms = seconds > UINT_MAX / 1000 ? UINT_MAX : seconds * 1000;
        int idle = (int) MAX(seconds / 2, 1u), intvl = (int) MAX(seconds / 4, 1u), one = 1;

        if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms)) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0 ||
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0 ||
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl)) < 0)
                return -errno;
        return 0;
}

unsigned long long now_usec(void) {
        struct timespec ts;
        (void) clock_gettime(CLOCK_MONOTONIC, &ts);
        return (unsigned long long) ts.tv_sec * 1000000ULL + (unsigned long long) ts.tv_nsec / 1000ULL;
}

int fd_write_all(int fd, const void *buf, size_t len, int timeout_ms) {
        const unsigned char *p = buf;
        unsigned long long deadline = timeout_ms < 0 ? 0 : now_usec() + (unsigned long long) timeout_ms * 1000ULL;

        while (len > 0) {
                ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
                if (n < 0 && errno == ENOTSOCK)
                        n = write(fd, p, len);
                if (n > 0) {
                        p += n;
                        len -= (size_t) n;
                        continue;
                }
                if (n == 0)
                        return -EIO;
                if (errno == EINTR)
                        continue;
                if (errno != EAGAIN)
                        return -errno;

                int wait_ms = -1;
                if (timeout_ms >= 0) {
                        unsigned long long now = now_usec();
                        if (now >= deadline)
                                return -ETIMEDOUT;
                        wait_ms = (int) ((deadline - now + 999) / 1000);
                }
                struct pollfd pfd = { .fd = fd, .events = POLLOUT };
                int r = poll(&pfd, 1, wait_ms);
                if (r < 0 && errno != EINTR)
                        return -errno;
                if (r == 0)
                        return -ETIMEDOUT;
        }
        return 0;
}
