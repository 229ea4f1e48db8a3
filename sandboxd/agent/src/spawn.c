/* spawn.c - the code of forked children: the per-exec supervisor, the command child, and the
 * `--supervise` mode (see spawn.h). After fork it uses only its own copies of memory and the
 * descriptors handed to it; it never writes to the channel. */
#define _GNU_SOURCE
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proctree.h"
#include "util.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

extern char **environ;

static const char *env_get(char *const *envp, const char *key)
{
    size_t kl = strlen(key);
    for (; envp && *envp; envp++)
        if (strncmp(*envp, key, kl) == 0 && (*envp)[kl] == '=')
            return *envp + kl + 1;
    return NULL;
}

/* execve argv[0], searched in PATH when it has no '/'. Returns only on failure (errno set). */
static void exec_search(char **argv, char **envp)
{
    const char *file = argv[0];
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return;
    }
    if (!*file) {
        errno = ENOENT;
        return;
    }
    const char *path = env_get(envp, "PATH");
    if (!path)
        path = DEFAULT_PATH;
    size_t fl = strlen(file);
    char *buf = malloc(strlen(path) + fl + 2);
    if (!buf) {
        errno = ENOMEM;
        return;
    }
    bool eacces = false;
    for (const char *p = path;;) {
        const char *z = strchrnul(p, ':');
        size_t dl = (size_t)(z - p);
        memcpy(buf, p, dl);
        if (dl)
            buf[dl++] = '/';
        memcpy(buf + dl, file, fl + 1);
        execve(buf, argv, envp);
        if (errno == EACCES)
            eacces = true;
        else if (errno != ENOENT && errno != ENOTDIR)
            return;
        if (!*z)
            break;
        p = z + 1;
    }
    errno = eacces ? EACCES : ENOENT;
}

/* "sandboxd-agent: cannot run 'X': <what><strerror>\n" on fd 2, then exit 127 / 126. */
_Noreturn static void cannot_run(const char *file, const char *what, int err)
{
    const char *msg = strerror(err);
    struct iovec iov[5] = {
        {(void *)"sandboxd-agent: cannot run '", 28},
        {(void *)file, strlen(file)},
        {(void *)"': ", 3},
        {(void *)what, strlen(what)},
        {(void *)msg, strlen(msg)},
    };
    ssize_t r;
    do
        r = writev(2, iov, 5);
    while (r < 0 && errno == EINTR);
    do
        r = write(2, "\n", 1);
    while (r < 0 && errno == EINTR);
    _exit(err == ENOENT ? 127 : 126);
}

/* Make fd become target (close-on-exec cleared). */
static int move_fd(int fd, int target)
{
    if (fd == target) {
        int fl = fcntl(fd, F_GETFD);
        return fl < 0 ? -1 : fcntl(fd, F_SETFD, fl & ~FD_CLOEXEC);
    }
    int r;
    do
        r = dup2(fd, target);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -1 : 0;
}

_Noreturn static void run_command(const struct cmd_spec *c)
{
    signals_unblock(); /* dispositions are the defaults already: the agent reset them */
    if ((c->fd_in >= 0 && move_fd(c->fd_in, 0) < 0) || move_fd(c->fd_out, 1) < 0 ||
        move_fd(c->fd_err, 2) < 0)
        _exit(126); /* stderr may be what failed: nothing to tell */
    close_from(3);
    if (c->ctty) {
        if (setsid() < 0 || ioctl(0, TIOCSCTTY, 0) < 0)
            cannot_run(c->argv[0], "controlling terminal: ", errno);
    } else {
        (void)setpgid(0, 0);
    }
    umask(c->umask);
    if (c->cwd && chdir(c->cwd) < 0) {
        int err = errno;
        size_t n = strlen(c->cwd);
        char *what = malloc(n + 12);
        if (what) {
            memcpy(what, "chdir '", 7);
            memcpy(what + 7, c->cwd, n);
            memcpy(what + 7 + n, "': ", 4);
        }
        cannot_run(c->argv[0], what ? what : "chdir: ", err);
    }
    exec_search(c->argv, c->envp);
    cannot_run(c->argv[0], "", errno);
}

