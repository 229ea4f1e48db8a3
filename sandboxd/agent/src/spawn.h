/* spawn.h - everything that runs in a forked child: the per-exec supervisor (setsid, child
 * subreaper, reports to the agent), the command child (stdio, controlling tty, cwd, execve with
 * a PATH search), and the `--supervise` mode. It never touches the channel or exec records. */
#ifndef SBX_SPAWN_H
#define SBX_SPAWN_H

#include <stdint.h>
#include <sys/types.h>

/* What the supervisor tells the agent over its report pipe: 8-byte records. */
struct report {
    int32_t kind;  /* REPORT_* */
    int32_t value; /* pid, errno, or wait status */
};
#define REPORT_STARTED 1 /* value: the command's pid */
#define REPORT_FAILED 2  /* value: errno of fork() */
#define REPORT_STATUS 3  /* value: the command's wait status */

struct cmd_spec {
    char **argv; /* argv[0] is searched in envp's PATH when it has no '/' */
    char **envp;
    const char *cwd; /* NULL: the agent's own */
    int fd_in;       /* -1: keep fd 0 (/dev/null) */
    int fd_out, fd_err;
    int ctty;        /* fd_in is a PTY slave: setsid and make it the controlling terminal */
    mode_t umask;
};

/* Fork the supervisor of one exec (the agent calls this). It keeps report_fd and the spec's
 * descriptors and closes every other. The caller still owns and closes its copies.
 * Returns the supervisor's pid, or -1 with errno. */
pid_t spawn_supervisor(const struct cmd_spec *c, int report_fd);

/* `agent --supervise [--] ARGV...`: run ARGV under a child subreaper and return its exit code
 * once every descendant has ended. */
int supervise_main(char **argv);

#endif
