/* virtio_mmio.c — the virtio-mmio v2 register file, status state machine, feature
 * negotiation, queue setup and notification dispatch. */
#define _GNU_SOURCE
#include "virtio_mmio.h"
#include "error_table.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REG_MAGIC_VALUE 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_VENDOR_ID 0x00c
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY SM_VIRTIO_MMIO_QUEUE_NOTIFY
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_SHM_SEL 0x0ac
#define REG_CONFIG_GENERATION 0x0fc
#define REG_CONFIG_SPACE 0x100
#define REG_ACCESS_BYTES 4

static const char *const MMIO_ERROR_MESSAGES[SM_VIRTIO_MMIO_ERR_COUNT] = {
    [SM_VIRTIO_MMIO_ERR_NONE] = "ok",
    [SM_VIRTIO_MMIO_ERR_BAD_ACCESS_SIZE] = "Guest accessed a transport register with a size other than 4 bytes",
    [SM_VIRTIO_MMIO_ERR_QUEUE_SELECT_OUT_OF_RANGE] = "Guest configured a queue the device does not have",
    [SM_VIRTIO_MMIO_ERR_QUEUE_CHANGED_WHILE_READY] = "Guest changed a queue's size or address while it was ready",
    [SM_VIRTIO_MMIO_ERR_FEATURES_WITHOUT_VERSION_1] = "Guest did not accept VIRTIO_F_VERSION_1",
    [SM_VIRTIO_MMIO_ERR_UNOFFERED_FEATURES] = "Guest accepted features the device did not offer",
    [SM_VIRTIO_MMIO_ERR_STATUS_SEQUENCE] = "Guest set DRIVER_OK without FEATURES_OK",
    [SM_VIRTIO_MMIO_ERR_NOTIFY_BEFORE_DRIVER_OK] = "Guest notified a queue before DRIVER_OK",
    [SM_VIRTIO_MMIO_ERR_NOTIFY_QUEUE_OUT_OF_RANGE] = "Guest notified a queue the device does not have",
    [SM_VIRTIO_MMIO_ERR_QUEUE_INVALID] = "Guest made a queue ready with an invalid layout",
};

const char *sm_virtio_mmio_error_message(int err)
{
    return sm_error_table_lookup(MMIO_ERROR_MESSAGES, SM_VIRTIO_MMIO_ERR_COUNT, err, "unknown virtio-mmio error");
}

sm_virtio_mmio *sm_virtio_mmio_create(const char *name, uint64_t base_gpa, const sm_virtio_ops *ops,
                                      void *dev, const sm_guest_memory *mem, sm_irq_line irq,
                                      sm_device_reporter reporter)
{
    sm_virtio_mmio *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->base_gpa = base_gpa;
    t->irq = irq;
    t->mem = mem;
    t->reporter = reporter;
    t->ops = ops;
    t->dev = dev;
    pthread_mutex_init(&t->lock, NULL);
    for (uint16_t i = 0; i < SM_VIRTIO_MAX_QUEUES; i++)
        sm_vq_init(&t->queues[i], mem, i < ops->num_queues ? SM_VQ_MAX_SIZE : 0);
    return t;
}

