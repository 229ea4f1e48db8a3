/* proto.h - the channel protocol's numbers (PROTOCOL.md, version 1): frame types, error
 * codes, limits and sizes. Shared by every part of the agent and by the sanitizer harness.
 * Declarations only: no code, no state. */
#ifndef SBX_PROTO_H
#define SBX_PROTO_H

#include <stdint.h>

#define PROTOCOL_VERSION 1u
#define AGENT_VERSION_STR "0.1.0"
#define AGENT_VERSION ((0u << 16) | (1u << 8) | 0u) /* major << 16 | minor << 8 | patch */

#define HDR_LEN 24u
#define MAX_PAYLOAD (1u << 20)
#define RING_SIZE (1u << 20)       /* output retained per stream per exec */
#define SEND_WINDOW (1u << 20)     /* output sent and not yet acknowledged, per exec */
#define STDIN_WINDOW (1u << 20)    /* stdin buffered by the agent, per exec */
#define MAX_EXECS 128u
#define DRAIN_QUIET_MS 50
#define DRAIN_MAX_MS 2000
#define PARTIAL_FRAME_MS 250
#define CHAN_IN_FD 990
#define CHAN_OUT_FD 991
#define OUTPUT_CHUNK_MAX (256u << 10) /* largest OUTPUT payload data the agent sends */
#define COALESCE_BYTES (64u << 10)    /* less unsent output than this may wait ... */
#define COALESCE_MS 1                 /* ... this long for more (while its pipes are open) */
#define REPLY_BACKLOG (4u << 20)      /* replies queued for the channel before input pauses */
#define PING_MAX 64u
#define NONCE_LEN 16u
#define STATE_RECORD_LEN 48u
#define ENTRY_FIXED_LEN 22u           /* file entry without its name */
#define FREAD_MAX (MAX_PAYLOAD - 16u)

enum frame_type {
    /* daemon -> agent */
    T_HELLO = 0x01,
    T_START = 0x02,
    T_STDIN = 0x03,
    T_CLOSE_STDIN = 0x04,
    T_SIGNAL = 0x05,
    T_RESIZE = 0x06,
    T_ACK = 0x07,
    T_RELEASE = 0x08,
    T_PING = 0x09,
    T_REWIND = 0x0A,
    T_FREAD = 0x10,
    T_FWRITE = 0x11,
    T_FSTAT = 0x12,
    T_FLIST = 0x13,
    /* agent -> daemon */
    T_STATE = 0x81,
    T_STARTED = 0x82,
    T_START_FAILED = 0x83,
    T_OUTPUT = 0x84,
    T_EXIT = 0x85,
    T_STDIN_ACK = 0x86,
    T_ERROR = 0x87,
    T_PONG = 0x89,
    T_REWOUND = 0x8A,
    T_FRESULT = 0x90,
};

enum error_code {
    ERR_BAD_FRAME = 1,
    ERR_BAD_PAYLOAD = 2,
    ERR_UNKNOWN_EXEC = 3,
    ERR_STDIN_OVERFLOW = 4,
};

/* START flags */
#define START_TTY 1u
#define START_STDIN 2u
#define START_DETACHED 4u

/* FWRITE flags */
#define FWRITE_TRUNCATE 1u
#define FWRITE_PARENTS 2u

/* OUTPUT flags: the stream */
#define STREAM_STDOUT 1u
#define STREAM_STDERR 2u

/* STATE record flags */
#define REC_DETACHED 1u
#define REC_TTY 2u
#define REC_STDIN_OPEN 4u
#define REC_EXITED 8u
#define REC_TREE_ALIVE 16u

#endif
