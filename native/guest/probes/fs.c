/* fs probe: drives virtio-fs like Linux's virtio_fs + fuse — hiprio queue 0, request queue 1,
 * requests as [in header + args (readable)] [out header (writable)] [out args (writable)],
 * FORGET on hiprio without a reply. Sends FUSE_INIT, LOOKUP/GETATTR/OPEN/READ of hello.txt
 * (content checked), OPENDIR/READDIR, CREATE+WRITE of out.txt (ro=1: expects EROFS), names
 * Linux never sends ('..', '.', 'a/b', oversized, no NUL: refused), symlinks leaving the share
 * (they are links, never followed: LOOKUP through them fails), an unknown opcode (ENOSYS) and
 * a garbage header (EINVAL); prints the results and PROBE fs OK. Read-write shares also get
 * the privilege checks: CREATE with mode 04755 / 02755 (the host file must come out without
 * the bits), CREATE/MKNOD of a device (EPERM), a write-open / truncating CREATE / truncate of
 * the host's set-user-ID file setuid_host (EPERM), chmod 04755 (bits stripped), chown (EPERM),
 * and the namespace ops (mkdir, rename, symlink, link, unlink, rmdir, statfs, fsync,
 * fallocate, lseek) with their edge cases. Read-only shares answer every modifying op EROFS.
 * With snap=1 it instead holds a FUSE session (node ids of hello.txt, sub, sub/deep.txt,
 * gone.txt, inside_link; handles on hello.txt, sub/deep.txt (append), gone.txt and the
 * directory sub), stops at a snapshot point, then uses every one of them again and reports
 * each answer ("after <what> -> <rc>"): the host restores it and checks the answers. With
 * snap=1 many=<n> it holds n node ids of long paths instead (a session too large to keep). */
#include "probe.h"

#define VIRTIO_ID_FS 26
#define CONFIG_TAG 0x100
#define CONFIG_TAG_BYTES 36
#define CONFIG_NUM_REQUEST_QUEUES (CONFIG_TAG + CONFIG_TAG_BYTES)
#define HIPRIO_QUEUE 0
#define REQUEST_QUEUE 1
#define QUEUE_SIZE 16

#define FUSE_LOOKUP 1
#define FUSE_FORGET 2
#define FUSE_GETATTR 3
#define FUSE_SETATTR 4
#define FUSE_READLINK 5
#define FUSE_SYMLINK 6
#define FUSE_MKNOD 8
#define FUSE_MKDIR 9
#define FUSE_UNLINK 10
#define FUSE_RMDIR 11
#define FUSE_RENAME 12
#define FUSE_LINK 13
#define FUSE_STATFS 17
#define FUSE_FSYNC 20
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_RELEASE 18
#define FUSE_FLUSH 25
#define FUSE_INIT 26
#define FUSE_OPENDIR 27
#define FUSE_READDIR 28
#define FUSE_RELEASEDIR 29
#define FUSE_CREATE 35
#define FUSE_FSYNCDIR 30
#define FUSE_DESTROY 38
#define FUSE_BATCH_FORGET 42
#define FUSE_FALLOCATE 43
#define FUSE_RENAME2 45
#define FUSE_LSEEK 46
#define FUSE_UNKNOWN_OPCODE 4242
#define FUSE_ROOT_ID 1

#define L_O_RDONLY 0
#define L_O_WRONLY 1
#define L_O_APPEND 02000
#define L_O_CREAT 0100
#define L_O_TRUNC 01000
#define E_PERM 1
#define E_NOENT 2
#define E_BADF 9
#define E_EXIST 17
#define E_XDEV 18
#define E_NOTDIR 20
#define E_INVAL 22
#define E_ROFS 30
#define E_NAMETOOLONG 36
#define E_LOOP 40
#define E_NOSYS 38
#define E_STALE 116
#define E_OPNOTSUPP 95
#define L_S_IFMT 0170000
#define L_S_IFLNK 0120000
#define L_S_IFDIR 0040000
#define L_S_IFIFO 0010000
#define L_SEEK_SET 0
#define L_SEEK_DATA 3
#define L_SEEK_HOLE 4
#define L_RENAME_NOREPLACE 1
#define L_RENAME_EXCHANGE 2
#define FATTR_MODE (1u << 0)
#define FATTR_UID (1u << 1)
#define FATTR_SIZE (1u << 3)
#define FATTR_MTIME (1u << 5)
#define FATTR_FH (1u << 6)
#define MTIME_2001 978307200ull
#define SPARSE_HOLE_BYTES (1024 * 1024)

#define HELLO_TEXT "hello from the host side\n"
#define OUT_TEXT "written by the fs probe\n"

struct fuse_in_header { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid; uint16_t total_extlen, padding; };
struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; };
struct fuse_attr {
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct fuse_entry_out { uint64_t nodeid, generation, entry_valid, attr_valid; uint32_t entry_valid_nsec, attr_valid_nsec; struct fuse_attr attr; };
struct fuse_attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec, dummy; struct fuse_attr attr; };
struct fuse_open_in { uint32_t flags, open_flags; };
struct fuse_open_out { uint64_t fh; uint32_t open_flags, padding; };
struct fuse_create_in { uint32_t flags, mode, umask, open_flags; };
struct fuse_rw_in { uint64_t fh, offset; uint32_t size, rw_flags; uint64_t lock_owner; uint32_t flags, padding; };
struct fuse_release_in { uint64_t fh; uint32_t flags, release_flags; uint64_t lock_owner; };
struct fuse_init_in { uint32_t major, minor, max_readahead, flags, flags2, unused[11]; };
struct fuse_init_out { uint32_t major, minor, max_readahead, flags; uint16_t max_background, congestion_threshold; uint32_t max_write, time_gran; uint16_t max_pages, map_alignment; uint32_t flags2, unused[7]; };
struct fuse_dirent { uint64_t ino, off; uint32_t namelen, type; };
struct fuse_setattr_in {
    uint32_t valid, padding;
    uint64_t fh, size, lock_owner, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5;
};
struct fuse_mkdir_in { uint32_t mode, umask; };
struct fuse_rename2_in { uint64_t newdir; uint32_t flags, padding; };
struct fuse_kstatfs { uint64_t blocks, bfree, bavail, files, ffree; uint32_t bsize, namelen, frsize, padding, spare[6]; };
struct fuse_fsync_in { uint64_t fh; uint32_t fsync_flags, padding; };
struct fuse_fallocate_in { uint64_t fh, offset, length; uint32_t mode, padding; };
struct fuse_lseek_in { uint64_t fh, offset; uint32_t whence, padding; };

