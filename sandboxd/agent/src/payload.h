/* payload.h - parsers for daemon -> agent payloads (PROTOCOL.md "Daemon -> agent frames"), and
 * the builders that turn a validated string list into an argv / envp. Pure: no I/O; the only
 * side effect is malloc in the builders. A parser returns NULL when the payload is well formed,
 * else a short static message for ERROR BAD_PAYLOAD. */
#ifndef SBX_PAYLOAD_H
#define SBX_PAYLOAD_H

#include <stddef.h>
#include <stdint.h>

struct start_req {
    uint32_t flags;
    uint32_t timeout_ms;
    uint16_t rows, cols;
    uint32_t argc, envc;
    const uint8_t *cwd; /* not NUL-terminated */
    uint32_t cwd_len;
    const uint8_t *argv_raw; /* argc x (u32 len, bytes), validated */
    size_t argv_raw_len;
    const uint8_t *env_raw; /* envc x (u32 len, "KEY=VALUE"), validated */
    size_t env_raw_len;
};

struct fread_req {
    uint64_t offset;
    uint32_t length;
    const uint8_t *path;
    size_t path_len;
};

struct fwrite_req {
    uint64_t offset;
    uint32_t mode;
    uint32_t flags;
    const uint8_t *path;
    size_t path_len;
    const uint8_t *data;
    size_t data_len;
};

struct hello_req {
    const uint8_t *nonce; /* 16 bytes */
    uint32_t version;
};

/* The payload length a fixed-size type needs is checked here too: HELLO, SIGNAL, RESIZE, ACK,
 * REWIND, CLOSE_STDIN, RELEASE, PING. Types with a variable payload pass. */
const char *check_payload_len(uint8_t type, uint32_t len);

const char *parse_hello(const uint8_t *p, size_t n, struct hello_req *out);
const char *parse_start(const uint8_t *p, size_t n, struct start_req *out);
const char *parse_fread(const uint8_t *p, size_t n, struct fread_req *out);
const char *parse_fwrite(const uint8_t *p, size_t n, struct fwrite_req *out);
/* FSTAT and FLIST: the whole payload is the path. */
const char *parse_path(const uint8_t *p, size_t n);

/* A NULL-terminated string vector in one allocation (free() it), from count validated
 * (u32 len, bytes) entries. With base (an environment), entries are "KEY=VALUE" laid over a
 * copy of base: one with the same KEY replaces it, others are appended. NULL when out of
 * memory. */
char **strv_build(const uint8_t *raw, size_t raw_len, uint32_t count, char *const *base);

/* A NUL-terminated copy of n bytes (malloc), or NULL. */
char *str_dup_n(const uint8_t *p, size_t n);

#endif
