/* inbuf.h - assembly of daemon -> agent frames from the channel's bytes, with the resync rules
 * of PROTOCOL.md ("Agent-side validation and resync"). Pure: it never reads a descriptor and
 * never looks at a clock; the caller reads into inbuf_space() and decides when a partial frame
 * has gone stale. */
#ifndef SBX_INBUF_H
#define SBX_INBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "frame.h"

struct inbuf {
    uint8_t *buf;
    size_t cap, head, len;
    size_t consume;  /* length of the frame last returned: dropped by the next call */
    bool recovering; /* inside one resync: further bad bytes report nothing new */
};

void inbuf_init(struct inbuf *b);
void inbuf_free(struct inbuf *b);

/* Where to read the next bytes to; *avail is how many fit (always > 0 on success).
 * NULL when memory is short (try again later). Invalidates the last frame's payload. */
uint8_t *inbuf_space(struct inbuf *b, size_t *avail);
void inbuf_commit(struct inbuf *b, size_t n);

/* Give back a large buffer when nothing is held (call when input has been quiet a while).
 * True when memory was released. */
bool inbuf_trim(struct inbuf *b);

/* Whether the buffer is larger than its idle size. */
static inline bool inbuf_big(const struct inbuf *b) { return b->cap > (64u << 10); }

enum in_ev {
    IN_NONE,  /* nothing complete: need more bytes */
    IN_FRAME, /* *f is a valid frame; its payload stays valid until the next inbuf call */
    IN_BAD,   /* a resync started: send one ERROR BAD_FRAME, then call again */
};
enum in_ev inbuf_next(struct inbuf *b, struct frame *f);

/* Whether bytes are held that do not make a complete frame yet. */
bool inbuf_partial(const struct inbuf *b);

/* A partial frame went stale: drop its first byte so the next inbuf_next resyncs.
 * True when this starts a recovery (the caller sends ERROR BAD_FRAME). */
bool inbuf_expire(struct inbuf *b);

#endif
