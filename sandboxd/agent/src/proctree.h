/* proctree.h - finding and killing a process tree through /proc ("stop all, then kill",
 * PROTOCOL.md "Execs"). Knows nothing about execs or the channel. */
#ifndef SBX_PROCTREE_H
#define SBX_PROCTREE_H

#include <stddef.h>
#include <sys/types.h>

/* SIGSTOP every descendant of root, in rounds (at most 50) until a round finds none new, then
 * SIGKILL them all. root itself is never signalled; nor are root's direct children listed in
 * skip, nor their descendants. Returns how many processes were killed, or -1 when /proc could
 * not be listed (nothing was signalled). */
int proctree_kill(pid_t root, const pid_t *skip, size_t nskip);

/* Every process (but the caller) whose environment holds the entry (e.g. "VAR=value"),
 * and all its descendants: stopped, then killed. Returns how many, or -1 when /proc could
 * not be listed. For a kill from inside a container whose processes the host cannot see
 * (gVisor), run as the user who owns them. */
int proctree_kill_marked(const char *entry);

#endif
