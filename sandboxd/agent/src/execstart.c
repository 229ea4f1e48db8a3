/* execstart.c - START: an exec's descriptors (pipes, or a PTY), its supervisor, its record.
 * Owns the defaults every exec starts from (the agent's environment and umask). What happens
 * after the start is exec.c's (lifecycle) and execio.c's (I/O). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "exec.h"
#include "exec_int.h"
#include "proto.h"
#include "spawn.h"
#include "util.h"

static char **agent_env;
static mode_t agent_umask;

void execs_init(char **env, mode_t umask)
{
    agent_env = env;
    agent_umask = umask;
}

struct start_fds {
    int report[2];
    int out[2][2]; /* [stream][read, write] */
    int in[2];     /* [read, write] */
    int master, slave;
};

static void close_fds(struct start_fds *f)
{
    int *all = &f->report[0];
    for (size_t i = 0; i < sizeof *f / sizeof(int); i++)
        close_quiet(all[i]);
}

/* Create the descriptors of one exec; -1 with errno. */
static int open_fds(struct start_fds *f, const struct start_req *req)
{
    memset(f, -1, sizeof *f);
    if (pipe2(f->report, O_CLOEXEC) < 0 || set_nonblock(f->report[0]) < 0)
        return -1;
    if (req->flags & START_TTY) {
        f->master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (f->master < 0 || set_cloexec(f->master) < 0 || grantpt(f->master) < 0 ||
            unlockpt(f->master) < 0)
            return -1;
        char name[128];
        int r = ptsname_r(f->master, name, sizeof name);
        if (r) {
            errno = r;
            return -1;
        }
        f->slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (f->slave < 0)
            return -1;
        struct winsize ws = {0};
        ws.ws_row = req->rows ? req->rows : 24;
        ws.ws_col = req->cols ? req->cols : 80;
        if (ioctl(f->master, TIOCSWINSZ, &ws) < 0 || set_nonblock(f->master) < 0)
            return -1;
        if (req->flags & START_STDIN) {
            f->in[1] = fcntl(f->master, F_DUPFD_CLOEXEC, 3);
            if (f->in[1] < 0)
                return -1;
        }
        return 0;
    }
    for (int s = 0; s < 2; s++) {
        if (pipe2(f->out[s], O_CLOEXEC) < 0 || set_nonblock(f->out[s][0]) < 0)
            return -1;
        pipe_grow(f->out[s][0], s == 0 ? (1 << 20) : (256 << 10));
    }
    if (req->flags & START_STDIN) {
        if (pipe2(f->in, O_CLOEXEC) < 0 || set_nonblock(f->in[1]) < 0)
            return -1;
        pipe_grow(f->in[1], 1 << 20);
    }
    return 0;
}

void exec_start(uint64_t id, const struct start_req *req)
{
    if (exec_find(id)) {
        exec_start_failed(id, EEXIST);
        return;
    }
    if (g_nexecs >= MAX_EXECS) {
        exec_start_failed(id, EAGAIN);
        return;
    }
    struct start_fds f;
    memset(&f, -1, sizeof f);
    struct exec *e = calloc(1, sizeof *e);
    char **argv = strv_build(req->argv_raw, req->argv_raw_len, req->argc, NULL);
    char **envp = strv_build(req->env_raw, req->env_raw_len, req->envc, agent_env);
    char *cwd = req->cwd_len ? str_dup_n(req->cwd, req->cwd_len) : NULL;
    int err = 0;
    if (!e || !argv || !envp || (req->cwd_len && !cwd) || exec_sups_reserve() < 0)
        err = ENOMEM;
    else if (open_fds(&f, req) < 0)
        err = errno ? errno : EIO;
    pid_t sup = -1;
    if (!err) {
        bool tty = req->flags & START_TTY;
        struct cmd_spec spec = {
            .argv = argv,
            .envp = envp,
            .cwd = cwd,
            .fd_in = tty ? f.slave : f.in[0],
            .fd_out = tty ? f.slave : f.out[0][1],
            .fd_err = tty ? f.slave : f.out[1][1],
            .ctty = tty,
            .umask = agent_umask,
        };
        sup = spawn_supervisor(&spec, f.report[1]);
        if (sup < 0)
            err = errno;
    }
    free(argv);
    free(envp);
    free(cwd);
    if (err) {
        close_fds(&f);
        free(e);
        exec_start_failed(id, err);
        return;
    }
    /* The agent keeps: report read end, output read ends (or the master), stdin write end. */
    bool tty = req->flags & START_TTY;
    e->id = id;
    e->flags = req->flags;
    e->sup_pid = sup;
    e->sup_alive = true;
    e->report_fd = f.report[0];
    e->out_fd[0] = tty ? f.master : f.out[0][0];
    e->out_fd[1] = tty ? -1 : f.out[1][0];
    e->in_fd = f.in[1];
    e->stdin_open = e->in_fd >= 0;
    f.report[0] = f.out[0][0] = f.out[1][0] = f.in[1] = -1;
    if (tty)
        f.master = -1;
    close_fds(&f);
    exec_sups_add(sup); /* exec_sups_reserve made room */
    if (req->timeout_ms)
        e->deadline = now_ns() + (int64_t)req->timeout_ms * NS_PER_MS;
    g_execs[g_nexecs++] = e;
}
