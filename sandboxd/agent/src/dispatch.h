/* dispatch.h - acting on one valid daemon -> agent frame: payload checks (BAD_PAYLOAD), then
 * the exec, file or channel handler. Holds no state but whether a HELLO came. */
#ifndef SBX_DISPATCH_H
#define SBX_DISPATCH_H

#include <stdbool.h>

#include "frame.h"

void dispatch(const struct frame *f);
/* Whether the first HELLO came (the agent sends nothing before it). */
bool dispatch_hello_seen(void);

#endif
