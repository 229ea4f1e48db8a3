/* fake_agent: a hostile stand-in for the sandboxd agent (PROTOCOL.md, version 1).
 *
 * Run as a sandbox's PID 1 through the daemon's `agent_path` setting. It reads the
 * daemon's frames on stdin, answers the first HELLO with a valid STATE (the nonce echoed,
 * the header CRC right) and then misbehaves as $FAKE_AGENT_MODE says:
 *
 *   garbage       bytes that are no frame at all
 *   bad_crc       a PONG header whose header CRC is wrong
 *   oversized     an OUTPUT header (valid CRC) announcing MAX_PAYLOAD + 1 bytes
 *   unknown_exec  a well-formed OUTPUT for an exec the daemon never started
 *   quiet         nothing more: a channel that is in step and idle (execs never start)
 *   silent        not even the STATE: the HELLO is never answered
 *   flood         no STATE either: bytes without end, as fast as the channel takes them
 *
 * It then keeps reading (and ignoring) its input and never exits: the container must stay
 * up, so that the daemon's fallback (the engine's exec) is what the tests see.
 *
 * `fake_agent --supervise [--] ARGV...` is what the daemon's engine-exec fallback runs
 * (it wraps commands as `/.sandboxd/agent --supervise -- CMD`): here it simply execs ARGV.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HEADER_LEN 24
#define MAX_PAYLOAD (1u << 20)
#define T_HELLO 0x01
#define T_STATE 0x81
#define T_OUTPUT 0x84
#define T_PONG 0x89

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib's crc32(0, buf, len) */
static uint32_t crc32_of(const unsigned char *buf, size_t len) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++)
        c = crc_table[(c ^ buf[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (v >> (8 * i)) & 0xFF;
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (v >> (8 * i)) & 0xFF;
}
static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void write_all(const unsigned char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(1, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return; /* the daemon went away: nothing to do */
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* A 24-byte header; the header CRC covers bytes 0..19 (agent -> daemon payload CRC is 0). */
static void header(unsigned char *h, uint8_t type, uint8_t flags, uint32_t length, uint64_t id) {
    h[0] = 'S';
    h[1] = 'B';
    h[2] = type;
    h[3] = flags;
    put_u32(h + 4, length);
    put_u64(h + 8, id);
    put_u32(h + 16, 0);
    put_u32(h + 20, crc32_of(h, 20));
}

static void send_state(const unsigned char *nonce) {
    unsigned char f[HEADER_LEN + 28];
    header(f, T_STATE, 0, 28, 0);
    memcpy(f + HEADER_LEN, nonce, 16);
    put_u32(f + HEADER_LEN + 16, 1);          /* protocol version */
    put_u32(f + HEADER_LEN + 20, 0x000100);   /* agent version 0.1.0 */
    put_u32(f + HEADER_LEN + 24, 0);          /* no execs */
    write_all(f, sizeof f);
}

static void misbehave(const char *mode) {
    unsigned char f[HEADER_LEN + 16];
    if (strcmp(mode, "garbage") == 0) {
        static const unsigned char junk[] =
            "\xde\xad\xbe\xef this is not a frame \x00\x01\x02\xff\xfe garbage garbage garbage";
        write_all(junk, sizeof junk - 1);
    } else if (strcmp(mode, "bad_crc") == 0) {
        header(f, T_PONG, 0, 0, 7);
        f[20] ^= 0x5A; /* the header CRC no longer matches */
        write_all(f, HEADER_LEN);
    } else if (strcmp(mode, "oversized") == 0) {
        header(f, T_OUTPUT, 1, MAX_PAYLOAD + 1, 0x5eed);
        write_all(f, HEADER_LEN);
    } else if (strcmp(mode, "unknown_exec") == 0) {
        header(f, T_OUTPUT, 1, 8 + 4, 0x5eed);
        put_u64(f + HEADER_LEN, 0);
        memcpy(f + HEADER_LEN + 8, "boo\n", 4);
        write_all(f, HEADER_LEN + 12);
    }
    /* quiet: nothing */
}

static int supervise(int argc, char **argv) {
    int i = 2;
    if (i < argc && strcmp(argv[i], "--") == 0)
        i++;
    if (i >= argc) {
        fprintf(stderr, "fake_agent: --supervise needs a command\n");
        return 126;
    }
    execvp(argv[i], argv + i);
    fprintf(stderr, "fake_agent: cannot run '%s': %s\n", argv[i], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--supervise") == 0)
        return supervise(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        printf("sandboxd-agent 0.0.0 (fake, protocol 1)\n");
        return 0;
    }
    const char *mode = getenv("FAKE_AGENT_MODE");
    if (mode == NULL || *mode == '\0')
        mode = "quiet";
    signal(SIGCHLD, SIG_IGN); /* orphans of engine execs are reaped by the kernel */
    crc_init();

    static unsigned char buf[2 * (HEADER_LEN + MAX_PAYLOAD)];
    size_t have = 0;
    int answered = 0;
    for (;;) {
        ssize_t n = read(0, buf + have, sizeof buf - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
        /* Take whole frames; resync by one byte on anything that is not one. */
        size_t at = 0;
        while (have - at >= HEADER_LEN) {
            const unsigned char *h = buf + at;
            uint32_t length = get_u32(h + 4);
            if (h[0] != 'S' || h[1] != 'B' || length > MAX_PAYLOAD) {
                at++;
                continue;
            }
            if (have - at < HEADER_LEN + (size_t)length)
                break;
            if (h[2] == T_HELLO && strcmp(mode, "flood") == 0) {
                static unsigned char junk[256 * 1024];
                memset(junk, 'x', sizeof junk);
                for (;;)
                    write_all(junk, sizeof junk); /* dropped by the engine while detached */
            }
            if (h[2] == T_HELLO && length == 20 && !answered && strcmp(mode, "silent") != 0) {
                send_state(h + HEADER_LEN);
                answered = 1;
                struct timespec ts = {0, 100 * 1000 * 1000}; /* let the daemon call it ready */
                nanosleep(&ts, NULL);
                misbehave(mode);
            } else if (h[2] == T_HELLO && answered && strcmp(mode, "quiet") == 0) {
                send_state(h + HEADER_LEN); /* a re-attach: in step again */
            }
            at += HEADER_LEN + length;
        }
        memmove(buf, buf + at, have - at);
        have -= at;
        if (have == sizeof buf)
            have = 0;
    }
    for (;;) /* the channel is gone: stay up as the container's main process */
        pause();
}