void sm_virtio_mmio_destroy(sm_virtio_mmio *t)
{
    if (!t)
        return;
    if (t->ops->destroy)
        t->ops->destroy(t->dev);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

void sm_virtio_mmio_signal_used_locked(sm_virtio_mmio *t)
{
    t->interrupt_status |= SM_VIRTIO_INTERRUPT_USED_RING;
    t->counters.interrupts_used_ring++;
    sm_irq_line_pulse(&t->irq);
}

void sm_virtio_mmio_signal_config_locked(sm_virtio_mmio *t)
{
    t->config_generation++;
    t->interrupt_status |= SM_VIRTIO_INTERRUPT_CONFIG_CHANGE;
    t->counters.interrupts_config++;
    if (t->status & SM_VIRTIO_STATUS_DRIVER_OK)
        sm_irq_line_pulse(&t->irq);
}

static void sync_doorbells_locked(sm_virtio_mmio *t);

void sm_virtio_mmio_mark_broken_locked(sm_virtio_mmio *t, const char *fmt, ...)
{
    if (t->broken)
        return;
    t->broken = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->broken_reason, sizeof(t->broken_reason), fmt, ap);
    va_end(ap);
    t->status |= SM_VIRTIO_STATUS_DEVICE_NEEDS_RESET;
    sync_doorbells_locked(t);   /* a broken device's notifies exit again and are counted */
    sm_device_report_broken(&t->reporter, t->name, t->broken_reason);
    sm_virtio_mmio_signal_config_locked(t);
}

int sm_virtio_mmio_is_live_locked(const sm_virtio_mmio *t)
{
    return !t->broken && t->activated;
}

static void reset_locked(sm_virtio_mmio *t)
{
    if (t->ops->reset)
        t->ops->reset(t->dev);
    for (uint16_t i = 0; i < SM_VIRTIO_MAX_QUEUES; i++)
        sm_vq_reset(&t->queues[i]);
    t->device_features_sel = 0;
    t->driver_features_sel = 0;
    t->driver_features = 0;
    t->acked_features = 0;
    t->queue_sel = 0;
    t->status = t->broken ? SM_VIRTIO_STATUS_DEVICE_NEEDS_RESET : 0;
    t->interrupt_status = 0;
    t->activated = 0;
    t->counters.resets++;
}

static uint64_t offered_features(sm_virtio_mmio *t)
{
    return t->ops->device_features(t->dev) | (1ULL << SM_VIRTIO_F_VERSION_1_BIT);
}

static void write_status_locked(sm_virtio_mmio *t, uint32_t v)
{
    if (v == 0) {
        reset_locked(t);
        return;
    }
    uint32_t needs_reset = t->status & SM_VIRTIO_STATUS_DEVICE_NEEDS_RESET;
    if ((v & SM_VIRTIO_STATUS_FEATURES_OK) && !(t->status & SM_VIRTIO_STATUS_FEATURES_OK)) {
        uint64_t offered = offered_features(t);
        if (!(t->driver_features & (1ULL << SM_VIRTIO_F_VERSION_1_BIT)) ||
            (t->driver_features & ~offered)) {
            /* Leave FEATURES_OK clear: the driver reads it back and gives up (spec 3.1.1). */
            t->counters.feature_negotiation_failures++;
            v &= ~(uint32_t)SM_VIRTIO_STATUS_FEATURES_OK;
        } else {
            t->acked_features = t->driver_features;
        }
    }
    if ((v & SM_VIRTIO_STATUS_DRIVER_OK) && !(v & SM_VIRTIO_STATUS_FEATURES_OK)) {
        sm_virtio_mmio_mark_broken_locked(t, "%s",
                                          MMIO_ERROR_MESSAGES[SM_VIRTIO_MMIO_ERR_STATUS_SEQUENCE]);
        t->status = v | SM_VIRTIO_STATUS_DEVICE_NEEDS_RESET;
        return;
    }
    int activate = (v & SM_VIRTIO_STATUS_DRIVER_OK) && !(t->status & SM_VIRTIO_STATUS_DRIVER_OK);
    t->status = v | needs_reset;
    if (activate && !t->broken) {
        t->activated = 1;
        t->counters.activations++;
        if (t->ops->activate)
            t->ops->activate(t->dev);
    }
}

static sm_virtqueue *selected_queue(sm_virtio_mmio *t)
{
    if (t->queue_sel >= t->ops->num_queues)
        return NULL;
    return &t->queues[t->queue_sel];
}

