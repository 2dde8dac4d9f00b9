/* blk probe: drives virtio-blk like Linux's virtio_blk — header / data / status chains —
 * writes a pattern, flushes, reads it back, compares, reports a checksum; asks GET_ID;
 * checks an out-of-range read fails with IOERR; with ro=1 checks that writes fail. With
 * snap=1 it then stops at a snapshot point (see probe_snapshot_point) and does a second
 * round on the same queue: writes and reads back the sector after the pattern, and checks
 * the pattern still reads back as before. With reset=1, after the first round it resets the
 * device, notifies the reset queue (to be ignored), sets it up again and reads back. */
#include "probe.h"

#define VIRTIO_ID_BLOCK 2
#define BLK_F_RO (1ull << 5)
#define BLK_F_FLUSH (1ull << 9)
#define CONFIG_CAPACITY 0x100
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define SECTOR_BYTES 512
#define IO_SECTORS 8
#define IO_START_SECTOR 1
#define SECOND_ROUND_SECTOR (IO_START_SECTOR + IO_SECTORS)

struct blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static struct virtq q;
static struct blk_req_header hdr;
static volatile uint8_t status;

/* One request: header, optional data (dir: device-writable if is_in), status. */
static int request(uint32_t type, uint64_t sector, void *data, uint32_t len, int is_in)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status = 0xff;
    uint16_t n = 0;
    q.desc[n].addr = (uint64_t)&hdr;
    q.desc[n].len = sizeof(hdr);
    q.desc[n].flags = VRING_DESC_F_NEXT;
    q.desc[n].next = (uint16_t)(n + 1);
    n++;
    if (len) {
        q.desc[n].addr = (uint64_t)data;
        q.desc[n].len = len;
        q.desc[n].flags = VRING_DESC_F_NEXT | (is_in ? VRING_DESC_F_WRITE : 0);
        q.desc[n].next = (uint16_t)(n + 1);
        n++;
    }
    q.desc[n].addr = (uint64_t)&status;
    q.desc[n].len = 1;
    q.desc[n].flags = VRING_DESC_F_WRITE;
    q.desc[n].next = 0;
    virtq_publish(&q, 0);
    if (virtq_wait_used(&q, 0, 0))
        return -1;
    return status;
}

