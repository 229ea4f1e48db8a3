/* ring.h - one output stream's ring (RING_SIZE bytes) with chunks tagged by their starting
 * exec offset (PROTOCOL.md "Output"). It stores and finds bytes; it never reads a descriptor
 * and knows nothing of the channel. */
#ifndef SBX_RING_H
#define SBX_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct chunk {
    uint64_t off;   /* exec offset of the first byte */
    uint32_t sidx;  /* stream index of the first byte, modulo 2^32 */
    uint32_t len;
};

struct ring {
    uint8_t *mem;      /* RING_SIZE bytes, mapped on first use */
    struct chunk *ch;  /* circular, oldest first */
    uint32_t ch_cap, ch_head, ch_n;
    uint64_t sidx_end; /* stream bytes stored so far */
    uint32_t bytes;    /* bytes retained */
};

/* Map the memory on first use; -1 when out of memory. */
int ring_ready(struct ring *r);
void ring_free(struct ring *r);

/* How many new bytes may be stored now. Blocking mode (dropping false): no retained byte at an
 * offset >= keep may be overwritten. end_off: the exec's offset of the next byte. */
size_t ring_room(const struct ring *r, bool dropping, uint64_t keep, uint64_t end_off);

/* Where the next n (<= RING_SIZE) bytes go: 1 or 2 segments. */
int ring_write_segs(const struct ring *r, size_t n, struct iovec seg[2]);

/* Record n bytes just stored there, the first at exec offset off; the oldest bytes beyond
 * RING_SIZE are dropped. Merges with the previous chunk when it ends at off. */
void ring_commit(struct ring *r, uint64_t off, size_t n);

/* The first retained bytes at an offset >= from, within one chunk, at most max: their offset
 * in *start and 1-2 segments; returns the byte count (0: none). */
size_t ring_peek(const struct ring *r, uint64_t from, size_t max, uint64_t *start,
                 struct iovec seg[2], int *nseg);

/* The oldest retained offset; UINT64_MAX when empty. */
uint64_t ring_oldest(const struct ring *r);

#endif