static struct virtq hiprio, req;
static uint8_t *in_buf, *out_payload;
static struct fuse_out_header *out_hdr;
static uint64_t next_unique = 1;
static uint32_t reply_payload_len;

/* Sends one request on the request queue; returns the FUSE error (0 or -errno), or 1 on a
 * transport failure. The reply payload lands in out_payload. */
static int fuse_call(uint32_t opcode, uint64_t nodeid, const void *arg, uint32_t arg_len,
                     const void *arg2, uint32_t arg2_len, uint32_t out_len, uint32_t header_len_override)
{
    struct fuse_in_header *h = (struct fuse_in_header *)in_buf;
    memset(h, 0, sizeof(*h));
    uint32_t total = sizeof(*h) + arg_len + arg2_len;
    h->len = header_len_override ? header_len_override : total;
    h->opcode = opcode;
    h->unique = next_unique++;
    h->nodeid = nodeid;
    if (arg_len)
        memcpy(in_buf + sizeof(*h), arg, arg_len);
    if (arg2_len)
        memcpy(in_buf + sizeof(*h) + arg_len, arg2, arg2_len);
    memset(out_hdr, 0xff, sizeof(*out_hdr));
    req.desc[0].addr = (uint64_t)in_buf;
    req.desc[0].len = total;
    req.desc[0].flags = VRING_DESC_F_NEXT;
    req.desc[0].next = 1;
    req.desc[1].addr = (uint64_t)out_hdr;
    req.desc[1].len = sizeof(*out_hdr);
    req.desc[1].flags = VRING_DESC_F_WRITE | (out_len ? VRING_DESC_F_NEXT : 0);
    req.desc[1].next = 2;
    req.desc[2].addr = (uint64_t)out_payload;
    req.desc[2].len = out_len;
    req.desc[2].flags = VRING_DESC_F_WRITE;
    req.desc[2].next = 0;
    virtq_publish(&req, 0);
    uint32_t used_len = 0;
    if (virtq_wait_used(&req, 0, &used_len))
        return 1;
    if (out_hdr->unique != h->unique && !header_len_override)
        return 1;
    if (out_hdr->len < sizeof(*out_hdr) || used_len != out_hdr->len)
        return 1;
    reply_payload_len = out_hdr->len - (uint32_t)sizeof(*out_hdr);
    return out_hdr->error;
}

static void forget(uint64_t nodeid, uint64_t nlookup)
{
    static struct { struct fuse_in_header h; uint64_t nlookup; } f;
    memset(&f, 0, sizeof(f));
    f.h.len = sizeof(f);
    f.h.opcode = FUSE_FORGET;
    f.h.unique = next_unique++;
    f.h.nodeid = nodeid;
    f.nlookup = nlookup;
    hiprio.desc[0].addr = (uint64_t)&f;
    hiprio.desc[0].len = sizeof(f);
    hiprio.desc[0].flags = 0;
    hiprio.desc[0].next = 0;
    virtq_publish(&hiprio, 0);
    virtq_wait_used(&hiprio, 0, 0);
}

/* BATCH_FORGET on hiprio: count entries (nodeid, nlookup) of which `given` are in the frame. */
static void batch_forget(uint32_t count, uint32_t given, const uint64_t *pairs)
{
    static struct { struct fuse_in_header h; uint32_t count, dummy; uint64_t pairs[8]; } f;
    memset(&f, 0, sizeof(f));
    f.h.len = (uint32_t)(sizeof(f.h) + 8 + given * 16);
    f.h.opcode = FUSE_BATCH_FORGET;
    f.h.unique = next_unique++;
    f.count = count;
    memcpy(f.pairs, pairs, given * 16);
    hiprio.desc[0].addr = (uint64_t)&f;
    hiprio.desc[0].len = f.h.len;
    hiprio.desc[0].flags = 0;
    hiprio.desc[0].next = 0;
    virtq_publish(&hiprio, 0);
    virtq_wait_used(&hiprio, 0, 0);
}

static void report(const char *what, int rc);

static void put_oct(uint32_t v)
{
    char digits[12];
    int n = 0;
    do {
        digits[n++] = (char)('0' + (v & 7));
        v >>= 3;
    } while (v);
    put_char('0');
    while (n)
        put_char(digits[--n]);
}

/* CREATE name with mode (umask 0); returns the FUSE error, *mode_out the mode the reply says. */
static int create_file(const char *name, uint32_t flags, uint32_t mode, uint32_t *mode_out,
                       uint64_t *node_out, uint64_t *fh_out)
{
    struct fuse_create_in ci = {.flags = flags, .mode = mode, .umask = 0, .open_flags = 0};
    int rc = fuse_call(FUSE_CREATE, FUSE_ROOT_ID, &ci, sizeof(ci), name, (uint32_t)strlen(name) + 1,
                       sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out), 0);
    if (rc == 0) {
        struct fuse_entry_out *e = (struct fuse_entry_out *)out_payload;
        *mode_out = e->attr.mode;
        *node_out = e->nodeid;
        *fh_out = ((struct fuse_open_out *)(out_payload + sizeof(*e)))->fh;
    }
    return rc;
}

static void report(const char *what, int rc)
{
    put_str(what);
    put_str(" -> ");
    if (rc < 0) {
        put_char('-');
        put_dec((uint64_t)(-rc));
    } else {
        put_dec((uint64_t)rc);
    }
    put_char('\n');
}

static int fail(const char *why)
{
    put_str("PROBE fs FAIL ");
    put_line(why);
    return 1;
}

static int lookup(uint64_t parent, const char *name, struct fuse_entry_out *e)
{
    int rc = fuse_call(FUSE_LOOKUP, parent, name, (uint32_t)strlen(name) + 1, 0, 0, sizeof(*e), 0);
    if (rc == 0)
        memcpy(e, out_payload, sizeof(*e));
    return rc;
}

static int open_node(uint32_t opcode, uint64_t nodeid, uint32_t flags, uint64_t *fh)
{
    struct fuse_open_in in = {.flags = flags, .open_flags = 0};
    int rc = fuse_call(opcode, nodeid, &in, sizeof(in), 0, 0, sizeof(struct fuse_open_out), 0);
    if (rc == 0)
        *fh = ((struct fuse_open_out *)out_payload)->fh;
    return rc;
}

