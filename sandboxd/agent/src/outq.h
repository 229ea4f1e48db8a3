/* outq.h - everything the agent writes to its channel (fd 991): a queue of reply frames
 * (built in place, written in order) and at most one OUTPUT frame in flight whose data stays in
 * an exec's ring until the channel takes it. Never blocks; never reads. */
#ifndef SBX_OUTQ_H
#define SBX_OUTQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* Queue a complete frame; its payload is a followed by b (either may be empty). */
void outq_frame(uint8_t type, uint8_t flags, uint64_t id, const void *a, size_t alen,
                const void *b, size_t blen);

/* Queue a frame whose payload is "u32 code, u32 len, message" (ERROR, START_FAILED). */
void outq_coded(uint8_t type, uint64_t id, uint32_t code, const char *msg);

/* Build a frame in place: room for up to maxlen payload bytes (NULL when memory is short),
 * then outq_end with the real length, or outq_cancel. Nothing else may be queued between. */
uint8_t *outq_begin(size_t maxlen);
void outq_end(uint8_t type, uint8_t flags, uint64_t id, size_t len);
void outq_cancel(void);

/* Whether an OUTPUT frame may be started now (none is in flight and no reply waits). */
bool outq_idle(void);

/* Start the OUTPUT frame: header, u64 offset, then the data of nseg (<= 2) segments, which
 * must stay untouched until written or until outq_guard copies them. */
void outq_output(uint8_t flags, uint64_t id, uint64_t offset, const struct iovec *seg, int nseg);

/* [p, p + n) is about to be overwritten or freed: copy what the frame in flight still needs
 * from it. False when that copy failed (memory): the caller must not touch the bytes yet. */
bool outq_guard(const uint8_t *p, size_t n);

/* Whether bytes wait for the channel; the reply bytes queued. */
bool outq_pending(void);
size_t outq_backlog(void);

/* Write what the channel takes. 1: everything written; 0: the channel is full (poll for
 * POLLOUT); -1: the channel is gone (everything queued now and later is dropped). */
int outq_flush(int fd);

#endif
