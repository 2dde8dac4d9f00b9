/* virtio_queue.c — split virtqueue parsing with every guest value checked. */
#include "virtio_queue.h"
#include "error_table.h"

#include <string.h>

static const char *const VQ_ERROR_MESSAGES[SM_VQ_ERROR_COUNT] = {
    [SM_VQ_OK] = "ok",
    [SM_VQ_EMPTY] = "queue empty",
    [SM_VQ_ERR_NOT_READY] = "Guest used a queue that is not ready",
    [SM_VQ_ERR_SIZE_NOT_POWER_OF_TWO] = "Guest set a queue size that is not a power of two",
    [SM_VQ_ERR_SIZE_TOO_LARGE] = "Guest set a queue size above QueueNumMax",
    [SM_VQ_ERR_SIZE_ZERO] = "Guest set a queue size of zero",
    [SM_VQ_ERR_DESC_TABLE_OUT_OF_MEMORY] = "Guest placed the descriptor table outside guest RAM",
    [SM_VQ_ERR_AVAIL_RING_OUT_OF_MEMORY] = "Guest placed the available ring outside guest RAM",
    [SM_VQ_ERR_USED_RING_OUT_OF_MEMORY] = "Guest placed the used ring outside guest RAM",
    [SM_VQ_ERR_MISALIGNED_RING] = "Guest placed a ring at a misaligned address",
    [SM_VQ_ERR_AVAIL_INDEX_JUMP] = "Guest moved the available index further than the queue size",
    [SM_VQ_ERR_HEAD_OUT_OF_RANGE] = "Guest gave us a chain head index beyond the queue size",
    [SM_VQ_ERR_NEXT_OUT_OF_RANGE] = "Guest gave us a descriptor whose next index is beyond the queue size",
    [SM_VQ_ERR_DESCRIPTOR_LOOP] = "Guest gave us a descriptor chain that loops",
    [SM_VQ_ERR_CHAIN_TOO_LONG] = "Guest gave us a descriptor chain longer than we accept",
    [SM_VQ_ERR_BUFFER_OUT_OF_MEMORY] = "Guest gave us a descriptor whose buffer lies outside guest RAM",
    [SM_VQ_ERR_CHAIN_TOO_LARGE] = "Guest gave us a descriptor chain whose total length is too large",
    [SM_VQ_ERR_INDIRECT_NOT_NEGOTIATED] = "Guest used an indirect descriptor without VIRTIO_F_INDIRECT_DESC",
    [SM_VQ_ERR_READABLE_AFTER_WRITABLE] = "Guest put a device-readable descriptor after a device-writable one",
    [SM_VQ_ERR_USED_HEAD_OUT_OF_RANGE] = "Device tried to return a head beyond the queue size",
};

const char *sm_vq_error_message(int err)
{
    return sm_error_table_lookup(VQ_ERROR_MESSAGES, SM_VQ_ERROR_COUNT, err, "unknown virtqueue error");
}

void sm_vq_init(sm_virtqueue *q, const sm_guest_memory *mem, uint16_t max_size)
{
    memset(q, 0, sizeof(*q));
    q->mem = mem;
    q->max_size = max_size;
    q->size = max_size;
}

void sm_vq_reset(sm_virtqueue *q)
{
    sm_vq_init(q, q->mem, q->max_size);
}

int sm_vq_activate(sm_virtqueue *q)
{
    q->ready = 0;
    if (q->size == 0)
        return SM_VQ_ERR_SIZE_ZERO;
    if (q->size > q->max_size)
        return SM_VQ_ERR_SIZE_TOO_LARGE;
    if (q->size & (q->size - 1))
        return SM_VQ_ERR_SIZE_NOT_POWER_OF_TWO;
    if (q->desc_gpa % 16 || q->avail_gpa % 2 || q->used_gpa % 4)
        return SM_VQ_ERR_MISALIGNED_RING;
    uint64_t desc_bytes = (uint64_t)q->size * SM_VRING_DESC_BYTES;
    uint64_t avail_bytes = SM_VRING_AVAIL_HEADER_BYTES + 2ULL * q->size + 2;
    uint64_t used_bytes = SM_VRING_USED_HEADER_BYTES + (uint64_t)SM_VRING_USED_ELEM_BYTES * q->size + 2;
    q->desc = sm_memory_ptr(q->mem, q->desc_gpa, desc_bytes);
    if (!q->desc)
        return SM_VQ_ERR_DESC_TABLE_OUT_OF_MEMORY;
    q->avail = sm_memory_ptr(q->mem, q->avail_gpa, avail_bytes);
    if (!q->avail)
        return SM_VQ_ERR_AVAIL_RING_OUT_OF_MEMORY;
    q->used = sm_memory_ptr(q->mem, q->used_gpa, used_bytes);
    if (!q->used)
        return SM_VQ_ERR_USED_RING_OUT_OF_MEMORY;
    q->next_avail = 0;
    q->next_used = 0;
    q->ready = 1;
    return SM_VQ_OK;
}

void sm_vq_save(const sm_virtqueue *q, sm_vq_state *s)
{
    s->size = q->size;
    s->ready = (uint16_t)q->ready;
    s->next_avail = q->next_avail;
    s->next_used = q->next_used;
    s->desc_gpa = q->desc_gpa;
    s->avail_gpa = q->avail_gpa;
    s->used_gpa = q->used_gpa;
}