static void set_queue_field_locked(sm_virtio_mmio *t, uint32_t reg, uint32_t v)
{
    sm_virtqueue *q = selected_queue(t);
    if (!q) {
        t->counters.bad_register_accesses++;
        return;
    }
    if (q->ready) {
        sm_virtio_mmio_mark_broken_locked(
            t, "%s (queue %u)", MMIO_ERROR_MESSAGES[SM_VIRTIO_MMIO_ERR_QUEUE_CHANGED_WHILE_READY],
            t->queue_sel);
        return;
    }
    switch (reg) {
    case REG_QUEUE_NUM: q->size = v > 0xffff ? 0xffff : (uint16_t)v; break; /* checked on QueueReady */
    case REG_QUEUE_DESC_LOW: q->desc_gpa = (q->desc_gpa & ~0xffffffffULL) | v; break;
    case REG_QUEUE_DESC_HIGH: q->desc_gpa = (q->desc_gpa & 0xffffffffULL) | ((uint64_t)v << 32); break;
    case REG_QUEUE_DRIVER_LOW: q->avail_gpa = (q->avail_gpa & ~0xffffffffULL) | v; break;
    case REG_QUEUE_DRIVER_HIGH: q->avail_gpa = (q->avail_gpa & 0xffffffffULL) | ((uint64_t)v << 32); break;
    case REG_QUEUE_DEVICE_LOW: q->used_gpa = (q->used_gpa & ~0xffffffffULL) | v; break;
    case REG_QUEUE_DEVICE_HIGH: q->used_gpa = (q->used_gpa & 0xffffffffULL) | ((uint64_t)v << 32); break;
    default: break;
    }
}

static void write_queue_ready_locked(sm_virtio_mmio *t, uint32_t v)
{
    sm_virtqueue *q = selected_queue(t);
    if (!q) {
        t->counters.bad_register_accesses++;
        return;
    }
    if (v == 0) {
        q->ready = 0;
        return;
    }
    if (q->ready)
        return;
    int rc = sm_vq_activate(q);
    if (rc != SM_VQ_OK)
        sm_virtio_mmio_mark_broken_locked(t, "%s: queue %u: %s (size %u, desc 0x%llx, avail 0x%llx, used 0x%llx)",
                                          MMIO_ERROR_MESSAGES[SM_VIRTIO_MMIO_ERR_QUEUE_INVALID],
                                          t->queue_sel, sm_vq_error_message(rc), q->size,
                                          (unsigned long long)q->desc_gpa,
                                          (unsigned long long)q->avail_gpa,
                                          (unsigned long long)q->used_gpa);
}

static void notify_locked(sm_virtio_mmio *t, uint32_t queue)
{
    t->counters.queue_notifications++;
    if (t->broken) {
        t->counters.notifications_while_broken++;
        return;
    }
    if (queue >= t->ops->num_queues) {
        sm_virtio_mmio_mark_broken_locked(
            t, "%s (queue %u)", MMIO_ERROR_MESSAGES[SM_VIRTIO_MMIO_ERR_NOTIFY_QUEUE_OUT_OF_RANGE], queue);
        return;
    }
    if (!t->activated)
        return; /* buffers are looked at on DRIVER_OK */
    if (!t->queues[queue].ready) {
        sm_virtio_mmio_mark_broken_locked(t, "%s (queue %u)", sm_vq_error_message(SM_VQ_ERR_NOT_READY), queue);
        return;
    }
    t->ops->queue_notify(t->dev, (uint16_t)queue);
}

/* ---- doorbells (sm_virtio_doorbells) ------------------------------------------------ */

static int queue_live_locked(const sm_virtio_mmio *t, uint16_t queue)
{
    return queue < t->ops->num_queues && t->activated && !t->broken && t->queues[queue].ready;
}

/* A doorbell that rang: what the guest's QueueNotify write would have done, unless the queue
 * stopped being live since (a ring the event loop took just before a reset or QueueReady=0:
 * dropped, as the guest's own teardown drops its buffers). */
