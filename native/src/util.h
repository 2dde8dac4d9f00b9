/* util.h — small helpers any module may use; a leaf: it includes nothing of the core. */
#ifndef SM_UTIL_H
#define SM_UTIL_H

#include <stdarg.h>
#include <stddef.h>

/* snprintf into buf (len 0: nothing written); the result is always NUL-terminated. */
void sm_format(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void sm_vformat(char *buf, size_t len, const char *fmt, va_list ap);

#endif
