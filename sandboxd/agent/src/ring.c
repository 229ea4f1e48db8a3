/* ring.c - output ring storage (see ring.h). Owns the ring memory and the chunk table. */
#define _GNU_SOURCE
#include "ring.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "proto.h"

#define CH_FIRST 16u
#define CH_MAX 16384u /* chunk descriptors per stream at most */

int ring_ready(struct ring *r)
{
    if (r->mem)
        return 0;
    void *m = mmap(NULL, RING_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return -1;
    (void)madvise(m, RING_SIZE, MADV_DONTFORK); /* forks (supervisors) never copy it */
    r->mem = m;
    return 0;
}

void ring_free(struct ring *r)
{
    if (r->mem)
        (void)munmap(r->mem, RING_SIZE);
    free(r->ch);
    memset(r, 0, sizeof *r);
}

static struct chunk *chunk_at(const struct ring *r, uint32_t i)
{
    return &r->ch[(r->ch_head + i) % r->ch_cap];
}

/* Index of the first chunk holding a byte at offset >= off (ch_n when none). */
static uint32_t first_from(const struct ring *r, uint64_t off)
{
    uint32_t lo = 0, hi = r->ch_n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const struct chunk *c = chunk_at(r, mid);
        if (c->off + c->len <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

size_t ring_room(const struct ring *r, bool dropping, uint64_t keep, uint64_t end_off)
{
    if (dropping)
        return RING_SIZE;
    uint32_t protected_bytes = 0;
    uint32_t i = first_from(r, keep);
    if (i < r->ch_n) {
        const struct chunk *c = chunk_at(r, i);
        uint64_t from = keep > c->off ? keep : c->off;
        uint32_t sidx = c->sidx + (uint32_t)(from - c->off);
        protected_bytes = (uint32_t)r->sidx_end - sidx;
    }
    if (protected_bytes >= RING_SIZE)
        return 0;
    if (r->ch_n == CH_MAX) {
        const struct chunk *last = chunk_at(r, r->ch_n - 1);
        const struct chunk *first = chunk_at(r, 0);
        bool merges = last->off + last->len == end_off;
        if (!merges && first->off + first->len > keep)
            return 0; /* a new chunk would need a slot only an unacknowledged chunk holds */
    }
    return RING_SIZE - protected_bytes;
}

int ring_write_segs(const struct ring *r, size_t n, struct iovec seg[2])
{
    size_t pos = (size_t)(r->sidx_end % RING_SIZE);
    size_t first = RING_SIZE - pos;
    seg[0].iov_base = r->mem + pos;
    if (n <= first) {
        seg[0].iov_len = n;
        return 1;
    }
    seg[0].iov_len = first;
    seg[1].iov_base = r->mem;
    seg[1].iov_len = n - first;
    return 2;
}

static void drop_front(struct ring *r, uint32_t k)
{
    struct chunk *c = chunk_at(r, 0);
    c->off += k;
    c->sidx += k;
    c->len -= k;
    r->bytes -= k;
    if (c->len == 0) {
        r->ch_head = (r->ch_head + 1) % r->ch_cap;
        r->ch_n--;
    }
}

/* A free chunk slot: grow the table, else drop the oldest chunk. */
static void chunk_slot(struct ring *r)
{
    if (r->ch_n < r->ch_cap)
        return;
    if (r->ch_cap < CH_MAX) {
        uint32_t cap = r->ch_cap ? r->ch_cap * 2 : CH_FIRST;
        struct chunk *nc = malloc((size_t)cap * sizeof *nc);
        if (nc) {
            for (uint32_t i = 0; i < r->ch_n; i++)
                nc[i] = *chunk_at(r, i);
            free(r->ch);
            r->ch = nc;
            r->ch_cap = cap;
            r->ch_head = 0;
            return;
        }
        if (!r->ch_cap)
            return;
    }
    drop_front(r, chunk_at(r, 0)->len);
}

void ring_commit(struct ring *r, uint64_t off, size_t n)
{
    if (n == 0 || n > RING_SIZE)
        return;
    struct chunk *last = r->ch_n ? chunk_at(r, r->ch_n - 1) : NULL;
    if (last && last->off + last->len == off) {
        last->len += (uint32_t)n;
    } else {
        chunk_slot(r);
        if (r->ch_n == r->ch_cap) { /* no table at all (memory): keep no chunk */
            r->sidx_end += n;
            return;
        }
        struct chunk *c = &r->ch[(r->ch_head + r->ch_n) % r->ch_cap];
        c->off = off;
        c->sidx = (uint32_t)r->sidx_end;
        c->len = (uint32_t)n;
        r->ch_n++;
    }
    r->sidx_end += n;
    r->bytes += (uint32_t)n;
    while (r->bytes > RING_SIZE && r->ch_n) {
        uint32_t excess = r->bytes - RING_SIZE;
        uint32_t flen = chunk_at(r, 0)->len;
        drop_front(r, excess < flen ? excess : flen);
    }
}

size_t ring_peek(const struct ring *r, uint64_t from, size_t max, uint64_t *start,
                 struct iovec seg[2], int *nseg)
{
    uint32_t i = first_from(r, from);
    if (i >= r->ch_n || !max)
        return 0;
    const struct chunk *c = chunk_at(r, i);
    uint64_t s = from > c->off ? from : c->off;
    uint32_t skip = (uint32_t)(s - c->off);
    size_t n = c->len - skip;
    if (n > max)
        n = max;
    size_t pos = (size_t)((c->sidx + skip) % RING_SIZE);
    size_t first = RING_SIZE - pos;
    seg[0].iov_base = r->mem + pos;
    if (n <= first) {
        seg[0].iov_len = n;
        *nseg = 1;
    } else {
        seg[0].iov_len = first;
        seg[1].iov_base = r->mem;
        seg[1].iov_len = n - first;
        *nseg = 2;
    }
    *start = s;
    return n;
}

uint64_t ring_oldest(const struct ring *r)
{
    return r->ch_n ? chunk_at(r, 0)->off : UINT64_MAX;
}
