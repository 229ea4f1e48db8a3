/* frame.h - the frame header (24 bytes, PROTOCOL.md "Frame"), little-endian field access and a
 * bounds-checked payload reader. Pure: no I/O, no allocation, no state. */
#ifndef SBX_FRAME_H
#define SBX_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct frame {
    uint8_t type;
    uint8_t flags;
    uint32_t len;          /* payload length */
    uint64_t id;
    uint32_t payload_crc;
    const uint8_t *payload; /* set once the whole frame is held */
};

static inline void put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Write a complete header (magic, both CRC fields) for an agent -> daemon frame. */
void hdr_build(uint8_t out[24], uint8_t type, uint8_t flags, uint32_t len, uint64_t id,
               uint32_t payload_crc);

/* Whether a daemon -> agent frame type exists. */
bool frame_type_inbound(uint8_t type);

/* Validate a daemon -> agent header (magic, header CRC, known type, length limit); on success
 * fill everything in *f but payload. p must hold 24 bytes. */
bool hdr_parse(const uint8_t *p, struct frame *f);

/* A cursor over untrusted bytes: every read checks the length first; a short read sets bad
 * and yields zeroes / NULL, so a parser checks once at the end. */
struct rd {
    const uint8_t *p;
    size_t n;
    bool bad;
};

static inline struct rd rd_new(const uint8_t *p, size_t n)
{
    struct rd r = {p, n, false};
    return r;
}

const uint8_t *rd_bytes(struct rd *r, size_t len);
uint8_t rd_u8(struct rd *r);
uint16_t rd_u16(struct rd *r);
uint32_t rd_u32(struct rd *r);
uint64_t rd_u64(struct rd *r);

#endif