static int release(uint32_t opcode, uint64_t nodeid, uint64_t fh)
{
    struct fuse_release_in in;
    memset(&in, 0, sizeof(in));
    in.fh = fh;
    return fuse_call(opcode, nodeid, &in, sizeof(in), 0, 0, 0, 0);
}

/* Sends opcode with [fixed struct][name1 NUL][name2 NUL] (either name may be absent). */
static int call_names(uint32_t opcode, uint64_t nodeid, const void *fixed, uint32_t fixed_len,
                      const char *name1, const char *name2, uint32_t out_len)
{
    static char args[6144];
    uint32_t n = 0;
    if (fixed_len)
        memcpy(args, fixed, fixed_len);
    n = fixed_len;
    if (name1) {
        memcpy(args + n, name1, strlen(name1) + 1);
        n += (uint32_t)strlen(name1) + 1;
    }
    if (name2) {
        memcpy(args + n, name2, strlen(name2) + 1);
        n += (uint32_t)strlen(name2) + 1;
    }
    return fuse_call(opcode, nodeid, args, n, 0, 0, out_len, 0);
}

static int expect(const char *what, int rc, int want)
{
    report(what, rc);
    if (rc == want)
        return 1;
    put_str("PROBE fs FAIL ");
    put_str(what);
    put_str(": expected ");
    put_dec((uint64_t)(want < 0 ? -want : want));
    put_char('\n');
    return 0;
}

static int readlink_node(uint64_t node, char *out, uint32_t room)
{
    int rc = fuse_call(FUSE_READLINK, node, 0, 0, 0, 0, 4096, 0);
    if (rc == 0) {
        uint32_t n = reply_payload_len < room - 1 ? reply_payload_len : room - 1;
        memcpy(out, out_payload, n);
        out[n] = 0;
    }
    return rc;
}

/* Names Linux never sends, and symlinks that point out of the share: both kinds of share. */
static int check_names_and_links(uint64_t hello)
{
    struct fuse_entry_out e;
    static const char *const bad[] = {"..", ".", "../secret", "a/b", "/etc"};
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        put_str("bad name ");
        put_str(bad[i]);
        if (!expect("", lookup(FUSE_ROOT_ID, bad[i], &e), -E_INVAL))
            return 0;
    }
    static char longname[300];
    memset(longname, 'a', sizeof(longname) - 1);
    if (!expect("oversized name", lookup(FUSE_ROOT_ID, longname, &e), -E_NAMETOOLONG))
        return 0;
    if (!expect("name without NUL", fuse_call(FUSE_LOOKUP, FUSE_ROOT_ID, "abc", 3, 0, 0, sizeof(e), 0),
                -E_INVAL))
        return 0;
    static const char *const outward[] = {"escape_abs", "escape_rel"};
    for (unsigned i = 0; i < 2; i++) {
        if (lookup(FUSE_ROOT_ID, outward[i], &e) || (e.attr.mode & L_S_IFMT) != L_S_IFLNK)
            return !fail("a symlink leaving the share is not reported as a symlink");
        uint64_t link = e.nodeid;
        char text[256];
        if (readlink_node(link, text, sizeof(text)))
            return !fail("readlink of a symlink leaving the share");
        put_str("readlink ");
        put_str(outward[i]);
        put_str(" = ");
        put_line(text);
        uint64_t fh;
        put_str(outward[i]);
        if (!expect(" open", open_node(FUSE_OPEN, link, L_O_RDONLY, &fh), -E_LOOP))
            return 0;
        put_str(outward[i]);
        if (!expect(" lookup through", lookup(link, "secret", &e), -E_NOTDIR))
            return 0;
        forget(link, 1);
    }
    if (lookup(FUSE_ROOT_ID, "inside_link", &e) || (e.attr.mode & L_S_IFMT) != L_S_IFLNK ||
        e.nodeid == hello)
        return !fail("a symlink inside the share is not reported as a symlink");
    char text[64];
    if (readlink_node(e.nodeid, text, sizeof(text)) || strlen(text) != 9 || memcmp(text, "hello.txt", 9))
        return !fail("readlink inside_link is not hello.txt");
    put_line("inside_link is a symlink to hello.txt");
    if (!expect("readlink of a file", readlink_node(hello, text, sizeof(text)), -E_INVAL))
        return 0;
    /* A BATCH_FORGET that claims more entries than it carries is dropped whole; a right one
     * frees the node (a later request naming it gets ENOENT). */
    uint64_t pairs[2] = {e.nodeid, 1};
    batch_forget(5, 1, pairs);
    if (!expect("getattr after a short batch forget",
                fuse_call(FUSE_GETATTR, e.nodeid, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16, 0, 0,
                          sizeof(struct fuse_attr_out), 0), 0))
        return 0;
    batch_forget(1, 1, pairs);
    if (!expect("getattr after batch forget",
                fuse_call(FUSE_GETATTR, e.nodeid, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16, 0, 0,
                          sizeof(struct fuse_attr_out), 0), -E_NOENT))
        return 0;
    return 1;
}

static int setattr(uint64_t node, const struct fuse_setattr_in *in, uint32_t *mode_out)
{
    int rc = fuse_call(FUSE_SETATTR, node, in, sizeof(*in), 0, 0, sizeof(struct fuse_attr_out), 0);
    if (rc == 0 && mode_out)
        *mode_out = ((struct fuse_attr_out *)out_payload)->attr.mode;
    return rc;
}

