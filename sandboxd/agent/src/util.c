/* util.c - small system helpers (see util.h). Owns no state. */
#define _GNU_SOURCE
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int64_t now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    if (fl & O_NONBLOCK)
        return 0;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int set_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFD);
    if (fl < 0)
        return -1;
    return fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
}

void pipe_grow(int fd, int size)
{
#ifdef F_SETPIPE_SZ
    int saved = errno;
    (void)fcntl(fd, F_SETPIPE_SZ, size);
    errno = saved;
#else
    (void)fd;
    (void)size;
#endif
}

void close_quiet(int fd)
{
    if (fd < 0)
        return;
    int saved = errno;
    (void)close(fd); /* never retried on EINTR: Linux always releases the descriptor */
    errno = saved;
}

int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

void close_from(int lowfd)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0u) == 0)
        return;
#endif
    /* Older kernels: close what /proc lists, else a bounded sweep. */
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        int dfd = dirfd(d);
        int fds[256];
        size_t n = 0;
        for (;;) {
            struct dirent *e = readdir(d);
            if (!e)
                break;
            char *end;
            long v = strtol(e->d_name, &end, 10);
            if (*end || end == e->d_name || v < lowfd || v == dfd || v > 0x7fffffff)
                continue;
            if (n < sizeof fds / sizeof fds[0])
                fds[n++] = (int)v;
        }
        closedir(d);
        for (size_t i = 0; i < n; i++)
            close_quiet(fds[i]);
        if (n < sizeof fds / sizeof fds[0])
            return;
    }
    long max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536)
        max = 65536;
    for (long fd = lowfd; fd < max; fd++)
        close_quiet((int)fd);
}

pid_t wait_nohang(pid_t pid, int *status)
{
    pid_t r;
    do
        r = waitpid(pid, status, WNOHANG);
    while (r < 0 && errno == EINTR);
    return r;
}

int status_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 255;
}

void signals_default(void)
{
    struct sigaction sa = {0};
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    for (int s = 1; s < 65; s++)
        if (s != SIGKILL && s != SIGSTOP)
            (void)sigaction(s, &sa, NULL); /* EINVAL for numbers that are no signal */
}

void signals_unblock(void)
{
    sigset_t none;
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
}
