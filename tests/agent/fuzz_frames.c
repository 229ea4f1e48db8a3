/* fuzz_frames.c - sanitizer harness for the agent's input path: frame assembly and resync
 * (inbuf.c, frame.c, crc32.c) and payload parsing / argv-envp building (payload.c). Built by
 * test_agent_sanitize.py with -fsanitize=address,undefined; feeds valid frames, mutated frames
 * (bit flips, truncations, random lengths with re-computed CRCs, random payloads) and random
 * bytes in random-sized pieces, with stale-partial expiry, and checks that every sentinel
 * frame sent after the damage and a silence is found again.
 *
 *   fuzz_frames SEED ROUNDS */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crc32.h"
#include "frame.h"
#include "inbuf.h"
#include "payload.h"
#include "proto.h"

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static size_t below(size_t n)
{
    return n ? (size_t)(rnd() % n) : 0;
}

struct buf {
    uint8_t *p;
    size_t n, cap;
};

static void put(struct buf *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p)
            abort();
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void put32(struct buf *b, uint32_t v) { put(b, &v, 4); }
static void put64(struct buf *b, uint64_t v) { put(b, &v, 8); }
static void put16(struct buf *b, uint16_t v) { put(b, &v, 2); }

static void put_random(struct buf *b, size_t n, int allow_nul)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t c = (uint8_t)rnd();
        if (!allow_nul && !c)
            c = 'x';
        put(b, &c, 1);
    }
}

static void put_str(struct buf *b, int env)
{
    size_t n = below(24);
    struct buf s = {0};
    if (env) {
        put_random(&s, 1 + below(6), below(50) == 0);
        put(&s, "=", 1);
    }
    put_random(&s, n, below(50) == 0);
    put32(b, (uint32_t)(below(40) == 0 ? rnd() : s.n));
    if (s.n)
        put(b, s.p, s.n);
    free(s.p);
}

static const uint8_t types[] = {T_HELLO,  T_START,   T_STDIN, T_CLOSE_STDIN, T_SIGNAL,
                                T_RESIZE, T_ACK,     T_RELEASE, T_PING,      T_REWIND,
                                T_FREAD,  T_FWRITE,  T_FSTAT, T_FLIST};

static void payload_for(struct buf *b, uint8_t type)
{
    switch (type) {
    case T_HELLO:
        put_random(b, 16, 1);
        put32(b, 1);
        break;
    case T_START: {
        uint32_t argc = (uint32_t)below(5), envc = (uint32_t)below(5);
        put32(b, (uint32_t)below(8));
        put32(b, (uint32_t)below(10000));
        put16(b, (uint16_t)below(100));
        put16(b, (uint16_t)below(300));
        put32(b, argc);
        put32(b, envc);
        size_t cwd = below(3) ? 0 : below(30);
        put32(b, (uint32_t)cwd);
        put_random(b, cwd, below(20) == 0);
        for (uint32_t i = 0; i < argc; i++)
            put_str(b, 0);
        for (uint32_t i = 0; i < envc; i++)
            put_str(b, 1);
        break;
    }
    case T_STDIN:
        put_random(b, below(4096), 1);
        break;
    case T_SIGNAL:
    case T_RESIZE:
        put32(b, (uint32_t)rnd());
        break;
    case T_ACK:
    case T_REWIND:
        put64(b, rnd());
        break;
    case T_PING:
        put_random(b, below(70), 1);
        break;
    case T_FREAD:
        put64(b, rnd());
        put32(b, (uint32_t)rnd());
        put(b, "/", 1);
        put_random(b, below(40), below(10) == 0);
        break;
    case T_FWRITE: {
        size_t plen = 1 + below(40);
        put64(b, rnd());
        put32(b, (uint32_t)rnd());
        put32(b, (uint32_t)below(4));
        put32(b, (uint32_t)(below(20) == 0 ? rnd() : plen));
        put(b, "/", 1);
        put_random(b, plen - 1, below(10) == 0);
        put_random(b, below(2000), 1);
        break;
    }
    case T_FSTAT:
    case T_FLIST:
        put(b, "/", 1);
        put_random(b, below(60), below(10) == 0);
        break;
    default:
        break;
    }
}

