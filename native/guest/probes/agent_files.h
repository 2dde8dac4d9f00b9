/* agent_files.h — the agent probe's files: a small table in guest RAM standing in for the
 * guest's filesystem behind WRITE_FILE, READ_FILE, `cat` and `hostname`. Paths are plain
 * keys (no directories). /dev/urandom takes writes and keeps nothing: Linux mixes them into
 * its entropy pool, and the probe has no pool. */
#ifndef SM_AGENT_FILES_H
#define SM_AGENT_FILES_H

#include <stdint.h>

#define FILES_MAX 8
#define FILE_MAX_BYTES 4096u
#define FILE_PATH_MAX_BYTES 256u
#define HOSTNAME_PATH "/proc/sys/kernel/hostname"

/* What went wrong, as the errno a Linux guest would report. */
enum files_result {
    FILES_OK,
    FILES_NOT_FOUND,      /* ENOENT */
    FILES_TABLE_FULL,     /* ENOSPC */
    FILES_TOO_LARGE,      /* EFBIG: more than FILE_MAX_BYTES */
    FILES_NAME_TOO_LONG,  /* ENAMETOOLONG: more than FILE_PATH_MAX_BYTES */
    FILES_NOT_READABLE,   /* EOPNOTSUPP: /dev/urandom (no entropy here to read) */
};

/* strerror() of the errno a result stands for. */
const char *files_strerror(enum files_result r);

/* Replaces (or, with append, extends) the file; nothing changes on failure. */
enum files_result files_write(const char *path, uint32_t path_len, const uint8_t *data,
                              uint32_t len, int append);
/* The file's bytes, valid until the next write. */
enum files_result files_read(const char *path, uint32_t path_len, const uint8_t **data,
                             uint32_t *len);

#endif