/* The namespace and attribute ops on a read-write share, with what Linux never sends. */
static int namespace_ops_rw(void)
{
    struct fuse_entry_out e;
    struct fuse_setattr_in sa;
    uint32_t mode = 0;
    if (lookup(FUSE_ROOT_ID, "out.txt", &e))
        return !fail("lookup out.txt");
    uint64_t out = e.nodeid;
    uint32_t owner = e.attr.uid;
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_MODE;
    sa.mode = 0104755;
    if (!expect("chmod 04755 out.txt", setattr(out, &sa, &mode), 0))
        return 0;
    put_str("chmod result mode ");
    put_oct(mode & 07777);
    put_char('\n');
    if (mode & 06000)
        return !fail("SETATTR kept a set-user-ID bit");
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_SIZE;
    sa.size = 7;
    if (!expect("truncate out.txt 7", setattr(out, &sa, 0), 0))
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_MTIME;
    sa.mtimensec = 1000000000u;
    if (!expect("utimes nsec 1e9", setattr(out, &sa, 0), -E_INVAL))
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_UID;
    sa.uid = owner + 1;
    if (!expect("chown to another uid", setattr(out, &sa, 0), -E_PERM))
        return 0;
    sa.uid = owner;
    if (!expect("chown to the same uid", setattr(out, &sa, 0), 0))
        return 0;
    if (!expect("setattr short", fuse_call(FUSE_SETATTR, out, 0, 0, 0, 0, sizeof(struct fuse_attr_out), 0),
                -E_INVAL))
        return 0;
    if (lookup(FUSE_ROOT_ID, "setuid_host", &e))
        return !fail("lookup setuid_host");
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_SIZE;
    if (!expect("truncate setuid_host", setattr(e.nodeid, &sa, 0), -E_PERM))
        return 0;
    forget(e.nodeid, 1);

    /* fallocate, fsync, lseek on handles; then handles that were never given out. */
    uint64_t fh;
    if (open_node(FUSE_OPEN, out, L_O_WRONLY, &fh))
        return !fail("open out.txt for write");
    struct fuse_fallocate_in fa = {.fh = fh, .offset = 0, .length = 8192, .mode = 0, .padding = 0};
    if (!expect("fallocate out.txt 8192", fuse_call(FUSE_FALLOCATE, out, &fa, sizeof(fa), 0, 0, 0, 0), 0))
        return 0;
    fa.mode = 0x08; /* FALLOC_FL_COLLAPSE_RANGE: Linux's FUSE never sends it */
    if (!expect("fallocate collapse", fuse_call(FUSE_FALLOCATE, out, &fa, sizeof(fa), 0, 0, 0, 0), -E_OPNOTSUPP))
        return 0;
    fa.mode = 0;
    fa.offset = 0x7fffffffffffffffull;
    if (!expect("fallocate past 2^63", fuse_call(FUSE_FALLOCATE, out, &fa, sizeof(fa), 0, 0, 0, 0), -E_INVAL))
        return 0;
    struct fuse_fsync_in fs = {.fh = fh, .fsync_flags = 0, .padding = 0};
    if (!expect("fsync out.txt", fuse_call(FUSE_FSYNC, out, &fs, sizeof(fs), 0, 0, 0, 0), 0))
        return 0;
    fs.fsync_flags = 1;
    if (!expect("fdatasync out.txt", fuse_call(FUSE_FSYNC, out, &fs, sizeof(fs), 0, 0, 0, 0), 0))
        return 0;
    fs.fh = 999;
    if (!expect("fsync unknown handle", fuse_call(FUSE_FSYNC, out, &fs, sizeof(fs), 0, 0, 0, 0), -E_BADF))
        return 0;
    release(FUSE_RELEASE, out, fh);
    /* After fallocate (which moves mtime): the time the guest sets is the one that stays. */
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_MTIME;
    sa.mtime = MTIME_2001;
    if (!expect("utimes out.txt 2001", setattr(out, &sa, 0), 0))
        return 0;
    if (lookup(FUSE_ROOT_ID, "sparse.bin", &e))
        return !fail("lookup sparse.bin");
    if (open_node(FUSE_OPEN, e.nodeid, L_O_RDONLY, &fh))
        return !fail("open sparse.bin");
    struct fuse_lseek_in ls = {.fh = fh, .offset = 0, .whence = L_SEEK_DATA, .padding = 0};
    if (!expect("lseek SEEK_DATA", fuse_call(FUSE_LSEEK, e.nodeid, &ls, sizeof(ls), 0, 0, 8, 0), 0))
        return 0;
    put_str("sparse.bin data at ");
    put_dec(*(uint64_t *)out_payload);
    put_char('\n');
    ls.whence = L_SEEK_HOLE;
    if (!expect("lseek SEEK_HOLE", fuse_call(FUSE_LSEEK, e.nodeid, &ls, sizeof(ls), 0, 0, 8, 0), 0))
        return 0;
    put_str("sparse.bin hole at ");
    put_dec(*(uint64_t *)out_payload);
    put_char('\n');
    ls.whence = L_SEEK_SET;
    if (!expect("lseek SEEK_SET", fuse_call(FUSE_LSEEK, e.nodeid, &ls, sizeof(ls), 0, 0, 8, 0), -E_INVAL))
        return 0;
    release(FUSE_RELEASE, e.nodeid, fh);
    forget(e.nodeid, 1);
    uint64_t dfh;
    if (open_node(FUSE_OPENDIR, FUSE_ROOT_ID, 0, &dfh))
        return !fail("opendir for fsyncdir");
    fs.fh = dfh;
    fs.fsync_flags = 0;
    if (!expect("fsyncdir /", fuse_call(FUSE_FSYNCDIR, FUSE_ROOT_ID, &fs, sizeof(fs), 0, 0, 0, 0), 0))
        return 0;
    release(FUSE_RELEASEDIR, FUSE_ROOT_ID, dfh);
    if (!expect("statfs", fuse_call(FUSE_STATFS, FUSE_ROOT_ID, 0, 0, 0, 0, sizeof(struct fuse_kstatfs), 0), 0))
        return 0;
    struct fuse_kstatfs *st = (struct fuse_kstatfs *)out_payload;
    put_str("statfs bsize ");
    put_dec(st->bsize);
    put_str(" namelen ");
    put_dec(st->namelen);
    put_str(" blocks ");
    put_dec(st->blocks);
    put_char('\n');

    /* mkdir, mknod, symlink, link, rename, unlink, rmdir. */
    struct fuse_mkdir_in mk = {.mode = 042777, .umask = 022};
    if (!expect("mkdir sub", call_names(FUSE_MKDIR, FUSE_ROOT_ID, &mk, sizeof(mk), "sub", 0, sizeof(e)), 0))
        return 0;
    struct fuse_entry_out *made = (struct fuse_entry_out *)out_payload;
    uint64_t sub = made->nodeid;
    put_str("mkdir sub mode ");
    put_oct(made->attr.mode & 07777);
    put_char('\n');
    if ((made->attr.mode & L_S_IFMT) != L_S_IFDIR || (made->attr.mode & 06000))
        return !fail("mkdir made no directory, or kept a set-group-ID bit");
    if (!expect("mkdir ../up", call_names(FUSE_MKDIR, FUSE_ROOT_ID, &mk, sizeof(mk), "../up", 0, sizeof(e)), -E_INVAL))
        return 0;
    if (!expect("mkdir sub again", call_names(FUSE_MKDIR, FUSE_ROOT_ID, &mk, sizeof(mk), "sub", 0, sizeof(e)), -E_EXIST))
        return 0;
    struct { uint32_t mode, rdev, umask, padding; } mn = {L_S_IFIFO | 0644, 0, 0, 0};
    if (!expect("mknod fifo", call_names(FUSE_MKNOD, sub, &mn, sizeof(mn), "fifo", 0, sizeof(e)), 0))
        return 0;
    forget(((struct fuse_entry_out *)out_payload)->nodeid, 1);
    if (!expect("symlink out_link -> /etc", call_names(FUSE_SYMLINK, FUSE_ROOT_ID, 0, 0, "out_link", "/etc", sizeof(e)), 0))
        return 0;
    made = (struct fuse_entry_out *)out_payload;
    uint64_t out_link = made->nodeid;
    if ((made->attr.mode & L_S_IFMT) != L_S_IFLNK)
        return !fail("SYMLINK reply is not a symlink");
    if (!expect("lookup through new symlink", lookup(out_link, "passwd", &e), -E_NOTDIR))
        return 0;
    static char long_target[4200];
    memset(long_target, 'x', sizeof(long_target) - 1);
    if (!expect("symlink oversized target", call_names(FUSE_SYMLINK, FUSE_ROOT_ID, 0, 0, "long", long_target, sizeof(e)),
                -E_NAMETOOLONG))
        return 0;
    if (!expect("symlink name a/b", call_names(FUSE_SYMLINK, FUSE_ROOT_ID, 0, 0, "a/b", "x", sizeof(e)), -E_INVAL))
        return 0;
    uint64_t old = out;
    if (!expect("link out.txt sub/hard", call_names(FUSE_LINK, sub, &old, 8, "hard", 0, sizeof(e)), 0))
        return 0;
    if (((struct fuse_entry_out *)out_payload)->nodeid != out || ((struct fuse_entry_out *)out_payload)->attr.nlink != 2)
        return !fail("LINK did not answer the same node with nlink 2");
    if (!expect("link name ..", call_names(FUSE_LINK, sub, &old, 8, "..", 0, sizeof(e)), -E_INVAL))
        return 0;
    old = 4000;
    if (!expect("link unknown node", call_names(FUSE_LINK, sub, &old, 8, "h2", 0, sizeof(e)), -E_NOENT))
        return 0;
    struct fuse_rename2_in rn = {.newdir = sub, .flags = 0, .padding = 0};
    if (!expect("rename out.txt sub/moved", call_names(FUSE_RENAME, FUSE_ROOT_ID, &rn, 8, "out.txt", "moved", 0), 0))
        return 0;
    rn.newdir = FUSE_ROOT_ID;
    if (!expect("rename to ../moved", call_names(FUSE_RENAME, sub, &rn, 8, "moved", "../moved", 0), -E_INVAL))
        return 0;
    rn.newdir = out_link; /* a symlink to /etc: never a way out */
    if (!expect("rename into a symlink to /etc", call_names(FUSE_RENAME, sub, &rn, 8, "moved", "passwd", 0), -E_NOTDIR))
        return 0;
    rn.newdir = 4000;
    if (!expect("rename to unknown node", call_names(FUSE_RENAME, sub, &rn, 8, "moved", "x", 0), -E_NOENT))
        return 0;
    rn.newdir = sub;
    rn.flags = L_RENAME_NOREPLACE;
    if (!expect("rename2 noreplace onto hard", call_names(FUSE_RENAME2, sub, &rn, sizeof(rn), "moved", "hard", 0), -E_EXIST))
        return 0;
    rn.flags = L_RENAME_EXCHANGE;
    if (!expect("rename2 exchange", call_names(FUSE_RENAME2, sub, &rn, sizeof(rn), "moved", "hard", 0), -E_INVAL))
        return 0;
    rn.flags = L_RENAME_NOREPLACE;
    if (!expect("rename2 noreplace to new", call_names(FUSE_RENAME2, sub, &rn, sizeof(rn), "moved", "renamed", 0), 0))
        return 0;
    if (!expect("unlink rmme", call_names(FUSE_UNLINK, FUSE_ROOT_ID, 0, 0, "rmme", 0, 0), 0))
        return 0;
    if (!expect("unlink ../secret", call_names(FUSE_UNLINK, FUSE_ROOT_ID, 0, 0, "../secret", 0, 0), -E_INVAL))
        return 0;
    if (!expect("rmdir emptydir", call_names(FUSE_RMDIR, FUSE_ROOT_ID, 0, 0, "emptydir", 0, 0), 0))
        return 0;
    if (!expect("rmdir ..", call_names(FUSE_RMDIR, sub, 0, 0, "..", 0, 0), -E_INVAL))
        return 0;
    forget(out, 2);
    forget(out_link, 1);
    forget(sub, 1);
    return 1;
}

