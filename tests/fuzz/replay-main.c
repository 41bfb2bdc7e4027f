/*
 * replay-main.c -- plain main() that replays fuzz inputs through any
 * libFuzzer target (LLVMFuzzerTestOneInput) without libFuzzer
 *
 * SYNOPSIS
 *	replay-<target> PATH...
 * DESCRIPTION
 *	A directory argument replays every regular file directly in it (sorted
 *	by name, dotfiles skipped, no recursion); a file argument replays that
 *	file. Prints "replayed N inputs" to stderr. Used by make check so that
 *	the corpus is a regression suite with the ordinary compiler.
 * ERRORS
 *	Exit 0; 1 if a path cannot be read. A failing input abort()s inside
 *	the target.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(int dirfd, const char *path) {
        struct stat st;
        uint8_t *buf;
        size_t off = 0;
        int fd;

        fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                int r = errno ? -errno : -EISDIR;
                close(fd);
                return r;
        }
        /* +1: never malloc(0); libFuzzer never passes NULL either */
        buf = malloc((size_t) st.st_size + 1);
        if (!buf) {
                close(fd);
                return -ENOMEM;
        }
        while (off < (size_t) st.st_size) {
                ssize_t n = read(fd, buf + off, (size_t) st.st_size - off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                off += (size_t) n;
        }
        close(fd);
        (void) LLVMFuzzerTestOneInput(buf, off);
        free(buf);
        return 0;
}

static int replay_dir(const char *path, unsigned *count) {
        struct dirent **entries;
        int n, dirfd, r = 0;

        dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dirfd < 0)
                return -errno;
        n = scandir(path, &entries, NULL, alphasort);
        if (n < 0) {
                r = -errno;
                close(dirfd);
                return r;
        }
        for (int i = 0; i < n; i++) {
                const char *name = entries[i]->d_name;
                struct stat st;

                if (name[0] != '.' && fstatat(dirfd, name, &st, 0) == 0 && S_ISREG(st.st_mode)) {
                        int k = replay_file(dirfd, name);
                        if (k < 0) {
                                fprintf(stderr, "%s/%s: %s\n", path, name, strerror(-k));
                                r = k;
                        } else
                                (*count)++;
                }
                free(entries[i]);
        }
        free(entries);
        close(dirfd);
        return r;
}

int main(int argc, char **argv) {
        unsigned count = 0;
        int ret = EXIT_SUCCESS;

        for (int i = 1; i < argc; i++) {
                struct stat st;
                int r;

                if (stat(argv[i], &st) < 0)
                        r = -errno;
                else if (S_ISDIR(st.st_mode))
                        r = replay_dir(argv[i], &count);
                else {
                        r = replay_file(AT_FDCWD, argv[i]);
                        if (r >= 0)
                                count++;
                }
                if (r < 0) {
                        fprintf(stderr, "%s: %s\n", argv[i], strerror(-r));
                        ret = EXIT_FAILURE;
                }
        }
        fprintf(stderr, "replayed %u inputs\n", count);
        return ret;
}
