/* virtio_fs.c — FUSE request parsing and a confined passthrough of one host directory.
 * Descriptor-level garbage (from sm_vq_pop) breaks the device like every other device;
 * request-level garbage (short headers, bad arguments, bad names, unknown opcodes, unknown
 * node ids) is answered with a FUSE error and counted. How names are confined: virtio_fs.h.
 * Wire structures follow include/uapi/linux/fuse.h (checked against Linux 6.1's). */
#define _GNU_SOURCE
#include "virtio_fs.h"
#include "error_table.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<linux/openat2.h>)
#include <linux/openat2.h>
#define SM_HAVE_OPEN_HOW 1
#endif
#endif
#ifndef SM_HAVE_OPEN_HOW
struct open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_BENEATH 0x08
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif

#define FS_RESOLVE_FLAGS (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
#define FS_ENTRY_VALID_S 1
#define FS_ATTR_VALID_S 1
#define FS_MAX_BACKGROUND 16
#define FS_PROC_FD_PATH_BYTES 64
#define FS_OPEN_FLAGS_KEPT (O_ACCMODE | O_APPEND | O_TRUNC)
#define FS_LOOKUP_FLAGS (O_PATH | O_NOFOLLOW | O_CLOEXEC) /* a symlink is a node of its own */
#define FS_CREATE_FLAGS_KEPT (O_ACCMODE | O_APPEND | O_EXCL) /* O_TRUNC: after the check */
/* Permission bits a guest may give a file it creates: never S_ISUID or S_ISGID, so guest root
 * cannot leave a set-user-ID (or set-group-ID) executable in the host directory. */
#define FS_CREATE_MODE_BITS (S_ISVTX | S_IRWXU | S_IRWXG | S_IRWXO)
#define FS_PRIVILEGE_BITS (S_ISUID | S_ISGID)
#define FS_NSEC_PER_SEC 1000000000u
/* fallocate modes Linux's FUSE client sends (fs/fuse/file.c refuses any other bit). */
#define FS_FALLOCATE_MODES (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)
#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1u << 0)
#endif
#ifndef SYS_renameat2
#define SYS_renameat2 316
#endif

/* FUSE attribute bits of SETATTR (fuse_setattr_in.valid) and INIT flags we use. */
#define FATTR_MODE (1u << 0)
#define FATTR_UID (1u << 1)
#define FATTR_GID (1u << 2)
#define FATTR_SIZE (1u << 3)
#define FATTR_ATIME (1u << 4)
#define FATTR_MTIME (1u << 5)
#define FATTR_FH (1u << 6)
#define FATTR_ATIME_NOW (1u << 7)
#define FATTR_MTIME_NOW (1u << 8)
#define FUSE_ATOMIC_O_TRUNC (1u << 3)
#define FUSE_FSYNC_FDATASYNC (1u << 0)

/* ---- FUSE wire structures (little endian, as the guest lays them out) ---- */
struct fuse_in_header { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid; uint16_t total_extlen, padding; };
struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; };
struct fuse_attr {
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct fuse_entry_out {
    uint64_t nodeid, generation, entry_valid, attr_valid;
    uint32_t entry_valid_nsec, attr_valid_nsec;
    struct fuse_attr attr;
};
struct fuse_attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec, dummy; struct fuse_attr attr; };
struct fuse_forget_in { uint64_t nlookup; };
struct fuse_open_in { uint32_t flags, open_flags; };
struct fuse_open_out { uint64_t fh; uint32_t open_flags, padding; };
struct fuse_create_in { uint32_t flags, mode, umask, open_flags; };
struct fuse_read_in { uint64_t fh, offset; uint32_t size, read_flags; uint64_t lock_owner; uint32_t flags, padding; };
struct fuse_write_in { uint64_t fh, offset; uint32_t size, write_flags; uint64_t lock_owner; uint32_t flags, padding; };
struct fuse_write_out { uint32_t size, padding; };
struct fuse_release_in { uint64_t fh; uint32_t flags, release_flags; uint64_t lock_owner; };
struct fuse_init_in { uint32_t major, minor, max_readahead, flags; };
struct fuse_init_out {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2, unused[7];
};
struct fuse_dirent { uint64_t ino, off; uint32_t namelen, type; };
struct fuse_setattr_in {
    uint32_t valid, padding;
    uint64_t fh, size, lock_owner, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5;
};
struct fuse_mkdir_in { uint32_t mode, umask; };
struct fuse_mknod_in { uint32_t mode, rdev, umask, padding; };
struct fuse_rename_in { uint64_t newdir; };
struct fuse_rename2_in { uint64_t newdir; uint32_t flags, padding; };
struct fuse_link_in { uint64_t oldnodeid; };
struct fuse_kstatfs {
    uint64_t blocks, bfree, bavail, files, ffree;
    uint32_t bsize, namelen, frsize, padding, spare[6];
};
struct fuse_fsync_in { uint64_t fh; uint32_t fsync_flags, padding; };
struct fuse_flush_in { uint64_t fh; uint32_t unused, padding; uint64_t lock_owner; };
struct fuse_fallocate_in { uint64_t fh, offset, length; uint32_t mode, padding; };
struct fuse_lseek_in { uint64_t fh, offset; uint32_t whence, padding; };
struct fuse_lseek_out { uint64_t offset; };
struct fuse_batch_forget_in { uint32_t count, dummy; };
struct fuse_forget_one { uint64_t nodeid, nlookup; };
#define FUSE_COMPAT_22_INIT_OUT_BYTES 24
#define FUSE_DIRENT_ALIGN(x) (((x) + 7u) & ~7u)

struct linux_dirent64 { uint64_t d_ino; int64_t d_off; uint16_t d_reclen; uint8_t d_type; char d_name[]; };

_Static_assert(sizeof(struct fuse_in_header) == SM_FUSE_IN_HEADER_BYTES, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == SM_FUSE_OUT_HEADER_BYTES, "fuse_out_header");
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");
_Static_assert(sizeof(struct fuse_write_in) == 40, "fuse_write_in");
_Static_assert(sizeof(struct fuse_setattr_in) == 88, "fuse_setattr_in");
_Static_assert(sizeof(struct fuse_mknod_in) == 16, "fuse_mknod_in");
_Static_assert(sizeof(struct fuse_rename2_in) == 16, "fuse_rename2_in");
_Static_assert(sizeof(struct fuse_kstatfs) == 80, "fuse_kstatfs");
_Static_assert(sizeof(struct fuse_flush_in) == 24, "fuse_flush_in");
_Static_assert(sizeof(struct fuse_fallocate_in) == 32, "fuse_fallocate_in");
_Static_assert(sizeof(struct fuse_lseek_in) == 24, "fuse_lseek_in");
_Static_assert(sizeof(struct fuse_forget_one) == 16, "fuse_forget_one");

static const char *const FS_ERROR_MESSAGES[SM_FS_ERR_COUNT] = {
    [SM_FS_ERR_NONE] = "ok",
    [SM_FS_ERR_QUEUE] = "Guest gave us a malformed queue",
    [SM_FS_ERR_MALFORMED_HEADER] = "Guest gave us a FUSE request whose header is short or whose length disagrees with the chain",
    [SM_FS_ERR_MALFORMED_ARGUMENT] = "Guest gave us a FUSE request whose arguments are short or not NUL-terminated",
    [SM_FS_ERR_NO_REPLY_SPACE] = "Guest gave us a FUSE request without room for the reply",
    [SM_FS_ERR_NOT_INITIALIZED] = "Guest sent a FUSE request before FUSE_INIT",
    [SM_FS_ERR_UNSUPPORTED_OPCODE] = "Guest sent a FUSE opcode we do not serve",
    [SM_FS_ERR_UNKNOWN_NODE] = "Guest named a node id we never gave out",
    [SM_FS_ERR_UNKNOWN_HANDLE] = "Guest named a file handle we never gave out",
    [SM_FS_ERR_READ_ONLY] = "Guest tried to modify a read-only share",
    [SM_FS_ERR_ESCAPE] = "Guest tried to resolve a path leaving the shared directory",
    [SM_FS_ERR_TABLE_FULL] = "Guest holds more nodes or open files than we allow",
    [SM_FS_ERR_HOST_IO] = "Host file operation failed",
    [SM_FS_ERR_PRIVILEGED] = "Guest tried to create a device node, to write a set-user-ID or set-group-ID host file, or to change a host file's owner",
    [SM_FS_ERR_BAD_NAME] = "Guest named a directory entry with '/' in it, or '.' or '..'",
    [SM_FS_ERR_GONE] = "Guest named a node or file handle whose host file was gone at the restore",
};

const char *sm_fs_error_message(int err)
{
    return sm_error_table_lookup(FS_ERROR_MESSAGES, SM_FS_ERR_COUNT, err, "unknown fs error");
}

static int fs_openat2(int dirfd, const char *name, uint64_t flags, uint64_t mode)
{
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = flags;
    how.mode = mode;
    how.resolve = FS_RESOLVE_FLAGS;
    long rc;
    do {
        rc = syscall(SYS_openat2, dirfd, name, &how, sizeof(how));
    } while (rc < 0 && errno == EINTR);
    return (int)rc;
}