static void ring_locked(sm_virtio_mmio *t, uint16_t queue)
{
    if (t->broken || queue_live_locked(t, queue)) {
        t->counters.doorbell_notifications++;
        notify_locked(t, queue);
    } else {
        t->counters.stale_doorbells++;
    }
}

/* Arm the doorbell of every live queue, disarm the others. */
static void sync_doorbells_locked(sm_virtio_mmio *t)
{
    if (!t->doorbells.arm)
        return;
    for (uint16_t q = 0; q < t->ops->num_queues; q++) {
        uint32_t bit = 1u << q;
        int live = queue_live_locked(t, q);
        if (live && !(t->doorbells_armed & bit)) {
            if (t->doorbells.arm(t->doorbells.ctx, q) == 0)
                t->doorbells_armed |= bit;
        } else if (!live && (t->doorbells_armed & bit)) {
            t->doorbells_armed &= ~bit;
            t->doorbells.disarm(t->doorbells.ctx, q);
        }
    }
}

/* Handle every ring not yet taken, doorbells staying armed (a snapshot must not miss one). */
static void take_rings_locked(sm_virtio_mmio *t)
{
    for (uint16_t q = 0; q < t->ops->num_queues; q++)
        if ((t->doorbells_armed & (1u << q)) && t->doorbells.take(t->doorbells.ctx, q))
            ring_locked(t, q);
}

/* Before a write that may change which queues are live: disarm every doorbell (later
 * notifies exit), then handle what rang before it, in the guest's order: notify, then the
 * write. */
static void quiesce_doorbells_locked(sm_virtio_mmio *t)
{
    for (uint16_t q = 0; q < t->ops->num_queues; q++) {
        uint32_t bit = 1u << q;
        if (!(t->doorbells_armed & bit))
            continue;
        t->doorbells_armed &= ~bit;
        t->doorbells.disarm(t->doorbells.ctx, q);
        if (t->doorbells.take(t->doorbells.ctx, q))
            ring_locked(t, q);
    }
}

void sm_virtio_mmio_set_doorbells(sm_virtio_mmio *t, sm_virtio_doorbells doorbells)
{
    pthread_mutex_lock(&t->lock);
    if (doorbells.arm && doorbells.disarm && doorbells.take)
        t->doorbells = doorbells;
    sync_doorbells_locked(t);
    pthread_mutex_unlock(&t->lock);
}

void sm_virtio_mmio_doorbell(sm_virtio_mmio *t, uint16_t queue)
{
    pthread_mutex_lock(&t->lock);
    if (t->doorbells.take && queue < t->ops->num_queues && t->doorbells.take(t->doorbells.ctx, queue))
        ring_locked(t, queue);
    pthread_mutex_unlock(&t->lock);
}

static uint32_t read_register_locked(sm_virtio_mmio *t, uint64_t offset)
{
    sm_virtqueue *q;
    switch (offset) {
    case REG_MAGIC_VALUE: return SM_VIRTIO_MMIO_MAGIC_VALUE;
    case REG_VERSION: return SM_VIRTIO_MMIO_VERSION;
    case REG_DEVICE_ID: return t->ops->device_id;
    case REG_VENDOR_ID: return SM_VIRTIO_VENDOR_ID;
    case REG_DEVICE_FEATURES:
        if (t->device_features_sel > 1)
            return 0;
        return (uint32_t)(offered_features(t) >> (32 * t->device_features_sel));
    case REG_QUEUE_NUM_MAX:
        q = selected_queue(t);
        return q ? q->max_size : 0;
    case REG_QUEUE_READY:
        q = selected_queue(t);
        return q ? (uint32_t)q->ready : 0;
    case REG_INTERRUPT_STATUS: return t->interrupt_status;
    case REG_STATUS: return t->status;
    case REG_CONFIG_GENERATION: return t->config_generation;
    case REG_SHM_SEL + 4: /* SHMLenLow/High: no shared memory regions */
    case REG_SHM_SEL + 8:
        return 0xffffffffu;
    default:
        t->counters.bad_register_accesses++;
        return 0;
    }
}

