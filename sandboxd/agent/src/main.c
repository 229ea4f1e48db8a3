/* main.c - the agent's entry point: `--version`, `--supervise`, or the agent proper. Owns the
 * start-up (PROTOCOL.md "Start-up of the agent"), the signalfd, the channel input and the one
 * poll() loop; frames go to dispatch.c, exec work to exec.c, channel output to outq.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32.h"
#include "dispatch.h"
#include "exec.h"
#include "proctree.h"
#include "inbuf.h"
#include "outq.h"
#include "proto.h"
#include "spawn.h"
#include "util.h"

#define TRIM_AFTER_MS 1000 /* give back a big input buffer after this much quiet */
#define READS_PER_WAKE 16

extern char **environ;

static struct inbuf in;
static int sig_fd = -1;
static bool in_eof;
static int64_t last_input;

static void die(const char *what)
{
    /* stderr is /dev/null by now, except in the earliest steps. */
    int e = errno;
    (void)!write(2, "sandboxd-agent: ", 16);
    (void)!write(2, what, strlen(what));
    (void)!write(2, ": ", 2);
    (void)!write(2, strerror(e), strlen(strerror(e)));
    (void)!write(2, "\n", 1);
    _exit(1);
}

/* Whether a child can become a subreaper, as each exec's supervisor does (gVisor refuses
 * with EINVAL). Asked of a child: PID 1 may be treated apart. */
static bool subreapers_work(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 ? 0 : 1);
    if (pid < 0)
        return true; /* cannot tell: assume the common case */
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return true;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static void setup(void)
{
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        die("PR_SET_DUMPABLE");
    if (dup3(0, CHAN_IN_FD, O_CLOEXEC) < 0 || dup3(1, CHAN_OUT_FD, O_CLOEXEC) < 0)
        die("moving the channel to fds 990/991");
    if (set_nonblock(CHAN_IN_FD) < 0 || set_nonblock(CHAN_OUT_FD) < 0)
        die("O_NONBLOCK on the channel");
    pipe_grow(CHAN_IN_FD, 1 << 20);
    pipe_grow(CHAN_OUT_FD, 1 << 20);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0)
        die("/dev/null");
    for (int fd = 0; fd < 3; fd++)
        if (fd != null && dup2(null, fd) < 0)
            die("dup2 /dev/null");
    if (null > 2)
        close_quiet(null);
    else /* it landed on 0-2 itself: keep it there, inheritable like the others */
        (void)fcntl(null, F_SETFD, 0);
    signals_default(); /* nothing inherited as ignored reaches the commands */
    mode_t mask = umask(0); /* files the agent creates get exactly the asked mode */
    execs_init(environ, mask);
    sigset_t all;
    sigfillset(&all);
    if (sigprocmask(SIG_BLOCK, &all, NULL) < 0)
        die("sigprocmask");
    sig_fd = signalfd(-1, &all, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sig_fd < 0)
        die("signalfd");
    if (getpid() != 1) /* best effort: only the orphan rule needs it (qemu-user lacks it) */
        (void)prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    if (!subreapers_work())
        execs_no_subreaper();
    crc32_init();
    inbuf_init(&in);
    last_input = now_ns();
}

_Noreturn static void shutdown_agent(void)
{
    execs_kill_all();
    _exit(0);
}

static void handle_signals(void)
{
    bool reap = false;
    for (;;) {
        struct signalfd_siginfo si[16];
        ssize_t r = read(sig_fd, si, sizeof si);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        for (size_t i = 0; i < (size_t)r / sizeof si[0]; i++) {
            uint32_t s = si[i].ssi_signo;
            if (s == SIGCHLD)
                reap = true;
            else if ((s == SIGTERM || s == SIGINT || s == SIGHUP) &&
                     (si[i].ssi_pid == 0 || getpid() != 1))
                shutdown_agent(); /* from outside the sandbox (or anyone, when not PID 1) */
        }
    }
    if (!reap)
        return;
    for (;;) {
        int st;
        pid_t pid = wait_nohang(-1, &st);
        if (pid <= 0)
            break;
        execs_reaped(pid, st);
    }
}

static bool input_paused(void)
{
    return outq_backlog() >= REPLY_BACKLOG;
}