/* Every modifying op on a read-only share: EROFS, whatever its arguments. */
static int refusals_ro(uint64_t hello)
{
    struct fuse_setattr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.valid = FATTR_SIZE;
    struct fuse_mkdir_in mk = {.mode = 0755, .umask = 0};
    struct fuse_rename2_in rn = {.newdir = FUSE_ROOT_ID, .flags = 0, .padding = 0};
    struct fuse_fallocate_in fa = {.fh = 1, .offset = 0, .length = 4096, .mode = 0, .padding = 0};
    uint64_t old = hello;
    return expect("ro truncate", setattr(hello, &sa, 0), -E_ROFS) &&
           expect("ro mkdir", call_names(FUSE_MKDIR, FUSE_ROOT_ID, &mk, sizeof(mk), "d", 0, 128), -E_ROFS) &&
           expect("ro unlink", call_names(FUSE_UNLINK, FUSE_ROOT_ID, 0, 0, "hello.txt", 0, 0), -E_ROFS) &&
           expect("ro rmdir", call_names(FUSE_RMDIR, FUSE_ROOT_ID, 0, 0, "emptydir", 0, 0), -E_ROFS) &&
           expect("ro rename", call_names(FUSE_RENAME, FUSE_ROOT_ID, &rn, 8, "hello.txt", "x", 0), -E_ROFS) &&
           expect("ro symlink", call_names(FUSE_SYMLINK, FUSE_ROOT_ID, 0, 0, "l", "hello.txt", 128), -E_ROFS) &&
           expect("ro link", call_names(FUSE_LINK, FUSE_ROOT_ID, &old, 8, "h", 0, 128), -E_ROFS) &&
           expect("ro fallocate", fuse_call(FUSE_FALLOCATE, hello, &fa, sizeof(fa), 0, 0, 0, 0), -E_ROFS) &&
           expect("ro statfs", fuse_call(FUSE_STATFS, FUSE_ROOT_ID, 0, 0, 0, 0, sizeof(struct fuse_kstatfs), 0), 0);
}


