/* exec_int.h - the exec record, shared by exec.c (lifecycle), execstart.c (START) and
 * execio.c (pipe I/O and output production) only. Nothing else includes it. */
#ifndef SBX_EXEC_INT_H
#define SBX_EXEC_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "ring.h"

struct exec {
    uint64_t id;
    uint32_t flags; /* START_* */
    pid_t sup_pid;  /* the supervisor */
    pid_t cmd_pid;  /* the command, 0 until reported */
    bool sup_alive;
    bool started;   /* STARTED queued */
    uint32_t pending_sig; /* a SIGNAL that came before the command was started */

    int report_fd; /* the supervisor's report pipe, -1 once closed */
    uint8_t rep_buf[8];
    uint8_t rep_len;

    int out_fd[2]; /* stdout (or the PTY master), stderr; -1 once closed */
    struct ring ring[2];
    bool blocked; /* a stream waits for room (blocking mode): drain clocks stand still */

    int in_fd;      /* stdin pipe or the PTY master's duplicate, -1 once closed */
    uint8_t *in_buf; /* STDIN_WINDOW bytes, circular, allocated on first need */
    uint32_t in_head, in_len;
    bool stdin_open;    /* STDIN is accepted */
    bool stdin_closing; /* close once the buffer is written */
    uint64_t stdin_consumed, stdin_reported;

    uint64_t end_off;  /* output bytes read */
    uint64_t acked;    /* never goes back */
    uint64_t send_pos; /* next offset to send */
    uint64_t sent_max; /* highest offset sent */
    int64_t unsent_since; /* when the oldest output not yet sent was read (coalescing) */

    bool have_status;
    int status; /* wait status */
    bool timed_out;
    int64_t deadline; /* timeout, 0: none */
    int64_t drain_tick, drain_quiet, drain_used;
    bool drained;   /* pipes closed: EXIT follows the last output */
    bool exit_sent; /* EXIT queued since the last HELLO / REWIND */
};

extern struct exec *g_execs[];
extern size_t g_nexecs;

/* execio.c */
void exio_read_report(struct exec *e);
void exio_read_output(struct exec *e, int s);
void exio_write_stdin(struct exec *e);
size_t exio_room(const struct exec *e, int s);
uint64_t exio_start_offset(const struct exec *e);
uint64_t exio_first_held(const struct exec *e, uint64_t from);
void exio_close_stdin_now(struct exec *e);
void exio_close_outputs(struct exec *e);
bool exio_output_frame(struct exec *e);
bool exio_holding(const struct exec *e, int64_t now);

/* exec.c */
struct exec *exec_find(uint64_t id);
void exec_start_failed(uint64_t id, int err); /* queue START_FAILED */
int exec_sups_reserve(void);                  /* room for one more supervisor, or -1 */
void exec_sups_add(pid_t pid);                /* a new live supervisor (after reserve) */
void exec_started(struct exec *e, pid_t cmd);
void exec_failed(struct exec *e, int err);
void exec_status(struct exec *e, int status, int64_t now);

#endif
