/* probe: what hostile code inside a sandbox can do to its neighbours and its agent.
 *
 * Built static on the host by the tests (gcc -static -O2) and copied into a sandbox.
 * Each mode prints one line per check, "name=ok" when the operation succeeded or
 * "name=ERRNO_NAME" when it failed, so the tests assert on plain text.
 *
 *   probe ptrace        PTRACE_ATTACH / PTRACE_SEIZE to PID 1, process_vm_readv of PID 1,
 *                       open of /proc/1/mem for reading and writing
 *   probe ids           real and effective uid, then setuid(0) and setgid(0) (for a
 *                       setuid-root copy of this binary)
 *   probe subreaper     PR_SET_CHILD_SUBREAPER, then whom an orphaned grandchild is
 *                       re-parented to (the runtime's support for child subreapers)
 *   probe forkbomb      every process forks copies of itself forever, ignoring failures
 *                       (unlike a shell, which gives up when fork fails)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *err_name(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ESRCH: return "ESRCH";
    case EINVAL: return "EINVAL";
    case ENOSYS: return "ENOSYS";
    case EFAULT: return "EFAULT";
    case EIO: return "EIO";
    default: return strerror(e);
    }
}

static void report(const char *name, long rc) {
    if (rc < 0)
        printf("%s=%s\n", name, err_name(errno));
    else
        printf("%s=ok\n", name);
    fflush(stdout);
}

static int do_ptrace(void) {
    long rc = ptrace(PTRACE_ATTACH, 1, NULL, NULL);
    report("ptrace_attach", rc);
    if (rc == 0) {
        waitpid(1, NULL, __WALL);
        ptrace(PTRACE_DETACH, 1, NULL, NULL);
    }
    rc = ptrace(PTRACE_SEIZE, 1, NULL, NULL);
    report("ptrace_seize", rc);
    if (rc == 0)
        ptrace(PTRACE_DETACH, 1, NULL, NULL);
    char buf[64];
    struct iovec local = {buf, sizeof buf};
    struct iovec remote = {(void *)0x400000, sizeof buf};
    report("process_vm_readv", (long)process_vm_readv(1, &local, 1, &remote, 1, 0));
    int fd = open("/proc/1/mem", O_RDONLY);
    report("open_mem_read", fd);
    if (fd >= 0)
        close(fd);
    fd = open("/proc/1/mem", O_RDWR);
    report("open_mem_write", fd);
    if (fd >= 0)
        close(fd);
    return 0;
}

static int do_ids(void) {
    printf("uid=%d\neuid=%d\n", (int)getuid(), (int)geteuid());
    report("setuid0", setuid(0));
    report("setgid0", setgid(0));
    printf("euid_after=%d\n", (int)geteuid());
    fflush(stdout);
    return 0;
}

static int do_subreaper(void) {
    report("set_subreaper", prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0));
    int on = -1;
    prctl(PR_GET_CHILD_SUBREAPER, &on, 0, 0, 0);
    printf("subreaper=%d\n", on);
    int fds[2];
    if (pipe(fds) != 0)
        return 1;
    pid_t child = fork();
    if (child == 0) {
        pid_t grandchild = fork();
        if (grandchild == 0) {
            close(fds[0]);
            usleep(200 * 1000); /* its parent is gone by now */
            dprintf(fds[1], "%d\n", (int)getppid());
            _exit(0);
        }
        _exit(0);
    }
    close(fds[1]);
    waitpid(child, NULL, 0);
    char line[32] = {0};
    ssize_t n = read(fds[0], line, sizeof line - 1);
    if (n > 0) {
        int ppid = atoi(line);
        if (ppid == (int)getpid())
            printf("orphan_parent=self\n");
        else
            printf("orphan_parent=%d\n", ppid);
    }
    while (wait(NULL) > 0) {
    }
    fflush(stdout);
    return 0;
}

static int do_forkbomb(void) {
    for (;;)
        (void)fork();
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: probe ptrace|ids|subreaper|forkbomb\n");
        return 2;
    }
    if (strcmp(argv[1], "ptrace") == 0)
        return do_ptrace();
    if (strcmp(argv[1], "ids") == 0)
        return do_ids();
    if (strcmp(argv[1], "subreaper") == 0)
        return do_subreaper();
    if (strcmp(argv[1], "forkbomb") == 0)
        return do_forkbomb();
    fprintf(stderr, "probe: unknown mode %s\n", argv[1]);
    return 2;
}
