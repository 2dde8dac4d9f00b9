/* virtio_blk.c — request parsing and file I/O for virtio-blk. Request-level problems
 * (bad sector, unsupported type, write to a read-only disk) are answered with a status
 * byte and counted; descriptor-level garbage breaks the device. */
#define _GNU_SOURCE
#include "virtio_blk.h"
#include "error_table.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CONFIG_CAPACITY_OFFSET 0
#define CONFIG_BYTES 8

static const char *const BLK_ERROR_MESSAGES[SM_BLK_ERR_COUNT] = {
    [SM_BLK_ERR_NONE] = "ok",
    [SM_BLK_ERR_QUEUE] = "Guest gave us a malformed queue",
    [SM_BLK_ERR_DESCRIPTOR_LAYOUT] = "Guest gave us a request without a readable 16-byte header and a writable status byte",
    [SM_BLK_ERR_SECTOR_OUT_OF_RANGE] = "Guest asked for sectors beyond the end of the disk",
    [SM_BLK_ERR_DATA_NOT_SECTOR_MULTIPLE] = "Guest gave us a data buffer that is not a multiple of 512 bytes",
    [SM_BLK_ERR_WRITE_TO_READ_ONLY] = "Guest wrote to a read-only disk",
    [SM_BLK_ERR_UNSUPPORTED_TYPE] = "Guest sent an unsupported request type",
    [SM_BLK_ERR_IO] = "Host I/O on the backing file failed",
};

const char *sm_blk_error_message(int err)
{
    return sm_error_table_lookup(BLK_ERROR_MESSAGES, SM_BLK_ERR_COUNT, err, "unknown blk error");
}

sm_blk *sm_blk_create(const char *path, int read_only, const char *serial, uint32_t index, char *err,
                      size_t err_len)
{
    if (serial && strlen(serial) > SM_BLK_ID_BYTES) {
        snprintf(err, err_len, "virtio-blk%u: serial %s is longer than %u bytes", index, serial,
                 SM_BLK_ID_BYTES);
        return NULL;
    }
    if (!path || !*path) {
        snprintf(err, err_len, "virtio-blk%u: empty backing file path", index);
        return NULL;
    }
    int fd = open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, err_len, "virtio-blk%u: cannot open %s: %s", index, path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, err_len, "virtio-blk%u: %s is not a regular file", index, path);
        close(fd);
        return NULL;
    }
    if (st.st_size % SM_BLK_SECTOR_BYTES) {
        snprintf(err, err_len, "virtio-blk%u: %s size %lld is not a multiple of 512", index, path,
                 (long long)st.st_size);
        close(fd);
        return NULL;
    }
    sm_blk *b = calloc(1, sizeof(*b));
    if (!b) {
        close(fd);
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    b->fd = fd;
    b->read_only = read_only;
    b->capacity_bytes = (uint64_t)st.st_size;
    if (serial && *serial)
        snprintf(b->id, sizeof(b->id), "%s", serial);
    else
        snprintf(b->id, sizeof(b->id), "sm-blk%u", index);
    return b;
}

static uint64_t blk_features(void *dev)
{
    sm_blk *b = dev;
    uint64_t f = 1ULL << SM_BLK_F_FLUSH_BIT;
    if (b->read_only)
        f |= 1ULL << SM_BLK_F_RO_BIT;
    return f;
}

static void blk_config_read(void *dev, uint32_t offset, uint8_t *data, uint32_t len)
{
    sm_blk *b = dev;
    uint64_t sectors = b->capacity_bytes >> SM_BLK_SECTOR_SHIFT;
    uint8_t cfg[CONFIG_BYTES];
    memcpy(cfg + CONFIG_CAPACITY_OFFSET, &sectors, 8);
    if (offset < CONFIG_BYTES && len <= CONFIG_BYTES - offset)
        memcpy(data, cfg + offset, len);
}

