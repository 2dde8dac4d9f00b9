/* virtio_balloon.h — virtio-balloon (device id 5): inflate/deflate queues, statistics
 * queue, deflate-on-OOM. Inflated pages are returned to the host with MADV_DONTNEED. */
#ifndef SM_VIRTIO_BALLOON_H
#define SM_VIRTIO_BALLOON_H

#include <stdint.h>
#include "virtio_mmio.h"

struct sm_event_loop;

#define SM_VIRTIO_ID_BALLOON 5
#define SM_BALLOON_F_STATS_VQ_BIT 1
#define SM_BALLOON_F_DEFLATE_ON_OOM_BIT 2
#define SM_BALLOON_INFLATE_INDEX 0
#define SM_BALLOON_DEFLATE_INDEX 1
#define SM_BALLOON_STATS_INDEX 2
#define SM_BALLOON_NUM_QUEUES 3
#define SM_BALLOON_PFN_SHIFT 12          /* balloon PFNs are 4 KiB frames */
#define SM_BALLOON_PAGE_BYTES 4096u
#define SM_BALLOON_PFN_BYTES 4
#define SM_BALLOON_STAT_ENTRY_BYTES 10   /* le16 tag + le64 value, packed */
#define SM_BALLOON_STAT_TAG_COUNT 10
#define SM_MIB_TO_4K_PAGES 256u

typedef enum sm_balloon_error {
    SM_BALLOON_ERR_NONE = 0,
    SM_BALLOON_ERR_QUEUE,
    SM_BALLOON_ERR_PFN_BUFFER_WRITABLE,
    SM_BALLOON_ERR_PFN_BUFFER_SIZE,
    SM_BALLOON_ERR_PFN_OUT_OF_RANGE,
    SM_BALLOON_ERR_STATS_BUFFER_SIZE,
    SM_BALLOON_ERR_STATS_BUFFER_WRITABLE,
    SM_BALLOON_ERR_TWO_STATS_BUFFERS,
    SM_BALLOON_ERR_DISCARD_FAILED,
    SM_BALLOON_ERR_COUNT
} sm_balloon_error;

const char *sm_balloon_error_message(int err);

typedef struct sm_balloon_counters {
    uint64_t inflate_requests;
    uint64_t inflated_pages;
    uint64_t deflate_requests;
    uint64_t deflated_pages;
    uint64_t discarded_bytes;
    uint64_t stats_updates;
    uint64_t stats_requests;
    uint64_t unknown_stat_tags;
    uint64_t target_changes;
    uint64_t errors;
} sm_balloon_counters;

typedef struct sm_balloon {
    sm_virtio_mmio *transport;   /* owner; its lock guards this struct */
    int deflate_on_oom;
    uint32_t num_pages;          /* target (config space, device -> driver) */
    uint32_t actual_pages;       /* driver -> device */
    int stats_head_held;
    uint16_t stats_head;
    uint64_t stats_present;
    uint64_t stats[SM_BALLOON_STAT_TAG_COUNT];
    uint32_t stats_interval_s;
    int timer_fd;
    sm_balloon_counters counters;
} sm_balloon;

/* What a snapshot keeps of the balloon (the transport keeps its queues). The held statistics
 * buffer goes with it: after a restore the timer hands it back as before. */
typedef struct sm_balloon_state {
    uint32_t num_pages;
    uint32_t actual_pages;
    uint32_t stats_interval_s;
    uint16_t stats_head;
    uint8_t stats_head_held;
    uint8_t deflate_on_oom;
    uint64_t stats_present;
    uint64_t stats[SM_BALLOON_STAT_TAG_COUNT];
} sm_balloon_state;

extern const sm_virtio_ops SM_BALLOON_OPS;

sm_balloon *sm_balloon_create(int deflate_on_oom, uint32_t stats_interval_s);
/* Hooks the statistics timer into the event loop (after the transport exists). */
int sm_balloon_attach(sm_balloon *b, sm_virtio_mmio *t, struct sm_event_loop *loop);
void sm_balloon_set_target(sm_balloon *b, uint32_t pages);
int sm_balloon_set_stats_interval(sm_balloon *b, uint32_t seconds);
void sm_balloon_get_stats(sm_balloon *b, sm_balloon_stats *out);

#endif