/* The /proc path of one of our own fds: how an O_PATH node (already confined) is chmod'ed,
 * truncated, timestamped, reopened or linked — calls that take no O_PATH fd directly. */
static const char *proc_path(char out[FS_PROC_FD_PATH_BYTES], int fd)
{
    snprintf(out, FS_PROC_FD_PATH_BYTES, "/proc/self/fd/%d", fd);
    return out;
}

/* Reopens an O_PATH fd with real access flags (the inode is already confined). */
static int reopen_fd(int path_fd, int flags)
{
    char proc[FS_PROC_FD_PATH_BYTES];
    return open(proc_path(proc, path_fd), flags | O_CLOEXEC);
}

sm_fs *sm_fs_create(const char *host_path, const char *tag, int read_only, uint32_t index,
                    char *err, size_t err_len)
{
    if (!tag || !*tag || strlen(tag) > SM_FS_TAG_BYTES) {
        snprintf(err, err_len, "virtio-fs%u: tag must be 1..%d bytes", index, SM_FS_TAG_BYTES);
        return NULL;
    }
    if (!host_path || !*host_path) {
        snprintf(err, err_len, "virtio-fs%u: empty host_path", index);
        return NULL;
    }
    int root = open(host_path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) {
        snprintf(err, err_len, "virtio-fs%u: cannot open directory %s: %s", index, host_path,
                 strerror(errno));
        return NULL;
    }
    /* Check openat2 is usable here (Linux >= 5.6, not filtered): confinement depends on it. */
    int probe = fs_openat2(root, ".", O_PATH | O_CLOEXEC, 0);
    if (probe < 0) {
        snprintf(err, err_len, "virtio-fs%u: openat2(RESOLVE_BENEATH) unavailable: %s", index,
                 strerror(errno));
        close(root);
        return NULL;
    }
    close(probe);
    struct stat st;
    sm_fs *f = calloc(1, sizeof(*f));
    uint8_t *buf = malloc(SM_FS_MAX_IO_BYTES);
    if (!f || !buf || fstat(root, &st) < 0) {
        snprintf(err, err_len, "virtio-fs%u: setup failed: %s", index, strerror(errno ? errno : ENOMEM));
        free(f);
        free(buf);
        close(root);
        return NULL;
    }
    f->io_buf = buf;
    f->read_only = read_only;
    snprintf(f->tag, sizeof(f->tag), "%s", tag);
    for (uint32_t i = 0; i < SM_FS_MAX_NODES; i++)
        f->nodes[i].fd = -1;
    for (uint32_t i = 0; i < SM_FS_MAX_HANDLES; i++)
        f->handles[i].fd = -1;
    f->nodes[0].fd = root;
    f->nodes[0].dev = st.st_dev;
    f->nodes[0].ino = st.st_ino;
    f->nodes[0].nlookup = 1;
    return f;
}

/* ---- node and handle tables ---- */

static sm_fs_node *node_get(sm_fs *f, uint64_t nodeid)
{
    if (nodeid < 1 || nodeid > SM_FS_MAX_NODES)
        return NULL;
    sm_fs_node *n = &f->nodes[nodeid - 1];
    return n->fd >= 0 ? n : NULL;
}

/* A node id that names a gone node (restored without its file). */
static int node_is_gone(const sm_fs *f, uint64_t nodeid)
{
    return nodeid >= 1 && nodeid <= SM_FS_MAX_NODES && f->nodes[nodeid - 1].gone;
}

/* Takes ownership of path_fd. Returns the node id, or 0 (fd closed) if the table is full. */
static uint64_t node_insert(sm_fs *f, int path_fd, const struct stat *st)
{
    int free_slot = -1;
    for (uint32_t i = 0; i < SM_FS_MAX_NODES; i++) {
        sm_fs_node *n = &f->nodes[i];
        if (n->fd < 0) {
            if (free_slot < 0 && !n->gone)
                free_slot = (int)i;
            continue;
        }
        if (n->dev == st->st_dev && n->ino == st->st_ino) {
            close(path_fd);
            n->nlookup++;
            return i + 1;
        }
    }
    if (free_slot < 0) {
        close(path_fd);
        return 0;
    }
    sm_fs_node *n = &f->nodes[free_slot];
    n->fd = path_fd;
    n->dev = st->st_dev;
    n->ino = st->st_ino;
    n->nlookup = 1;
    return (uint64_t)free_slot + 1;
}

static void node_forget(sm_fs *f, uint64_t nodeid, uint64_t nlookup)
{
    if (nodeid == SM_FUSE_ROOT_ID)
        return;
    sm_fs_node *n = node_get(f, nodeid);
    if (!n && !node_is_gone(f, nodeid))
        return;
    n = &f->nodes[nodeid - 1];
    n->nlookup = nlookup >= n->nlookup ? 0 : n->nlookup - nlookup;
    if (n->nlookup == 0) {
        if (n->fd >= 0)
            close(n->fd);
        n->fd = -1;
        n->gone = 0;
    }
}

static sm_fs_handle *handle_get(sm_fs *f, uint64_t fh, int is_dir)
{
    if (fh < 1 || fh > SM_FS_MAX_HANDLES)
        return NULL;
    sm_fs_handle *h = &f->handles[fh - 1];
    return (h->fd >= 0 && h->is_dir == is_dir) ? h : NULL;
}

static int handle_is_gone(const sm_fs *f, uint64_t fh)
{
    return fh >= 1 && fh <= SM_FS_MAX_HANDLES && f->handles[fh - 1].gone;
}

/* Takes ownership of fd. Returns fh, or 0 (fd closed) if the table is full. */
static uint64_t handle_insert(sm_fs *f, int fd, int is_dir)
{
    for (uint32_t i = 0; i < SM_FS_MAX_HANDLES; i++) {
        if (f->handles[i].fd < 0 && !f->handles[i].gone) {
            f->handles[i].fd = fd;
            f->handles[i].is_dir = is_dir;
            return i + 1;
        }
    }
    close(fd);
    return 0;
}

static void close_all(sm_fs *f, int keep_root)
{
    for (uint32_t i = 0; i < SM_FS_MAX_HANDLES; i++) {
        if (f->handles[i].fd >= 0)
            close(f->handles[i].fd);
        f->handles[i].fd = -1;
        f->handles[i].gone = 0;
    }
    for (uint32_t i = keep_root ? 1 : 0; i < SM_FS_MAX_NODES; i++) {
        if (f->nodes[i].fd >= 0)
            close(f->nodes[i].fd);
        f->nodes[i].fd = -1;
        f->nodes[i].gone = 0;
    }
    if (keep_root)
        f->nodes[0].nlookup = 1;
}

/* ---- request handling ---- */

/* One request being answered: the chain, its header, the reply payload. */
typedef struct fs_req {
    const sm_vq_chain *chain;
    struct fuse_in_header in;
    uint32_t arg_bytes;        /* readable bytes after the header, bounded by in.len */
    uint32_t reply_room;       /* writable bytes after the out header */
    uint32_t written;          /* bytes put into the chain so far */
} fs_req;

static uint32_t read_arg(const fs_req *r, uint32_t offset, void *dst, uint32_t len)
{
    if (offset > r->arg_bytes || len > r->arg_bytes - offset)
        return 0;
    return sm_vq_chain_read(r->chain, SM_FUSE_IN_HEADER_BYTES + offset, dst, len);
}

/* Reads the NUL-terminated string at offset into out (max + 1 bytes). Returns its length,
 * -EINVAL if it is empty or has no NUL within the frame, -ENAMETOOLONG past max bytes. */
static int read_string(const fs_req *r, uint32_t offset, char *out, uint32_t max)
{
    if (offset >= r->arg_bytes)
        return -EINVAL;
    uint32_t n = r->arg_bytes - offset;
    if (n > max + 1)
        n = max + 1;
    if (read_arg(r, offset, out, n) != n)
        return -EINVAL;
    const char *nul = memchr(out, 0, n);
    if (!nul)
        return n == max + 1 ? -ENAMETOOLONG : -EINVAL;
    if (nul == out)
        return -EINVAL;
    return (int)(nul - out);
}

static void reply(fs_req *r, int32_t error, const void *payload, uint32_t len)
{
    struct fuse_out_header out;
    if (len > r->reply_room)
        len = r->reply_room;
    out.len = SM_FUSE_OUT_HEADER_BYTES + (error ? 0 : len);
    out.error = error;
    out.unique = r->in.unique;
    sm_vq_chain_write(r->chain, 0, &out, sizeof(out));
    r->written = SM_FUSE_OUT_HEADER_BYTES;
    if (!error && len) {
        sm_vq_chain_write(r->chain, SM_FUSE_OUT_HEADER_BYTES, payload, len);
        r->written += len;
    }
}

