/* exec.c - exec records and their lifecycle: the table, control frames
 * (stdin, signals, resize, ack, rewind, release), reaping, timeouts, the drain bound, STATE.
 * START is execstart.c's, pipe I/O and OUTPUT production execio.c's, the forked children's
 * code spawn.c's. */
#define _GNU_SOURCE
#include "exec.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "exec_int.h"
#include "frame.h"
#include "outq.h"
#include "proctree.h"
#include "proto.h"
#include "util.h"

struct exec *g_execs[MAX_EXECS];
size_t g_nexecs;

/* Live supervisors, including those of released execs: the orphan rule spares them. */
static pid_t *sups;
static size_t nsups, sups_cap;

enum role { R_REPORT, R_OUT0, R_OUT1, R_IN };
static struct {
    uint64_t id; /* looked up again after poll: a handler may have destroyed a record */
    enum role role;
} poll_refs[EXEC_POLL_MAX];

struct exec *exec_find(uint64_t id)
{
    for (size_t i = 0; i < g_nexecs; i++)
        if (g_execs[i]->id == id)
            return g_execs[i];
    return NULL;
}

static void send_error(uint32_t code, uint64_t id, const char *msg)
{
    outq_coded(T_ERROR, id, code, msg);
}

static struct exec *find_or_report(uint64_t id)
{
    struct exec *e = exec_find(id);
    if (!e)
        send_error(ERR_UNKNOWN_EXEC, id, "unknown exec");
    return e;
}

void exec_start_failed(uint64_t id, int err)
{
    outq_coded(T_START_FAILED, id, (uint32_t)err, strerror(err));
}

static void sups_remove(pid_t pid)
{
    for (size_t i = 0; i < nsups; i++) {
        if (sups[i] == pid) {
            sups[i] = sups[--nsups];
            return;
        }
    }
}

int exec_sups_reserve(void)
{
    if (nsups == sups_cap) {
        size_t cap = sups_cap ? sups_cap * 2 : 16;
        pid_t *v = realloc(sups, cap * sizeof *v);
        if (!v)
            return -1;
        sups = v;
        sups_cap = cap;
    }
    return 0;
}

void exec_sups_add(pid_t pid)
{
    sups[nsups++] = pid;
}

/* Free everything of a record (its processes are left alone) and drop it from the table. */
static void destroy(struct exec *e)
{
    for (int s = 0; s < 2; s++) {
        if (e->ring[s].mem)
            (void)outq_guard(e->ring[s].mem, RING_SIZE);
        close_quiet(e->out_fd[s]);
        ring_free(&e->ring[s]);
    }
    close_quiet(e->report_fd);
    close_quiet(e->in_fd);
    free(e->in_buf);
    for (size_t i = 0; i < g_nexecs; i++) {
        if (g_execs[i] == e) {
            g_execs[i] = g_execs[--g_nexecs];
            break;
        }
    }
    free(e);
}

/* ---- reports from the supervisor --------------------------------------------------------- */

static void kill_tree(struct exec *e);

void exec_started(struct exec *e, pid_t cmd)
{
    if (e->started)
        return;
    e->cmd_pid = cmd;
    e->started = true;
    uint8_t p[4];
    put_u32(p, (uint32_t)cmd);
    outq_frame(T_STARTED, 0, e->id, p, sizeof p, NULL, 0);
    uint32_t sig = e->pending_sig;
    e->pending_sig = 0;
    if (sig == SIGKILL)
        kill_tree(e);
    else if (sig)
        (void)kill(-cmd, (int)sig);
}

void exec_failed(struct exec *e, int err)
{
    exec_start_failed(e->id, err);
    destroy(e);
}

void exec_status(struct exec *e, int status, int64_t now)
{
    if (e->have_status)
        return;
    e->have_status = true;
    e->status = status;
    e->deadline = 0;
    e->drain_tick = now;
    e->drain_quiet = e->drain_used = 0;
}

/* ---- frames from the daemon -------------------------------------------------------------- */