static void write_register_locked(sm_virtio_mmio *t, uint64_t offset, uint32_t v)
{
    switch (offset) {
    case REG_DEVICE_FEATURES_SEL: t->device_features_sel = v; break;
    case REG_DRIVER_FEATURES:
        if (t->status & SM_VIRTIO_STATUS_FEATURES_OK) {
            t->counters.bad_register_accesses++;
        } else if (t->driver_features_sel == 0) {
            t->driver_features = (t->driver_features & ~0xffffffffULL) | v;
        } else if (t->driver_features_sel == 1) {
            t->driver_features = (t->driver_features & 0xffffffffULL) | ((uint64_t)v << 32);
        } else if (v) {
            t->driver_features |= 1ULL << 63; /* unofferable: fails FEATURES_OK */
        }
        break;
    case REG_DRIVER_FEATURES_SEL: t->driver_features_sel = v; break;
    case REG_QUEUE_SEL: t->queue_sel = v; break;
    case REG_QUEUE_NUM:
    case REG_QUEUE_DESC_LOW:
    case REG_QUEUE_DESC_HIGH:
    case REG_QUEUE_DRIVER_LOW:
    case REG_QUEUE_DRIVER_HIGH:
    case REG_QUEUE_DEVICE_LOW:
    case REG_QUEUE_DEVICE_HIGH:
        set_queue_field_locked(t, (uint32_t)offset, v);
        break;
    case REG_QUEUE_READY:
        quiesce_doorbells_locked(t);
        write_queue_ready_locked(t, v);
        sync_doorbells_locked(t);
        break;
    case REG_QUEUE_NOTIFY: notify_locked(t, v); break;
    case REG_INTERRUPT_ACK: t->interrupt_status &= ~v; break;
    case REG_STATUS:
        quiesce_doorbells_locked(t);
        write_status_locked(t, v);
        sync_doorbells_locked(t);
        break;
    case REG_SHM_SEL: break;
    default: t->counters.bad_register_accesses++; break;
    }
}

void sm_virtio_mmio_access(sm_virtio_mmio *t, uint64_t offset, uint8_t *data, uint32_t len,
                           int is_write)
{
    pthread_mutex_lock(&t->lock);
    if (is_write)
        t->counters.register_writes++;
    else
        t->counters.register_reads++;
    if (offset >= REG_CONFIG_SPACE) {
        uint32_t off = (uint32_t)(offset - REG_CONFIG_SPACE);
        if (is_write) {
            if (t->ops->config_write)
                t->ops->config_write(t->dev, off, data, len);
        } else {
            memset(data, 0, len);
            if (t->ops->config_read)
                t->ops->config_read(t->dev, off, data, len);
        }
    } else if (len != REG_ACCESS_BYTES || offset % REG_ACCESS_BYTES) {
        t->counters.bad_register_accesses++;
        if (!is_write)
            memset(data, 0, len);
    } else if (is_write) {
        uint32_t v;
        memcpy(&v, data, 4);
        write_register_locked(t, offset, v);
    } else {
        uint32_t v = read_register_locked(t, offset);
        memcpy(data, &v, 4);
    }
    pthread_mutex_unlock(&t->lock);
}

void sm_virtio_mmio_info(sm_virtio_mmio *t, sm_device_info *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&t->lock);
    snprintf(out->name, sizeof(out->name), "%s", t->name);
    out->virtio_device_id = t->ops->device_id;
    out->mmio_base = t->base_gpa;
    out->irq = t->irq.gsi;
    out->broken = t->broken;
    snprintf(out->broken_reason, sizeof(out->broken_reason), "%s", t->broken_reason);
    out->driver_status = t->status;
    uint32_t n = 0;
