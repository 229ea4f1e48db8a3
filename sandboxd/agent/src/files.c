/* files.c - file requests done by the agent itself, as the sandbox's uid, inside the
 * container (see files.h). Every open uses O_NONBLOCK | O_NOCTTY and anything that is not a
 * regular file is refused, so a FIFO or a device never blocks the agent; files of /proc and
 * /sys (the agent's own memory among them) are refused too. */
#define _GNU_SOURCE
#include "files.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "frame.h"
#include "outq.h"
#include "proto.h"
#include "util.h"

#define PROC_MAGIC 0x9fa0
#define SYSFS_MAGIC 0x62656572

static void reply_errno(uint64_t id, int err)
{
    uint8_t p[4];
    put_u32(p, (uint32_t)err);
    outq_frame(T_FRESULT, 0, id, p, sizeof p, NULL, 0);
}

/* A NUL-terminated absolute path, or NULL with *err set. */
static char *abs_path(const uint8_t *p, size_t n, int *err)
{
    if (n == 0 || p[0] != '/') {
        *err = EINVAL;
        return NULL;
    }
    char *s = str_dup_n(p, n);
    if (!s)
        *err = ENOMEM;
    return s;
}

static int open_retry(const char *path, int flags, mode_t mode)
{
    int fd;
    do
        fd = open(path, flags | O_NONBLOCK | O_CLOEXEC | O_NOCTTY, mode);
    while (fd < 0 && errno == EINTR);
    return fd;
}

/* 0 when fd is a regular file outside /proc and /sys, else the errno to report. */
static int check_regular(int fd, struct stat *st)
{
    if (fstat(fd, st) < 0)
        return errno;
    if (S_ISDIR(st->st_mode))
        return EISDIR;
    if (!S_ISREG(st->st_mode))
        return EINVAL;
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0)
        return errno;
    if (sf.f_type == PROC_MAGIC || sf.f_type == SYSFS_MAGIC)
        return EINVAL;
    return 0;
}

