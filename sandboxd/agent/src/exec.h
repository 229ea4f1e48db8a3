/* exec.h - the agent's exec records: what the frame dispatcher and the event loop may ask of
 * them. Everything about one exec (processes, pipes, rings, offsets, exit) is behind this. */
#ifndef SBX_EXEC_H
#define SBX_EXEC_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "payload.h"

/* Defaults every exec starts from: the agent's environment and umask. */
void execs_init(char **env, mode_t umask);
/* The kernel has no child subreapers (gVisor): what escapes an exec's supervisor (setsid,
 * double fork) lands on the agent, so a kill of an exec's tree also kills the agent's
 * orphans. */
void execs_no_subreaper(void);

/* Frames from the daemon (each answers on the channel itself when it has to). */
void exec_start(uint64_t id, const struct start_req *req);
void exec_stdin(uint64_t id, const uint8_t *data, size_t n);
void exec_close_stdin(uint64_t id);
void exec_signal(uint64_t id, uint32_t signo);
void exec_resize(uint64_t id, uint16_t rows, uint16_t cols);
void exec_ack(uint64_t id, uint64_t offset);
void exec_release(uint64_t id);
void exec_rewind(uint64_t id, uint64_t offset);

/* HELLO: every exec re-sends from max(acked, start_offset), then its EXIT. Writes the STATE
 * records (48 bytes each) to out, which holds MAX_EXECS of them; returns the count. */
uint32_t execs_hello(uint8_t *out);

/* Event loop: descriptors to poll (at most EXEC_POLL_MAX), and the earliest deadline (ns on
 * the monotonic clock, 0 when none), given the time now. */
#define EXEC_POLL_MAX (4 * 128)
size_t execs_pollfds(struct pollfd *pfd, int64_t now, int64_t *deadline);
/* After poll: handle the revents of the descriptors execs_pollfds gave (same order). */
void execs_handle(const struct pollfd *pfd, size_t n);
/* Timers: timeouts and the drain bounds. Call after every poll with the time now. */
void execs_tick(int64_t now);
/* Queue coalesced STDIN_ACKs. */
void execs_post(void);
/* A child was reaped. */
void execs_reaped(pid_t pid, int status);
/* Queue the next frame of exec output (OUTPUT or EXIT); false when there is none. */
bool execs_produce(void);
/* The agent is ending: kill every process it started. */
void execs_kill_all(void);

#endif