/* An error reply, counted by its cause. */
static void reply_error(sm_fs *f, fs_req *r, int err_code, int errno_value)
{
    f->counters.errors++;
    switch (err_code) {
    case SM_FS_ERR_MALFORMED_HEADER:
    case SM_FS_ERR_MALFORMED_ARGUMENT:
    case SM_FS_ERR_NOT_INITIALIZED:
    case SM_FS_ERR_UNKNOWN_NODE:
    case SM_FS_ERR_UNKNOWN_HANDLE: f->counters.malformed_requests++; break;
    case SM_FS_ERR_UNSUPPORTED_OPCODE: f->counters.unsupported_opcodes++; break;
    case SM_FS_ERR_READ_ONLY: f->counters.read_only_refusals++; break;
    case SM_FS_ERR_ESCAPE:
    case SM_FS_ERR_BAD_NAME: f->counters.escape_refusals++; break;
    case SM_FS_ERR_TABLE_FULL: f->counters.table_full++; break;
    case SM_FS_ERR_PRIVILEGED: f->counters.privilege_refusals++; break;
    case SM_FS_ERR_GONE: f->counters.stale_answers++; break;
    default: f->counters.host_errors++; break;
    }
    reply(r, -errno_value, NULL, 0);
}

/* Maps a failed host call's errno to the named error that counts it. */
static void reply_errno(sm_fs *f, fs_req *r, int e)
{
    if (e == EXDEV || e == ELOOP)
        reply_error(f, r, SM_FS_ERR_ESCAPE, e);
    else if (e == EROFS)
        reply_error(f, r, SM_FS_ERR_READ_ONLY, e);
    else
        reply_error(f, r, SM_FS_ERR_HOST_IO, e ? e : EIO);
}

/* A node id or file handle the request named is not one we hold: ESTALE for one a restore
 * found gone, else the guest named one we never gave out. */
static void reply_no_node(sm_fs *f, fs_req *r, uint64_t nodeid)
{
    if (node_is_gone(f, nodeid))
        reply_error(f, r, SM_FS_ERR_GONE, ESTALE);
    else
        reply_error(f, r, SM_FS_ERR_UNKNOWN_NODE, ENOENT);
}

static void reply_no_handle(sm_fs *f, fs_req *r, uint64_t fh)
{
    if (handle_is_gone(f, fh))
        reply_error(f, r, SM_FS_ERR_GONE, ESTALE);
    else
        reply_error(f, r, SM_FS_ERR_UNKNOWN_HANDLE, EBADF);
}

/* Reads the directory-entry name at *offset and moves *offset past it. A name is one entry of
 * one directory: '/', "." and ".." are refused here, so no *at() call below can walk out of
 * the directory it is given. On failure answers the request and returns -1. */
static int take_name(sm_fs *f, fs_req *r, uint32_t *offset, char out[SM_FS_MAX_NAME_BYTES + 1])
{
    int n = read_string(r, *offset, out, SM_FS_MAX_NAME_BYTES);
    if (n < 0) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, -n);
        return -1;
    }
    if (strchr(out, '/') || strcmp(out, ".") == 0 || strcmp(out, "..") == 0) {
        reply_error(f, r, SM_FS_ERR_BAD_NAME, EINVAL);
        return -1;
    }
    *offset += (uint32_t)n + 1;
    return 0;
}

static void fill_attr(struct fuse_attr *a, const struct stat *st)
{
    memset(a, 0, sizeof(*a));
    a->ino = st->st_ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->rdev = (uint32_t)st->st_rdev;
    a->blksize = (uint32_t)st->st_blksize;
}

static void fill_entry(struct fuse_entry_out *e, uint64_t nodeid, const struct stat *st)
{
    memset(e, 0, sizeof(*e));
    e->nodeid = nodeid;
    e->entry_valid = FS_ENTRY_VALID_S;
    e->attr_valid = FS_ATTR_VALID_S;
    fill_attr(&e->attr, st);
}

static void do_init(sm_fs *f, fs_req *r)
{
    struct fuse_init_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (in.major != SM_FUSE_KERNEL_VERSION || in.minor < SM_FUSE_MIN_MINOR_VERSION) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EPROTO);
        return;
    }
    struct fuse_init_out out;
    memset(&out, 0, sizeof(out));
    out.major = SM_FUSE_KERNEL_VERSION;
    out.minor = in.minor < SM_FUSE_KERNEL_MINOR_VERSION ? in.minor : SM_FUSE_KERNEL_MINOR_VERSION;
    out.max_readahead = in.max_readahead;
    /* Plain, synchronous passthrough; O_TRUNC comes in OPEN (one op, not SETATTR + OPEN). */
    out.flags = in.flags & FUSE_ATOMIC_O_TRUNC;
    out.max_background = FS_MAX_BACKGROUND;
    out.congestion_threshold = FS_MAX_BACKGROUND * 3 / 4;
    out.max_write = SM_FS_MAX_IO_BYTES;
    out.time_gran = 1;
    out.max_pages = SM_FS_MAX_IO_BYTES / 4096;
    f->minor = out.minor;
    f->initialized = 1;
    reply(r, 0, &out, out.minor < 23 ? FUSE_COMPAT_22_INIT_OUT_BYTES : sizeof(out));
}

/* Answers with the entry `name` of parent (LOOKUP, and MKDIR/MKNOD/SYMLINK/LINK once made):
 * a node of its own, a symlink included, never what a symlink points to. */
static void reply_entry(sm_fs *f, fs_req *r, sm_fs_node *parent, const char *name)
{
    int fd = fs_openat2(parent->fd, name, FS_LOOKUP_FLAGS, 0);
    if (fd < 0) {
        reply_errno(f, r, errno);
        return;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        reply_errno(f, r, e);
        return;
    }
    uint64_t id = node_insert(f, fd, &st);
    if (!id) {
        reply_error(f, r, SM_FS_ERR_TABLE_FULL, ENFILE);
        return;
    }
    struct fuse_entry_out e;
    fill_entry(&e, id, &st);
    reply(r, 0, &e, sizeof(e));
}

static void do_lookup(sm_fs *f, fs_req *r, sm_fs_node *parent)
{
    char name[SM_FS_MAX_NAME_BYTES + 1];
    uint32_t at = 0;
    if (take_name(f, r, &at, name))
        return;
    reply_entry(f, r, parent, name);
}