void files_read(uint64_t id, const struct fread_req *r)
{
    int err = 0;
    if (r->length > FREAD_MAX) {
        reply_errno(id, E2BIG);
        return;
    }
    if (r->offset > (uint64_t)INT64_MAX - r->length) {
        reply_errno(id, EINVAL);
        return;
    }
    char *path = abs_path(r->path, r->path_len, &err);
    if (!path) {
        reply_errno(id, err);
        return;
    }
    int fd = open_retry(path, O_RDONLY, 0);
    free(path);
    if (fd < 0) {
        reply_errno(id, errno == ENXIO ? EINVAL : errno);
        return;
    }
    struct stat st;
    if ((err = check_regular(fd, &st))) {
        close_quiet(fd);
        reply_errno(id, err);
        return;
    }
    uint8_t *p = outq_begin(12 + (size_t)r->length);
    if (!p) {
        close_quiet(fd);
        reply_errno(id, ENOMEM);
        return;
    }
    size_t got = 0;
    while (got < r->length) {
        ssize_t n = pread(fd, p + 12 + got, r->length - got, (off_t)(r->offset + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            err = errno;
            break;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close_quiet(fd);
    if (err) {
        outq_cancel();
        reply_errno(id, err);
        return;
    }
    put_u32(p, 0);
    put_u64(p + 4, (uint64_t)st.st_size);
    outq_end(T_FRESULT, 0, id, 12 + got);
}

/* mkdir -p of every parent of path (not path itself), mode 0755. 0 or an errno. */
static int make_parents(char *path)
{
    for (char *s = path + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        int r = mkdir(path, 0755);
        int err = errno;
        *s = '/';
        if (r < 0 && err != EEXIST)
            return err;
    }
    return 0;
}

static int do_write(const struct fwrite_req *r, char *path)
{
    int err;
    if (r->offset > (uint64_t)INT64_MAX || r->data_len > (uint64_t)INT64_MAX - r->offset)
        return EFBIG;
    if ((r->flags & FWRITE_PARENTS) && (err = make_parents(path)))
        return err;
    mode_t mode = (mode_t)(r->mode & 07777);
    int fd = open_retry(path, O_WRONLY | O_CREAT, mode ? mode : 0644);
    if (fd < 0)
        return errno == ENXIO ? EINVAL : errno;
    struct stat st;
    if ((err = check_regular(fd, &st))) {
        close_quiet(fd);
        return err;
    }
    if ((r->flags & FWRITE_TRUNCATE) && ftruncate(fd, 0) < 0) {
        err = errno;
        close_quiet(fd);
        return err;
    }
    size_t done = 0;
    while (done < r->data_len) {
        ssize_t n = pwrite(fd, r->data + done, r->data_len - done, (off_t)(r->offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            err = n < 0 ? errno : EIO;
            close_quiet(fd);
            return err;
        }
        done += (size_t)n;
    }
    if (close(fd) < 0 && errno != EINTR)
        return errno;
    return 0;
}

void files_write(uint64_t id, const struct fwrite_req *r)
{
    int err = 0;
    char *path = abs_path(r->path, r->path_len, &err);
    if (path) {
        err = do_write(r, path);
        free(path);
    }
    reply_errno(id, err);
}

/* The last component of path ("/" for the root); *n its length. */
static const char *base_name(const char *path, size_t *n)
{
    size_t end = strlen(path);
    while (end > 1 && path[end - 1] == '/')
        end--;
    size_t start = end;
    while (start > 0 && path[start - 1] != '/')
        start--;
    if (start == end) { /* only slashes */
        *n = 1;
        return "/";
    }
    *n = end - start;
    return path + start;
}

/* One file entry at p (room bytes there); its length, or 0 when it does not fit. */
static size_t put_entry(uint8_t *p, size_t room, const struct stat *st, const char *name,
                        size_t nlen)
{
    if (nlen > 0xffff || room < ENTRY_FIXED_LEN + nlen)
        return 0;
    put_u64(p, (uint64_t)st->st_size);
    put_u32(p + 8, (uint32_t)st->st_mode);
    put_u64(p + 12, (uint64_t)((int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec));
    put_u16(p + 20, (uint16_t)nlen);
    memcpy(p + ENTRY_FIXED_LEN, name, nlen);
    return ENTRY_FIXED_LEN + nlen;
}

void files_stat(uint64_t id, const uint8_t *raw, size_t n)
{
    int err = 0;
    char *path = abs_path(raw, n, &err);
    if (!path) {
        reply_errno(id, err);
        return;
    }
    struct stat st;
    if (stat(path, &st) < 0) {
        err = errno;
        free(path);
        reply_errno(id, err);
        return;
    }
    size_t nlen;
    const char *name = base_name(path, &nlen);
    uint8_t *p = outq_begin(4 + ENTRY_FIXED_LEN + nlen);
    if (!p) {
        free(path);
        reply_errno(id, ENOMEM);
        return;
    }
    put_u32(p, 0);
    size_t len = put_entry(p + 4, ENTRY_FIXED_LEN + nlen, &st, name, nlen);
    free(path);
    if (!len) {
        outq_cancel();
        reply_errno(id, ENAMETOOLONG);
        return;
    }
    outq_end(T_FRESULT, 0, id, 4 + len);
}

void files_list(uint64_t id, const uint8_t *raw, size_t n)
{
    int err = 0;
    char *path = abs_path(raw, n, &err);
    if (!path) {
        reply_errno(id, err);
        return;
    }
    int fd = open_retry(path, O_RDONLY | O_DIRECTORY, 0);
    free(path);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        err = errno;
        close_quiet(fd);
        reply_errno(id, err);
        return;
    }
    uint8_t *p = outq_begin(MAX_PAYLOAD);
    if (!p) {
        closedir(d);
        reply_errno(id, ENOMEM);
        return;
    }
    size_t len = 8;
    uint32_t count = 0;
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (!e) {
            err = errno;
            break;
        }
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        struct stat st;
        if (fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue; /* gone meanwhile */
        size_t w = put_entry(p + len, MAX_PAYLOAD - len, &st, e->d_name, strlen(e->d_name));
        if (!w) {
            err = E2BIG;
            break;
        }
        len += w;
        count++;
    }
    closedir(d);
    if (err) {
        outq_cancel();
        reply_errno(id, err);
        return;
    }
    put_u32(p, 0);
    put_u32(p + 4, count);
    outq_end(T_FRESULT, 0, id, len);
}