void exec_stdin(uint64_t id, const uint8_t *data, size_t n)
{
    struct exec *e = find_or_report(id);
    if (!e)
        return;
    if (!e->stdin_open) {
        send_error(ERR_BAD_PAYLOAD, id, "stdin is not open");
        return;
    }
    if (!n)
        return;
    if (e->in_len == 0) { /* straight to the pipe while it takes it */
        ssize_t w;
        do
            w = write(e->in_fd, data, n);
        while (w < 0 && errno == EINTR);
        if (w < 0 && errno != EAGAIN) {
            exio_close_stdin_now(e);
            return;
        }
        if (w > 0) {
            data += w;
            n -= (size_t)w;
            e->stdin_consumed += (uint64_t)w;
        }
    }
    size_t room = STDIN_WINDOW - e->in_len;
    if (n > room) {
        n = room;
        send_error(ERR_STDIN_OVERFLOW, id, "stdin beyond the window was dropped");
    }
    if (!n)
        return;
    if (!e->in_buf && !(e->in_buf = malloc(STDIN_WINDOW))) {
        send_error(ERR_STDIN_OVERFLOW, id, "no memory for stdin: dropped");
        return;
    }
    uint32_t tail = (e->in_head + e->in_len) % STDIN_WINDOW;
    size_t first = STDIN_WINDOW - tail;
    if (first > n)
        first = n;
    memcpy(e->in_buf + tail, data, first);
    memcpy(e->in_buf, data + first, n - first);
    e->in_len += (uint32_t)n;
}

void exec_close_stdin(uint64_t id)
{
    struct exec *e = find_or_report(id);
    if (!e || !e->stdin_open)
        return;
    e->stdin_open = false;
    e->stdin_closing = true;
    if (e->in_len == 0)
        exio_close_stdin_now(e);
}

static bool no_subreaper;

void execs_no_subreaper(void)
{
    no_subreaper = true;
}

/* Stop all, then kill, in the exec's tree (the supervisor stays to reap). Without
 * subreapers, also every orphan the agent inherited: what escaped this exec is among them
 * (and so may be what escaped another). */
static void kill_tree(struct exec *e)
{
    if (!e->sup_alive)
        return;
    if (proctree_kill(e->sup_pid, NULL, 0) < 0 && e->cmd_pid > 0)
        (void)kill(-e->cmd_pid, SIGKILL); /* no /proc: at least the command's group */
    if (no_subreaper)
        (void)proctree_kill(getpid(), sups, nsups);
    (void)kill(e->sup_pid, SIGCONT); /* a supervisor stopped from inside must still reap */
}

void exec_signal(uint64_t id, uint32_t signo)
{
    struct exec *e = find_or_report(id);
    if (!e)
        return;
    if (signo == 0 || signo >= 65) {
        send_error(ERR_BAD_PAYLOAD, id, "no such signal");
        return;
    }
    if (!e->started && e->sup_alive) /* not forked yet, or not reported: again at STARTED */
        e->pending_sig = signo;
    if (signo == SIGKILL)
        kill_tree(e);
    else if (e->cmd_pid > 0 && e->sup_alive)
        (void)kill(-e->cmd_pid, (int)signo);
}

void exec_resize(uint64_t id, uint16_t rows, uint16_t cols)
{
    struct exec *e = find_or_report(id);
    if (!e || !(e->flags & START_TTY) || e->out_fd[0] < 0)
        return;
    struct winsize ws = {0};
    ws.ws_row = rows;
    ws.ws_col = cols;
    (void)ioctl(e->out_fd[0], TIOCSWINSZ, &ws);
}

void exec_ack(uint64_t id, uint64_t offset)
{
    struct exec *e = find_or_report(id);
    if (!e)
        return;
    if (offset > e->sent_max)
        offset = e->sent_max;
    if (offset > e->acked)
        e->acked = offset;
}

void exec_release(uint64_t id)
{
    struct exec *e = find_or_report(id);
    if (e)
        destroy(e);
}

void exec_rewind(uint64_t id, uint64_t offset)
{
    struct exec *e = find_or_report(id);
    if (!e)
        return;
    offset = exio_first_held(e, offset);
    e->send_pos = offset;
    if (offset > e->acked) /* what is skipped counts as acknowledged */
        e->acked = offset;
    e->exit_sent = false;
    uint8_t p[8];
    put_u64(p, offset);
    outq_frame(T_REWOUND, 0, id, p, sizeof p, NULL, 0);
}

