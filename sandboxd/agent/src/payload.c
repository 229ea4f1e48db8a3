/* payload.c - daemon -> agent payload parsing and argv / envp building (see payload.h).
 * Pure: no I/O. Every length comes from untrusted bytes and is checked before use. */
#include "payload.h"

#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "proto.h"

const char *check_payload_len(uint8_t type, uint32_t len)
{
    switch (type) {
    case T_HELLO:
        return len == NONCE_LEN + 4 ? NULL : "HELLO needs 20 bytes";
    case T_SIGNAL:
        return len == 4 ? NULL : "SIGNAL needs 4 bytes";
    case T_RESIZE:
        return len == 4 ? NULL : "RESIZE needs 4 bytes";
    case T_ACK:
        return len == 8 ? NULL : "ACK needs 8 bytes";
    case T_REWIND:
        return len == 8 ? NULL : "REWIND needs 8 bytes";
    case T_CLOSE_STDIN:
        return len == 0 ? NULL : "CLOSE_STDIN takes no payload";
    case T_RELEASE:
        return len == 0 ? NULL : "RELEASE takes no payload";
    case T_PING:
        return len <= PING_MAX ? NULL : "PING payload over 64 bytes";
    default:
        return NULL;
    }
}

const char *parse_hello(const uint8_t *p, size_t n, struct hello_req *out)
{
    struct rd r = rd_new(p, n);
    out->nonce = rd_bytes(&r, NONCE_LEN);
    out->version = rd_u32(&r);
    if (r.bad || r.n)
        return "HELLO needs 20 bytes";
    return NULL;
}

/* Walk count (u32 len, bytes) strings: none may hold a NUL; with is_env each needs "KEY=" with
 * a non-empty KEY. Sets *raw_len to the bytes the list takes. */
static const char *check_strlist(struct rd *r, uint32_t count, int is_env, size_t *raw_len)
{
    size_t before = r->n;
    if (count > r->n / 4) /* every entry takes 4 bytes at least */
        return is_env ? "envc exceeds the payload" : "argc exceeds the payload";
    for (uint32_t i = 0; i < count; i++) {
        uint32_t len = rd_u32(r);
        const uint8_t *s = rd_bytes(r, len);
        if (r->bad)
            return is_env ? "env entry exceeds the payload" : "argument exceeds the payload";
        if (memchr(s, 0, len))
            return is_env ? "env entry holds a NUL" : "argument holds a NUL";
        if (is_env) {
            const uint8_t *eq = memchr(s, '=', len);
            if (!eq || eq == s)
                return "env entry is not KEY=VALUE";
        }
    }
    *raw_len = before - r->n;
    return NULL;
}

const char *parse_start(const uint8_t *p, size_t n, struct start_req *out)
{
    struct rd r = rd_new(p, n);
    memset(out, 0, sizeof *out);
    out->flags = rd_u32(&r);
    out->timeout_ms = rd_u32(&r);
    out->rows = rd_u16(&r);
    out->cols = rd_u16(&r);
    out->argc = rd_u32(&r);
    out->envc = rd_u32(&r);
    out->cwd_len = rd_u32(&r);
    out->cwd = rd_bytes(&r, out->cwd_len);
    if (r.bad)
        return "START payload too short";
    if (out->argc < 1)
        return "argc must be at least 1";
    if (memchr(out->cwd, 0, out->cwd_len))
        return "cwd holds a NUL";
    const char *err;
    out->argv_raw = r.p;
    if ((err = check_strlist(&r, out->argc, 0, &out->argv_raw_len)))
        return err;
    out->env_raw = r.p;
    if ((err = check_strlist(&r, out->envc, 1, &out->env_raw_len)))
        return err;
    if (r.n)
        return "trailing bytes after START";
    return NULL;
}

const char *parse_path(const uint8_t *p, size_t n)
{
    if (memchr(p, 0, n))
        return "path holds a NUL";
    return NULL;
}

const char *parse_fread(const uint8_t *p, size_t n, struct fread_req *out)
{
    struct rd r = rd_new(p, n);
    out->offset = rd_u64(&r);
    out->length = rd_u32(&r);
    if (r.bad)
        return "FREAD payload too short";
    out->path = r.p;
    out->path_len = r.n;
    return parse_path(out->path, out->path_len);
}

const char *parse_fwrite(const uint8_t *p, size_t n, struct fwrite_req *out)
{
    struct rd r = rd_new(p, n);
    out->offset = rd_u64(&r);
    out->mode = rd_u32(&r);
    out->flags = rd_u32(&r);
    uint32_t path_len = rd_u32(&r);
    out->path = rd_bytes(&r, path_len);
    if (r.bad)
        return "FWRITE payload too short";
    out->path_len = path_len;
    out->data = r.p;
    out->data_len = r.n;
    return parse_path(out->path, out->path_len);
}

char *str_dup_n(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    if (!s)
        return NULL;
    if (n)
        memcpy(s, p, n);
    s[n] = 0;
    return s;
}

/* Length of the "KEY=" prefix of an environment entry (0 when it has no '='). */
static size_t key_len(const char *s)
{
    const char *eq = strchr(s, '=');
    return eq ? (size_t)(eq - s) + 1 : 0;
}

char **strv_build(const uint8_t *raw, size_t raw_len, uint32_t count, char *const *base)
{
    size_t nbase = 0;
    if (base)
        while (base[nbase])
            nbase++;
    size_t slots = nbase + (size_t)count + 1;
    /* Each entry's string plus its NUL fits in its own 4-byte prefix plus bytes. */
    size_t size = slots * sizeof(char *) + raw_len;
    char **v = malloc(size);
    if (!v)
        return NULL;
    char *strings = (char *)(v + slots);
    for (size_t i = 0; i < nbase; i++)
        v[i] = base[i];
    size_t nv = nbase;
    struct rd r = rd_new(raw, raw_len);
    for (uint32_t i = 0; i < count; i++) {
        uint32_t len = rd_u32(&r);
        const uint8_t *s = rd_bytes(&r, len);
        if (r.bad) { /* cannot happen on a validated list; stay safe regardless */
            free(v);
            return NULL;
        }
        memcpy(strings, s, len);
        strings[len] = 0;
        size_t slot = nv;
        size_t k = base ? key_len(strings) : 0;
        for (size_t j = 0; k && j < nv; j++) {
            if (strncmp(v[j], strings, k) == 0) {
                slot = j;
                break;
            }
        }
        v[slot] = strings;
        if (slot == nv)
            nv++;
        strings += len + 1;
    }
    v[nv] = NULL;
    return v;
}