static void do_getattr(sm_fs *f, fs_req *r, sm_fs_node *node)
{
    struct stat st;
    if (fstat(node->fd, &st) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    struct fuse_attr_out out;
    memset(&out, 0, sizeof(out));
    out.attr_valid = FS_ATTR_VALID_S;
    fill_attr(&out.attr, &st);
    reply(r, 0, &out, sizeof(out));
}

static int wants_write(uint32_t flags)
{
    return (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC);
}

static void do_open(sm_fs *f, fs_req *r, sm_fs_node *node, int is_dir)
{
    struct fuse_open_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    struct stat st;
    if (fstat(node->fd, &st) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    int flags;
    if (is_dir) {
        if (!S_ISDIR(st.st_mode)) {
            reply_error(f, r, SM_FS_ERR_HOST_IO, ENOTDIR);
            return;
        }
        flags = O_RDONLY | O_DIRECTORY;
    } else {
        if (!S_ISREG(st.st_mode)) { /* no FIFOs or device nodes: they could block or reach the host */
            int e = S_ISDIR(st.st_mode) ? EISDIR : S_ISLNK(st.st_mode) ? ELOOP : EACCES;
            reply_error(f, r, SM_FS_ERR_HOST_IO, e);
            return;
        }
        if (f->read_only && wants_write(in.flags)) {
            reply_error(f, r, SM_FS_ERR_READ_ONLY, EROFS);
            return;
        }
        /* We may hold CAP_FSETID (running as root), so the kernel would not clear these bits
         * on a write: the guest could replace a set-user-ID host program's contents. */
        if ((st.st_mode & FS_PRIVILEGE_BITS) && wants_write(in.flags)) {
            reply_error(f, r, SM_FS_ERR_PRIVILEGED, EPERM);
            return;
        }
        flags = (int)(in.flags & FS_OPEN_FLAGS_KEPT);
    }
    int fd = reopen_fd(node->fd, flags);
    if (fd < 0) {
        reply_errno(f, r, errno);
        return;
    }
    uint64_t fh = handle_insert(f, fd, is_dir);
    if (!fh) {
        reply_error(f, r, SM_FS_ERR_TABLE_FULL, ENFILE);
        return;
    }
    struct fuse_open_out out;
    memset(&out, 0, sizeof(out));
    out.fh = fh;
    reply(r, 0, &out, sizeof(out));
}

static void do_create(sm_fs *f, fs_req *r, sm_fs_node *parent)
{
    struct fuse_create_in in;
    char name[SM_FS_MAX_NAME_BYTES + 1];
    uint32_t at = sizeof(in);
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (take_name(f, r, &at, name))
        return;
    if (r->reply_room < sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out)) {
        reply_error(f, r, SM_FS_ERR_NO_REPLY_SPACE, EINVAL);
        return;
    }
    /* CREATE makes regular files only (Linux sends S_IFREG): a device node, FIFO or socket
     * type is refused, not silently turned into a file. */
    uint32_t type = in.mode & S_IFMT;
    if (type != 0 && type != S_IFREG) {
        reply_error(f, r, SM_FS_ERR_PRIVILEGED, EPERM);
        return;
    }
    uint64_t flags = (in.flags & FS_CREATE_FLAGS_KEPT) | O_CREAT | O_CLOEXEC | O_NOFOLLOW;
    int fd = fs_openat2(parent->fd, name, flags, in.mode & FS_CREATE_MODE_BITS & ~in.umask);
    if (fd < 0) {
        reply_errno(f, r, errno);
        return;
    }
    struct stat st;
    char proc[FS_PROC_FD_PATH_BYTES];
    int path_fd = open(proc_path(proc, fd), O_PATH | O_CLOEXEC);
    if (path_fd < 0 || fstat(path_fd, &st) < 0) {
        int e = errno;
        if (path_fd >= 0)
            close(path_fd);
        close(fd);
        reply_errno(f, r, e);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        close(path_fd);
        close(fd);
        reply_error(f, r, SM_FS_ERR_HOST_IO, EACCES);
        return;
    }
    /* Without O_EXCL an existing file opens: the same rule as a write-OPEN, checked before
     * O_TRUNC (applied here, not by the open) touches the file. */
    if ((st.st_mode & FS_PRIVILEGE_BITS) && wants_write(in.flags)) {
        close(path_fd);
        close(fd);
        reply_error(f, r, SM_FS_ERR_PRIVILEGED, EPERM);
        return;
    }
    if ((in.flags & O_TRUNC) && st.st_size != 0) {
        if (truncate(proc, 0) < 0 || fstat(path_fd, &st) < 0) {
            int e = errno;
            close(path_fd);
            close(fd);
            reply_errno(f, r, e);
            return;
        }
    }
    uint64_t id = node_insert(f, path_fd, &st);
    if (!id) {
        close(fd);
        reply_error(f, r, SM_FS_ERR_TABLE_FULL, ENFILE);
        return;
    }
    uint64_t fh = handle_insert(f, fd, 0);
    if (!fh) {
        node_forget(f, id, 1);
        reply_error(f, r, SM_FS_ERR_TABLE_FULL, ENFILE);
        return;
    }
    struct {
        struct fuse_entry_out e;
        struct fuse_open_out o;
    } out;
    fill_entry(&out.e, id, &st);
    memset(&out.o, 0, sizeof(out.o));
    out.o.fh = fh;
    reply(r, 0, &out, sizeof(out));
}

static void do_read(sm_fs *f, fs_req *r)
{
    struct fuse_read_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, 0);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    uint32_t want = in.size;
    if (want > SM_FS_MAX_IO_BYTES)
        want = SM_FS_MAX_IO_BYTES;
    if (want > r->reply_room)
        want = r->reply_room;
    if (in.offset > INT64_MAX) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    uint32_t done = 0;
    while (done < want) {
        ssize_t n = pread(h->fd, f->io_buf + done, want - done, (off_t)(in.offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            reply_errno(f, r, errno);
            return;
        }
        if (n == 0)
            break;
        done += (uint32_t)n;
    }
    f->counters.bytes_read += done;
    reply(r, 0, f->io_buf, done);
}

static void do_write(sm_fs *f, fs_req *r)
{
    struct fuse_write_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in) || in.size > SM_FS_MAX_IO_BYTES ||
        in.size > r->arg_bytes - sizeof(in) || in.offset > INT64_MAX) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, 0);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    if (read_arg(r, sizeof(in), f->io_buf, in.size) != in.size) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    uint32_t done = 0;
    while (done < in.size) {
        ssize_t n = pwrite(h->fd, f->io_buf + done, in.size - done, (off_t)(in.offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (done)
                break;
            reply_errno(f, r, n < 0 ? errno : EIO);
            return;
        }
        done += (uint32_t)n;
    }
    f->counters.bytes_written += done;
    struct fuse_write_out out = {.size = done, .padding = 0};
    reply(r, 0, &out, sizeof(out));
}

static void do_release(sm_fs *f, fs_req *r, int is_dir)
{
    struct fuse_release_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (handle_is_gone(f, in.fh) && f->handles[in.fh - 1].is_dir == is_dir) {
        f->handles[in.fh - 1].gone = 0; /* nothing left to close: the slot is free again */
        reply(r, 0, NULL, 0);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, is_dir);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    close(h->fd);
    h->fd = -1;
    reply(r, 0, NULL, 0);
}

static void do_readdir(sm_fs *f, fs_req *r)
{
    struct fuse_read_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in) || in.offset > INT64_MAX) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, 1);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    uint32_t room = in.size;
    if (room > r->reply_room)
        room = r->reply_room;
    if (room > SM_FS_MAX_IO_BYTES / 2)
        room = SM_FS_MAX_IO_BYTES / 2;
    /* First half of io_buf: raw getdents64; second half: the FUSE reply. */
    uint8_t *raw = f->io_buf, *outb = f->io_buf + SM_FS_MAX_IO_BYTES / 2;
    if (lseek(h->fd, (off_t)in.offset, SEEK_SET) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    uint32_t used = 0;
    for (;;) {
        long n = syscall(SYS_getdents64, h->fd, raw, room ? room : 1);
        if (n < 0) {
            if (used)
                break;
            reply_errno(f, r, errno);
            return;
        }
        if (n == 0)
            break;
        int full = 0;
        for (long pos = 0; pos < n;) {
            const struct linux_dirent64 *d = (const struct linux_dirent64 *)(raw + pos);
            if (d->d_reclen == 0 || pos + d->d_reclen > n)
                break;
            size_t namelen = strnlen(d->d_name, d->d_reclen - offsetof(struct linux_dirent64, d_name));
            uint32_t need = FUSE_DIRENT_ALIGN((uint32_t)(sizeof(struct fuse_dirent) + namelen));
            if (used + need > room) {
                full = 1;
                break;
            }
            struct fuse_dirent fd_ent = {.ino = d->d_ino, .off = (uint64_t)d->d_off,
                                         .namelen = (uint32_t)namelen, .type = d->d_type};
            memcpy(outb + used, &fd_ent, sizeof(fd_ent));
            memcpy(outb + used + sizeof(fd_ent), d->d_name, namelen);
            memset(outb + used + sizeof(fd_ent) + namelen, 0, need - sizeof(fd_ent) - namelen);
            used += need;
            pos += d->d_reclen;
        }
        if (full)
            break;
    }
    reply(r, 0, outb, used);
}

/* ---- namespace and attribute operations ---- */

