/* virtio_balloon.c — the balloon device state machine and queue handlers. */
#define _GNU_SOURCE
#include "virtio_balloon.h"
#include "error_table.h"
#include "../event_loop.h"
#include "../util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define CONFIG_NUM_PAGES_OFFSET 0
#define CONFIG_ACTUAL_OFFSET 4
#define CONFIG_BYTES 8

static const char *const BALLOON_ERROR_MESSAGES[SM_BALLOON_ERR_COUNT] = {
    [SM_BALLOON_ERR_NONE] = "ok",
    [SM_BALLOON_ERR_QUEUE] = "Guest gave us a malformed queue",
    [SM_BALLOON_ERR_PFN_BUFFER_WRITABLE] = "Guest gave us a device-writable inflate/deflate buffer",
    [SM_BALLOON_ERR_PFN_BUFFER_SIZE] = "Guest gave us a PFN buffer whose size is not a multiple of 4 bytes",
    [SM_BALLOON_ERR_PFN_OUT_OF_RANGE] = "Guest gave us a PFN outside guest RAM",
    [SM_BALLOON_ERR_STATS_BUFFER_SIZE] = "Guest gave us a statistics buffer whose size is not a multiple of 10 bytes",
    [SM_BALLOON_ERR_STATS_BUFFER_WRITABLE] = "Guest gave us a device-writable statistics buffer",
    [SM_BALLOON_ERR_TWO_STATS_BUFFERS] = "Guest gave us a second statistics buffer while we held one",
    [SM_BALLOON_ERR_DISCARD_FAILED] = "Releasing inflated pages to the host failed",
};

const char *sm_balloon_error_message(int err)
{
    return sm_error_table_lookup(BALLOON_ERROR_MESSAGES, SM_BALLOON_ERR_COUNT, err, "unknown balloon error");
}

sm_balloon *sm_balloon_create(int deflate_on_oom, uint32_t stats_interval_s)
{
    sm_balloon *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->deflate_on_oom = deflate_on_oom;
    b->stats_interval_s = stats_interval_s;
    b->timer_fd = -1;
    return b;
}

static void fail(sm_balloon *b, int err, const char *detail)
{
    b->counters.errors++;
    sm_virtio_mmio_mark_broken_locked(b->transport, "%s%s%s", BALLOON_ERROR_MESSAGES[err],
                                      detail ? ": " : "", detail ? detail : "");
}

static uint64_t balloon_features(void *dev)
{
    sm_balloon *b = dev;
    uint64_t f = 1ULL << SM_BALLOON_F_STATS_VQ_BIT;
    if (b->deflate_on_oom)
        f |= 1ULL << SM_BALLOON_F_DEFLATE_ON_OOM_BIT;
    return f;
}

static void balloon_config_read(void *dev, uint32_t offset, uint8_t *data, uint32_t len)
{
    sm_balloon *b = dev;
    uint8_t cfg[CONFIG_BYTES];
    memcpy(cfg + CONFIG_NUM_PAGES_OFFSET, &b->num_pages, 4);
    memcpy(cfg + CONFIG_ACTUAL_OFFSET, &b->actual_pages, 4);
    if (offset < CONFIG_BYTES && len <= CONFIG_BYTES - offset)
        memcpy(data, cfg + offset, len);
}

static void balloon_config_write(void *dev, uint32_t offset, const uint8_t *data, uint32_t len)
{
    sm_balloon *b = dev;
    if (offset == CONFIG_ACTUAL_OFFSET && len == 4)
        memcpy(&b->actual_pages, data, 4);
    else
        b->transport->counters.bad_register_accesses++;
}

