/* bad_guest probe: a hostile driver. Each virtio device gets one kind of garbage — bad
 * queue sizes, rings or buffers outside RAM, descriptor loops, oversized lengths, a
 * runaway avail index, an out-of-range head, a notify for a queue that does not exist, a
 * balloon PFN outside RAM — plus garbage register accesses. The VMM must flag each device
 * broken (DEVICE_NEEDS_RESET) with a reason, keep running, and stay stoppable. The probe
 * reports what it saw and then halts forever (the host stops the VM). */
#include "probe.h"

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_BALLOON 5
#define FAR_OUTSIDE_RAM_GPA 0x7fff00000000ull
#define SCENARIO_COUNT 8
#define STATUS_POLL_EVERY 65536   /* pauses between two status reads (each one an exit) */

static const char *const SCENARIO_NAMES[SCENARIO_COUNT] = {
    "queue_size_too_large", "queue_size_not_power_of_two", "buffer_outside_ram",
    "descriptor_loop", "oversized_length", "avail_index_jump", "head_out_of_range",
    "notify_missing_queue",
};

static uint8_t scratch[64] __attribute__((aligned(16)));

/* Sets queue 0 up by hand with an arbitrary size (no validity checks: that is the point). */
static struct virtq q;

static void raw_queue(uint64_t base, uint32_t size, uint64_t desc_gpa)
{
    memset(&q, 0, sizeof(q));
    q.base = base;
    q.index = 0;
    q.size = (uint16_t)(size > 256 ? 256 : size);
    q.desc = alloc_pages(2);
    q.avail = alloc_pages(1);
    q.used = alloc_pages(1);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, 0);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NUM, size);
    uint64_t d = desc_gpa ? desc_gpa : (uint64_t)q.desc;
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)d);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(d >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)q.avail);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)q.used);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_READY, 1);
}

/* A notify may be handled after the write returns (a KVM ioeventfd hands it to the VMM's
 * event loop, as virtio allows): poll the status a while for DEVICE_NEEDS_RESET. */
static int wait_needs_reset(uint64_t base)
{
    for (uint64_t i = 0; i < PROBE_SPIN_LIMIT; i++) {
        if (i % STATUS_POLL_EVERY == 0 &&
            (mmio_read32(base + VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_DEVICE_NEEDS_RESET))
            return 1;
        __asm__ volatile("pause");
    }
    return 0;
}

static void scenario(uint32_t i, uint64_t base)
{
    virtio_negotiate(base, 0);
    switch (i) {
    case 0: raw_queue(base, 1000, 0); break;
    case 1: raw_queue(base, 3, 0); break;
    default: raw_queue(base, 128, 0); break;
    }
    virtio_driver_ok(base);
    switch (i) {
    case 2: /* a buffer far outside guest RAM */
        q.desc[0].addr = FAR_OUTSIDE_RAM_GPA;
        q.desc[0].len = 16;
        q.desc[0].flags = 0;
        virtq_publish(&q, 0);
        break;
    case 3: /* 0 -> 1 -> 0 -> ... */
        q.desc[0].addr = (uint64_t)scratch;
        q.desc[0].len = 16;
        q.desc[0].flags = VRING_DESC_F_NEXT;
        q.desc[0].next = 1;
        q.desc[1].addr = (uint64_t)scratch;
        q.desc[1].len = 16;
        q.desc[1].flags = VRING_DESC_F_NEXT;
        q.desc[1].next = 0;
        virtq_publish(&q, 0);
        break;
    case 4: /* a 4 GiB - 1 length from a valid address */
        q.desc[0].addr = (uint64_t)scratch;
        q.desc[0].len = 0xffffffffu;
        q.desc[0].flags = 0;
        virtq_publish(&q, 0);
        break;
    case 5: /* avail index 500 ahead on a 128-entry queue */
        q.avail[1] = 500;
        barrier();
        mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        break;
    case 6: /* head index 4000 */
        virtq_publish(&q, 4000);
        break;
    case 7: /* no queue 0x10000 (queue 0's index in its low half), no queue 9; garbage
             * register accesses first, one a byte-wide notify of queue 0 */
        mmio_write8(base + VIRTIO_MMIO_STATUS, 0xff);          /* byte-wide register write */
        mmio_write32(base + 0x0f0, 0xdeadbeef);                /* unknown register */
        (void)mmio_read32(base + 0x0e8);
        mmio_write8(base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 0x10000);
        mmio_write32(base + VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        break;
    default:
        break;
    }
}

int probe_main(void)
{
    uint32_t flagged = 0;
    for (uint32_t i = 0; i < SCENARIO_COUNT; i++) {
        uint64_t base = virtio_find(VIRTIO_ID_BLOCK, i);
        if (!base) {
            put_str("PROBE bad_guest FAIL needs 8 block devices, missing #");
            put_dec(i);
            put_char('\n');
            return 1;
        }
        scenario(i, base);
        int broken = wait_needs_reset(base);
        flagged += (uint32_t)broken;
        put_str("scenario ");
        put_str(SCENARIO_NAMES[i]);
        put_str(broken ? ": device flagged DEVICE_NEEDS_RESET\n" : ": device NOT flagged\n");
    }
    uint64_t balloon = virtio_find(VIRTIO_ID_BALLOON, 0);
    if (balloon) {
        struct virtq inflate;
        virtio_negotiate(balloon, 0);
        virtq_setup(&inflate, balloon, 0, 16);
        virtq_setup(&q, balloon, 1, 16);
        virtio_driver_ok(balloon);
        static uint32_t bad_pfn = 0xfffffff0u;
        inflate.desc[0].addr = (uint64_t)&bad_pfn;
        inflate.desc[0].len = 4;
        inflate.desc[0].flags = 0;
        virtq_publish(&inflate, 0);
        int broken = wait_needs_reset(balloon);
        flagged += (uint32_t)broken;
        put_str(broken ? "scenario balloon_pfn_outside_ram: device flagged DEVICE_NEEDS_RESET\n"
                       : "scenario balloon_pfn_outside_ram: device NOT flagged\n");
    }
    put_str("flagged ");
    put_dec(flagged);
    put_char('\n');
    put_line("PROBE bad_guest DONE (halting; the host must stop the VM)");
    halt_forever();
}