static void report(int fd, int32_t kind, int32_t value)
{
    struct report r = {kind, value};
    (void)write_all(fd, &r, sizeof r); /* EPIPE once the agent forgot the exec: fine */
}

/* Reap until no child is left. The command's status goes to report_fd (when >= 0) and is
 * returned. forward: pass other signals on to the command (the --supervise mode); else a
 * SIGHUP after the agent died (the parent death signal) kills the tree. */
static int reap_all(pid_t cmd, int report_fd, pid_t agent, bool forward)
{
    sigset_t set;
    sigfillset(&set);
    int cmd_status = 0;
    bool cmd_alive = true;
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&set, &si);
        if (sig < 0)
            continue; /* EINTR */
        if (sig != SIGCHLD) {
            if (forward && cmd_alive)
                (void)kill(cmd, sig);
            else if (!forward && sig == SIGHUP && getppid() != agent)
                (void)proctree_kill(getpid(), NULL, 0);
            continue;
        }
        for (;;) {
            int st;
            pid_t pid = wait_nohang(-1, &st);
            if (pid < 0) /* ECHILD: every descendant has ended */
                return cmd_status;
            if (pid == 0)
                break;
            if (pid == cmd && (WIFEXITED(st) || WIFSIGNALED(st))) {
                cmd_alive = false;
                cmd_status = st;
                if (report_fd >= 0)
                    report(report_fd, REPORT_STATUS, st);
            }
        }
    }
}

/* Supervisor body: runs in the forked child, never returns. */
_Noreturn static void supervisor(const struct cmd_spec *spec, int report_fd, pid_t agent)
{
    /* Keep report_fd and the stdio ends on 3..6; close everything else of the agent's. */
    int keep[4] = {report_fd, spec->fd_in, spec->fd_out, spec->fd_err};
    int tmp[4];
    for (int i = 0; i < 4; i++)
        tmp[i] = keep[i] < 0 ? -1 : fcntl(keep[i], F_DUPFD_CLOEXEC, 10);
    for (int i = 0; i < 4; i++) {
        if (keep[i] >= 0 && (tmp[i] < 0 || dup3(tmp[i], 3 + i, O_CLOEXEC) < 0))
            _exit(125);
    }
    close_from(7);
    struct cmd_spec c = *spec;
    c.fd_in = spec->fd_in < 0 ? -1 : 4;
    c.fd_out = 5;
    c.fd_err = 6;
    report_fd = 3;

    (void)setsid();
    (void)prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    (void)prctl(PR_SET_PDEATHSIG, SIGHUP, 0, 0, 0);
    if (getppid() != agent) /* the agent died before the death signal was armed */
        (void)kill(getpid(), SIGHUP);

    pid_t cmd = fork();
    if (cmd == 0)
        run_command(&c);
    if (cmd < 0) {
        report(report_fd, REPORT_FAILED, errno);
        _exit(0);
    }
    if (!c.ctty) /* its group exists before STARTED: a signal to it cannot miss */
        (void)setpgid(cmd, cmd);
    close_quiet(4);
    close_quiet(5);
    close_quiet(6);
    report(report_fd, REPORT_STARTED, cmd);
    (void)reap_all(cmd, report_fd, agent, false);
    _exit(0);
}

pid_t spawn_supervisor(const struct cmd_spec *c, int report_fd)
{
    pid_t agent = getpid();
    pid_t pid = fork();
    if (pid == 0)
        supervisor(c, report_fd, agent);
    return pid;
}

int supervise_main(char **argv)
{
    (void)prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    (void)prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    signals_default();
    sigset_t all;
    sigfillset(&all);
    (void)sigprocmask(SIG_BLOCK, &all, NULL);
    pid_t cmd = fork();
    if (cmd == 0) {
        signals_unblock();
        exec_search(argv, environ);
        cannot_run(argv[0], "", errno);
    }
    if (cmd < 0) {
        cannot_run(argv[0], "fork: ", errno);
    }
    return status_code(reap_all(cmd, -1, 0, true));
}