/* Inflate (discard = 1) or deflate one chain of PFNs. Returns 0 or -1 (device broken). */
static int handle_pfn_chain(sm_balloon *b, const sm_vq_chain *c, int inflate)
{
    const sm_guest_memory *mem = b->transport->mem;
    uint64_t run_start = 0, run_pages = 0;
    for (uint16_t i = 0; i < c->n; i++) {
        const sm_vq_buffer *buf = &c->bufs[i];
        if (buf->device_writable) {
            fail(b, SM_BALLOON_ERR_PFN_BUFFER_WRITABLE, NULL);
            return -1;
        }
        if (buf->len % SM_BALLOON_PFN_BYTES) {
            fail(b, SM_BALLOON_ERR_PFN_BUFFER_SIZE, NULL);
            return -1;
        }
        for (uint32_t off = 0; off < buf->len; off += SM_BALLOON_PFN_BYTES) {
            uint32_t pfn;
            memcpy(&pfn, buf->host + off, 4);
            uint64_t gpa = (uint64_t)pfn << SM_BALLOON_PFN_SHIFT;
            if (!sm_memory_ptr(mem, gpa, SM_BALLOON_PAGE_BYTES)) {
                char detail[64];
                sm_format(detail, sizeof(detail), "pfn 0x%x", pfn);
                fail(b, SM_BALLOON_ERR_PFN_OUT_OF_RANGE, detail);
                return -1;
            }
            if (inflate) {
                b->counters.inflated_pages++;
                if (run_pages && gpa == run_start + run_pages * SM_BALLOON_PAGE_BYTES) {
                    run_pages++;
                    continue;
                }
                if (run_pages && sm_memory_discard(mem, run_start, run_pages * SM_BALLOON_PAGE_BYTES) < 0) {
                    fail(b, SM_BALLOON_ERR_DISCARD_FAILED, NULL);
                    return -1;
                }
                b->counters.discarded_bytes += run_pages * SM_BALLOON_PAGE_BYTES;
                run_start = gpa;
                run_pages = 1;
            } else {
                b->counters.deflated_pages++; /* pages fault back in on first touch */
            }
        }
    }
    if (run_pages) {
        if (sm_memory_discard(mem, run_start, run_pages * SM_BALLOON_PAGE_BYTES) < 0) {
            fail(b, SM_BALLOON_ERR_DISCARD_FAILED, NULL);
            return -1;
        }
        b->counters.discarded_bytes += run_pages * SM_BALLOON_PAGE_BYTES;
    }
    return 0;
}

static int handle_stats_chain(sm_balloon *b, const sm_vq_chain *c)
{
    if (b->stats_head_held) {
        fail(b, SM_BALLOON_ERR_TWO_STATS_BUFFERS, NULL);
        return -1;
    }
    if (c->writable_bytes) {
        fail(b, SM_BALLOON_ERR_STATS_BUFFER_WRITABLE, NULL);
        return -1;
    }
    if (c->readable_bytes % SM_BALLOON_STAT_ENTRY_BYTES) {
        fail(b, SM_BALLOON_ERR_STATS_BUFFER_SIZE, NULL);
        return -1;
    }
    for (uint32_t off = 0; off < c->readable_bytes; off += SM_BALLOON_STAT_ENTRY_BYTES) {
        uint8_t entry[SM_BALLOON_STAT_ENTRY_BYTES];
        sm_vq_chain_read(c, off, entry, sizeof(entry));
        uint16_t tag;
        uint64_t val;
        memcpy(&tag, entry, 2);
        memcpy(&val, entry + 2, 8);
        if (tag >= SM_BALLOON_STAT_TAG_COUNT) {
            b->counters.unknown_stat_tags++; /* newer drivers add tags: ignore, not an error */
            continue;
        }
        b->stats[tag] = val;
        b->stats_present |= 1ULL << tag;
    }
    b->stats_head = c->head;
    b->stats_head_held = 1;
    b->counters.stats_updates++;
    return 0;
}

static void process_queue(sm_balloon *b, uint16_t queue)
{
    sm_virtio_mmio *t = b->transport;
    sm_virtqueue *q = &t->queues[queue];
    sm_vq_chain chain;
    int used = 0;
    while (sm_virtio_mmio_is_live_locked(t)) {
        int rc = sm_vq_pop(q, &chain);
        if (rc == SM_VQ_EMPTY)
            break;
        if (rc != SM_VQ_OK) {
            b->counters.errors++;
            sm_virtio_mmio_mark_broken_locked(t, "%s: queue %u: %s",
                                              BALLOON_ERROR_MESSAGES[SM_BALLOON_ERR_QUEUE], queue,
                                              sm_vq_error_message(rc));
            break;
        }
        if (queue == SM_BALLOON_STATS_INDEX) {
            handle_stats_chain(b, &chain); /* buffer is held until the next poll */
            continue;
        }
        if (queue == SM_BALLOON_INFLATE_INDEX)
            b->counters.inflate_requests++;
        else
            b->counters.deflate_requests++;
        if (handle_pfn_chain(b, &chain, queue == SM_BALLOON_INFLATE_INDEX) < 0)
            break;
        sm_vq_push_used(q, chain.head, 0);
        used = 1;
    }
    if (used)
        sm_virtio_mmio_signal_used_locked(t);
}

