/* virtio_fs.h — virtio-fs (device id 26): an in-process FUSE passthrough server for one host
 * directory. Queues: hiprio (FORGET, BATCH_FORGET) and one request queue.
 * Confinement, one way: every name the guest sends is a single directory entry (no '/', not
 * '.' or '..', NUL-terminated within the frame, at most 255 bytes) and is resolved relative to
 * the O_PATH fd of a node the guest was given: opens go through openat2(RESOLVE_BENEATH |
 * RESOLVE_NO_MAGICLINKS, O_NOFOLLOW), everything else through the *at() call that never
 * follows its last component (mkdirat, unlinkat, renameat2, symlinkat, linkat, readlinkat).
 * Symlinks are never followed host-side: LOOKUP/GETATTR/READDIR report them as symlinks and
 * READLINK hands their text to the guest, whose kernel resolves it in the guest's namespace.
 * read_only is enforced host-side: every modifying op answers EROFS.
 * No host privilege comes out of the share: CREATE, MKDIR and SETATTR strip S_ISUID/S_ISGID
 * from the mode; MKNOD makes regular files, FIFOs and sockets only (device nodes: EPERM); a
 * write-open, truncate or truncating CREATE of an existing set-user-ID/set-group-ID file
 * answers EPERM; SETATTR refuses to change a file's owner or group (EPERM): guest root is not
 * host root, and ownership is where host privilege lives. SETXATTR is not served (ENOSYS).
 * No DAX window: see README ("virtio-fs and DAX").
 * Snapshots keep the FUSE session: the negotiated INIT state, the read-only flag and tag (the
 * record's blob, sm_fs_state) and, as extra state, every node id and open file handle as the
 * path of its file relative to the share root (sm_fs_saved_entry + path bytes). A restore
 * re-resolves each path beneath the share it is given, one entry at a time with the live
 * lookups' confinement; a path that is not relative single entries refuses the restore, a
 * file that is gone (or a symlink in the way, or another kind of file now) leaves its node or
 * handle "gone": every request naming it answers ESTALE. A file deleted but still open when
 * the snapshot is taken is gone too. The session must fit SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES
 * (1 MiB, about 1000 node ids and open files at 1 KiB paths), else the snapshot is refused. */
#ifndef SM_VIRTIO_FS_H
#define SM_VIRTIO_FS_H

#include <stdint.h>
#include <sys/types.h>
#include "virtio_mmio.h"

#define SM_VIRTIO_ID_FS 26
#define SM_FS_TAG_BYTES 36
#define SM_FS_CONFIG_BYTES 40           /* tag[36] + le32 num_request_queues */
#define SM_FS_NUM_REQUEST_QUEUES 1
#define SM_FS_HIPRIO_QUEUE_INDEX 0
#define SM_FS_REQUEST_QUEUE_INDEX 1
#define SM_FS_NUM_QUEUES 2

#define SM_FS_MAX_NODES 1024            /* node ids (O_PATH fds) the guest may hold */
#define SM_FS_MAX_HANDLES 256           /* open files and directories */
#define SM_FS_MAX_IO_BYTES (1024u * 1024u) /* max_write we announce; READ size is clamped to it */
#define SM_FS_MAX_NAME_BYTES 255
#define SM_FS_MAX_SYMLINK_BYTES 4095    /* a symlink's text, as PATH_MAX - 1 */
#define SM_FS_MAX_BATCH_FORGET 1024     /* node ids one BATCH_FORGET may name */

/* FUSE protocol we speak (include/uapi/linux/fuse.h). */
#define SM_FUSE_KERNEL_VERSION 7
#define SM_FUSE_KERNEL_MINOR_VERSION 31
#define SM_FUSE_MIN_MINOR_VERSION 12    /* fuse_create_in has umask from 7.12 on */
#define SM_FUSE_ROOT_ID 1
#define SM_FUSE_IN_HEADER_BYTES 40
#define SM_FUSE_OUT_HEADER_BYTES 16

#define SM_FUSE_LOOKUP 1
#define SM_FUSE_FORGET 2
#define SM_FUSE_GETATTR 3
#define SM_FUSE_SETATTR 4
#define SM_FUSE_READLINK 5
#define SM_FUSE_SYMLINK 6
#define SM_FUSE_MKNOD 8
#define SM_FUSE_MKDIR 9
#define SM_FUSE_UNLINK 10
#define SM_FUSE_RMDIR 11
#define SM_FUSE_RENAME 12
#define SM_FUSE_LINK 13
#define SM_FUSE_OPEN 14
#define SM_FUSE_READ 15
#define SM_FUSE_WRITE 16
#define SM_FUSE_STATFS 17
#define SM_FUSE_RELEASE 18
#define SM_FUSE_FSYNC 20
#define SM_FUSE_SETXATTR 21
#define SM_FUSE_REMOVEXATTR 24
#define SM_FUSE_FLUSH 25
#define SM_FUSE_INIT 26
#define SM_FUSE_OPENDIR 27
#define SM_FUSE_READDIR 28
#define SM_FUSE_RELEASEDIR 29
#define SM_FUSE_FSYNCDIR 30
#define SM_FUSE_CREATE 35
#define SM_FUSE_DESTROY 38
#define SM_FUSE_BATCH_FORGET 42
#define SM_FUSE_FALLOCATE 43
#define SM_FUSE_RENAME2 45
#define SM_FUSE_LSEEK 46