static void frame_of(struct buf *out, uint8_t type, uint64_t id, const uint8_t *p, size_t n,
                     uint32_t len_field)
{
    uint8_t h[HDR_LEN];
    h[0] = 'S';
    h[1] = 'B';
    h[2] = type;
    h[3] = (uint8_t)below(2);
    put_u32(h + 4, len_field);
    put_u64(h + 8, id);
    put_u32(h + 16, crc32_update(0, p, n));
    put_u32(h + 20, crc32_update(0, h, 20));
    put(out, h, sizeof h);
    if (n)
        put(out, p, n);
}

/* One frame (possibly damaged) appended to out. */
static void one_frame(struct buf *out)
{
    uint8_t type = below(30) == 0 ? (uint8_t)rnd() : types[below(sizeof types)];
    struct buf pl = {0};
    payload_for(&pl, type);
    if (pl.n > MAX_PAYLOAD)
        pl.n = MAX_PAYLOAD;
    uint64_t id = below(4) ? 1 + below(200) : rnd();
    switch (below(8)) {
    case 0: /* random payload, CRCs valid: the parsers see garbage */
        pl.n = 0;
        put_random(&pl, below(300), 1);
        frame_of(out, type, id, pl.p, pl.n, (uint32_t)pl.n);
        break;
    case 1: { /* random length field, header CRC valid */
        uint32_t len = below(2) ? (uint32_t)rnd() : (uint32_t)below(pl.n + 64);
        frame_of(out, type, id, pl.p, pl.n, len);
        break;
    }
    case 2: { /* bit flips anywhere */
        size_t at = out->n;
        frame_of(out, type, id, pl.p, pl.n, (uint32_t)pl.n);
        for (size_t k = 1 + below(3); k; k--) {
            size_t i = at + below(out->n - at);
            out->p[i] ^= (uint8_t)(1u << below(8));
        }
        break;
    }
    case 3: { /* truncated */
        size_t at = out->n;
        frame_of(out, type, id, pl.p, pl.n, (uint32_t)pl.n);
        out->n = at + below(out->n - at);
        break;
    }
    case 4: /* random bytes */
        put_random(out, below(200), 1);
        break;
    default: /* valid */
        frame_of(out, type, id, pl.p, pl.n, (uint32_t)pl.n);
        break;
    }
    free(pl.p);
}

static char *base_env[] = {"PATH=/bin", "HOME=/", "A=1", NULL};
static uint64_t sentinels_seen;
static size_t frames_ok, bad_events, payload_errors;

static void handle(const struct frame *f)
{
    frames_ok++;
    if (f->len > MAX_PAYLOAD)
        abort();
    if (f->type == T_PING && f->len == 8 && get_u64(f->payload) == 0x53454e54494e454cULL) {
        sentinels_seen++;
        return;
    }
    const char *err = check_payload_len(f->type, f->len);
    if (err) {
        payload_errors++;
        return;
    }
    switch (f->type) {
    case T_HELLO: {
        struct hello_req h;
        err = parse_hello(f->payload, f->len, &h);
        break;
    }
    case T_START: {
        struct start_req s;
        err = parse_start(f->payload, f->len, &s);
        if (!err) {
            char **argv = strv_build(s.argv_raw, s.argv_raw_len, s.argc, NULL);
            char **envp = strv_build(s.env_raw, s.env_raw_len, s.envc, base_env);
            char *cwd = str_dup_n(s.cwd, s.cwd_len);
            size_t total = 0, n = 0;
            for (char **a = argv; a && *a; a++, n++)
                total += strlen(*a);
            if (argv && n != s.argc)
                abort();
            for (char **e = envp; e && *e; e++)
                if (!strchr(*e, '='))
                    abort();
            total += cwd ? strlen(cwd) : 0;
            (void)total;
            free(argv);
            free(envp);
            free(cwd);
        }
        break;
    }
    case T_FREAD: {
        struct fread_req r;
        err = parse_fread(f->payload, f->len, &r);
        if (!err && r.path_len && memchr(r.path, 0, r.path_len))
            abort();
        break;
    }
    case T_FWRITE: {
        struct fwrite_req r;
        err = parse_fwrite(f->payload, f->len, &r);
        if (!err && (r.path + r.path_len > f->payload + f->len ||
                     r.data + r.data_len != f->payload + f->len))
            abort();
        break;
    }
    case T_FSTAT:
    case T_FLIST:
        err = parse_path(f->payload, f->len);
        break;
    default:
        break;
    }
    if (err)
        payload_errors++;
}

