/* virtio_mmio.h — virtio-mmio transport, version 2 (virtio 1.x, section 4.2). One
 * transport per device; the device (balloon, blk, vsock, fs) plugs in through sm_virtio_ops.
 * The transport is handed its interrupt line, guest memory and a reporter (device.h) when it
 * is created, and passes them on: a device reaches guest RAM through t->mem and interrupts
 * the guest through sm_virtio_mmio_signal_*_locked. The machine may also give the transport
 * doorbells (sm_virtio_doorbells: queue notifies without a vCPU exit); the devices never see
 * them: their queue_notify runs under the transport's lock whichever way the notify came. */
#ifndef SM_VIRTIO_MMIO_H
#define SM_VIRTIO_MMIO_H

#include <pthread.h>
#include <stdint.h>
#include "device.h"
#include "virtio_queue.h"
#include "../memory.h"
#include "../../include/supermachine.h"

#define SM_VIRTIO_MMIO_MAGIC_VALUE 0x74726976u /* "virt" */
#define SM_VIRTIO_MMIO_VERSION 2
#define SM_VIRTIO_MMIO_QUEUE_NOTIFY 0x050       /* register offset: a doorbell's address */
#define SM_VIRTIO_VENDOR_ID 0x554d4551u         /* "QEMU", what Linux expects nothing of */
#define SM_VIRTIO_MAX_QUEUES 4
#define SM_VIRTIO_F_VERSION_1_BIT 32
#define SM_VIRTIO_NAME_BYTES 32
#define SM_VIRTIO_BROKEN_REASON_BYTES 256
#define SM_VIRTIO_SNAPSHOT_BLOB_BYTES 256   /* room for a device's own snapshot state */
/* Device state too large for the blob (virtio-fs: its FUSE session) travels after the records,
 * at most this many bytes per device: a device whose state is larger refuses the snapshot. */
#define SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES (1024u * 1024u)

#define SM_VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define SM_VIRTIO_STATUS_DRIVER 0x02
#define SM_VIRTIO_STATUS_DRIVER_OK 0x04
#define SM_VIRTIO_STATUS_FEATURES_OK 0x08
#define SM_VIRTIO_STATUS_DEVICE_NEEDS_RESET 0x40
#define SM_VIRTIO_STATUS_FAILED 0x80

#define SM_VIRTIO_INTERRUPT_USED_RING 0x1
#define SM_VIRTIO_INTERRUPT_CONFIG_CHANGE 0x2

/* Transport named errors (device errors live with each device). */
typedef enum sm_virtio_mmio_error {
    SM_VIRTIO_MMIO_ERR_NONE = 0,
    SM_VIRTIO_MMIO_ERR_BAD_ACCESS_SIZE,
    SM_VIRTIO_MMIO_ERR_QUEUE_SELECT_OUT_OF_RANGE,
    SM_VIRTIO_MMIO_ERR_QUEUE_CHANGED_WHILE_READY,
    SM_VIRTIO_MMIO_ERR_FEATURES_WITHOUT_VERSION_1,
    SM_VIRTIO_MMIO_ERR_UNOFFERED_FEATURES,
    SM_VIRTIO_MMIO_ERR_STATUS_SEQUENCE,
    SM_VIRTIO_MMIO_ERR_NOTIFY_BEFORE_DRIVER_OK,
    SM_VIRTIO_MMIO_ERR_NOTIFY_QUEUE_OUT_OF_RANGE,
    SM_VIRTIO_MMIO_ERR_QUEUE_INVALID,
    SM_VIRTIO_MMIO_ERR_COUNT
} sm_virtio_mmio_error;

const char *sm_virtio_mmio_error_message(int err);