#define SM_ADD_COUNTER(field)                                                             \
    do {                                                                                  \
        snprintf(out->counter_names[n], sizeof(out->counter_names[n]), "%s", #field);     \
        out->counters[n++] = t->counters.field;                                           \
    } while (0)
    SM_ADD_COUNTER(register_reads);
    SM_ADD_COUNTER(register_writes);
    SM_ADD_COUNTER(queue_notifications);
    SM_ADD_COUNTER(interrupts_used_ring);
    SM_ADD_COUNTER(interrupts_config);
    SM_ADD_COUNTER(bad_register_accesses);
    SM_ADD_COUNTER(resets);
    SM_ADD_COUNTER(activations);
    SM_ADD_COUNTER(feature_negotiation_failures);
    SM_ADD_COUNTER(notifications_while_broken);
    SM_ADD_COUNTER(doorbell_notifications);
    SM_ADD_COUNTER(stale_doorbells);
#undef SM_ADD_COUNTER
    if (t->ops->counters)
        t->ops->counters(t->dev, out, &n);
    pthread_mutex_unlock(&t->lock);
}

/* ---- snapshots ---------------------------------------------------------------------- */

const char *sm_virtio_mmio_snapshot_refusal(sm_virtio_mmio *t)
{
    if (!t->ops->snapshot_refusal)
        return NULL;
    pthread_mutex_lock(&t->lock);
    const char *why = t->ops->snapshot_refusal(t->dev);
    pthread_mutex_unlock(&t->lock);
    return why;
}

int sm_virtio_mmio_save(sm_virtio_mmio *t, sm_virtio_mmio_state *s, uint8_t **extra, char *err,
                        size_t err_len)
{
    memset(s, 0, sizeof(*s));
    *extra = NULL;
    pthread_mutex_lock(&t->lock);
    take_rings_locked(t);   /* a notify the guest made before the pause is in the snapshot */
    snprintf(s->name, sizeof(s->name), "%s", t->name);
    s->device_id = t->ops->device_id;
    s->n_queues = t->ops->num_queues;
    s->device_features_sel = t->device_features_sel;
    s->driver_features_sel = t->driver_features_sel;
    s->driver_features = t->driver_features;
    s->acked_features = t->acked_features;
    s->queue_sel = t->queue_sel;
    s->status = t->status;
    s->interrupt_status = t->interrupt_status;
    s->config_generation = t->config_generation;
    s->activated = (uint32_t)t->activated;
    s->broken = (uint32_t)t->broken;
    snprintf(s->broken_reason, sizeof(s->broken_reason), "%s", t->broken_reason);
    for (uint16_t i = 0; i < t->ops->num_queues; i++)
        sm_vq_save(&t->queues[i], &s->queues[i]);
    size_t blob_len = t->ops->save(t->dev, s->blob, sizeof(s->blob));
    size_t extra_len = 0;
    char device_err[SM_ERROR_MESSAGE_BYTES] = "";
    int extra_rc = t->ops->save_extra
                       ? t->ops->save_extra(t->dev, extra, &extra_len, device_err, sizeof(device_err))
                       : 0;
    pthread_mutex_unlock(&t->lock);
    if (extra_rc < 0 || blob_len > sizeof(s->blob) || extra_len > SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES) {
        if (extra_rc < 0)
            snprintf(err, err_len, "%s: %s", t->name, device_err);
        else if (blob_len > sizeof(s->blob))
            snprintf(err, err_len, "%s: device state of %zu bytes exceeds the %zu a snapshot "
                     "record holds", t->name, blob_len, sizeof(s->blob));
        else
            snprintf(err, err_len, "%s: device state of %zu bytes exceeds the %u a snapshot "
                     "holds per device", t->name, extra_len, SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES);
        free(*extra);
        *extra = NULL;
        return -1;
    }
    s->blob_len = (uint32_t)blob_len;
    s->extra_len = (uint32_t)extra_len;
    return 0;
}

