/* util.h - small system helpers shared by the agent's parts: the monotonic clock, descriptor
 * flags, EINTR-safe calls, and closing every descriptor but a few. No protocol knowledge. */
#ifndef SBX_UTIL_H
#define SBX_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define NS_PER_MS 1000000LL

int64_t now_ns(void);

int set_nonblock(int fd);
int set_cloexec(int fd);
/* Try to make a pipe hold `size` bytes (F_SETPIPE_SZ); failure is ignored. */
void pipe_grow(int fd, int size);
/* close() that keeps errno and ignores fd < 0. */
void close_quiet(int fd);

/* Write all of buf to a blocking descriptor (EINTR retried); 0 or -1. */
int write_all(int fd, const void *buf, size_t n);

/* Close every descriptor >= lowfd. */
void close_from(int lowfd);

/* waitpid(pid, st, WNOHANG) retried on EINTR. */
pid_t wait_nohang(pid_t pid, int *status);

/* The exit code a shell reports for a wait status: the code, or 128 + signal. */
int status_code(int status);

/* Put the default disposition back on every signal (once at start: children inherit it). */
void signals_default(void);
/* Unblock every signal. */
void signals_unblock(void);

#endif
