/*
 * hello.c -- the cheapest possible greeter, for comparison with
 * imapproxy-session's exec-to-greeting latency: spawned the same way
 * (systemd-socket-activate --inetd), linked the same way (libc only, PIE),
 * it writes one IMAP greeting on stdout and exits.
 */
#include <unistd.h>

int main(void) {
        static const char greeting[] = "* OK hello\r\n";
        return write(STDOUT_FILENO, greeting, sizeof(greeting) - 1) == (ssize_t) (sizeof(greeting) - 1) ? 0 : 1;
}