static int getattr_size(uint64_t node, uint64_t *size)
{
    int rc = fuse_call(FUSE_GETATTR, node, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16, 0, 0,
                       sizeof(struct fuse_attr_out), 0);
    if (rc == 0 && size)
        *size = ((struct fuse_attr_out *)out_payload)->attr.size;
    return rc;
}

static int read_handle(uint32_t opcode, uint64_t node, uint64_t fh)
{
    struct fuse_rw_in rd;
    memset(&rd, 0, sizeof(rd));
    rd.fh = fh;
    rd.size = 4096;
    return fuse_call(opcode, node, &rd, sizeof(rd), 0, 0, 4096, 0);
}

static int listing_has(const char *want)
{
    uint32_t want_len = (uint32_t)strlen(want);
    for (uint32_t pos = 0; pos + sizeof(struct fuse_dirent) <= reply_payload_len;) {
        struct fuse_dirent *d = (struct fuse_dirent *)(out_payload + pos);
        if (d->namelen == want_len && memcmp(d + 1, want, want_len) == 0)
            return 1;
        pos += (uint32_t)((sizeof(*d) + d->namelen + 7) & ~7ul);
    }
    return 0;
}

static void after(const char *what, int rc)
{
    put_str("after ");
    report(what, rc);
}

/* snap=1 many=<n>: node ids of n files with long paths (DEEP_LEVELS directories of
 * DEEP_DIR_NAME_BYTES 'd's, then names "f<4 digits>" padded with 'x' to DEEP_FILE_NAME_BYTES)
 * held at the snapshot point: a session larger than a snapshot keeps. */
#define DEEP_LEVELS 5
#define DEEP_DIR_NAME_BYTES 200
#define DEEP_FILE_NAME_BYTES 150
static int hold_many_names(uint64_t many)
{
    static char name[DEEP_DIR_NAME_BYTES + 1];
    struct fuse_entry_out e;
    uint64_t dir = FUSE_ROOT_ID;
    memset(name, 'd', DEEP_DIR_NAME_BYTES);
    name[DEEP_DIR_NAME_BYTES] = 0;
    for (int i = 0; i < DEEP_LEVELS; i++) {
        if (lookup(dir, name, &e))
            return fail("lookup of a deep directory");
        dir = e.nodeid;
    }
    memset(name, 'x', DEEP_FILE_NAME_BYTES);
    name[DEEP_FILE_NAME_BYTES] = 0;
    for (uint64_t i = 0; i < many; i++) {
        name[0] = 'f';
        name[1] = (char)('0' + i / 1000 % 10);
        name[2] = (char)('0' + i / 100 % 10);
        name[3] = (char)('0' + i / 10 % 10);
        name[4] = (char)('0' + i % 10);
        if (lookup(dir, name, &e))
            return fail("lookup of a deep file");
    }
    put_str("held ");
    put_dec(many);
    put_line(" deep names");
    if (probe_snapshot_point("fs"))
        return fail("no byte from the host at the snapshot point");
    put_line("PROBE fs OK");
    return 0;
}

/* snap=1: a FUSE session held across a snapshot point, then used again (see the top). */
static int snapshot_session(int ro)
{
    struct fuse_entry_out e;
    uint64_t hello, sub, deep, gone, link, fh_hello, fh_deep, fh_gone, fh_sub;
    if (lookup(FUSE_ROOT_ID, "hello.txt", &e))
        return fail("lookup hello.txt");
    hello = e.nodeid;
    if (lookup(FUSE_ROOT_ID, "sub", &e))
        return fail("lookup sub");
    sub = e.nodeid;
    if (lookup(sub, "deep.txt", &e))
        return fail("lookup sub/deep.txt");
    deep = e.nodeid;
    if (lookup(FUSE_ROOT_ID, "gone.txt", &e))
        return fail("lookup gone.txt");
    gone = e.nodeid;
    if (lookup(FUSE_ROOT_ID, "inside_link", &e))
        return fail("lookup inside_link");
    link = e.nodeid;
    if (open_node(FUSE_OPEN, hello, L_O_RDONLY, &fh_hello) ||
        open_node(FUSE_OPEN, deep, ro ? L_O_RDONLY : L_O_WRONLY | L_O_APPEND, &fh_deep) ||
        open_node(FUSE_OPEN, gone, L_O_RDONLY, &fh_gone) ||
        open_node(FUSE_OPENDIR, sub, 0, &fh_sub))
        return fail("open the session's files");
    put_str("session nodes ");
    put_dec(hello); put_char(' '); put_dec(sub); put_char(' '); put_dec(deep); put_char(' ');
    put_dec(gone); put_char(' '); put_dec(link);
    put_str(" handles ");
    put_dec(fh_hello); put_char(' '); put_dec(fh_deep); put_char(' '); put_dec(fh_gone);
    put_char(' '); put_dec(fh_sub); put_char('\n');
    if (probe_snapshot_point("fs"))
        return fail("no byte from the host at the snapshot point");

    int rc = read_handle(FUSE_READ, hello, fh_hello);
    after("read hello.txt handle", rc);
    if (rc == 0)
        put_line(reply_payload_len == sizeof(HELLO_TEXT) - 1 &&
                 memcmp(out_payload, HELLO_TEXT, reply_payload_len) == 0
                     ? "after hello.txt content ok" : "after hello.txt content differs");
    uint64_t size = 0;
    rc = getattr_size(hello, &size);
    after("getattr hello.txt", rc);
    rc = lookup(sub, "deep.txt", &e);
    after("lookup sub/deep.txt", rc);
    if (rc == 0 && e.nodeid == deep)
        put_line("after lookup sub/deep.txt answers the same node id");
    if (!ro) {
        struct fuse_rw_in wr;
        memset(&wr, 0, sizeof(wr));
        wr.fh = fh_deep;
        wr.size = 18;
        after("append sub/deep.txt", fuse_call(FUSE_WRITE, deep, &wr, sizeof(wr), "after the restore\n",
                                               18, 8, 0));
    }
    rc = read_handle(FUSE_READDIR, sub, fh_sub);
    after("readdir sub", rc);
    if (rc == 0 && listing_has("deep.txt"))
        put_line("after readdir sub lists deep.txt");
    after("getattr gone.txt", getattr_size(gone, 0));
    after("read gone.txt handle", read_handle(FUSE_READ, gone, fh_gone));
    after("release gone.txt handle", release(FUSE_RELEASE, gone, fh_gone));
    after("read released gone.txt handle", read_handle(FUSE_READ, gone, fh_gone));
    forget(gone, 1);
    after("getattr forgotten gone.txt", getattr_size(gone, 0));
    char text[64];
    rc = readlink_node(link, text, sizeof(text));
    after("readlink inside_link", rc);
    if (rc == 0) {
        put_str("after inside_link = ");
        put_line(text);
    }
    rc = lookup(FUSE_ROOT_ID, "hello.txt", &e);
    after("lookup hello.txt", rc);
    if (rc == 0 && e.nodeid == hello)
        put_line("after lookup hello.txt answers the same node id");
    after("release hello.txt handle", release(FUSE_RELEASE, hello, fh_hello));
    after("release sub/deep.txt handle", release(FUSE_RELEASE, deep, fh_deep));
    after("releasedir sub", release(FUSE_RELEASEDIR, sub, fh_sub));
    put_line("PROBE fs OK");
    return 0;
}