uint32_t execs_hello(uint8_t *out)
{
    for (size_t i = 0; i < g_nexecs; i++) {
        struct exec *e = g_execs[i];
        uint64_t start = exio_start_offset(e);
        e->send_pos = e->acked > start ? e->acked : start;
        if (e->send_pos > e->end_off)
            e->send_pos = e->end_off;
        if (e->send_pos > e->acked) /* dropped output counts as acknowledged */
            e->acked = e->send_pos;
        e->exit_sent = false;
        uint8_t *r = out + i * STATE_RECORD_LEN;
        uint8_t flags = 0;
        if (e->flags & START_DETACHED)
            flags |= REC_DETACHED;
        if (e->flags & START_TTY)
            flags |= REC_TTY;
        if (e->stdin_open)
            flags |= REC_STDIN_OPEN;
        if (e->drained)
            flags |= REC_EXITED;
        if (e->sup_alive)
            flags |= REC_TREE_ALIVE;
        memset(r, 0, STATE_RECORD_LEN);
        put_u64(r, e->id);
        r[8] = flags;
        r[9] = e->timed_out;
        r[10] = e->have_status && WIFSIGNALED(e->status);
        put_u32(r + 12, e->drained ? (uint32_t)status_code(e->status) : 0);
        put_u64(r + 16, start);
        put_u64(r + 24, e->end_off);
        put_u64(r + 32, e->acked);
        put_u64(r + 40, e->stdin_consumed);
    }
    return (uint32_t)g_nexecs;
}

/* ---- event loop -------------------------------------------------------------------------- */

static size_t add_fd(struct pollfd *pfd, size_t n, int fd, short ev, struct exec *e, enum role r)
{
    if (n >= EXEC_POLL_MAX)
        return n;
    pfd[n].fd = fd;
    pfd[n].events = ev;
    pfd[n].revents = 0;
    poll_refs[n].id = e->id;
    poll_refs[n].role = r;
    return n + 1;
}

static void min_deadline(int64_t *d, int64_t t)
{
    if (t > 0 && (*d == 0 || t < *d))
        *d = t;
}

size_t execs_pollfds(struct pollfd *pfd, int64_t now, int64_t *deadline)
{
    size_t n = 0;
    for (size_t i = 0; i < g_nexecs; i++) {
        struct exec *e = g_execs[i];
        if (e->report_fd >= 0)
            n = add_fd(pfd, n, e->report_fd, POLLIN, e, R_REPORT);
        e->blocked = false;
        for (int s = 0; s < 2; s++) {
            if (e->out_fd[s] < 0)
                continue;
            if (exio_room(e, s))
                n = add_fd(pfd, n, e->out_fd[s], POLLIN, e, s ? R_OUT1 : R_OUT0);
            else
                e->blocked = true;
        }
        if (e->in_fd >= 0 && e->in_len)
            n = add_fd(pfd, n, e->in_fd, POLLOUT, e, R_IN);
        min_deadline(deadline, e->deadline);
        if (e->send_pos < e->end_off && exio_holding(e, now))
            min_deadline(deadline, e->unsent_since + (int64_t)COALESCE_MS * NS_PER_MS);
        if (e->have_status && !e->drained && !e->blocked) {
            int64_t q = DRAIN_QUIET_MS * NS_PER_MS - e->drain_quiet;
            int64_t m = DRAIN_MAX_MS * NS_PER_MS - e->drain_used;
            int64_t left = q < m ? q : m;
            min_deadline(deadline, now + (left > 0 ? left : 0));
        }
    }
    return n;
}

void execs_handle(const struct pollfd *pfd, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!pfd[i].revents)
            continue;
        struct exec *e = exec_find(poll_refs[i].id);
        if (!e) /* destroyed by an earlier handler of this round */
            continue;
        switch (poll_refs[i].role) {
        case R_REPORT:
            if (e->report_fd == pfd[i].fd)
                exio_read_report(e);
            break;
        case R_OUT0:
        case R_OUT1: {
            int s = poll_refs[i].role == R_OUT1;
            if (e->out_fd[s] == pfd[i].fd)
                exio_read_output(e, s);
            break;
        }
        case R_IN:
            if (e->in_fd == pfd[i].fd)
                exio_write_stdin(e);
            break;
        }
    }
}