int sm_vq_restore(sm_virtqueue *q, const sm_vq_state *s)
{
    sm_vq_reset(q);
    if (s->size > q->max_size)
        return SM_VQ_ERR_SIZE_TOO_LARGE;
    q->size = s->size;
    q->desc_gpa = s->desc_gpa;
    q->avail_gpa = s->avail_gpa;
    q->used_gpa = s->used_gpa;
    if (!s->ready)
        return SM_VQ_OK;
    int rc = sm_vq_activate(q);
    if (rc != SM_VQ_OK)
        return rc;
    q->next_avail = s->next_avail;
    q->next_used = s->next_used;
    return SM_VQ_OK;
}

/* Ring fields are shared with the guest: read once, through atomics. */
static uint16_t load16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE);
}

static void store16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE);
}

int sm_vq_has_available(sm_virtqueue *q)
{
    if (!q->ready)
        return 0;
    return load16(q->avail + 2) != q->next_avail;
}

int sm_vq_pop(sm_virtqueue *q, sm_vq_chain *chain)
{
    if (!q->ready)
        return SM_VQ_ERR_NOT_READY;
    uint16_t avail_idx = load16(q->avail + 2);
    uint16_t pending = (uint16_t)(avail_idx - q->next_avail);
    if (pending == 0)
        return SM_VQ_EMPTY;
    if (pending > q->size)
        return SM_VQ_ERR_AVAIL_INDEX_JUMP;
    uint16_t head = load16(q->avail + SM_VRING_AVAIL_HEADER_BYTES + 2u * (q->next_avail % q->size));
    if (head >= q->size)
        return SM_VQ_ERR_HEAD_OUT_OF_RANGE;

    uint8_t visited[SM_VQ_MAX_SIZE / 8];
    memset(visited, 0, sizeof(visited));
    chain->head = head;
    chain->n = 0;
    chain->readable_bytes = 0;
    chain->writable_bytes = 0;
    uint64_t total = 0;
    uint16_t idx = head;
    int seen_writable = 0;
    for (;;) {
        if (visited[idx / 8] & (1u << (idx % 8)))
            return SM_VQ_ERR_DESCRIPTOR_LOOP;
        visited[idx / 8] |= (uint8_t)(1u << (idx % 8));
        if (chain->n >= SM_VQ_MAX_CHAIN_DESCRIPTORS)
            return SM_VQ_ERR_CHAIN_TOO_LONG;
        const uint8_t *d = q->desc + (size_t)idx * SM_VRING_DESC_BYTES;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & SM_VRING_DESC_F_INDIRECT)
            return SM_VQ_ERR_INDIRECT_NOT_NEGOTIATED;
        total += len;
        if (total > SM_VQ_MAX_CHAIN_BYTES)
            return SM_VQ_ERR_CHAIN_TOO_LARGE;
        uint8_t *host = sm_memory_ptr(q->mem, addr, len);
        if (!host)
            return SM_VQ_ERR_BUFFER_OUT_OF_MEMORY;
        int writable = (flags & SM_VRING_DESC_F_WRITE) != 0;
        if (!writable && seen_writable)
            return SM_VQ_ERR_READABLE_AFTER_WRITABLE;
        seen_writable |= writable;
        sm_vq_buffer *b = &chain->bufs[chain->n++];
        b->gpa = addr;
        b->len = len;
        b->host = host;
        b->device_writable = writable;
        if (writable)
            chain->writable_bytes += len;
        else
            chain->readable_bytes += len;
        if (!(flags & SM_VRING_DESC_F_NEXT))
            break;
        if (next >= q->size)
            return SM_VQ_ERR_NEXT_OUT_OF_RANGE;
        idx = next;
    }
    q->next_avail++;
    return SM_VQ_OK;
}

void sm_vq_undo_pop(sm_virtqueue *q)
{
    q->next_avail--;
}

int sm_vq_push_used(sm_virtqueue *q, uint16_t head, uint32_t written)
{
    if (!q->ready)
        return SM_VQ_ERR_NOT_READY;
    if (head >= q->size)
        return SM_VQ_ERR_USED_HEAD_OUT_OF_RANGE;
    uint8_t *elem = q->used + SM_VRING_USED_HEADER_BYTES +
                    (size_t)SM_VRING_USED_ELEM_BYTES * (q->next_used % q->size);
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &written, 4);
    q->next_used++;
    store16(q->used + 2, q->next_used); /* release: element visible before the index */
    return SM_VQ_OK;
}

uint32_t sm_vq_chain_read(const sm_vq_chain *c, uint32_t offset, void *dst, uint32_t len)
{
    uint32_t copied = 0;
    for (uint16_t i = 0; i < c->n && copied < len; i++) {
        const sm_vq_buffer *b = &c->bufs[i];
        if (b->device_writable)
            break;
        if (offset >= b->len) {
            offset -= b->len;
            continue;
        }
        uint32_t n = b->len - offset;
        if (n > len - copied)
            n = len - copied;
        memcpy((uint8_t *)dst + copied, b->host + offset, n);
        copied += n;
        offset = 0;
    }
    return copied;
}

uint32_t sm_vq_chain_write(const sm_vq_chain *c, uint32_t offset, const void *src, uint32_t len)
{
    uint32_t copied = 0;
    for (uint16_t i = 0; i < c->n && copied < len; i++) {
        const sm_vq_buffer *b = &c->bufs[i];
        if (!b->device_writable)
            continue;
        if (offset >= b->len) {
            offset -= b->len;
            continue;
        }
        uint32_t n = b->len - offset;
        if (n > len - copied)
            n = len - copied;
        memcpy(b->host + offset, (const uint8_t *)src + copied, n);
        copied += n;
        offset = 0;
    }
    return copied;
}