const char *sm_virtio_mmio_state_check(const sm_virtio_mmio_state *s)
{
    if (!memchr(s->name, 0, sizeof(s->name)))
        return "device name is not NUL-terminated";
    if (!memchr(s->broken_reason, 0, sizeof(s->broken_reason)))
        return "broken reason is not NUL-terminated";
    if (s->n_queues > SM_VIRTIO_MAX_QUEUES)
        return "queue count above the record's 4 queues";
    for (uint32_t i = 0; i < s->n_queues; i++)
        if (s->queues[i].ready > 1)
            return "queue ready flag is neither 0 nor 1";
    if (s->blob_len > sizeof(s->blob))
        return "device state length above the record's capacity";
    if (s->extra_len > SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES)
        return "extra device state length above the limit";
    return NULL;
}

int sm_virtio_mmio_restore(sm_virtio_mmio *t, const sm_virtio_mmio_state *s, const uint8_t *extra,
                           char *err, size_t err_len)
{
    const char *refusal = sm_virtio_mmio_snapshot_refusal(t);
    if (refusal) {
        snprintf(err, err_len, "%s cannot be restored: %s", t->name, refusal);
        return -1;
    }
    if (s->extra_len && !t->ops->restore_extra) {
        snprintf(err, err_len, "%s: the snapshot has %u bytes of extra state, the device keeps none",
                 t->name, s->extra_len);
        return -1;
    }
    if (s->n_queues != t->ops->num_queues) {
        snprintf(err, err_len, "%s: the snapshot has %u queues, the device %u", t->name,
                 s->n_queues, t->ops->num_queues);
        return -1;
    }
    pthread_mutex_lock(&t->lock);
    int rc = -1;
    for (uint16_t i = 0; i < t->ops->num_queues; i++) {
        const sm_vq_state *q = &s->queues[i];
        int vq_rc = sm_vq_restore(&t->queues[i], q);
        if (vq_rc != SM_VQ_OK) {
            snprintf(err, err_len, "%s: queue %u: %s (size %u, max %u, desc 0x%llx, avail 0x%llx, "
                     "used 0x%llx)", t->name, i, sm_vq_error_message(vq_rc), q->size,
                     t->queues[i].max_size, (unsigned long long)q->desc_gpa,
                     (unsigned long long)q->avail_gpa, (unsigned long long)q->used_gpa);
            goto out;
        }
    }
    t->device_features_sel = s->device_features_sel;
    t->driver_features_sel = s->driver_features_sel;
    t->driver_features = s->driver_features;
    t->acked_features = s->acked_features;
    t->queue_sel = s->queue_sel;
    t->status = s->status;
    t->interrupt_status = s->interrupt_status;
    t->config_generation = s->config_generation;
    t->activated = s->activated != 0;
    t->broken = s->broken != 0;
    snprintf(t->broken_reason, sizeof(t->broken_reason), "%s", s->broken_reason);
    char device_err[SM_ERROR_MESSAGE_BYTES];
    if (t->ops->restore(t->dev, s->blob, s->blob_len, device_err, sizeof(device_err)) < 0 ||
        (t->ops->restore_extra &&
         t->ops->restore_extra(t->dev, extra, s->extra_len, device_err, sizeof(device_err)) < 0)) {
        snprintf(err, err_len, "%s: %s", t->name, device_err);
        goto out;
    }
    /* After the device's own checks, which name the setting that differs. */
    uint64_t unoffered = s->acked_features & ~offered_features(t);
    if (unoffered) {
        snprintf(err, err_len, "%s: the guest accepted features 0x%llx this device does not offer "
                 "(a different device configuration)", t->name, (unsigned long long)unoffered);
        goto out;
    }
    rc = 0;
    sync_doorbells_locked(t);   /* host-side kernel objects: armed anew for the live queues */
out:
    pthread_mutex_unlock(&t->lock);
    return rc;
}