static void do_setattr(sm_fs *f, fs_req *r, sm_fs_node *node)
{
    struct fuse_setattr_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in) ||
        ((in.valid & FATTR_ATIME) && !(in.valid & FATTR_ATIME_NOW) &&
         (in.atimensec >= FS_NSEC_PER_SEC || in.atime > INT64_MAX)) ||
        ((in.valid & FATTR_MTIME) && !(in.valid & FATTR_MTIME_NOW) &&
         (in.mtimensec >= FS_NSEC_PER_SEC || in.mtime > INT64_MAX))) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    struct stat st;
    if (fstat(node->fd, &st) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    /* A symlink's own mode and times mean nothing to Linux, and no call changes them
     * through an O_PATH fd without following the link: refused, never followed. */
    if (S_ISLNK(st.st_mode)) {
        reply_error(f, r, SM_FS_ERR_HOST_IO, EPERM);
        return;
    }
    /* Owner and group stay the host's: a chown that changes them is refused; one that names
     * the current owner (cp -p, tar as root) is a no-op and succeeds. */
    if (((in.valid & FATTR_UID) && in.uid != st.st_uid) ||
        ((in.valid & FATTR_GID) && in.gid != st.st_gid)) {
        reply_error(f, r, SM_FS_ERR_PRIVILEGED, EPERM);
        return;
    }
    sm_fs_handle *h = NULL;
    if (in.valid & FATTR_SIZE) {
        if (!S_ISREG(st.st_mode) || in.size > INT64_MAX) {
            reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
            return;
        }
        /* Running as root we may hold CAP_FSETID: truncating would keep the set-id bits. */
        if (st.st_mode & FS_PRIVILEGE_BITS) {
            reply_error(f, r, SM_FS_ERR_PRIVILEGED, EPERM);
            return;
        }
        if ((in.valid & FATTR_FH) && !(h = handle_get(f, in.fh, 0))) {
            reply_no_handle(f, r, in.fh);
            return;
        }
    }
    char proc[FS_PROC_FD_PATH_BYTES];
    proc_path(proc, node->fd);
    /* The set-id bits stay stripped, as CREATE strips them: chmod 4755 leaves 0755. */
    if ((in.valid & FATTR_MODE) && chmod(proc, in.mode & FS_CREATE_MODE_BITS) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    if (in.valid & FATTR_SIZE) {
        int rc = h ? ftruncate(h->fd, (off_t)in.size) : truncate(proc, (off_t)in.size);
        if (rc < 0) {
            reply_errno(f, r, errno);
            return;
        }
    }
    if (in.valid & (FATTR_ATIME | FATTR_MTIME)) {
        struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        if (in.valid & FATTR_ATIME)
            ts[0] = (in.valid & FATTR_ATIME_NOW) ? (struct timespec){0, UTIME_NOW}
                                                 : (struct timespec){(time_t)in.atime, in.atimensec};
        if (in.valid & FATTR_MTIME)
            ts[1] = (in.valid & FATTR_MTIME_NOW) ? (struct timespec){0, UTIME_NOW}
                                                 : (struct timespec){(time_t)in.mtime, in.mtimensec};
        if (utimensat(AT_FDCWD, proc, ts, 0) < 0) {
            reply_errno(f, r, errno);
            return;
        }
    }
    do_getattr(f, r, node);
}

static void do_readlink(sm_fs *f, fs_req *r, sm_fs_node *node)
{
    char target[SM_FS_MAX_SYMLINK_BYTES + 1];
    ssize_t n = readlinkat(node->fd, "", target, sizeof(target)); /* the O_PATH link itself */
    if (n < 0) {
        reply_errno(f, r, errno == ENOENT ? EINVAL : errno); /* not a symlink */
        return;
    }
    if ((size_t)n > SM_FS_MAX_SYMLINK_BYTES || (uint32_t)n > r->reply_room) {
        reply_error(f, r, SM_FS_ERR_NO_REPLY_SPACE, ENAMETOOLONG);
        return;
    }
    reply(r, 0, target, (uint32_t)n);
}

static void do_mkdir(sm_fs *f, fs_req *r, sm_fs_node *parent)
{
    struct fuse_mkdir_in in;
    char name[SM_FS_MAX_NAME_BYTES + 1];
    uint32_t at = sizeof(in);
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (take_name(f, r, &at, name))
        return;
    if (mkdirat(parent->fd, name, in.mode & FS_CREATE_MODE_BITS & ~in.umask) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    reply_entry(f, r, parent, name);
}

/* Regular files, FIFOs and sockets (the guest's kernel serves the last two itself); device
 * nodes would be host devices to anyone on the host who opens them. */
static void do_mknod(sm_fs *f, fs_req *r, sm_fs_node *parent)
{
    struct fuse_mknod_in in;
    char name[SM_FS_MAX_NAME_BYTES + 1];
    uint32_t at = sizeof(in);
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (take_name(f, r, &at, name))
        return;
    uint32_t type = in.mode & S_IFMT;
    if (type == 0)
        type = S_IFREG;
    if (type != S_IFREG && type != S_IFIFO && type != S_IFSOCK) {
        reply_error(f, r, SM_FS_ERR_PRIVILEGED, EPERM);
        return;
    }
    if (mknodat(parent->fd, name, type | (in.mode & FS_CREATE_MODE_BITS & ~in.umask), 0) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    reply_entry(f, r, parent, name);
}

static void do_symlink(sm_fs *f, fs_req *r, sm_fs_node *parent)
{
    char name[SM_FS_MAX_NAME_BYTES + 1], target[SM_FS_MAX_SYMLINK_BYTES + 1];
    uint32_t at = 0;
    if (take_name(f, r, &at, name))
        return;
    int n = read_string(r, at, target, SM_FS_MAX_SYMLINK_BYTES);
    if (n < 0) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, -n);
        return;
    }
    /* The text is stored, never resolved host-side: any target is only words. */
    if (symlinkat(target, parent->fd, name) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    reply_entry(f, r, parent, name);
}

static void do_unlink(sm_fs *f, fs_req *r, sm_fs_node *parent, int flags)
{
    char name[SM_FS_MAX_NAME_BYTES + 1];
    uint32_t at = 0;
    if (take_name(f, r, &at, name))
        return;
    if (unlinkat(parent->fd, name, flags) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    reply(r, 0, NULL, 0);
}

/* RENAME (fuse_rename_in) and RENAME2 (fuse_rename2_in: flags 0 or RENAME_NOREPLACE). Both
 * directories are nodes we gave out, both names single entries: nothing leaves the share. */
static void do_rename(sm_fs *f, fs_req *r, sm_fs_node *parent, int with_flags)
{
    struct fuse_rename2_in in;
    memset(&in, 0, sizeof(in));
    uint32_t at = with_flags ? sizeof(struct fuse_rename2_in) : sizeof(struct fuse_rename_in);
    if (read_arg(r, 0, &in, at) != at) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (in.flags & ~RENAME_NOREPLACE) { /* EXCHANGE, WHITEOUT: not served */
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    char old_name[SM_FS_MAX_NAME_BYTES + 1], new_name[SM_FS_MAX_NAME_BYTES + 1];
    if (take_name(f, r, &at, old_name) || take_name(f, r, &at, new_name))
        return;
    sm_fs_node *newdir = node_get(f, in.newdir);
    if (!newdir) {
        reply_no_node(f, r, in.newdir);
        return;
    }
    if (syscall(SYS_renameat2, parent->fd, old_name, newdir->fd, new_name, in.flags) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    reply(r, 0, NULL, 0);
}

static void do_link(sm_fs *f, fs_req *r, sm_fs_node *parent)
{
    struct fuse_link_in in;
    char name[SM_FS_MAX_NAME_BYTES + 1];
    uint32_t at = sizeof(in);
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (take_name(f, r, &at, name))
        return;
    sm_fs_node *old = node_get(f, in.oldnodeid);
    if (!old) {
        reply_no_node(f, r, in.oldnodeid);
        return;
    }
    struct stat st;
    if (fstat(old->fd, &st) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    int rc;
    if (S_ISLNK(st.st_mode)) {
        /* The /proc route could follow the link: AT_EMPTY_PATH links the link itself (it needs
         * CAP_DAC_READ_SEARCH; without it, refused rather than followed). */
        rc = linkat(old->fd, "", parent->fd, name, AT_EMPTY_PATH);
        if (rc < 0 && (errno == ENOENT || errno == EINVAL))
            errno = EPERM;
    } else {
        char proc[FS_PROC_FD_PATH_BYTES];
        rc = linkat(AT_FDCWD, proc_path(proc, old->fd), parent->fd, name, AT_SYMLINK_FOLLOW);
    }
    if (rc < 0) {
        reply_errno(f, r, errno);
        return;
    }
    reply_entry(f, r, parent, name);
}

static void do_statfs(sm_fs *f, fs_req *r, sm_fs_node *node)
{
    struct statfs sf;
    if (fstatfs(node->fd, &sf) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    struct fuse_kstatfs out;
    memset(&out, 0, sizeof(out));
    out.blocks = sf.f_blocks;
    out.bfree = sf.f_bfree;
    out.bavail = sf.f_bavail;
    out.files = sf.f_files;
    out.ffree = sf.f_ffree;
    out.bsize = (uint32_t)sf.f_bsize;
    out.namelen = (uint32_t)sf.f_namelen;
    out.frsize = (uint32_t)sf.f_frsize;
    reply(r, 0, &out, sizeof(out));
}

/* ---- operations on open handles ---- */

static void do_fsync(sm_fs *f, fs_req *r, int is_dir)
{
    struct fuse_fsync_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, is_dir);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    int rc = (in.fsync_flags & FUSE_FSYNC_FDATASYNC) ? fdatasync(h->fd) : fsync(h->fd);
    if (rc < 0) {
        reply_errno(f, r, errno);
        return;
    }
    f->counters.syncs++;
    reply(r, 0, NULL, 0);
}

static void do_flush(sm_fs *f, fs_req *r)
{
    struct fuse_flush_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in)) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (!handle_get(f, in.fh, 0)) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    reply(r, 0, NULL, 0); /* WRITE goes straight to pwrite: nothing is buffered here */
}

static void do_fallocate(sm_fs *f, fs_req *r)
{
    struct fuse_fallocate_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in) || in.offset > INT64_MAX ||
        in.length == 0 || in.length > INT64_MAX - in.offset) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    if (in.mode & ~(uint32_t)FS_FALLOCATE_MODES) {
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EOPNOTSUPP);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, 0);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    /* A set-id file never has a writable handle (do_open), so fallocate cannot keep its bits
     * on changed contents: the host's write-access check on h->fd refuses it (EBADF). */
    if (fallocate(h->fd, (int)in.mode, (off_t)in.offset, (off_t)in.length) < 0) {
        reply_errno(f, r, errno);
        return;
    }
    f->counters.fallocates++;
    reply(r, 0, NULL, 0);
}

static void do_lseek(sm_fs *f, fs_req *r)
{
    struct fuse_lseek_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in) || in.offset > INT64_MAX ||
        (in.whence != SEEK_DATA && in.whence != SEEK_HOLE)) { /* Linux seeks the rest itself */
        reply_error(f, r, SM_FS_ERR_MALFORMED_ARGUMENT, EINVAL);
        return;
    }
    sm_fs_handle *h = handle_get(f, in.fh, 0);
    if (!h) {
        reply_no_handle(f, r, in.fh);
        return;
    }
    off_t pos = lseek(h->fd, (off_t)in.offset, (int)in.whence);
    if (pos < 0) {
        reply_errno(f, r, errno); /* ENXIO: no data (or hole) past offset */
        return;
    }
    f->counters.seeks++;
    struct fuse_lseek_out out = {.offset = (uint64_t)pos};
    reply(r, 0, &out, sizeof(out));
}