static uint64_t fnv1a(const uint8_t *p, uint64_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static void put_queue_position(void)
{
    put_str("queue position ");
    put_dec(q.last_used);
    put_char('\n');
}

/* After the snapshot point: one more write and read on the same queue, and the first round's
 * sectors must read back unchanged (on a read-only disk the write must fail). */
static int second_round(const uint8_t *first, uint64_t seed, int expect_ro)
{
    uint8_t *wbuf = alloc_pages(1);
    uint8_t *rbuf = alloc_pages(1);
    for (uint32_t i = 0; i < SECTOR_BYTES; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        wbuf[i] = (uint8_t)(seed >> 56);
    }
    int st = request(T_OUT, SECOND_ROUND_SECTOR, wbuf, SECTOR_BYTES, 0);
    if (st != (expect_ro ? S_IOERR : S_OK) || request(T_FLUSH, 0, 0, 0, 0) != S_OK ||
        request(T_IN, SECOND_ROUND_SECTOR, rbuf, SECTOR_BYTES, 1) != S_OK) {
        put_line("PROBE blk FAIL second round write, flush or read");
        return 1;
    }
    if (!expect_ro && memcmp(wbuf, rbuf, SECTOR_BYTES) != 0) {
        put_line("PROBE blk FAIL second round read-back differs from what was written");
        return 1;
    }
    put_str("second round checksum ");
    put_hex(fnv1a(rbuf, SECTOR_BYTES));
    put_char('\n');
    uint8_t *again = alloc_pages(1);
    if (request(T_IN, IO_START_SECTOR, again, IO_SECTORS * SECTOR_BYTES, 1) != S_OK ||
        memcmp(first, again, IO_SECTORS * SECTOR_BYTES) != 0) {
        put_line("PROBE blk FAIL first round sectors changed after the snapshot point");
        return 1;
    }
    if (!virtq_used_in_step(&q)) {
        put_line("PROBE blk FAIL used ring out of step after the snapshot point");
        return 1;
    }
    put_queue_position();
    return 0;
}

/* reset=1: reset the device, notify queue 0 while it is reset (the device must ignore it),
 * set it up again and read the first round's sectors back on the new queue. */
static int reset_round(uint64_t base, const uint8_t *first)
{
    mmio_write32(base + VIRTIO_MMIO_STATUS, 0);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    if (mmio_read32(base + VIRTIO_MMIO_STATUS) != 0) {
        put_line("PROBE blk FAIL a notify while reset changed the device status");
        return 1;
    }
    if (!virtio_negotiate(base, BLK_F_FLUSH | BLK_F_RO) || virtq_setup(&q, base, 0, 128)) {
        put_line("PROBE blk FAIL negotiation or queue setup after the reset");
        return 1;
    }
    virtio_driver_ok(base);
    uint8_t *again = alloc_pages(1);
    if (request(T_IN, IO_START_SECTOR, again, IO_SECTORS * SECTOR_BYTES, 1) != S_OK ||
        memcmp(first, again, IO_SECTORS * SECTOR_BYTES) != 0) {
        put_line("PROBE blk FAIL reading the first round back after the reset");
        return 1;
    }
    put_line("reset round done");
    return 0;
}

int probe_main(void)
{
    int expect_ro = (int)cmdline_get_u64("ro", 0);
    uint64_t base = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!base) {
        put_line("PROBE blk FAIL no block device on the command line");
        return 1;
    }
    uint64_t features = virtio_negotiate(base, BLK_F_FLUSH | BLK_F_RO);
    if (!features || virtq_setup(&q, base, 0, 128)) {
        put_line("PROBE blk FAIL negotiation or queue setup");
        return 1;
    }
    virtio_driver_ok(base);
    uint64_t capacity = (uint64_t)mmio_read32(base + CONFIG_CAPACITY) |
                        ((uint64_t)mmio_read32(base + CONFIG_CAPACITY + 4) << 32);
    put_str("capacity sectors ");
    put_dec(capacity);
    put_str(" features ");
    put_hex(features);
    put_char('\n');
    if (((features & BLK_F_RO) != 0) != (expect_ro != 0)) {
        put_line("PROBE blk FAIL read-only feature does not match ro=");
        return 1;
    }
    uint8_t *wbuf = alloc_pages(1);
    uint8_t *rbuf = alloc_pages(1);
    uint64_t seed = cmdline_get_u64("seed", 7);
    for (uint32_t i = 0; i < IO_SECTORS * SECTOR_BYTES; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        wbuf[i] = (uint8_t)(seed >> 56);
    }
    int st = request(T_OUT, IO_START_SECTOR, wbuf, IO_SECTORS * SECTOR_BYTES, 0);
    if (expect_ro) {
        if (st != S_IOERR) {
            put_line("PROBE blk FAIL write to a read-only disk did not fail");
            return 1;
        }
        put_line("write refused on read-only disk");
    } else if (st != S_OK) {
        put_line("PROBE blk FAIL write");
        return 1;
    }
    if (request(T_FLUSH, 0, 0, 0, 0) != S_OK) {
        put_line("PROBE blk FAIL flush");
        return 1;
    }
    if (request(T_IN, IO_START_SECTOR, rbuf, IO_SECTORS * SECTOR_BYTES, 1) != S_OK) {
        put_line("PROBE blk FAIL read");
        return 1;
    }
    if (!expect_ro && memcmp(wbuf, rbuf, IO_SECTORS * SECTOR_BYTES) != 0) {
        put_line("PROBE blk FAIL read-back differs from what was written");
        return 1;
    }
    put_str("checksum ");
    put_hex(fnv1a(rbuf, IO_SECTORS * SECTOR_BYTES));
    put_char('\n');
    uint8_t *first = alloc_pages(1); /* what the second round must read back again */
    memcpy(first, rbuf, IO_SECTORS * SECTOR_BYTES);
    char id[21];
    memset(id, 0, sizeof(id));
    if (request(T_GET_ID, 0, id, 20, 1) != S_OK) {
        put_line("PROBE blk FAIL get-id");
        return 1;
    }
    put_str("id ");
    put_line(id);
    if (request(T_IN, capacity, rbuf, SECTOR_BYTES, 1) != S_IOERR) {
        put_line("PROBE blk FAIL read past the end did not fail");
        return 1;
    }
    put_line("read past the end refused");
    if (cmdline_get_u64("reset", 0) && reset_round(base, first))
        return 1;
    if (cmdline_get_u64("snap", 0)) {
        put_queue_position();
        if (probe_snapshot_point("blk")) {
            put_line("PROBE blk FAIL no byte from the host at the snapshot point");
            return 1;
        }
        if (second_round(first, seed, expect_ro))
            return 1;
    }
    put_line("PROBE blk OK");
    return 0;
}