typedef enum sm_fs_error {
    SM_FS_ERR_NONE = 0,
    SM_FS_ERR_QUEUE,
    SM_FS_ERR_MALFORMED_HEADER,
    SM_FS_ERR_MALFORMED_ARGUMENT,
    SM_FS_ERR_NO_REPLY_SPACE,
    SM_FS_ERR_NOT_INITIALIZED,
    SM_FS_ERR_UNSUPPORTED_OPCODE,
    SM_FS_ERR_UNKNOWN_NODE,
    SM_FS_ERR_UNKNOWN_HANDLE,
    SM_FS_ERR_READ_ONLY,
    SM_FS_ERR_ESCAPE,
    SM_FS_ERR_TABLE_FULL,
    SM_FS_ERR_HOST_IO,
    SM_FS_ERR_PRIVILEGED,
    SM_FS_ERR_BAD_NAME,
    SM_FS_ERR_GONE,
    SM_FS_ERR_COUNT
} sm_fs_error;

const char *sm_fs_error_message(int err);

typedef struct sm_fs_counters {
    uint64_t ops;                 /* FUSE requests handled (FORGET included) */
    uint64_t bytes_read;          /* file bytes READ returned to the guest */
    uint64_t bytes_written;       /* file bytes WRITE put into host files */
    uint64_t errors;              /* requests answered with an error */
    uint64_t malformed_requests;  /* headers or arguments that do not parse */
    uint64_t unsupported_opcodes; /* answered ENOSYS */
    uint64_t read_only_refusals;  /* answered EROFS */
    uint64_t escape_refusals;     /* a name with '/', '.' or '..'; openat2 said EXDEV/ELOOP */
    uint64_t table_full;          /* node or handle table exhausted (ENFILE) */
    uint64_t host_errors;         /* other host errno answered to the guest */
    uint64_t privilege_refusals;  /* device nodes, writes to setuid/setgid files, chown: EPERM */
    uint64_t syncs;               /* FSYNC / FSYNCDIR done on host files */
    uint64_t fallocates;          /* FALLOCATE done on host files */
    uint64_t seeks;               /* LSEEK (SEEK_DATA / SEEK_HOLE) answered */
    uint64_t gone_at_restore;     /* nodes and handles whose file a restore did not find */
    uint64_t stale_answers;       /* requests naming one of those, answered ESTALE */
} sm_fs_counters;

typedef struct sm_fs_node {
    int fd;            /* O_PATH, -1 if the slot is free or gone */
    int gone;          /* restored without its file: held (nlookup) until FORGET, ESTALE */
    dev_t dev;
    ino_t ino;
    uint64_t nlookup;
} sm_fs_node;

typedef struct sm_fs_handle {
    int fd;            /* -1 if free or gone */
    int gone;          /* restored without its file: ESTALE until RELEASE */
    int is_dir;
} sm_fs_handle;

/* The record's blob: what a restore's share must match, and the INIT state. */
typedef struct sm_fs_state {
    char tag[SM_FS_TAG_BYTES + 4];   /* NUL-terminated */
    uint32_t read_only;
    uint32_t initialized;
    uint32_t minor;
    uint32_t pad;
} sm_fs_state;

/* The extra state: one entry per node (the root excepted) and per open handle, each followed
 * by path_len bytes of its path relative to the share root (no NUL, no leading '/'). */
#define SM_FS_SAVED_NODE 1u
#define SM_FS_SAVED_HANDLE 2u
#define SM_FS_KIND_GONE 0u         /* no file at the snapshot either: path_len 0 */
#define SM_FS_KIND_FILE 1u
#define SM_FS_KIND_DIR 2u
#define SM_FS_KIND_SYMLINK 3u
#define SM_FS_KIND_OTHER 4u        /* FIFO, socket: nodes only */
#define SM_FS_MAX_SAVED_PATH_BYTES 4095
typedef struct sm_fs_saved_entry {
    uint32_t table;      /* SM_FS_SAVED_NODE or SM_FS_SAVED_HANDLE */
    uint32_t index;      /* node id - 1, or fh - 1 */
    uint32_t kind;       /* SM_FS_KIND_*: what the path named when the snapshot was taken */
    uint32_t flags;      /* handles: open flags (O_ACCMODE | O_APPEND); nodes: 0 */
    uint64_t nlookup;    /* nodes: the guest's lookup count; handles: 0 */
    uint32_t path_len;   /* bytes of path that follow; 0 for a gone entry */
    uint32_t pad;
} sm_fs_saved_entry;

typedef struct sm_fs {
    sm_virtio_mmio *transport;
    char tag[SM_FS_TAG_BYTES + 1];
    int read_only;
    int initialized;       /* FUSE_INIT answered */
    uint32_t minor;        /* negotiated FUSE minor version */
    sm_fs_node nodes[SM_FS_MAX_NODES];   /* node id = index + 1; index 0 is the root */
    sm_fs_handle handles[SM_FS_MAX_HANDLES]; /* fh = index + 1 */
    uint8_t *io_buf;       /* SM_FS_MAX_IO_BYTES bounce buffer for READ/WRITE/READDIR */
    sm_fs_counters counters;
} sm_fs;

extern const sm_virtio_ops SM_FS_OPS;

sm_fs *sm_fs_create(const char *host_path, const char *tag, int read_only, uint32_t index,
                    char *err, size_t err_len);

#endif
