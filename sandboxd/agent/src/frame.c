/* frame.c - frame header encoding and validation, and the bounds-checked payload reader.
 * Pure: no I/O, no allocation, no state. */
#include "frame.h"

#include "crc32.h"
#include "proto.h"

void hdr_build(uint8_t out[24], uint8_t type, uint8_t flags, uint32_t len, uint64_t id,
               uint32_t payload_crc)
{
    out[0] = 'S';
    out[1] = 'B';
    out[2] = type;
    out[3] = flags;
    put_u32(out + 4, len);
    put_u64(out + 8, id);
    put_u32(out + 16, payload_crc);
    put_u32(out + 20, crc32_update(0, out, 20));
}

bool frame_type_inbound(uint8_t type)
{
    return (type >= T_HELLO && type <= T_REWIND) || (type >= T_FREAD && type <= T_FLIST);
}

bool hdr_parse(const uint8_t *p, struct frame *f)
{
    if (p[0] != 'S' || p[1] != 'B')
        return false;
    if (crc32_update(0, p, 20) != get_u32(p + 20))
        return false;
    if (!frame_type_inbound(p[2]))
        return false;
    uint32_t len = get_u32(p + 4);
    if (len > MAX_PAYLOAD)
        return false;
    f->type = p[2];
    f->flags = p[3];
    f->len = len;
    f->id = get_u64(p + 8);
    f->payload_crc = get_u32(p + 16);
    f->payload = NULL;
    return true;
}

const uint8_t *rd_bytes(struct rd *r, size_t len)
{
    if (r->bad || r->n < len) {
        r->bad = true;
        r->n = 0;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += len;
    r->n -= len;
    return p;
}

uint8_t rd_u8(struct rd *r)
{
    const uint8_t *p = rd_bytes(r, 1);
    return p ? p[0] : 0;
}

uint16_t rd_u16(struct rd *r)
{
    const uint8_t *p = rd_bytes(r, 2);
    return p ? get_u16(p) : 0;
}

uint32_t rd_u32(struct rd *r)
{
    const uint8_t *p = rd_bytes(r, 4);
    return p ? get_u32(p) : 0;
}

uint64_t rd_u64(struct rd *r)
{
    const uint8_t *p = rd_bytes(r, 8);
    return p ? get_u64(p) : 0;
}
