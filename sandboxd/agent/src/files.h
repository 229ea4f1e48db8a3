/* files.h - FREAD / FWRITE / FSTAT / FLIST (PROTOCOL.md "Files"), each answered with one
 * FRESULT. Regular files only, opened without blocking; nothing here touches execs. */
#ifndef SBX_FILES_H
#define SBX_FILES_H

#include <stddef.h>
#include <stdint.h>

#include "payload.h"

void files_read(uint64_t id, const struct fread_req *r);
void files_write(uint64_t id, const struct fwrite_req *r);
void files_stat(uint64_t id, const uint8_t *path, size_t n);
void files_list(uint64_t id, const uint8_t *path, size_t n);

#endif