/* FORGET and BATCH_FORGET: no reply. Returns 0 if the arguments parsed. */
static int do_forget(sm_fs *f, fs_req *r)
{
    if (r->in.opcode == SM_FUSE_FORGET) {
        struct fuse_forget_in in;
        if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in))
            return -1;
        node_forget(f, r->in.nodeid, in.nlookup);
        return 0;
    }
    struct fuse_batch_forget_in in;
    if (read_arg(r, 0, &in, sizeof(in)) != sizeof(in) || in.count > SM_FS_MAX_BATCH_FORGET ||
        in.count * sizeof(struct fuse_forget_one) > r->arg_bytes - sizeof(in))
        return -1;
    for (uint32_t i = 0; i < in.count; i++) {
        struct fuse_forget_one one;
        read_arg(r, (uint32_t)(sizeof(in) + i * sizeof(one)), &one, sizeof(one));
        node_forget(f, one.nodeid, one.nlookup);
    }
    return 0;
}

/* Ops that change the share: a read-only mount answers them all EROFS, before any parsing. */
static int modifies_share(uint32_t opcode)
{
    switch (opcode) {
    case SM_FUSE_SETATTR:
    case SM_FUSE_SYMLINK:
    case SM_FUSE_MKNOD:
    case SM_FUSE_MKDIR:
    case SM_FUSE_UNLINK:
    case SM_FUSE_RMDIR:
    case SM_FUSE_RENAME:
    case SM_FUSE_LINK:
    case SM_FUSE_WRITE:
    case SM_FUSE_SETXATTR:
    case SM_FUSE_REMOVEXATTR:
    case SM_FUSE_CREATE:
    case SM_FUSE_FALLOCATE:
    case SM_FUSE_RENAME2: return 1;
    default: return 0;
    }
}

/* Ops whose in-header nodeid must name a node we gave out. */
static int needs_node(uint32_t opcode)
{
    switch (opcode) {
    case SM_FUSE_LOOKUP:
    case SM_FUSE_GETATTR:
    case SM_FUSE_SETATTR:
    case SM_FUSE_READLINK:
    case SM_FUSE_SYMLINK:
    case SM_FUSE_MKNOD:
    case SM_FUSE_MKDIR:
    case SM_FUSE_UNLINK:
    case SM_FUSE_RMDIR:
    case SM_FUSE_RENAME:
    case SM_FUSE_LINK:
    case SM_FUSE_OPEN:
    case SM_FUSE_STATFS:
    case SM_FUSE_OPENDIR:
    case SM_FUSE_CREATE:
    case SM_FUSE_RENAME2: return 1;
    default: return 0;
    }
}

/* Handles one well-formed chain; returns 1 if a reply was written, 0 for FORGET. */
static int handle_request(sm_fs *f, fs_req *r)
{
    f->counters.ops++;
    struct fuse_in_header *in = &r->in;
    if (in->opcode == SM_FUSE_FORGET || in->opcode == SM_FUSE_BATCH_FORGET) {
        if (do_forget(f, r))
            f->counters.malformed_requests++;
        return 0;
    }
    if (r->reply_room == 0 && r->chain->writable_bytes < SM_FUSE_OUT_HEADER_BYTES) {
        f->counters.errors++;
        f->counters.malformed_requests++;
        return 0; /* nowhere to answer: the chain goes back empty */
    }
    if (!f->initialized && in->opcode != SM_FUSE_INIT) {
        reply_error(f, r, SM_FS_ERR_NOT_INITIALIZED, EIO);
        return 1;
    }
    if (f->read_only && modifies_share(in->opcode)) {
        reply_error(f, r, SM_FS_ERR_READ_ONLY, EROFS);
        return 1;
    }
    sm_fs_node *node = NULL;
    if (needs_node(in->opcode) && !(node = node_get(f, in->nodeid))) {
        reply_no_node(f, r, in->nodeid);
        return 1;
    }
    switch (in->opcode) {
    case SM_FUSE_INIT: do_init(f, r); break;
    case SM_FUSE_LOOKUP: do_lookup(f, r, node); break;
    case SM_FUSE_GETATTR: do_getattr(f, r, node); break;
    case SM_FUSE_SETATTR: do_setattr(f, r, node); break;
    case SM_FUSE_READLINK: do_readlink(f, r, node); break;
    case SM_FUSE_SYMLINK: do_symlink(f, r, node); break;
    case SM_FUSE_MKNOD: do_mknod(f, r, node); break;
    case SM_FUSE_MKDIR: do_mkdir(f, r, node); break;
    case SM_FUSE_UNLINK: do_unlink(f, r, node, 0); break;
    case SM_FUSE_RMDIR: do_unlink(f, r, node, AT_REMOVEDIR); break;
    case SM_FUSE_RENAME: do_rename(f, r, node, 0); break;
    case SM_FUSE_RENAME2: do_rename(f, r, node, 1); break;
    case SM_FUSE_LINK: do_link(f, r, node); break;
    case SM_FUSE_STATFS: do_statfs(f, r, node); break;
    case SM_FUSE_FSYNC: do_fsync(f, r, 0); break;
    case SM_FUSE_FSYNCDIR: do_fsync(f, r, 1); break;
    case SM_FUSE_FALLOCATE: do_fallocate(f, r); break;
    case SM_FUSE_LSEEK: do_lseek(f, r); break;
    case SM_FUSE_OPEN: do_open(f, r, node, 0); break;
    case SM_FUSE_OPENDIR: do_open(f, r, node, 1); break;
    case SM_FUSE_CREATE: do_create(f, r, node); break;
    case SM_FUSE_READ: do_read(f, r); break;
    case SM_FUSE_WRITE: do_write(f, r); break;
    case SM_FUSE_READDIR: do_readdir(f, r); break;
    case SM_FUSE_RELEASE: do_release(f, r, 0); break;
    case SM_FUSE_RELEASEDIR: do_release(f, r, 1); break;
    case SM_FUSE_FLUSH: do_flush(f, r); break;
    case SM_FUSE_DESTROY:
        close_all(f, 1);
        f->initialized = 0;
        reply(r, 0, NULL, 0);
        break;
    default: reply_error(f, r, SM_FS_ERR_UNSUPPORTED_OPCODE, ENOSYS); break;
    }
    return 1;
}

/* Parses the header of a popped chain and answers it; returns bytes written. */
static uint32_t serve_chain(sm_fs *f, const sm_vq_chain *c)
{
    fs_req r;
    memset(&r, 0, sizeof(r));
    r.chain = c;
    r.reply_room = c->writable_bytes >= SM_FUSE_OUT_HEADER_BYTES
                       ? c->writable_bytes - SM_FUSE_OUT_HEADER_BYTES : 0;
    if (c->readable_bytes < SM_FUSE_IN_HEADER_BYTES ||
        sm_vq_chain_read(c, 0, &r.in, sizeof(r.in)) != sizeof(r.in) ||
        r.in.len < SM_FUSE_IN_HEADER_BYTES || r.in.len > c->readable_bytes) {
        f->counters.ops++;
        if (c->writable_bytes < SM_FUSE_OUT_HEADER_BYTES) {
            f->counters.errors++;
            f->counters.malformed_requests++;
            return 0;
        }
        if (c->readable_bytes < SM_FUSE_IN_HEADER_BYTES)
            memset(&r.in, 0, sizeof(r.in)); /* unique 0: nothing to echo */
        reply_error(f, &r, SM_FS_ERR_MALFORMED_HEADER, EINVAL);
        return r.written;
    }
    r.arg_bytes = r.in.len - SM_FUSE_IN_HEADER_BYTES;
    handle_request(f, &r);
    return r.written;
}

static void fs_process_queue(sm_fs *f, uint16_t index)
{
    sm_virtio_mmio *t = f->transport;
    sm_virtqueue *q = &t->queues[index];
    sm_vq_chain chain;
    int used = 0;
    while (sm_virtio_mmio_is_live_locked(t) && q->ready) {
        int rc = sm_vq_pop(q, &chain);
        if (rc == SM_VQ_EMPTY)
            break;
        if (rc != SM_VQ_OK) {
            sm_virtio_mmio_mark_broken_locked(t, "%s: %s", FS_ERROR_MESSAGES[SM_FS_ERR_QUEUE],
                                              sm_vq_error_message(rc));
            break;
        }
        uint32_t written = serve_chain(f, &chain);
        sm_vq_push_used(q, chain.head, written);
        used = 1;
    }
    if (used)
        sm_virtio_mmio_signal_used_locked(t);
}

static uint64_t fs_features(void *dev)
{
    (void)dev;
    return 0;
}