int probe_main(void)
{
    int ro = (int)cmdline_get_u64("ro", 0);
    uint64_t base = virtio_find(VIRTIO_ID_FS, 0);
    if (!base)
        return fail("no virtio-fs device on the command line");
    if (!virtio_negotiate(base, 0))
        return fail("feature negotiation");
    char tag[CONFIG_TAG_BYTES + 1];
    for (uint32_t i = 0; i < CONFIG_TAG_BYTES; i += 4) {
        uint32_t v = mmio_read32(base + CONFIG_TAG + i);
        memcpy(tag + i, &v, 4);
    }
    tag[CONFIG_TAG_BYTES] = 0;
    uint32_t nrq = mmio_read32(base + CONFIG_NUM_REQUEST_QUEUES);
    put_str("tag ");
    put_str(tag);
    put_str(" request queues ");
    put_dec(nrq);
    put_char('\n');
    if (nrq != 1)
        return fail("num_request_queues is not 1");
    if (virtq_setup(&hiprio, base, HIPRIO_QUEUE, QUEUE_SIZE) || virtq_setup(&req, base, REQUEST_QUEUE, QUEUE_SIZE))
        return fail("queue setup");
    virtio_driver_ok(base);
    in_buf = alloc_pages(2);
    out_hdr = alloc_pages(1);
    out_payload = alloc_pages(2);

    /* Before INIT every request is refused. */
    struct fuse_entry_out e;
    if (lookup(FUSE_ROOT_ID, "hello.txt", &e) >= 0)
        return fail("lookup before FUSE_INIT succeeded");

    struct fuse_init_in init;
    memset(&init, 0, sizeof(init));
    init.major = 7;
    init.minor = 38;
    init.max_readahead = 128 * 1024;
    int rc = fuse_call(FUSE_INIT, 0, &init, sizeof(init), 0, 0, sizeof(struct fuse_init_out), 0);
    struct fuse_init_out *io = (struct fuse_init_out *)out_payload;
    if (rc || io->major != 7)
        return fail("FUSE_INIT");
    put_str("init ");
    put_dec(io->major);
    put_char('.');
    put_dec(io->minor);
    put_str(" max_write ");
    put_dec(io->max_write);
    put_char('\n');
    if (cmdline_get_u64("snap", 0) && cmdline_get_u64("many", 0))
        return hold_many_names(cmdline_get_u64("many", 0));
    if (cmdline_get_u64("snap", 0))
        return snapshot_session(ro);

    if (lookup(FUSE_ROOT_ID, "hello.txt", &e))
        return fail("lookup hello.txt");
    uint64_t hello = e.nodeid;
    if (fuse_call(FUSE_GETATTR, hello, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16, 0, 0, sizeof(struct fuse_attr_out), 0))
        return fail("getattr hello.txt");
    uint64_t size = ((struct fuse_attr_out *)out_payload)->attr.size;
    put_str("hello.txt size ");
    put_dec(size);
    put_char('\n');
    if (size != sizeof(HELLO_TEXT) - 1)
        return fail("hello.txt size");
    uint64_t fh;
    if (open_node(FUSE_OPEN, hello, L_O_RDONLY, &fh))
        return fail("open hello.txt");
    struct fuse_rw_in rd;
    memset(&rd, 0, sizeof(rd));
    rd.fh = fh;
    rd.size = 4096;
    if (fuse_call(FUSE_READ, hello, &rd, sizeof(rd), 0, 0, 4096, 0))
        return fail("read hello.txt");
    if (reply_payload_len != sizeof(HELLO_TEXT) - 1 || memcmp(out_payload, HELLO_TEXT, reply_payload_len))
        return fail("hello.txt content differs");
    put_str("read hello.txt ");
    put_dec(reply_payload_len);
    put_line(" bytes, content ok");
    if (ro) {
        struct fuse_rw_in wr;
        memset(&wr, 0, sizeof(wr));
        wr.fh = fh;
        wr.size = 4;
        report("write read-only", fuse_call(FUSE_WRITE, hello, &wr, sizeof(wr), "nope", 4, sizeof(uint64_t), 0));
        if (out_hdr->error != -E_ROFS)
            return fail("write on a read-only share was not refused with EROFS");
        uint64_t wfh;
        rc = open_node(FUSE_OPEN, hello, L_O_WRONLY, &wfh);
        report("open-for-write read-only", rc);
        if (rc != -E_ROFS)
            return fail("write-open on a read-only share was not refused with EROFS");
    }
    if (release(FUSE_RELEASE, hello, fh))
        return fail("release hello.txt");

    uint64_t dfh;
    if (open_node(FUSE_OPENDIR, FUSE_ROOT_ID, 0, &dfh))
        return fail("opendir /");
    memset(&rd, 0, sizeof(rd));
    rd.fh = dfh;
    rd.size = 4096;
    if (fuse_call(FUSE_READDIR, FUSE_ROOT_ID, &rd, sizeof(rd), 0, 0, 4096, 0))
        return fail("readdir /");
    int seen_hello = 0, entries = 0;
    for (uint32_t pos = 0; pos + sizeof(struct fuse_dirent) <= reply_payload_len;) {
        struct fuse_dirent *d = (struct fuse_dirent *)(out_payload + pos);
        const char *name = (const char *)(d + 1);
        entries++;
        if (d->namelen == 9 && memcmp(name, "hello.txt", 9) == 0)
            seen_hello = 1;
        pos += (uint32_t)((sizeof(*d) + d->namelen + 7) & ~7ul);
    }
    put_str("readdir entries ");
    put_dec((uint64_t)entries);
    put_char('\n');
    if (!seen_hello)
        return fail("readdir did not list hello.txt");
    if (release(FUSE_RELEASEDIR, FUSE_ROOT_ID, dfh))
        return fail("releasedir");

    if (!check_names_and_links(hello))
        return 1;
    if (ro && !refusals_ro(hello))
        return 1;
    forget(hello, 1);
    if (lookup(FUSE_ROOT_ID, "missing.txt", &e) != -E_NOENT)
        return fail("lookup of a missing file did not answer ENOENT");

    struct fuse_create_in ci = {.flags = L_O_WRONLY | L_O_CREAT | L_O_TRUNC, .mode = 0100644, .umask = 022, .open_flags = 0};
    rc = fuse_call(FUSE_CREATE, FUSE_ROOT_ID, &ci, sizeof(ci), "out.txt", 8,
                   sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out), 0);
    report("create out.txt", rc);
    if (ro) {
        if (rc != -E_ROFS)
            return fail("create on a read-only share was not refused with EROFS");
    } else {
        if (rc)
            return fail("create out.txt");
        uint64_t out_node = ((struct fuse_entry_out *)out_payload)->nodeid;
        uint64_t out_fh = ((struct fuse_open_out *)(out_payload + sizeof(struct fuse_entry_out)))->fh;
        struct fuse_rw_in wr;
        memset(&wr, 0, sizeof(wr));
        wr.fh = out_fh;
        wr.size = sizeof(OUT_TEXT) - 1;
        rc = fuse_call(FUSE_WRITE, out_node, &wr, sizeof(wr), OUT_TEXT, sizeof(OUT_TEXT) - 1, 8, 0);
        if (rc || *(uint32_t *)out_payload != sizeof(OUT_TEXT) - 1)
            return fail("write out.txt");
        put_str("wrote out.txt ");
        put_dec(*(uint32_t *)out_payload);
        put_line(" bytes");
        if (fuse_call(FUSE_FLUSH, out_node, &wr, 24, 0, 0, 0, 0))
            return fail("flush out.txt");
        if (release(FUSE_RELEASE, out_node, out_fh))
            return fail("release out.txt");
        forget(out_node, 1);

        /* Guest root must not leave set-user-ID/set-group-ID files or device nodes behind. */
        static const struct { const char *name; uint32_t mode; } privileged[] = {
            {"suid.bin", 0104755}, {"sgid.bin", 0102755}, {"both.bin", 0106777}};
        for (unsigned i = 0; i < sizeof(privileged) / sizeof(privileged[0]); i++) {
            uint32_t mode = 0;
            uint64_t node = 0, pfh = 0;
            rc = create_file(privileged[i].name, L_O_WRONLY | L_O_CREAT, privileged[i].mode,
                             &mode, &node, &pfh);
            put_str("create ");
            put_str(privileged[i].name);
            put_str(" mode ");
            put_oct(privileged[i].mode & 07777);
            report("", rc);
            if (rc)
                return fail("create with a set-id mode failed instead of stripping the bits");
            put_str("created mode ");
            put_oct(mode & 07777);
            put_char('\n');
            if (mode & 06000)
                return fail("CREATE kept a set-user-ID or set-group-ID bit");
            release(FUSE_RELEASE, node, pfh);
            forget(node, 1);
        }
        uint32_t mode = 0;
        uint64_t node = 0, pfh = 0;
        rc = create_file("chardev", L_O_WRONLY | L_O_CREAT, 0020644, &mode, &node, &pfh);
        report("create chardev", rc);
        if (rc != -E_PERM)
            return fail("CREATE of a character device was not refused with EPERM");
        rc = create_file("blockdev", L_O_WRONLY | L_O_CREAT, 0060644, &mode, &node, &pfh);
        report("create blockdev", rc);
        if (rc != -E_PERM)
            return fail("CREATE of a block device was not refused with EPERM");
        struct { uint32_t mode, rdev, umask, padding; } mk = {0020644, 0x0103, 0, 0};
        rc = fuse_call(FUSE_MKNOD, FUSE_ROOT_ID, &mk, sizeof(mk), "mknod_dev", 10,
                       sizeof(struct fuse_entry_out), 0);
        report("mknod chardev", rc);
        if (rc != -E_PERM)
            return fail("MKNOD of a character device was not refused with EPERM");
        /* setuid_host is a set-user-ID file the host put in the share: no rewriting it. */
        if (lookup(FUSE_ROOT_ID, "setuid_host", &e))
            return fail("lookup setuid_host");
        uint64_t suid_fh;
        rc = open_node(FUSE_OPEN, e.nodeid, L_O_WRONLY, &suid_fh);
        report("open-for-write setuid_host", rc);
        if (rc != -E_PERM)
            return fail("write-open of a set-user-ID host file was not refused with EPERM");
        rc = open_node(FUSE_OPEN, e.nodeid, L_O_RDONLY | L_O_TRUNC, &suid_fh);
        report("open-truncate setuid_host", rc);
        if (rc != -E_PERM)
            return fail("truncating open of a set-user-ID host file was not refused with EPERM");
        rc = create_file("setuid_host", L_O_WRONLY | L_O_CREAT | L_O_TRUNC, 0100644, &mode, &node, &pfh);
        report("create-truncate setuid_host", rc);
        if (rc != -E_PERM)
            return fail("truncating CREATE of a set-user-ID host file was not refused with EPERM");
        rc = open_node(FUSE_OPEN, e.nodeid, L_O_RDONLY, &suid_fh);
        report("open-read setuid_host", rc);
        if (rc)
            return fail("read-open of a set-user-ID host file failed");
        release(FUSE_RELEASE, e.nodeid, suid_fh);
        forget(e.nodeid, 1);
        if (!namespace_ops_rw())
            return 1;
    }

    rc = fuse_call(FUSE_UNKNOWN_OPCODE, FUSE_ROOT_ID, 0, 0, 0, 0, 0, 0);
    report("unknown opcode", rc);
    if (rc != -E_NOSYS)
        return fail("unknown opcode was not answered ENOSYS");
    rc = fuse_call(FUSE_LOOKUP, FUSE_ROOT_ID, "x", 2, 0, 0, sizeof(e), 4000);
    report("garbage header", rc);
    if (rc != -E_INVAL)
        return fail("garbage header was not answered EINVAL");
    if (fuse_call(FUSE_DESTROY, 0, 0, 0, 0, 0, 0, 0))
        return fail("destroy");
    put_line("destroy ok");
    put_line("PROBE fs OK");
    return 0;
}
