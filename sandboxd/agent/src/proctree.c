/* proctree.c - process tree discovery (/proc/<pid>/stat) and "stop all, then kill". Owns only
 * the memory of one call; never signals a process outside the asked tree. */
#define _GNU_SOURCE
#include "proctree.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#define ROUNDS_MAX 50

struct proc {
    pid_t pid, ppid;
};

struct pidset {
    pid_t *v;
    size_t n, cap;
};

static bool pidset_has(const struct pidset *s, pid_t pid)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->v[i] == pid)
            return true;
    return false;
}

static int pidset_add(struct pidset *s, pid_t pid)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        pid_t *v = realloc(s->v, cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = pid;
    return 0;
}

/* The parent of pid from /proc/<pid>/stat, or -1 (gone, or unreadable). */
static pid_t read_ppid(int procfd, const char *name)
{
    char path[64];
    size_t nl = strlen(name);
    if (nl + 6 > sizeof path)
        return -1;
    memcpy(path, name, nl);
    memcpy(path + nl, "/stat", 6);
    int fd;
    do
        fd = openat(procfd, path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -1;
    char buf[512];
    ssize_t n;
    do
        n = read(fd, buf, sizeof buf - 1);
    while (n < 0 && errno == EINTR);
    close_quiet(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    /* "pid (comm) S ppid ...": comm may hold anything, so look for the last ')'. A comm is at
     * most 16 bytes, so the fields we need are inside the first 512 bytes. */
    char *rp = strrchr(buf, ')');
    if (!rp || rp[1] != ' ' || !rp[2] || rp[3] != ' ')
        return -1;
    char *end;
    long ppid = strtol(rp + 4, &end, 10);
    if (end == rp + 4 || ppid < 0 || ppid > 0x7fffffff)
        return -1;
    return (pid_t)ppid;
}

static int cmp_proc(const void *a, const void *b)
{
    pid_t x = ((const struct proc *)a)->pid, y = ((const struct proc *)b)->pid;
    return (x > y) - (x < y);
}

/* Every process of /proc with its parent, sorted by pid; -1 when /proc cannot be listed. */
static int list_procs(struct proc **out, size_t *count)
{
    int procfd = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (procfd < 0)
        return -1;
    int dfd = dup(procfd);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        close_quiet(dfd);
        close_quiet(procfd);
        return -1;
    }
    struct proc *v = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (!e)
            break;
        if (e->d_name[0] < '1' || e->d_name[0] > '9')
            continue;
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0 || pid > 0x7fffffff)
            continue;
        pid_t ppid = read_ppid(procfd, e->d_name);
        if (ppid < 0)
            continue;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 128;
            struct proc *nv = realloc(v, ncap * sizeof *nv);
            if (!nv) {
                rc = -1;
                break;
            }
            v = nv;
            cap = ncap;
        }
        v[n].pid = (pid_t)pid;
        v[n].ppid = ppid;
        n++;
    }
    closedir(d);
    close_quiet(procfd);
    if (rc < 0) {
        free(v);
        return -1;
    }
    qsort(v, n, sizeof *v, cmp_proc);
    *out = v;
    *count = n;
    return 0;
}

static ssize_t find_proc(const struct proc *v, size_t n, pid_t pid)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid].pid == pid)
            return (ssize_t)mid;
        if (v[mid].pid < pid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

/* Mark every descendant of root in in_tree[] (root itself stays unmarked). */
static void mark_tree(const struct proc *v, size_t n, bool *in_tree, pid_t root,
                      const pid_t *skip, size_t nskip)
{
    memset(in_tree, 0, n * sizeof *in_tree);
    bool changed = true;
    while (changed) {
        changed = false;
        for (size_t i = 0; i < n; i++) {
            if (in_tree[i] || v[i].pid == root)
                continue;
            bool take = false;
            if (v[i].ppid == root) {
                take = true;
                for (size_t k = 0; k < nskip; k++)
                    if (skip[k] == v[i].pid)
                        take = false;
            } else {
                ssize_t p = find_proc(v, n, v[i].ppid);
                take = p >= 0 && in_tree[p];
            }
            if (take) {
                in_tree[i] = true;
                changed = true;
            }
        }
    }
}

int proctree_kill(pid_t root, const pid_t *skip, size_t nskip)
{
    struct pidset stopped = {0};
    bool listed = false;
    for (int round = 0; round < ROUNDS_MAX; round++) {
        struct proc *v;
        size_t n;
        if (list_procs(&v, &n) < 0)
            break;
        listed = true;
        bool *in_tree = n ? malloc(n * sizeof *in_tree) : NULL;
        if (n && !in_tree) {
            free(v);
            break;
        }
        mark_tree(v, n, in_tree, root, skip, nskip);
        size_t fresh = 0;
        for (size_t i = 0; i < n; i++) {
            if (!in_tree[i] || pidset_has(&stopped, v[i].pid))
                continue;
            if (pidset_add(&stopped, v[i].pid) < 0)
                break;
            (void)kill(v[i].pid, SIGSTOP);
            fresh++;
        }
        free(in_tree);
        free(v);
        if (!fresh)
            break;
    }
    for (size_t i = 0; i < stopped.n; i++)
        (void)kill(stopped.v[i], SIGKILL);
    int killed = (int)stopped.n;
    free(stopped.v);
    return listed ? killed : -1;
}

/* Whether /proc/<pid>/environ holds entry as a whole NUL-terminated entry. */
static bool environ_has(pid_t pid, const char *entry)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    static char buf[256 << 10];
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, buf + len, sizeof buf - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
        if (len == sizeof buf - 1)
            break;
    }
    close_quiet(fd);
    size_t elen = strlen(entry);
    for (size_t at = 0; at < len;) {
        size_t n = strnlen(buf + at, len - at);
        if (n == elen && memcmp(buf + at, entry, elen) == 0)
            return true;
        at += n + 1;
    }
    return false;
}

int proctree_kill_marked(const char *entry)
{
    struct proc *v;
    size_t n;
    if (list_procs(&v, &n) < 0)
        return -1;
    pid_t self = getpid();
    int killed = 0;
    for (size_t i = 0; i < n; i++) {
        pid_t pid = v[i].pid;
        if (pid == self || !environ_has(pid, entry))
            continue;
        (void)kill(pid, SIGSTOP); /* it cannot fork while its tree is taken */
        int below = proctree_kill(pid, NULL, 0);
        (void)kill(pid, SIGKILL);
        killed += 1 + (below > 0 ? below : 0);
    }
    free(v);
    return killed;
}