typedef struct sm_virtio_mmio_counters {
    uint64_t register_reads;
    uint64_t register_writes;
    uint64_t queue_notifications;
    uint64_t interrupts_used_ring;
    uint64_t interrupts_config;
    uint64_t bad_register_accesses;   /* unknown offsets, wrong sizes: answered and counted */
    uint64_t resets;
    uint64_t activations;
    uint64_t feature_negotiation_failures;
    uint64_t notifications_while_broken;
    uint64_t doorbell_notifications;  /* of queue_notifications: rung without a vCPU exit */
    uint64_t stale_doorbells;         /* rung before the queue stopped being live: dropped */
} sm_virtio_mmio_counters;

/* Doorbells: a machine that can take a QueueNotify write without a vCPU exit to the VMM
 * (KVM's ioeventfd: a 4-byte write of the queue's index at QueueNotify) offers these. The
 * transport arms a queue's doorbell while the queue is live (after DRIVER_OK, ready, device
 * not broken) and disarms it before that changes, taking any ring first; the machine calls
 * sm_virtio_mmio_doorbell when one may have rung. Every other write to QueueNotify (another
 * value, another size, a queue not live) still exits and is handled as an MMIO write. */
typedef struct sm_virtio_doorbells {
    int (*arm)(void *ctx, uint16_t queue);      /* 0, or -1: that queue keeps the MMIO exit */
    void (*disarm)(void *ctx, uint16_t queue);
    int (*take)(void *ctx, uint16_t queue);     /* 1 if it rang since last taken (consumes) */
    void *ctx;
} sm_virtio_doorbells;

struct sm_virtio_mmio;

typedef struct sm_virtio_ops {
    uint32_t device_id;
    uint16_t num_queues;
    uint64_t (*device_features)(void *dev);
    void (*config_read)(void *dev, uint32_t offset, uint8_t *data, uint32_t len);
    void (*config_write)(void *dev, uint32_t offset, const uint8_t *data, uint32_t len);
    /* Called with the transport lock held, after DRIVER_OK. */
    void (*activate)(void *dev);
    void (*queue_notify)(void *dev, uint16_t queue);
    void (*reset)(void *dev);
    /* Adds device counters to info (names + values) starting at *n. */
    void (*counters)(void *dev, sm_device_info *info, uint32_t *n);
    void (*destroy)(void *dev);
    /* Snapshots, called with the transport lock held. snapshot_refusal: NULL (or a NULL
     * answer) if the device can be snapshotted, else why not; such a device has no save and
     * restore. save writes the device's own state into buf if it fits in cap and returns its
     * size (like snprintf). restore runs after the transport and its queues are restored;
     * 0, or -1 with err saying what in the snapshot or the new host side does not fit. */
    const char *(*snapshot_refusal)(void *dev);
    size_t (*save)(void *dev, uint8_t *buf, size_t cap);
    int (*restore)(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len);
    /* Optional: state of variable size that does not fit the blob. save_extra sets *buf
     * (malloc'd, the caller frees; NULL with *len 0 for none) and *len, at most
     * SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES; 0, or -1 with err. restore_extra runs right after
     * restore with the bytes save_extra wrote (untrusted: a snapshot is input); 0, or -1. */
    int (*save_extra)(void *dev, uint8_t **buf, size_t *len, char *err, size_t err_len);
    int (*restore_extra)(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len);
} sm_virtio_ops;

/* What a snapshot keeps of one virtio-mmio device: the transport registers, every queue
 * and the device's own state (blob, written by ops->save). Fixed size: one per device; its
 * extra state (ops->save_extra), extra_len bytes, follows all the records (snapshot.h). */
typedef struct sm_virtio_mmio_state {
    char name[SM_VIRTIO_NAME_BYTES];
    uint32_t device_id;
    uint32_t n_queues;
    uint32_t device_features_sel;
    uint32_t driver_features_sel;
    uint64_t driver_features;
    uint64_t acked_features;
    uint32_t queue_sel;
    uint32_t status;
    uint32_t interrupt_status;
    uint32_t config_generation;
    uint32_t activated;
    uint32_t broken;
    char broken_reason[SM_VIRTIO_BROKEN_REASON_BYTES];
    sm_vq_state queues[SM_VIRTIO_MAX_QUEUES];
    uint32_t blob_len;
    uint32_t extra_len;
    uint8_t blob[SM_VIRTIO_SNAPSHOT_BLOB_BYTES];
} sm_virtio_mmio_state;

