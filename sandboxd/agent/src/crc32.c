/* crc32.c - CRC-32 (zlib's, poly 0xEDB88320), slice-by-8. Owns the lookup tables and
 * nothing else: no I/O, no allocation. Little-endian hosts only (x86_64, aarch64). */
#include "crc32.h"

#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the agent supports little-endian hosts only"
#endif

static uint32_t table[8][256];

void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            table[k][i] = (table[k - 1][i] >> 8) ^ table[0][table[k - 1][i] & 0xffu];
}

uint32_t crc32_update(uint32_t crc, const void *data, size_t n)
{
    const uint8_t *p = data;
    uint32_t c = ~crc;
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= c;
        c = table[7][a & 0xffu] ^ table[6][(a >> 8) & 0xffu] ^ table[5][(a >> 16) & 0xffu] ^
            table[4][a >> 24] ^ table[3][b & 0xffu] ^ table[2][(b >> 8) & 0xffu] ^
            table[1][(b >> 16) & 0xffu] ^ table[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = table[0][(c ^ *p++) & 0xffu] ^ (c >> 8);
    return ~c;
}
