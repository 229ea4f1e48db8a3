/* execio.c - one exec's pipe I/O: the supervisor's reports, output pipes into the rings
 * (blocking or dropping mode), buffered stdin into its pipe, and the next OUTPUT frame from
 * the rings. Lifecycle decisions are exec.c's; this file only moves bytes and reports. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "exec_int.h"
#include "outq.h"
#include "proto.h"
#include "spawn.h"
#include "util.h"

#define READ_CHUNK (256u << 10)    /* one read from an output pipe at most */
#define READ_PER_WAKE (1u << 20)   /* reads of one stream per poll round at most */

void exio_read_report(struct exec *e)
{
    for (;;) {
        ssize_t r = read(e->report_fd, e->rep_buf + e->rep_len, sizeof e->rep_buf - e->rep_len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            return;
        if (r <= 0) { /* EOF: the supervisor has ended */
            close_quiet(e->report_fd);
            e->report_fd = -1;
            return;
        }
        e->rep_len += (uint8_t)r;
        if (e->rep_len < sizeof e->rep_buf)
            continue;
        e->rep_len = 0;
        struct report rep;
        memcpy(&rep, e->rep_buf, sizeof rep);
        switch (rep.kind) {
        case REPORT_STARTED:
            exec_started(e, rep.value);
            break;
        case REPORT_FAILED:
            exec_failed(e, rep.value); /* destroys e */
            return;
        case REPORT_STATUS:
            exec_status(e, rep.value, now_ns());
            break;
        default:
            break;
        }
    }
}

size_t exio_room(const struct exec *e, int s)
{
    return ring_room(&e->ring[s], (e->flags & START_DETACHED) != 0, e->acked, e->end_off);
}

static void close_output(struct exec *e, int s)
{
    close_quiet(e->out_fd[s]);
    e->out_fd[s] = -1;
}

void exio_close_outputs(struct exec *e)
{
    close_output(e, 0);
    close_output(e, 1);
}

void exio_read_output(struct exec *e, int s)
{
    if (ring_ready(&e->ring[s]) < 0) { /* no memory for the ring: end the stream (EPIPE) */
        close_output(e, s);
        return;
    }
    size_t total = 0;
    while (total < READ_PER_WAKE) {
        size_t n = exio_room(e, s);
        if (n > READ_CHUNK)
            n = READ_CHUNK;
        if (!n)
            return;
        struct iovec seg[2];
        int k = ring_write_segs(&e->ring[s], n, seg);
        for (int i = 0; i < k; i++)
            if (!outq_guard(seg[i].iov_base, seg[i].iov_len))
                return;
        ssize_t r = readv(e->out_fd[s], seg, k);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            return;
        if (r <= 0) { /* EOF; EIO: a PTY whose last slave closed */
            close_output(e, s);
            return;
        }
        if (e->send_pos >= e->end_off) /* the first output not yet sent */
            e->unsent_since = now_ns();
        ring_commit(&e->ring[s], e->end_off, (size_t)r);
        e->end_off += (uint64_t)r;
        e->drain_quiet = 0;
        total += (size_t)r;
        if ((size_t)r < n)
            return;
    }
}

void exio_close_stdin_now(struct exec *e)
{
    close_quiet(e->in_fd);
    e->in_fd = -1;
    e->stdin_open = false;
    e->stdin_closing = false;
    free(e->in_buf);
    e->in_buf = NULL;
    e->in_head = e->in_len = 0;
}

void exio_write_stdin(struct exec *e)
{
    while (e->in_len) {
        struct iovec seg[2];
        int k = 1;
        size_t first = STDIN_WINDOW - e->in_head;
        seg[0].iov_base = e->in_buf + e->in_head;
        seg[0].iov_len = first < e->in_len ? first : e->in_len;
        if (seg[0].iov_len < e->in_len) {
            seg[1].iov_base = e->in_buf;
            seg[1].iov_len = e->in_len - seg[0].iov_len;
            k = 2;
        }
        ssize_t w = writev(e->in_fd, seg, k);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            return;
        if (w <= 0) { /* EPIPE: nobody reads it any more */
            exio_close_stdin_now(e);
            return;
        }
        e->in_head = (uint32_t)((e->in_head + (size_t)w) % STDIN_WINDOW);
        e->in_len -= (uint32_t)w;
        e->stdin_consumed += (uint64_t)w;
    }
    e->in_head = 0;
    if (e->stdin_closing)
        exio_close_stdin_now(e);
}

uint64_t exio_start_offset(const struct exec *e)
{
    uint64_t a = ring_oldest(&e->ring[0]), b = ring_oldest(&e->ring[1]);
    uint64_t m = a < b ? a : b;
    return m == UINT64_MAX ? e->end_off : m;
}

/* The offset of the first retained byte at or after from (end_off when there is none). */
uint64_t exio_first_held(const struct exec *e, uint64_t from)
{
    uint64_t best = e->end_off;
    for (int s = 0; s < 2; s++) {
        struct iovec seg[2];
        int nseg;
        uint64_t start;
        if (ring_peek(&e->ring[s], from, 1, &start, seg, &nseg) && start < best)
            best = start;
    }
    return best;
}

/* A little output from a command still writing waits up to COALESCE_MS for more: a
 * producer that writes 4 KiB at a time then goes out in frames of about COALESCE_BYTES,
 * not one frame (and one trip through the engine and the daemon) per write. */
bool exio_holding(const struct exec *e, int64_t now)
{
    return (e->out_fd[0] >= 0 || e->out_fd[1] >= 0) && e->end_off - e->send_pos < COALESCE_BYTES &&
           now - e->unsent_since < (int64_t)COALESCE_MS * NS_PER_MS;
}

bool exio_output_frame(struct exec *e)
{
    if (e->send_pos >= e->end_off || exio_holding(e, now_ns()))
        return false;
    struct iovec seg[2][2];
    int nseg[2] = {0, 0};
    uint64_t start[2] = {0, 0};
    size_t n[2];
    for (int s = 0; s < 2; s++)
        n[s] = ring_peek(&e->ring[s], e->send_pos, OUTPUT_CHUNK_MAX, &start[s], seg[s], &nseg[s]);
    int s;
    if (n[0] && (!n[1] || start[0] < start[1]))
        s = 0;
    else if (n[1])
        s = 1;
    else { /* nothing retained at or after send_pos */
        e->send_pos = e->end_off;
        return false;
    }
    /* A gap: the bytes before start were dropped unsent. They count as acknowledged, on both
     * sides, so the window moves past them. */
    if (start[s] > e->send_pos && start[s] > e->acked)
        e->acked = start[s];
    uint64_t window_end = e->acked + SEND_WINDOW;
    if (start[s] >= window_end)
        return false;
    size_t len = n[s];
    if (len > window_end - start[s])
        len = (size_t)(window_end - start[s]);
    if (seg[s][0].iov_len >= len) {
        seg[s][0].iov_len = len;
        nseg[s] = 1;
    } else if (nseg[s] == 2) {
        seg[s][1].iov_len = len - seg[s][0].iov_len;
    }
    outq_output(s ? STREAM_STDERR : STREAM_STDOUT, e->id, start[s], seg[s], nseg[s]);
    e->send_pos = start[s] + len;
    if (e->send_pos > e->sent_max)
        e->sent_max = e->send_pos;
    return true;
}
