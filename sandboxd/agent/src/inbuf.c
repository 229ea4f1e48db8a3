/* inbuf.c - frame assembly and resync over a growable byte buffer (see inbuf.h). Owns the
 * input buffer; no I/O, no clock. Every length is checked against what is held before use. */
#include "inbuf.h"

#include <stdlib.h>
#include <string.h>

#include "crc32.h"
#include "proto.h"

#define READ_MIN (64u << 10)                       /* the buffer's first size */
#define READ_SLACK (16u << 10)                     /* room for one more read at least */
#define CAP_MAX (HDR_LEN + MAX_PAYLOAD + READ_MIN) /* one largest frame plus one read */

void inbuf_init(struct inbuf *b)
{
    memset(b, 0, sizeof *b);
}

void inbuf_free(struct inbuf *b)
{
    free(b->buf);
    inbuf_init(b);
}

static void apply_consume(struct inbuf *b)
{
    b->head += b->consume;
    b->len -= b->consume;
    b->consume = 0;
    if (b->len == 0)
        b->head = 0;
}

/* Bytes the frame at the head needs in all (a header's worth when no valid header is held). */
static size_t head_need(const struct inbuf *b)
{
    struct frame f;
    if (b->len >= HDR_LEN && hdr_parse(b->buf + b->head, &f))
        return HDR_LEN + (size_t)f.len;
    return HDR_LEN;
}

uint8_t *inbuf_space(struct inbuf *b, size_t *avail)
{
    apply_consume(b);
    size_t need = head_need(b);
    size_t want = (need > b->len ? need : b->len) + READ_SLACK; /* the head frame, and a read */
    if (want > CAP_MAX)
        want = CAP_MAX;
    if (b->cap < want) {
        size_t cap = b->cap ? b->cap : READ_MIN;
        while (cap < want)
            cap *= 2;
        if (cap > CAP_MAX)
            cap = CAP_MAX;
        uint8_t *nb = malloc(cap);
        if (!nb)
            return NULL;
        if (b->len)
            memcpy(nb, b->buf + b->head, b->len);
        free(b->buf);
        b->buf = nb;
        b->cap = cap;
        b->head = 0;
    } else if (b->cap - b->head < want) {
        memmove(b->buf, b->buf + b->head, b->len);
        b->head = 0;
    }
    size_t free_tail = b->cap - b->head - b->len;
    if (free_tail == 0)
        return NULL; /* a whole largest frame is held, unprocessed: read later */
    *avail = free_tail;
    return b->buf + b->head + b->len;
}

bool inbuf_trim(struct inbuf *b)
{
    apply_consume(b);
    if (b->len || b->cap <= READ_MIN)
        return false;
    free(b->buf);
    b->buf = NULL;
    b->cap = 0;
    b->head = 0;
    return true;
}

void inbuf_commit(struct inbuf *b, size_t n)
{
    size_t free_tail = b->cap - b->head - b->len;
    b->len += n <= free_tail ? n : free_tail;
}

enum in_ev inbuf_next(struct inbuf *b, struct frame *f)
{
    apply_consume(b);
    while (b->len) {
        const uint8_t *p = b->buf + b->head;
        size_t skip;
        if (p[0] != 'S') {
            const uint8_t *s = memchr(p, 'S', b->len);
            skip = s ? (size_t)(s - p) : b->len;
        } else if (b->len >= 2 && p[1] != 'B') {
            skip = 1;
        } else if (b->len >= 3 && !frame_type_inbound(p[2])) {
            skip = 1;
        } else if (b->len < HDR_LEN) {
            return IN_NONE;
        } else if (!hdr_parse(p, f)) {
            skip = 1;
        } else if (b->len - HDR_LEN < f->len) {
            return IN_NONE;
        } else if (crc32_update(0, p + HDR_LEN, f->len) != f->payload_crc) {
            skip = 1;
        } else {
            f->payload = p + HDR_LEN;
            b->consume = HDR_LEN + (size_t)f->len;
            b->recovering = false;
            return IN_FRAME;
        }
        b->head += skip;
        b->len -= skip;
        if (b->len == 0)
            b->head = 0;
        if (!b->recovering) {
            b->recovering = true;
            return IN_BAD;
        }
    }
    return IN_NONE;
}

bool inbuf_partial(const struct inbuf *b)
{
    return b->len > b->consume;
}

bool inbuf_expire(struct inbuf *b)
{
    apply_consume(b);
    if (b->len == 0)
        return false;
    b->head++;
    b->len--;
    if (b->len == 0)
        b->head = 0;
    if (b->recovering)
        return false;
    b->recovering = true;
    return true;
}