static void process_input(void)
{
    while (!input_paused()) {
        struct frame f;
        enum in_ev ev = inbuf_next(&in, &f);
        if (ev == IN_NONE)
            return;
        if (ev == IN_BAD)
            outq_coded(T_ERROR, 0, ERR_BAD_FRAME, "invalid frame: resynchronising");
        else
            dispatch(&f);
    }
}

static void read_input(int64_t now)
{
    for (int i = 0; i < READS_PER_WAKE && !input_paused(); i++) {
        size_t avail;
        uint8_t *p = inbuf_space(&in, &avail);
        if (!p)
            return;
        ssize_t r = read(CHAN_IN_FD, p, avail);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            return;
        if (r <= 0) { /* EOF or a broken channel: nothing more will come */
            in_eof = true;
            return;
        }
        inbuf_commit(&in, (size_t)r);
        last_input = now;
        process_input();
        if ((size_t)r < avail)
            return;
    }
}

static void flush_channel(void)
{
    if (!dispatch_hello_seen())
        return;
    while (outq_flush(CHAN_OUT_FD) == 1)
        if (!execs_produce())
            return;
}

static void min_deadline(int64_t *d, int64_t t)
{
    if (*d == 0 || t < *d)
        *d = t;
}

_Noreturn static void run_agent(void)
{
    setup();
    static struct pollfd pfd[3 + EXEC_POLL_MAX];
    for (;;) {
        int64_t now = now_ns();
        int64_t deadline = 0;
        size_t n = 0;
        pfd[n++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
        int in_idx = -1;
        if (!in_eof && !input_paused()) {
            in_idx = (int)n;
            pfd[n++] = (struct pollfd){.fd = CHAN_IN_FD, .events = POLLIN};
        }
        if (dispatch_hello_seen() && outq_pending())
            pfd[n++] = (struct pollfd){.fd = CHAN_OUT_FD, .events = POLLOUT};
        size_t base = n;
        n += execs_pollfds(pfd + base, now, &deadline);
        bool partial = inbuf_partial(&in) && !input_paused();
        if (partial)
            min_deadline(&deadline, last_input + PARTIAL_FRAME_MS * NS_PER_MS);
        if (inbuf_big(&in))
            min_deadline(&deadline, last_input + TRIM_AFTER_MS * NS_PER_MS);
        int timeout = -1;
        if (deadline) {
            int64_t left = deadline - now;
            timeout = left <= 0 ? 0 : (int)((left + NS_PER_MS - 1) / NS_PER_MS);
        }
        int r = poll(pfd, (nfds_t)n, timeout);
        if (r < 0 && errno != EINTR)
            continue; /* ENOMEM: try again */
        now = now_ns();
        if (r > 0 && pfd[0].revents)
            handle_signals();
        bool got_input = r > 0 && in_idx >= 0 && pfd[in_idx].revents;
        if (got_input) {
            read_input(now);
        } else if (partial && now - last_input >= PARTIAL_FRAME_MS * NS_PER_MS) {
            /* A daemon died mid-frame: drop a byte and look for the next frame. */
            if (inbuf_expire(&in))
                outq_coded(T_ERROR, 0, ERR_BAD_FRAME, "stale partial frame: resynchronising");
            last_input = now;
            process_input();
        }
        if (!got_input && !inbuf_partial(&in) && now - last_input >= TRIM_AFTER_MS * NS_PER_MS)
            (void)inbuf_trim(&in);
        if (r > 0)
            execs_handle(pfd + base, n - base);
        execs_tick(now);
        execs_post();
        flush_channel();
    }
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        printf("sandboxd-agent %s (protocol %u)\n", AGENT_VERSION_STR, PROTOCOL_VERSION);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--supervise") == 0) {
        int first = 2;
        if (argc > first && strcmp(argv[first], "--") == 0)
            first++;
        if (argc <= first) {
            fputs("usage: sandboxd-agent --supervise [--] ARGV...\n", stderr);
            return 2;
        }
        return supervise_main(argv + first);
    }
    if (argc == 3 && strcmp(argv[1], "--kill-marker") == 0) {
        int killed = proctree_kill_marked(argv[2]);
        printf("%d\n", killed);
        return killed < 0 ? 1 : 0;
    }
    if (argc >= 2) {
        fputs("usage: sandboxd-agent [--version | --supervise [--] ARGV... | "
              "--kill-marker VAR=VALUE]\n", stderr);
        return 2;
    }
    run_agent();
}
