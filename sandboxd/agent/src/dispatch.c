/* dispatch.c - one valid frame to its handler (see dispatch.h). HELLO / STATE and PING / PONG
 * are answered here; everything about execs and files is delegated. */
#include "dispatch.h"

#include <string.h>

#include "exec.h"
#include "files.h"
#include "outq.h"
#include "payload.h"
#include "proto.h"

static bool hello_seen;

bool dispatch_hello_seen(void)
{
    return hello_seen;
}

static void on_hello(const struct hello_req *h)
{
    hello_seen = true;
    uint8_t *p = outq_begin(NONCE_LEN + 12 + (size_t)MAX_EXECS * STATE_RECORD_LEN);
    if (!p)
        return; /* no memory: the daemon's next HELLO tries again */
    memcpy(p, h->nonce, NONCE_LEN);
    put_u32(p + NONCE_LEN, PROTOCOL_VERSION);
    put_u32(p + NONCE_LEN + 4, AGENT_VERSION);
    uint32_t count = execs_hello(p + NONCE_LEN + 12);
    put_u32(p + NONCE_LEN + 8, count);
    outq_end(T_STATE, 0, 0, NONCE_LEN + 12 + (size_t)count * STATE_RECORD_LEN);
}

void dispatch(const struct frame *f)
{
    const uint8_t *p = f->payload;
    const char *bad = check_payload_len(f->type, f->len);
    if (!bad && f->id == 0 && f->type >= T_START && f->type <= T_REWIND && f->type != T_PING)
        bad = "exec id 0";
    if (bad) {
        outq_coded(T_ERROR, f->id, ERR_BAD_PAYLOAD, bad);
        return;
    }
    switch (f->type) {
    case T_HELLO: {
        struct hello_req h;
        if ((bad = parse_hello(p, f->len, &h)))
            break;
        on_hello(&h);
        return;
    }
    case T_START: {
        struct start_req s;
        if ((bad = parse_start(p, f->len, &s)))
            break;
        exec_start(f->id, &s);
        return;
    }
    case T_STDIN:
        exec_stdin(f->id, p, f->len);
        return;
    case T_CLOSE_STDIN:
        exec_close_stdin(f->id);
        return;
    case T_SIGNAL:
        exec_signal(f->id, get_u32(p));
        return;
    case T_RESIZE:
        exec_resize(f->id, get_u16(p), get_u16(p + 2));
        return;
    case T_ACK:
        exec_ack(f->id, get_u64(p));
        return;
    case T_RELEASE:
        exec_release(f->id);
        return;
    case T_PING:
        outq_frame(T_PONG, 0, f->id, p, f->len, NULL, 0);
        return;
    case T_REWIND:
        exec_rewind(f->id, get_u64(p));
        return;
    case T_FREAD: {
        struct fread_req r;
        if ((bad = parse_fread(p, f->len, &r)))
            break;
        files_read(f->id, &r);
        return;
    }
    case T_FWRITE: {
        struct fwrite_req r;
        if ((bad = parse_fwrite(p, f->len, &r)))
            break;
        files_write(f->id, &r);
        return;
    }
    case T_FSTAT:
        if ((bad = parse_path(p, f->len)))
            break;
        files_stat(f->id, p, f->len);
        return;
    case T_FLIST:
        if ((bad = parse_path(p, f->len)))
            break;
        files_list(f->id, p, f->len);
        return;
    default:
        bad = "unknown type";
        break;
    }
    outq_coded(T_ERROR, f->id, ERR_BAD_PAYLOAD, bad);
}