static void balloon_activate(void *dev)
{
    sm_balloon *b = dev;
    for (uint16_t i = 0; i < SM_BALLOON_NUM_QUEUES; i++)
        if (b->transport->queues[i].ready)
            process_queue(b, i);
}

static void balloon_notify(void *dev, uint16_t queue)
{
    process_queue(dev, queue);
}

static void balloon_reset(void *dev)
{
    sm_balloon *b = dev;
    b->stats_head_held = 0;
    b->actual_pages = 0;
}

static void balloon_counters(void *dev, sm_device_info *info, uint32_t *n)
{
    sm_balloon *b = dev;
#define ADD(field)                                                                                 \
    do {                                                                                           \
        snprintf(info->counter_names[*n], sizeof(info->counter_names[*n]), "%s", #field);          \
        info->counters[(*n)++] = b->counters.field;                                                \
    } while (0)
    ADD(inflate_requests);
    ADD(inflated_pages);
    ADD(deflate_requests);
    ADD(deflated_pages);
    ADD(discarded_bytes);
    ADD(stats_updates);
    ADD(stats_requests);
    ADD(unknown_stat_tags);
    ADD(target_changes);
    ADD(errors);
#undef ADD
}

static int arm_timer(sm_balloon *b);

static size_t balloon_save(void *dev, uint8_t *buf, size_t cap)
{
    sm_balloon *b = dev;
    sm_balloon_state s;
    memset(&s, 0, sizeof(s));
    s.num_pages = b->num_pages;
    s.actual_pages = b->actual_pages;
    s.stats_interval_s = b->stats_interval_s;
    s.stats_head = b->stats_head;
    s.stats_head_held = (uint8_t)b->stats_head_held;
    s.deflate_on_oom = (uint8_t)b->deflate_on_oom;
    s.stats_present = b->stats_present;
    memcpy(s.stats, b->stats, sizeof(s.stats));
    if (sizeof(s) <= cap)
        memcpy(buf, &s, sizeof(s));
    return sizeof(s);
}

static int balloon_restore(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len)
{
    sm_balloon *b = dev;
    sm_balloon_state s;
    if (len != sizeof(s)) {
        snprintf(err, err_len, "balloon state is %zu bytes, this core's is %zu", len, sizeof(s));
        return -1;
    }
    memcpy(&s, buf, sizeof(s));
    const sm_virtqueue *stats_q = &b->transport->queues[SM_BALLOON_STATS_INDEX];
    uint64_t ram_pages = b->transport->mem->total_bytes / SM_BALLOON_PAGE_BYTES;
    if (s.deflate_on_oom != (b->deflate_on_oom != 0)) {
        snprintf(err, err_len, "deflate_on_oom differs (snapshot %u, restore config %d)",
                 s.deflate_on_oom, b->deflate_on_oom != 0);
        return -1;
    }
    if (s.stats_interval_s != b->stats_interval_s) {
        snprintf(err, err_len, "statistics interval differs (snapshot %u s, restore config %u s)",
                 s.stats_interval_s, b->stats_interval_s);
        return -1;
    }
    if (s.num_pages > ram_pages) {
        snprintf(err, err_len, "target of %u pages exceeds guest RAM (%llu pages)", s.num_pages,
                 (unsigned long long)ram_pages);
        return -1;
    }
    if (s.stats_head_held > 1 || (s.stats_head_held && (!stats_q->ready || s.stats_head >= stats_q->size))) {
        snprintf(err, err_len, "held statistics buffer %u is not in the statistics queue (size %u)",
                 s.stats_head, stats_q->ready ? stats_q->size : 0);
        return -1;
    }
    b->num_pages = s.num_pages;
    b->actual_pages = s.actual_pages;
    b->stats_head = s.stats_head;
    b->stats_head_held = s.stats_head_held;
    b->stats_present = s.stats_present;
    memcpy(b->stats, s.stats, sizeof(b->stats));
    if (arm_timer(b) < 0) { /* the next poll comes one full interval after the restore */
        snprintf(err, err_len, "statistics timer: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static void balloon_destroy(void *dev)
{
    sm_balloon *b = dev;
    if (b->timer_fd >= 0)
        close(b->timer_fd);
    free(b);
}

const sm_virtio_ops SM_BALLOON_OPS = {
    .device_id = SM_VIRTIO_ID_BALLOON,
    .num_queues = SM_BALLOON_NUM_QUEUES,
    .device_features = balloon_features,
    .config_read = balloon_config_read,
    .config_write = balloon_config_write,
    .activate = balloon_activate,
    .queue_notify = balloon_notify,
    .reset = balloon_reset,
    .counters = balloon_counters,
    .destroy = balloon_destroy,
    .save = balloon_save,
    .restore = balloon_restore,
};

/* Statistics poll: hand the held buffer back so the driver refills it. */
static void stats_timer_fired(void *opaque, int fd, uint32_t events)
{
    (void)events;
    sm_balloon *b = opaque;
    uint64_t expirations;
    (void)!read(fd, &expirations, sizeof(expirations));
    sm_virtio_mmio *t = b->transport;
    pthread_mutex_lock(&t->lock);
    if (b->stats_head_held && sm_virtio_mmio_is_live_locked(t)) {
        b->stats_head_held = 0;
        b->counters.stats_requests++;
        sm_vq_push_used(&t->queues[SM_BALLOON_STATS_INDEX], b->stats_head, 0);
        sm_virtio_mmio_signal_used_locked(t);
    }
    pthread_mutex_unlock(&t->lock);
}

static int arm_timer(sm_balloon *b)
{
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = b->stats_interval_s;
    its.it_interval.tv_sec = b->stats_interval_s;
    return timerfd_settime(b->timer_fd, 0, &its, NULL);
}

int sm_balloon_attach(sm_balloon *b, sm_virtio_mmio *t, struct sm_event_loop *loop)
{
    b->transport = t;
    b->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (b->timer_fd < 0)
        return -1;
    if (sm_event_loop_add(loop, b->timer_fd, EPOLLIN, stats_timer_fired, b) < 0)
        return -1;
    return arm_timer(b);
}

void sm_balloon_set_target(sm_balloon *b, uint32_t pages)
{
    sm_virtio_mmio *t = b->transport;
    pthread_mutex_lock(&t->lock);
    if (b->num_pages != pages) {
        b->num_pages = pages;
        b->counters.target_changes++;
        sm_virtio_mmio_signal_config_locked(t);
    }
    pthread_mutex_unlock(&t->lock);
}

int sm_balloon_set_stats_interval(sm_balloon *b, uint32_t seconds)
{
    pthread_mutex_lock(&b->transport->lock);
    b->stats_interval_s = seconds;
    int rc = arm_timer(b);
    pthread_mutex_unlock(&b->transport->lock);
    return rc;
}

void sm_balloon_get_stats(sm_balloon *b, sm_balloon_stats *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&b->transport->lock);
    out->target_pages = b->num_pages;
    out->actual_pages = b->actual_pages;
    out->target_mib = b->num_pages / SM_MIB_TO_4K_PAGES;
    out->actual_mib = b->actual_pages / SM_MIB_TO_4K_PAGES;
    out->present = b->stats_present;
    out->swap_in = b->stats[SM_BALLOON_STAT_SWAP_IN];
    out->swap_out = b->stats[SM_BALLOON_STAT_SWAP_OUT];
    out->major_faults = b->stats[SM_BALLOON_STAT_MAJOR_FAULTS];
    out->minor_faults = b->stats[SM_BALLOON_STAT_MINOR_FAULTS];
    out->free_memory = b->stats[SM_BALLOON_STAT_FREE_MEMORY];
    out->total_memory = b->stats[SM_BALLOON_STAT_TOTAL_MEMORY];
    out->available_memory = b->stats[SM_BALLOON_STAT_AVAILABLE_MEMORY];
    out->disk_caches = b->stats[SM_BALLOON_STAT_DISK_CACHES];
    out->hugetlb_allocations = b->stats[SM_BALLOON_STAT_HUGETLB_ALLOCATIONS];
    out->hugetlb_failures = b->stats[SM_BALLOON_STAT_HUGETLB_FAILURES];
    out->stats_updates = b->counters.stats_updates;
    pthread_mutex_unlock(&b->transport->lock);
}
