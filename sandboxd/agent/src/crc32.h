/* crc32.h - CRC-32 as zlib computes it (poly 0xEDB88320). Pure: no I/O, no allocation. */
#ifndef SBX_CRC32_H
#define SBX_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* Fill the lookup tables; call once before crc32_update. */
void crc32_init(void);
/* zlib's crc32(crc, p, n): start with crc = 0. */
uint32_t crc32_update(uint32_t crc, const void *p, size_t n);

#endif
