/* virtio_queue.h — split virtqueues (virtio 1.x, section 2.7) as seen by the device.
 * Everything read from the rings is guest input: each descriptor is bounds-checked
 * against guest RAM, chains are checked for loops and length, indexes for range. */
#ifndef SM_VIRTIO_QUEUE_H
#define SM_VIRTIO_QUEUE_H

#include <stdint.h>
#include "../memory.h"

#define SM_VQ_MAX_SIZE 256                 /* QueueNumMax we offer */
#define SM_VQ_MAX_CHAIN_DESCRIPTORS 64     /* longest chain we accept */
#define SM_VQ_MAX_CHAIN_BYTES (64u * 1024u * 1024u) /* total buffer bytes per chain */

#define SM_VRING_DESC_F_NEXT 1
#define SM_VRING_DESC_F_WRITE 2
#define SM_VRING_DESC_F_INDIRECT 4
#define SM_VRING_DESC_BYTES 16
#define SM_VRING_AVAIL_HEADER_BYTES 4
#define SM_VRING_USED_HEADER_BYTES 4
#define SM_VRING_USED_ELEM_BYTES 8

/* Named errors; sm_vq_error_message() gives the sentence. */
typedef enum sm_vq_error {
    SM_VQ_OK = 0,
    SM_VQ_EMPTY = 1,
    SM_VQ_ERR_NOT_READY,
    SM_VQ_ERR_SIZE_NOT_POWER_OF_TWO,
    SM_VQ_ERR_SIZE_TOO_LARGE,
    SM_VQ_ERR_SIZE_ZERO,
    SM_VQ_ERR_DESC_TABLE_OUT_OF_MEMORY,
    SM_VQ_ERR_AVAIL_RING_OUT_OF_MEMORY,
    SM_VQ_ERR_USED_RING_OUT_OF_MEMORY,
    SM_VQ_ERR_MISALIGNED_RING,
    SM_VQ_ERR_AVAIL_INDEX_JUMP,
    SM_VQ_ERR_HEAD_OUT_OF_RANGE,
    SM_VQ_ERR_NEXT_OUT_OF_RANGE,
    SM_VQ_ERR_DESCRIPTOR_LOOP,
    SM_VQ_ERR_CHAIN_TOO_LONG,
    SM_VQ_ERR_BUFFER_OUT_OF_MEMORY,
    SM_VQ_ERR_CHAIN_TOO_LARGE,
    SM_VQ_ERR_INDIRECT_NOT_NEGOTIATED,
    SM_VQ_ERR_READABLE_AFTER_WRITABLE,
    SM_VQ_ERR_USED_HEAD_OUT_OF_RANGE,
    SM_VQ_ERROR_COUNT
} sm_vq_error;

const char *sm_vq_error_message(int err);

typedef struct sm_vq_buffer {
    uint64_t gpa;
    uint32_t len;
    uint8_t *host;        /* valid for len bytes */
    int device_writable;
} sm_vq_buffer;

typedef struct sm_vq_chain {
    uint16_t head;
    uint16_t n;
    uint32_t readable_bytes;
    uint32_t writable_bytes;
    sm_vq_buffer bufs[SM_VQ_MAX_CHAIN_DESCRIPTORS];
} sm_vq_chain;

typedef struct sm_virtqueue {
    const sm_guest_memory *mem;
    uint16_t max_size;
    uint16_t size;
    int ready;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint8_t *desc;    /* host pointers, valid once sm_vq_activate succeeded */
    uint8_t *avail;
    uint8_t *used;
    uint16_t next_avail;
    uint16_t next_used;
} sm_virtqueue;

/* What a snapshot keeps of a queue: the driver's layout and the device's ring positions
 * (host pointers are recomputed against the restored guest RAM). */
typedef struct sm_vq_state {
    uint16_t size;
    uint16_t ready;
    uint16_t next_avail;
    uint16_t next_used;
    uint64_t desc_gpa, avail_gpa, used_gpa;
} sm_vq_state;

void sm_vq_init(sm_virtqueue *q, const sm_guest_memory *mem, uint16_t max_size);
void sm_vq_reset(sm_virtqueue *q);
/* Validates size and ring placement; on success the queue is ready. */
int sm_vq_activate(sm_virtqueue *q);
void sm_vq_save(const sm_virtqueue *q, sm_vq_state *s);
/* Loads s into q: a ready queue is re-activated (size and rings validated against guest RAM
 * as sm_vq_activate does) and then continues at the saved ring positions. SM_VQ_OK or the
 * sm_vq_error that refused it. */
int sm_vq_restore(sm_virtqueue *q, const sm_vq_state *s);
/* Pops the next available chain: SM_VQ_OK, SM_VQ_EMPTY, or an error. */
int sm_vq_pop(sm_virtqueue *q, sm_vq_chain *chain);
/* Gives back the chain popped last (nothing was pushed for it). */
void sm_vq_undo_pop(sm_virtqueue *q);
/* Nonzero if the driver has made chains available that we have not popped. */
int sm_vq_has_available(sm_virtqueue *q);
/* Returns the chain with `written` bytes written into its device-writable buffers. */
int sm_vq_push_used(sm_virtqueue *q, uint16_t head, uint32_t written);

/* Chain helpers: gather readable bytes / scatter into writable bytes, starting at offset
 * within the readable (resp. writable) part. Return bytes copied. */
uint32_t sm_vq_chain_read(const sm_vq_chain *c, uint32_t offset, void *dst, uint32_t len);
uint32_t sm_vq_chain_write(const sm_vq_chain *c, uint32_t offset, const void *src, uint32_t len);

#endif
