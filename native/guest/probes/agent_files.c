/* agent_files.c — see agent_files.h. */
#include "probe.h"
#include "agent_files.h"

#define DEV_URANDOM_PATH "/dev/urandom"

struct file {
    int used;
    uint32_t path_len;
    char path[FILE_PATH_MAX_BYTES];
    uint32_t len;
    uint8_t data[FILE_MAX_BYTES];
};

static struct file files[FILES_MAX];

static const char *const ERROR_TEXT[] = {
    [FILES_OK] = "Success",
    [FILES_NOT_FOUND] = "No such file or directory",
    [FILES_TABLE_FULL] = "No space left on device",
    [FILES_TOO_LARGE] = "File too large",
    [FILES_NAME_TOO_LONG] = "File name too long",
    [FILES_NOT_READABLE] = "Operation not supported",
};

const char *files_strerror(enum files_result r) { return ERROR_TEXT[r]; }

static int same_path(const char *path, uint32_t path_len, const char *other)
{
    return path_len == strlen(other) && memcmp(path, other, path_len) == 0;
}

static struct file *find(const char *path, uint32_t path_len)
{
    for (int i = 0; i < FILES_MAX; i++)
        if (files[i].used && files[i].path_len == path_len && memcmp(files[i].path, path, path_len) == 0)
            return &files[i];
    return 0;
}

enum files_result files_write(const char *path, uint32_t path_len, const uint8_t *data,
                              uint32_t len, int append)
{
    if (same_path(path, path_len, DEV_URANDOM_PATH))
        return FILES_OK;
    if (path_len > FILE_PATH_MAX_BYTES)
        return FILES_NAME_TOO_LONG;
    struct file *f = find(path, path_len);
    uint32_t kept = f && append ? f->len : 0;
    if (len > FILE_MAX_BYTES - kept)
        return FILES_TOO_LARGE;
    for (int i = 0; !f && i < FILES_MAX; i++) {
        if (!files[i].used) {
            f = &files[i];
            f->used = 1;
            f->path_len = path_len;
            memcpy(f->path, path, path_len);
        }
    }
    if (!f)
        return FILES_TABLE_FULL;
    memcpy(f->data + kept, data, len);
    f->len = kept + len;
    return FILES_OK;
}

enum files_result files_read(const char *path, uint32_t path_len, const uint8_t **data,
                             uint32_t *len)
{
    if (same_path(path, path_len, DEV_URANDOM_PATH))
        return FILES_NOT_READABLE;
    struct file *f = find(path, path_len);
    if (!f)
        return path_len > FILE_PATH_MAX_BYTES ? FILES_NAME_TOO_LONG : FILES_NOT_FOUND;
    *data = f->data;
    *len = f->len;
    return FILES_OK;
}
