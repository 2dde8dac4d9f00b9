/* util.c — small helpers (util.h). */
#include "util.h"

#include <stdio.h>

void sm_vformat(char *buf, size_t len, const char *fmt, va_list ap)
{
    if (len)
        vsnprintf(buf, len, fmt, ap);
}

void sm_format(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    sm_vformat(buf, len, fmt, ap);
    va_end(ap);
}