static void fs_config_read(void *dev, uint32_t offset, uint8_t *data, uint32_t len)
{
    sm_fs *f = dev;
    uint8_t cfg[SM_FS_CONFIG_BYTES];
    memset(cfg, 0, sizeof(cfg));
    memcpy(cfg, f->tag, strnlen(f->tag, SM_FS_TAG_BYTES));
    uint32_t nq = SM_FS_NUM_REQUEST_QUEUES;
    memcpy(cfg + SM_FS_TAG_BYTES, &nq, 4);
    if (offset < SM_FS_CONFIG_BYTES && len <= SM_FS_CONFIG_BYTES - offset)
        memcpy(data, cfg + offset, len);
}

static void fs_activate(void *dev)
{
    sm_fs *f = dev;
    fs_process_queue(f, SM_FS_HIPRIO_QUEUE_INDEX);
    fs_process_queue(f, SM_FS_REQUEST_QUEUE_INDEX);
}

static void fs_notify(void *dev, uint16_t queue)
{
    fs_process_queue(dev, queue);
}

static void fs_reset(void *dev)
{
    sm_fs *f = dev;
    close_all(f, 1);
    f->initialized = 0;
}

static void fs_counters(void *dev, sm_device_info *info, uint32_t *n)
{
    sm_fs *f = dev;
#define ADD(field)                                                                                 \
    do {                                                                                           \
        snprintf(info->counter_names[*n], sizeof(info->counter_names[*n]), "%s", #field);          \
        info->counters[(*n)++] = f->counters.field;                                                \
    } while (0)
    ADD(ops);
    ADD(bytes_read);
    ADD(bytes_written);
    ADD(errors);
    ADD(malformed_requests);
    ADD(unsupported_opcodes);
    ADD(read_only_refusals);
    ADD(escape_refusals);
    ADD(table_full);
    ADD(host_errors);
    ADD(privilege_refusals);
    ADD(syncs);
    ADD(fallocates);
    ADD(seeks);
    ADD(gone_at_restore);
    ADD(stale_answers);
#undef ADD
}

static void fs_destroy(void *dev)
{
    sm_fs *f = dev;
    close_all(f, 0);
    free(f->io_buf);
    free(f);
}

/* ---- snapshots: the FUSE session as paths beneath the share (virtio_fs.h) ---- */

static size_t fs_save(void *dev, uint8_t *buf, size_t cap)
{
    sm_fs *f = dev;
    sm_fs_state s;
    memset(&s, 0, sizeof(s));
    snprintf(s.tag, sizeof(s.tag), "%s", f->tag);
    s.read_only = (uint32_t)(f->read_only != 0);
    s.initialized = (uint32_t)(f->initialized != 0);
    s.minor = f->minor;
    if (sizeof(s) <= cap)
        memcpy(buf, &s, sizeof(s));
    return sizeof(s);
}

/* The host path of one of our fds, as the kernel names it (/proc/self/fd). 0, or -1. */
static int fd_host_path(int fd, char *out, size_t cap)
{
    char proc[FS_PROC_FD_PATH_BYTES];
    errno = 0;
    ssize_t n = readlink(proc_path(proc, fd), out, cap - 1);
    if (n < 0 || (size_t)n >= cap - 1)
        return -1;
    out[n] = 0;
    return 0;
}

static uint32_t kind_of(mode_t mode)
{
    return S_ISREG(mode) ? SM_FS_KIND_FILE : S_ISDIR(mode) ? SM_FS_KIND_DIR
           : S_ISLNK(mode) ? SM_FS_KIND_SYMLINK : SM_FS_KIND_OTHER;
}

/* Where fd's file is now, relative to the share root (root_path, its host path): 0 with
 * *kind, rel and *len set; 1 when the file is gone (deleted, or moved out of the share by the
 * host); -1 (err set) when the path cannot be kept. */
static int relative_path(int fd, const char *root_path, char *rel, uint32_t *len, uint32_t *kind,
                         char *err, size_t err_len)
{
    struct stat st;
    char host[2 * (SM_FS_MAX_SAVED_PATH_BYTES + 1)];
    if (fstat(fd, &st) < 0 || st.st_nlink == 0)
        return 1;
    if (fd_host_path(fd, host, sizeof(host)) < 0) {
        snprintf(err, err_len, "the host path of a file the guest holds cannot be read (%s)",
                 errno ? strerror(errno) : "too long");
        return -1;
    }
    size_t root_len = strlen(root_path);
    if (strcmp(root_path, "/") == 0)
        root_len = 0;                       /* the share is the host's root: "/x" -> "x" */
    if (host[0] != '/' || strncmp(host, root_path, root_len) != 0 || host[root_len] != '/' ||
        host[root_len + 1] == 0)
        return 1;                           /* not beneath the share any more */
    const char *p = host + root_len + 1;
    size_t n = strlen(p);
    if (n > SM_FS_MAX_SAVED_PATH_BYTES) {
        snprintf(err, err_len, "the path of %.200s is longer than %d bytes", host,
                 SM_FS_MAX_SAVED_PATH_BYTES);
        return -1;
    }
    memcpy(rel, p, n);
    *len = (uint32_t)n;
    *kind = kind_of(st.st_mode);
    return 0;
}

/* Appends one entry and its path to the growing extra state; -1 (err set) past the limit. */
static int append_entry(uint8_t **buf, size_t *len, size_t *cap, const sm_fs_saved_entry *e,
                        const char *path, char *err, size_t err_len)
{
    size_t need = *len + sizeof(*e) + e->path_len;
    if (need > SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES) {
        snprintf(err, err_len, "the guest's FUSE session (node ids and open files, as paths) "
                 "is larger than the %u bytes a snapshot keeps per share: have the guest close "
                 "files or drop its caches (echo 2 > /proc/sys/vm/drop_caches) and try again",
                 SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES);
        return -1;
    }
    if (need > *cap) {
        size_t grown = *cap ? *cap * 2 : 4096;
        while (grown < need)
            grown *= 2;
        uint8_t *b = realloc(*buf, grown);
        if (!b) {
            snprintf(err, err_len, "out of memory");
            return -1;
        }
        *buf = b;
        *cap = grown;
    }
    memcpy(*buf + *len, e, sizeof(*e));
    memcpy(*buf + *len + sizeof(*e), path, e->path_len);
    *len = need;
    return 0;
}

/* Saves one table slot: its fd's path, or path_len 0 when the slot or its file is gone.
 * A handle's kind is fixed (e->kind, what it was opened as); a node's comes from its file. */
static int save_slot(uint8_t **buf, size_t *len, size_t *cap, const char *root_path,
                     sm_fs_saved_entry *e, int fd, char *err, size_t err_len)
{
    char rel[SM_FS_MAX_SAVED_PATH_BYTES + 1];
    uint32_t kind = SM_FS_KIND_GONE;
    e->path_len = 0;
    if (fd >= 0) {
        int rc = relative_path(fd, root_path, rel, &e->path_len, &kind, err, err_len);
        if (rc < 0)
            return -1;
        if (rc > 0)
            e->path_len = 0;
    }
    if (e->table == SM_FS_SAVED_NODE)
        e->kind = e->path_len ? kind : SM_FS_KIND_GONE;
    return append_entry(buf, len, cap, e, rel, err, err_len);
}

static int fs_save_extra(void *dev, uint8_t **out, size_t *out_len, char *err, size_t err_len)
{
    sm_fs *f = dev;
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    char root_path[SM_FS_MAX_SAVED_PATH_BYTES + 1];
    *out = NULL;
    *out_len = 0;
    if (fd_host_path(f->nodes[0].fd, root_path, sizeof(root_path)) < 0) {
        snprintf(err, err_len, "the share's host path cannot be read (%s)",
                 errno ? strerror(errno) : "too long");
        return -1;
    }
    for (uint32_t i = 1; i < SM_FS_MAX_NODES; i++) {
        sm_fs_node *n = &f->nodes[i];
        if (n->fd < 0 && !n->gone)
            continue;
        sm_fs_saved_entry e = {.table = SM_FS_SAVED_NODE, .index = i, .nlookup = n->nlookup};
        if (save_slot(&buf, &len, &cap, root_path, &e, n->fd, err, err_len) < 0)
            goto fail;
    }
    for (uint32_t i = 0; i < SM_FS_MAX_HANDLES; i++) {
        sm_fs_handle *h = &f->handles[i];
        if (h->fd < 0 && !h->gone)
            continue;
        sm_fs_saved_entry e = {.table = SM_FS_SAVED_HANDLE, .index = i,
                               .kind = h->is_dir ? SM_FS_KIND_DIR : SM_FS_KIND_FILE};
        if (h->fd >= 0 && !h->is_dir) {
            int fl = fcntl(h->fd, F_GETFL);
            e.flags = fl < 0 ? 0 : (uint32_t)(fl & (O_ACCMODE | O_APPEND));
        }
        if (save_slot(&buf, &len, &cap, root_path, &e, h->fd, err, err_len) < 0)
            goto fail;
    }
    *out = buf;
    *out_len = len;
    return 0;
fail:
    free(buf);
    return -1;
}

static int fs_restore(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len)
{
    sm_fs *f = dev;
    sm_fs_state s;
    if (len != sizeof(s)) {
        snprintf(err, err_len, "fs state is %zu bytes, this core's is %zu", len, sizeof(s));
        return -1;
    }
    memcpy(&s, buf, sizeof(s));
    if (!memchr(s.tag, 0, sizeof(s.tag)) || s.initialized > 1 || s.read_only > 1 ||
        (s.initialized && (s.minor < SM_FUSE_MIN_MINOR_VERSION || s.minor > SM_FUSE_KERNEL_MINOR_VERSION))) {
        snprintf(err, err_len, "the snapshot's fs state is malformed (tag, flags or FUSE minor %u)",
                 s.minor);
        return -1;
    }
    if (s.read_only != (uint32_t)(f->read_only != 0)) {
        snprintf(err, err_len, "the share is %s, the snapshot's was %s",
                 f->read_only ? "read-only" : "read-write", s.read_only ? "read-only" : "read-write");
        return -1;
    }
    if (strcmp(s.tag, f->tag) != 0) {
        snprintf(err, err_len, "the share's tag is %s, the snapshot's was %s", f->tag, s.tag);
        return -1;
    }
    close_all(f, 1);
    f->initialized = (int)s.initialized;
    f->minor = s.minor;
    return 0;
}

/* A saved path is one or more single entries joined by '/': no leading, trailing or double
 * '/', no '.' or '..', no NUL, each at most SM_FS_MAX_NAME_BYTES: the names a live LOOKUP
 * takes, one after another. */
static int saved_path_is_clean(const char *path, uint32_t len)
{
    if (len == 0 || len > SM_FS_MAX_SAVED_PATH_BYTES || memchr(path, 0, len))
        return 0;
    uint32_t start = 0;
    for (uint32_t i = 0; i <= len; i++) {
        if (i < len && path[i] != '/')
            continue;
        uint32_t n = i - start;
        if (n == 0 || n > SM_FS_MAX_NAME_BYTES || (n == 1 && path[start] == '.') ||
            (n == 2 && path[start] == '.' && path[start + 1] == '.'))
            return 0;
        start = i + 1;
    }
    return 1;
}

/* Opens a clean saved path beneath the share as a live LOOKUP chain would: each entry by
 * openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS, O_PATH | O_NOFOLLOW) from the one before,
 * so a symlink on the way is never followed (the next step fails ENOTDIR). Returns the O_PATH
 * fd of the last entry with *st, or -1 when something on the way is not there. */
static int open_saved_path(sm_fs *f, const char *path, uint32_t len, struct stat *st)
{
    char name[SM_FS_MAX_NAME_BYTES + 1];
    int dir = f->nodes[0].fd, fd = -1;
    uint32_t start = 0;
    for (uint32_t i = 0; i <= len; i++) {
        if (i < len && path[i] != '/')
            continue;
        memcpy(name, path + start, i - start);
        name[i - start] = 0;
        fd = fs_openat2(dir, name, FS_LOOKUP_FLAGS, 0);
        if (dir != f->nodes[0].fd)
            close(dir);
        if (fd < 0)
            return -1;
        dir = fd;
        start = i + 1;
    }
    if (fstat(fd, st) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A node: its path's O_PATH fd, or gone (ESTALE) when its file is not there or is another
 * kind of file now. */
static void restore_node(sm_fs *f, const sm_fs_saved_entry *e, const char *path)
{
    sm_fs_node *n = &f->nodes[e->index];
    struct stat st;
    int fd = e->path_len ? open_saved_path(f, path, e->path_len, &st) : -1;
    if (fd >= 0 && kind_of(st.st_mode) != e->kind) {
        close(fd);
        fd = -1;
    }
    n->nlookup = e->nlookup;
    if (fd < 0) {
        n->gone = 1;
        f->counters.gone_at_restore++;
        return;
    }
    n->fd = fd;
    n->dev = st.st_dev;
    n->ino = st.st_ino;
}

/* A handle: its file reopened as OPEN/OPENDIR opened it (never truncating), with the same
 * checks; gone (ESTALE) when the file is not there, is another kind of file now, or has
 * become set-user-ID/set-group-ID under a write handle. */
static void restore_handle(sm_fs *f, const sm_fs_saved_entry *e, const char *path)
{
    sm_fs_handle *h = &f->handles[e->index];
    int is_dir = e->kind == SM_FS_KIND_DIR;
    struct stat st;
    int fd = -1;
    int path_fd = e->path_len ? open_saved_path(f, path, e->path_len, &st) : -1;
    if (path_fd >= 0) {
        int ok = is_dir ? S_ISDIR(st.st_mode)
                        : S_ISREG(st.st_mode) &&
                              !((st.st_mode & FS_PRIVILEGE_BITS) && wants_write(e->flags));
        if (ok)
            fd = reopen_fd(path_fd, is_dir ? O_RDONLY | O_DIRECTORY : (int)e->flags);
        close(path_fd);
    }
    h->is_dir = is_dir;
    if (fd < 0) {
        h->gone = 1;
        f->counters.gone_at_restore++;
        return;
    }
    h->fd = fd;
}

/* Checks one saved entry against the table it names; NULL, or what is wrong. */
static const char *saved_entry_problem(const sm_fs *f, const sm_fs_saved_entry *e, const char *path)
{
    if (e->table == SM_FS_SAVED_NODE) {
        if (e->index < 1 || e->index >= SM_FS_MAX_NODES)
            return "a node id outside the node table";
        if (f->nodes[e->index].fd >= 0 || f->nodes[e->index].gone)
            return "a node id saved twice";
        if (e->nlookup == 0 || e->flags || e->kind > SM_FS_KIND_OTHER ||
            (e->kind == SM_FS_KIND_GONE) != (e->path_len == 0))
            return "a node with a bad lookup count, kind or flags";
    } else if (e->table == SM_FS_SAVED_HANDLE) {
        if (e->index >= SM_FS_MAX_HANDLES)
            return "a file handle outside the handle table";
        if (f->handles[e->index].fd >= 0 || f->handles[e->index].gone)
            return "a file handle saved twice";
        if (e->nlookup || (e->kind != SM_FS_KIND_FILE && e->kind != SM_FS_KIND_DIR) ||
            (e->flags & ~(uint32_t)(O_ACCMODE | O_APPEND)) || (e->flags & O_ACCMODE) == O_ACCMODE ||
            (e->kind == SM_FS_KIND_DIR && e->flags))
            return "a file handle with a bad kind or open flags";
        if (f->read_only && wants_write(e->flags))
            return "a file handle open for writing on a read-only share";
    } else {
        return "an entry of no known table";
    }
    if (e->pad)
        return "an entry with nonzero padding";
    if (e->path_len && !saved_path_is_clean(path, e->path_len))
        return "a path that is not relative single entries (a '..', '.', empty or oversized entry, "
               "a leading '/', or a NUL)";
    return NULL;
}

static int fs_restore_extra(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len)
{
    sm_fs *f = dev;
    if (len && !f->initialized) {
        snprintf(err, err_len, "the snapshot's FUSE session has node ids before FUSE_INIT");
        return -1;
    }
    size_t at = 0;
    uint32_t n = 0;
    char path[SM_FS_MAX_SAVED_PATH_BYTES + 1];
    while (at < len) {
        sm_fs_saved_entry e;
        if (len - at < sizeof(e)) {
            snprintf(err, err_len, "the snapshot's FUSE session ends inside entry %u", n);
            return -1;
        }
        memcpy(&e, buf + at, sizeof(e));
        at += sizeof(e);
        if (e.path_len > SM_FS_MAX_SAVED_PATH_BYTES || e.path_len > len - at) {
            snprintf(err, err_len, "the snapshot's FUSE session entry %u has a path of %u bytes, "
                     "beyond the session or the %d-byte limit", n, e.path_len,
                     SM_FS_MAX_SAVED_PATH_BYTES);
            return -1;
        }
        memcpy(path, buf + at, e.path_len);
        path[e.path_len] = 0;
        at += e.path_len;
        const char *why = saved_entry_problem(f, &e, path);
        if (why) {
            snprintf(err, err_len, "the snapshot's FUSE session entry %u (%s %u) is refused: %s", n,
                     e.table == SM_FS_SAVED_NODE ? "node" : "handle", e.index + 1, why);
            return -1;
        }
        if (e.table == SM_FS_SAVED_NODE)
            restore_node(f, &e, path);
        else
            restore_handle(f, &e, path);
        n++;
    }
    return 0;
}

const sm_virtio_ops SM_FS_OPS = {
    .device_id = SM_VIRTIO_ID_FS,
    .num_queues = SM_FS_NUM_QUEUES,
    .device_features = fs_features,
    .config_read = fs_config_read,
    .config_write = NULL,
    .activate = fs_activate,
    .queue_notify = fs_notify,
    .reset = fs_reset,
    .counters = fs_counters,
    .destroy = fs_destroy,
    .save = fs_save,
    .restore = fs_restore,
    .save_extra = fs_save_extra,
    .restore_extra = fs_restore_extra,
};