static void drain(struct inbuf *b)
{
    for (;;) {
        struct frame f;
        enum in_ev ev = inbuf_next(b, &f);
        if (ev == IN_NONE)
            return;
        if (ev == IN_BAD)
            bad_events++;
        else
            handle(&f);
    }
}

/* Feed n bytes in random pieces; with expire, stale-partial expiry strikes at random times
 * (never while the sentinel is fed: that would rightly destroy it). */
static void feed(struct inbuf *b, const uint8_t *p, size_t n, int expire)
{
    while (n) {
        size_t avail;
        uint8_t *dst = inbuf_space(b, &avail);
        if (!dst)
            abort(); /* never full here: drain() runs after every piece */
        size_t piece = 1 + below(below(4) ? 4096 : 70000);
        if (piece > n)
            piece = n;
        if (piece > avail)
            piece = avail;
        memcpy(dst, p, piece);
        inbuf_commit(b, piece);
        p += piece;
        n -= piece;
        drain(b);
        if (expire && below(200) == 0 && inbuf_expire(b))
            bad_events++;
        if (below(200) == 0)
            (void)inbuf_trim(b);
        drain(b);
    }
}

/* The daemon went quiet: stale partial frames expire until nothing partial is held. (Bytes
 * that arrive without this pause may legitimately complete a damaged frame by chance.) */
static void silence(struct inbuf *b)
{
    size_t guard = 0;
    while (inbuf_partial(b)) {
        if (inbuf_expire(b))
            bad_events++;
        drain(b);
        if (++guard > 4 * (MAX_PAYLOAD + HDR_LEN))
            abort();
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: fuzz_frames SEED ROUNDS\n");
        return 2;
    }
    rng_state = (strtoull(argv[1], NULL, 10) + 1) * 0x9E3779B97F4A7C15ULL | 1;
    long rounds = strtol(argv[2], NULL, 10);
    crc32_init();
    struct inbuf b;
    inbuf_init(&b);
    uint64_t sentinels_sent = 0;
    uint8_t sentinel_payload[8];
    put_u64(sentinel_payload, 0x53454e54494e454cULL);
    for (long r = 0; r < rounds; r++) {
        struct buf stream = {0};
        for (size_t k = 1 + below(6); k; k--)
            one_frame(&stream);
        if (below(50) == 0) { /* now and then a large valid frame */
            uint8_t *big = malloc(MAX_PAYLOAD);
            if (!big)
                abort();
            size_t n = below(MAX_PAYLOAD);
            for (size_t i = 0; i < n; i++)
                big[i] = (uint8_t)rnd();
            frame_of(&stream, T_STDIN, 1, big, n, (uint32_t)n);
            free(big);
        }
        feed(&b, stream.p, stream.n, 1);
        silence(&b);
        /* The sentinel: after any damage, the stream must come back in step. */
        struct buf s = {0};
        uint8_t h[HDR_LEN];
        h[0] = 'S';
        h[1] = 'B';
        h[2] = T_PING;
        h[3] = 0;
        put_u32(h + 4, 8);
        put_u64(h + 8, 0);
        put_u32(h + 16, crc32_update(0, sentinel_payload, 8));
        put_u32(h + 20, crc32_update(0, h, 20));
        put(&s, h, sizeof h);
        put(&s, sentinel_payload, 8);
        sentinels_sent++;
        feed(&b, s.p, s.n, 0);
        free(s.p);
        silence(&b);
        if (sentinels_seen != sentinels_sent) {
            fprintf(stderr, "round %ld: sentinel lost (%llu of %llu)\n", r,
                    (unsigned long long)sentinels_seen, (unsigned long long)sentinels_sent);
            free(stream.p);
            inbuf_free(&b);
            return 1;
        }
        free(stream.p);
    }
    inbuf_free(&b);
    printf("rounds=%ld frames=%zu bad=%zu payload_errors=%zu sentinels=%llu\n", rounds,
           frames_ok, bad_events, payload_errors, (unsigned long long)sentinels_seen);
    return 0;
}
