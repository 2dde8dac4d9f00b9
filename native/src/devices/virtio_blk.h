/* virtio_blk.h — file-backed virtio-blk (device id 2): IN, OUT, FLUSH (fsync), GET_ID,
 * read-only feature; every request is bounds-checked against the backing file. */
#ifndef SM_VIRTIO_BLK_H
#define SM_VIRTIO_BLK_H

#include <stdint.h>
#include "virtio_mmio.h"

#define SM_VIRTIO_ID_BLOCK 2
#define SM_BLK_F_RO_BIT 5
#define SM_BLK_F_FLUSH_BIT 9
#define SM_BLK_SECTOR_BYTES 512u
#define SM_BLK_SECTOR_SHIFT 9
#define SM_BLK_REQUEST_HEADER_BYTES 16
#define SM_BLK_ID_BYTES 20
#define SM_BLK_QUEUE_INDEX 0
#define SM_BLK_NUM_QUEUES 1

#define SM_BLK_T_IN 0
#define SM_BLK_T_OUT 1
#define SM_BLK_T_FLUSH 4
#define SM_BLK_T_GET_ID 8
#define SM_BLK_S_OK 0
#define SM_BLK_S_IOERR 1
#define SM_BLK_S_UNSUPP 2

typedef enum sm_blk_error {
    SM_BLK_ERR_NONE = 0,
    SM_BLK_ERR_QUEUE,
    SM_BLK_ERR_DESCRIPTOR_LAYOUT,
    SM_BLK_ERR_SECTOR_OUT_OF_RANGE,
    SM_BLK_ERR_DATA_NOT_SECTOR_MULTIPLE,
    SM_BLK_ERR_WRITE_TO_READ_ONLY,
    SM_BLK_ERR_UNSUPPORTED_TYPE,
    SM_BLK_ERR_IO,
    SM_BLK_ERR_COUNT
} sm_blk_error;

const char *sm_blk_error_message(int err);

typedef struct sm_blk_counters {
    uint64_t read_requests;
    uint64_t write_requests;
    uint64_t flush_requests;
    uint64_t get_id_requests;
    uint64_t read_bytes;
    uint64_t write_bytes;
    uint64_t unsupported_requests;
    uint64_t out_of_range_requests;
    uint64_t read_only_violations;
    uint64_t io_errors;
    uint64_t malformed_requests;
} sm_blk_counters;

typedef struct sm_blk {
    sm_virtio_mmio *transport;
    int fd;
    int read_only;
    uint64_t capacity_bytes;
    char id[SM_BLK_ID_BYTES + 1];
    sm_blk_counters counters;
} sm_blk;

/* What a snapshot keeps of a disk: what the guest knows of it. A restore checks the new
 * backing file against it (requests are synchronous: none is in flight at a snapshot). */
typedef struct sm_blk_state {
    uint64_t capacity_bytes;
    uint32_t read_only;
    char id[SM_BLK_ID_BYTES + 1];
    uint8_t pad[7];
} sm_blk_state;

extern const sm_virtio_ops SM_BLK_OPS;

sm_blk *sm_blk_create(const char *path, int read_only, const char *serial, uint32_t index, char *err,
                      size_t err_len);

#endif