/* Data descriptors are bufs[1 .. n-2]; returns 0 or the sm_blk_error. */
static int do_rw(sm_blk *b, const sm_vq_chain *c, uint64_t sector, int is_write, uint32_t *written)
{
    uint64_t total = 0;
    for (uint16_t i = 1; i + 1 < c->n; i++) {
        if (c->bufs[i].device_writable == is_write)
            return SM_BLK_ERR_DESCRIPTOR_LAYOUT; /* OUT data must be readable, IN writable */
        total += c->bufs[i].len;
    }
    if (total % SM_BLK_SECTOR_BYTES)
        return SM_BLK_ERR_DATA_NOT_SECTOR_MULTIPLE;
    if (sector > (b->capacity_bytes >> SM_BLK_SECTOR_SHIFT) ||
        total > b->capacity_bytes - (sector << SM_BLK_SECTOR_SHIFT))
        return SM_BLK_ERR_SECTOR_OUT_OF_RANGE;
    if (is_write && b->read_only)
        return SM_BLK_ERR_WRITE_TO_READ_ONLY;
    uint64_t off = sector << SM_BLK_SECTOR_SHIFT;
    for (uint16_t i = 1; i + 1 < c->n; i++) {
        const sm_vq_buffer *buf = &c->bufs[i];
        uint32_t done = 0;
        while (done < buf->len) {
            ssize_t n = is_write ? pwrite(b->fd, buf->host + done, buf->len - done, (off_t)off)
                                 : pread(b->fd, buf->host + done, buf->len - done, (off_t)off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return SM_BLK_ERR_IO;
            done += (uint32_t)n;
            off += (uint64_t)n;
        }
        if (!is_write)
            *written += buf->len;
    }
    if (is_write)
        b->counters.write_bytes += total;
    else
        b->counters.read_bytes += total;
    return SM_BLK_ERR_NONE;
}

/* Returns the status byte for a well-formed chain. */
static uint8_t handle_request(sm_blk *b, const sm_vq_chain *c, uint32_t *written)
{
    uint8_t hdr[SM_BLK_REQUEST_HEADER_BYTES];
    memcpy(hdr, c->bufs[0].host, sizeof(hdr));
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    int err = SM_BLK_ERR_NONE;
    switch (type) {
    case SM_BLK_T_IN:
        b->counters.read_requests++;
        err = do_rw(b, c, sector, 0, written);
        break;
    case SM_BLK_T_OUT:
        b->counters.write_requests++;
        err = do_rw(b, c, sector, 1, written);
        break;
    case SM_BLK_T_FLUSH:
        b->counters.flush_requests++;
        if (!b->read_only && fsync(b->fd) < 0)
            err = SM_BLK_ERR_IO;
        break;
    case SM_BLK_T_GET_ID:
        b->counters.get_id_requests++;
        if (c->n < 3 || !c->bufs[1].device_writable) {
            err = SM_BLK_ERR_DESCRIPTOR_LAYOUT;
            break;
        }
        {
            uint32_t n = c->bufs[1].len < SM_BLK_ID_BYTES ? c->bufs[1].len : SM_BLK_ID_BYTES;
            memset(c->bufs[1].host, 0, n);
            memcpy(c->bufs[1].host, b->id, strnlen(b->id, n));
            *written += n;
        }
        break;
    default:
        err = SM_BLK_ERR_UNSUPPORTED_TYPE;
    }
    switch (err) {
    case SM_BLK_ERR_NONE: return SM_BLK_S_OK;
    case SM_BLK_ERR_UNSUPPORTED_TYPE: b->counters.unsupported_requests++; return SM_BLK_S_UNSUPP;
    case SM_BLK_ERR_SECTOR_OUT_OF_RANGE: b->counters.out_of_range_requests++; return SM_BLK_S_IOERR;
    case SM_BLK_ERR_WRITE_TO_READ_ONLY: b->counters.read_only_violations++; return SM_BLK_S_IOERR;
    case SM_BLK_ERR_IO: b->counters.io_errors++; return SM_BLK_S_IOERR;
    default: b->counters.malformed_requests++; return SM_BLK_S_IOERR;
    }
}

static void blk_process(sm_blk *b)
{
    sm_virtio_mmio *t = b->transport;
    sm_virtqueue *q = &t->queues[SM_BLK_QUEUE_INDEX];
    sm_vq_chain chain;
    int used = 0;
    while (sm_virtio_mmio_is_live_locked(t)) {
        int rc = sm_vq_pop(q, &chain);
        if (rc == SM_VQ_EMPTY)
            break;
        if (rc != SM_VQ_OK) {
            sm_virtio_mmio_mark_broken_locked(t, "%s: %s", BLK_ERROR_MESSAGES[SM_BLK_ERR_QUEUE],
                                              sm_vq_error_message(rc));
            break;
        }
        const sm_vq_buffer *last = &chain.bufs[chain.n - 1];
        if (chain.n < 2 || chain.bufs[0].device_writable ||
            chain.bufs[0].len < SM_BLK_REQUEST_HEADER_BYTES || !last->device_writable ||
            last->len < 1) {
            b->counters.malformed_requests++;
            sm_virtio_mmio_mark_broken_locked(t, "%s", BLK_ERROR_MESSAGES[SM_BLK_ERR_DESCRIPTOR_LAYOUT]);
            break;
        }
        uint32_t written = 0;
        uint8_t status = handle_request(b, &chain, &written);
        last->host[last->len - 1] = status; /* status is the last byte of the chain */
        sm_vq_push_used(q, chain.head, written + 1);
        used = 1;
    }
    if (used)
        sm_virtio_mmio_signal_used_locked(t);
}

static void blk_activate(void *dev) { blk_process(dev); }

static void blk_notify(void *dev, uint16_t queue)
{
    (void)queue;
    blk_process(dev);
}

static void blk_counters(void *dev, sm_device_info *info, uint32_t *n)
{
    sm_blk *b = dev;
#define ADD(field)                                                                                 \
    do {                                                                                           \
        snprintf(info->counter_names[*n], sizeof(info->counter_names[*n]), "%s", #field);          \
        info->counters[(*n)++] = b->counters.field;                                                \
    } while (0)
    ADD(read_requests);
    ADD(write_requests);
    ADD(flush_requests);
    ADD(get_id_requests);
    ADD(read_bytes);
    ADD(write_bytes);
    ADD(unsupported_requests);
    ADD(out_of_range_requests);
    ADD(read_only_violations);
    ADD(io_errors);
    ADD(malformed_requests);
#undef ADD
}

static size_t blk_save(void *dev, uint8_t *buf, size_t cap)
{
    sm_blk *b = dev;
    sm_blk_state s;
    memset(&s, 0, sizeof(s));
    s.capacity_bytes = b->capacity_bytes;
    s.read_only = (uint32_t)(b->read_only != 0);
    memcpy(s.id, b->id, sizeof(s.id));
    if (sizeof(s) <= cap)
        memcpy(buf, &s, sizeof(s));
    return sizeof(s);
}

static int blk_restore(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len)
{
    sm_blk *b = dev;
    sm_blk_state s;
    if (len != sizeof(s)) {
        snprintf(err, err_len, "blk state is %zu bytes, this core's is %zu", len, sizeof(s));
        return -1;
    }
    memcpy(&s, buf, sizeof(s));
    if (!memchr(s.id, 0, sizeof(s.id))) {
        snprintf(err, err_len, "the snapshot's serial is not NUL-terminated");
        return -1;
    }
    if (s.capacity_bytes != b->capacity_bytes) {
        snprintf(err, err_len, "backing file is %llu bytes, the snapshot's disk was %llu",
                 (unsigned long long)b->capacity_bytes, (unsigned long long)s.capacity_bytes);
        return -1;
    }
    if (s.read_only != (uint32_t)(b->read_only != 0)) {
        snprintf(err, err_len, "backing file is %s, the snapshot's disk was %s",
                 b->read_only ? "read-only" : "read-write", s.read_only ? "read-only" : "read-write");
        return -1;
    }
    if (strcmp(s.id, b->id) != 0) {
        snprintf(err, err_len, "serial is %s, the snapshot's disk was %s", b->id, s.id);
        return -1;
    }
    return 0;
}

static void blk_destroy(void *dev)
{
    sm_blk *b = dev;
    if (b->fd >= 0)
        close(b->fd);
    free(b);
}

const sm_virtio_ops SM_BLK_OPS = {
    .device_id = SM_VIRTIO_ID_BLOCK,
    .num_queues = SM_BLK_NUM_QUEUES,
    .device_features = blk_features,
    .config_read = blk_config_read,
    .config_write = NULL,
    .activate = blk_activate,
    .queue_notify = blk_notify,
    .reset = NULL,
    .counters = blk_counters,
    .destroy = blk_destroy,
    .save = blk_save,
    .restore = blk_restore,
};
