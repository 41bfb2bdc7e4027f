/*
 * hello.c -- the cheapest possible greeter, for comparison with
 * imapproxy-session's exec-to-greeting latency: spawned the same way
 * (systemd-socket-activate --inetd), libc only, it writes one IMAP greeting
 * on stdout and exits. Built twice (Makefile): bench/hello with glibc,
 * dynamic PIE (a small libc program as Debian builds one: the target's
 * reference), and bench/hello-musl with musl-gcc, static PIE, linked like
 * the musl session.
 */
#include <unistd.h>

int main(void) {
        static const char greeting[] = "* OK hello\r\n";
        return write(STDOUT_FILENO, greeting, sizeof(greeting) - 1) == (ssize_t) (sizeof(greeting) - 1) ? 0 : 1;
}
