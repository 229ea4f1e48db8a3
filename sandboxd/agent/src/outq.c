/* outq.c - the channel writer (see outq.h). Owns the reply queue and the in-flight OUTPUT
 * frame; it never looks inside exec records. */
#define _GNU_SOURCE
#include "outq.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "frame.h"
#include "proto.h"

#define QUEUE_KEEP (256u << 10) /* a larger empty queue buffer is given back */

static struct {
    uint8_t *buf;
    size_t cap, head, len;
    size_t begun;  /* payload room of the frame being built in place */
    bool building; /* outq_begin succeeded and neither outq_end nor outq_cancel came yet */
} q;

static struct {
    bool active;
    uint8_t hdr[HDR_LEN + 8];
    struct iovec iov[3];
    int idx, cnt;
    uint8_t *copy; /* the rest of the frame once outq_guard detached it */
} fl;

static bool dead;

/* Make room for n more bytes at the tail. */
static bool reserve(size_t n)
{
    if (q.cap - q.head - q.len >= n)
        return true;
    if (q.head && q.cap - q.len >= n) {
        memmove(q.buf, q.buf + q.head, q.len);
        q.head = 0;
        return true;
    }
    size_t cap = q.cap ? q.cap : 4096;
    while (cap < q.len + n) {
        if (cap > SIZE_MAX / 2)
            return false;
        cap *= 2;
    }
    uint8_t *nb = malloc(cap);
    if (!nb)
        return false;
    if (q.len)
        memcpy(nb, q.buf + q.head, q.len);
    free(q.buf);
    q.buf = nb;
    q.cap = cap;
    q.head = 0;
    return true;
}

void outq_frame(uint8_t type, uint8_t flags, uint64_t id, const void *a, size_t alen,
                const void *b, size_t blen)
{
    if (dead || alen + blen > MAX_PAYLOAD || !reserve(HDR_LEN + alen + blen))
        return;
    uint8_t *p = q.buf + q.head + q.len;
    hdr_build(p, type, flags, (uint32_t)(alen + blen), id, 0);
    if (alen)
        memcpy(p + HDR_LEN, a, alen);
    if (blen)
        memcpy(p + HDR_LEN + alen, b, blen);
    q.len += HDR_LEN + alen + blen;
}

void outq_coded(uint8_t type, uint64_t id, uint32_t code, const char *msg)
{
    uint8_t head[8];
    size_t n = strlen(msg);
    put_u32(head, code);
    put_u32(head + 4, (uint32_t)n);
    outq_frame(type, 0, id, head, sizeof head, msg, n);
}

uint8_t *outq_begin(size_t maxlen)
{
    if (dead || maxlen > MAX_PAYLOAD || !reserve(HDR_LEN + maxlen))
        return NULL;
    q.begun = maxlen;
    q.building = true;
    return q.buf + q.head + q.len + HDR_LEN;
}

void outq_end(uint8_t type, uint8_t flags, uint64_t id, size_t len)
{
    if (!q.building) /* nothing begun (or the channel died meanwhile) */
        return;
    if (len > q.begun)
        len = q.begun;
    hdr_build(q.buf + q.head + q.len, type, flags, (uint32_t)len, id, 0);
    q.len += HDR_LEN + len;
    q.building = false;
}

void outq_cancel(void)
{
    q.building = false;
}

bool outq_idle(void)
{
    return !dead && !fl.active && q.len == 0;
}

void outq_output(uint8_t flags, uint64_t id, uint64_t offset, const struct iovec *seg, int nseg)
{
    size_t n = 0;
    for (int i = 0; i < nseg; i++)
        n += seg[i].iov_len;
    hdr_build(fl.hdr, T_OUTPUT, flags, (uint32_t)(8 + n), id, 0);
    put_u64(fl.hdr + HDR_LEN, offset);
    fl.iov[0].iov_base = fl.hdr;
    fl.iov[0].iov_len = sizeof fl.hdr;
    fl.cnt = 1;
    for (int i = 0; i < nseg && i < 2; i++)
        if (seg[i].iov_len)
            fl.iov[fl.cnt++] = seg[i];
    fl.idx = 0;
    fl.active = true;
}

bool outq_guard(const uint8_t *p, size_t n)
{
    if (!fl.active || fl.copy || !n)
        return true;
    bool hit = false;
    for (int i = fl.idx; i < fl.cnt; i++) {
        const uint8_t *b = fl.iov[i].iov_base;
        if (b == fl.hdr)
            continue;
        if (b < p + n && p < b + fl.iov[i].iov_len)
            hit = true;
    }
    if (!hit)
        return true;
    size_t rest = 0;
    for (int i = fl.idx; i < fl.cnt; i++)
        rest += fl.iov[i].iov_len;
    uint8_t *c = malloc(rest);
    if (!c)
        return false;
    size_t at = 0;
    for (int i = fl.idx; i < fl.cnt; i++) {
        memcpy(c + at, fl.iov[i].iov_base, fl.iov[i].iov_len);
        at += fl.iov[i].iov_len;
    }
    fl.copy = c;
    fl.iov[0].iov_base = c;
    fl.iov[0].iov_len = rest;
    fl.idx = 0;
    fl.cnt = 1;
    return true;
}

bool outq_pending(void)
{
    return !dead && (fl.active || q.len);
}

size_t outq_backlog(void)
{
    return q.len;
}

static void drop_all(void)
{
    dead = true;
    fl.active = false;
    free(fl.copy);
    fl.copy = NULL;
    free(q.buf);
    q.buf = NULL;
    q.cap = q.head = q.len = 0;
    q.building = false;
}

/* 1: written through; 0: would block; -1: channel gone. */
static int check_write(ssize_t w)
{
    if (w >= 0)
        return 1;
    if (errno == EINTR)
        return 1;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return 0;
    drop_all();
    return -1;
}

int outq_flush(int fd)
{
    if (dead)
        return -1;
    for (;;) {
        if (fl.active) {
            ssize_t w = writev(fd, fl.iov + fl.idx, fl.cnt - fl.idx);
            int r = check_write(w);
            if (r <= 0)
                return r;
            if (w < 0)
                continue;
            size_t left = (size_t)w;
            while (fl.idx < fl.cnt && left >= fl.iov[fl.idx].iov_len) {
                left -= fl.iov[fl.idx].iov_len;
                fl.idx++;
            }
            if (fl.idx < fl.cnt) {
                fl.iov[fl.idx].iov_base = (uint8_t *)fl.iov[fl.idx].iov_base + left;
                fl.iov[fl.idx].iov_len -= left;
                return 0;
            }
            fl.active = false;
            free(fl.copy);
            fl.copy = NULL;
            continue;
        }
        if (q.len) {
            ssize_t w = write(fd, q.buf + q.head, q.len);
            int r = check_write(w);
            if (r <= 0)
                return r;
            if (w < 0)
                continue;
            q.head += (size_t)w;
            q.len -= (size_t)w;
            if (q.len)
                return 0;
            q.head = 0;
            if (q.cap > QUEUE_KEEP) {
                free(q.buf);
                q.buf = NULL;
                q.cap = 0;
            }
            continue;
        }
        return 1;
    }
}