typedef struct sm_virtio_mmio {
    char name[SM_VIRTIO_NAME_BYTES];
    uint64_t base_gpa;
    sm_irq_line irq;
    const sm_guest_memory *mem;   /* guest RAM, for the queues and the device */
    sm_device_reporter reporter;  /* told when the device breaks */
    pthread_mutex_t lock;   /* the transport and the device state behind it */
    const sm_virtio_ops *ops;
    void *dev;

    uint32_t device_features_sel;
    uint32_t driver_features_sel;
    uint64_t driver_features;
    uint64_t acked_features;   /* valid after FEATURES_OK */
    uint32_t queue_sel;
    uint32_t status;
    uint32_t interrupt_status;
    uint32_t config_generation;
    int activated;
    sm_virtqueue queues[SM_VIRTIO_MAX_QUEUES];
    sm_virtio_doorbells doorbells;   /* all NULL: every notify is an MMIO exit */
    uint32_t doorbells_armed;        /* bit per queue */

    int broken;
    char broken_reason[SM_VIRTIO_BROKEN_REASON_BYTES];
    sm_virtio_mmio_counters counters;
} sm_virtio_mmio;

sm_virtio_mmio *sm_virtio_mmio_create(const char *name, uint64_t base_gpa, const sm_virtio_ops *ops,
                                      void *dev, const sm_guest_memory *mem, sm_irq_line irq,
                                      sm_device_reporter reporter);
void sm_virtio_mmio_destroy(sm_virtio_mmio *t);
void sm_virtio_mmio_access(sm_virtio_mmio *t, uint64_t offset, uint8_t *data, uint32_t len,
                           int is_write);

/* Before the guest runs: the machine's doorbells for this transport's queues. */
void sm_virtio_mmio_set_doorbells(sm_virtio_mmio *t, sm_virtio_doorbells doorbells);
/* From the machine, when queue's doorbell may have rung: takes the ring under the lock and
 * handles it as the guest's QueueNotify write would have been. */
void sm_virtio_mmio_doorbell(sm_virtio_mmio *t, uint16_t queue);

/* For devices, with t->lock held: */
void sm_virtio_mmio_signal_used_locked(sm_virtio_mmio *t);
void sm_virtio_mmio_signal_config_locked(sm_virtio_mmio *t);
/* Mark the device broken (first reason wins), set DEVICE_NEEDS_RESET, stop processing, tell
 * the reporter. */
void sm_virtio_mmio_mark_broken_locked(sm_virtio_mmio *t, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
int sm_virtio_mmio_is_live_locked(const sm_virtio_mmio *t);

void sm_virtio_mmio_info(sm_virtio_mmio *t, sm_device_info *out);

/* Snapshots. refusal: why this device cannot be snapshotted, or NULL. save: the record and
 * the device's extra state (*extra malloc'd or NULL, s->extra_len its length; the caller
 * frees it), 0, or -1 with err. state_check: a record's own consistency (strings terminated,
 * counts and lengths within bounds), before anything trusts it; NULL or what is wrong.
 * restore: the record and its extra_len bytes of extra state into a device of the same kind;
 * 0, or -1 with err starting with the device name. */
const char *sm_virtio_mmio_snapshot_refusal(sm_virtio_mmio *t);
int sm_virtio_mmio_save(sm_virtio_mmio *t, sm_virtio_mmio_state *s, uint8_t **extra, char *err,
                        size_t err_len);
const char *sm_virtio_mmio_state_check(const sm_virtio_mmio_state *s);
int sm_virtio_mmio_restore(sm_virtio_mmio *t, const sm_virtio_mmio_state *s, const uint8_t *extra,
                           char *err, size_t err_len);

#endif