static void finish_drain(struct exec *e)
{
    exio_close_outputs(e);
    exio_close_stdin_now(e);
    e->drained = true;
}

void execs_tick(int64_t now)
{
    for (size_t i = 0; i < g_nexecs; i++) {
        struct exec *e = g_execs[i];
        if (e->deadline && now >= e->deadline && !e->have_status) {
            e->deadline = 0;
            e->timed_out = true;
            kill_tree(e);
        }
        if (!e->have_status || e->drained)
            continue;
        int64_t dt = now - e->drain_tick;
        e->drain_tick = now;
        if (!e->blocked && dt > 0) {
            e->drain_quiet += dt;
            e->drain_used += dt;
        }
        if ((e->out_fd[0] < 0 && e->out_fd[1] < 0) ||
            e->drain_quiet >= DRAIN_QUIET_MS * NS_PER_MS ||
            e->drain_used >= DRAIN_MAX_MS * NS_PER_MS)
            finish_drain(e);
    }
}

void execs_post(void)
{
    for (size_t i = 0; i < g_nexecs; i++) {
        struct exec *e = g_execs[i];
        if (e->stdin_consumed != e->stdin_reported) {
            uint8_t p[8];
            put_u64(p, e->stdin_consumed);
            outq_frame(T_STDIN_ACK, 0, e->id, p, sizeof p, NULL, 0);
            e->stdin_reported = e->stdin_consumed;
        }
    }
}

static size_t rr_next;

bool execs_produce(void)
{
    for (size_t k = 0; k < g_nexecs; k++) {
        size_t i = (rr_next + k) % g_nexecs;
        struct exec *e = g_execs[i];
        if (!e->started)
            continue;
        if (exio_output_frame(e)) {
            rr_next = i + 1;
            return true;
        }
        if (e->drained && !e->exit_sent && e->send_pos >= e->end_off) {
            uint8_t p[16] = {0};
            put_u32(p, (uint32_t)status_code(e->status));
            p[4] = WIFSIGNALED(e->status) ? 1 : 0;
            p[5] = e->timed_out;
            put_u64(p + 8, e->end_off);
            outq_frame(T_EXIT, 0, e->id, p, sizeof p, NULL, 0);
            e->exit_sent = true;
            rr_next = i + 1;
            return true;
        }
    }
    return false;
}

/* ---- processes ending -------------------------------------------------------------------- */

void execs_reaped(pid_t pid, int status)
{
    int64_t now = now_ns();
    bool was_sup = false;
    for (size_t i = 0; i < nsups; i++)
        was_sup |= sups[i] == pid;
    if (!was_sup) {
        /* An orphan: maybe a command whose supervisor was killed. */
        for (size_t i = 0; i < g_nexecs; i++)
            if (g_execs[i]->cmd_pid == pid && !g_execs[i]->have_status)
                exec_status(g_execs[i], status, now);
        return;
    }
    sups_remove(pid);
    struct exec *e = NULL;
    for (size_t i = 0; i < g_nexecs; i++)
        if (g_execs[i]->sup_pid == pid && g_execs[i]->sup_alive)
            e = g_execs[i];
    uint64_t id = e ? e->id : 0;
    if (e) {
        e->sup_alive = false;
        if (e->report_fd >= 0)
            exio_read_report(e); /* what it said before it ended (may destroy e) */
    }
    if (WIFSIGNALED(status)) /* killed from inside: its orphans are the agent's now */
        (void)proctree_kill(getpid(), sups, nsups);
    e = id ? exec_find(id) : NULL;
    if (!e || e->have_status)
        return;
    if (!e->started) { /* it died before starting the command */
        exec_failed(e, ECHILD);
        return;
    }
    int st;
    pid_t r = wait_nohang(e->cmd_pid, &st);
    if (r == e->cmd_pid)
        exec_status(e, st, now);
    else if (r < 0) /* not the agent's child: the supervisor reaped it and its report is lost */
        exec_status(e, status, now);
    /* r == 0: the orphaned command is being killed; its reaping reports it. */
}

void execs_kill_all(void)
{
    (void)proctree_kill(getpid(), NULL, 0);
}
