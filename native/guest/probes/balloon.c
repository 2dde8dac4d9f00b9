/* balloon probe: drives virtio-balloon like Linux's virtio_balloon driver — negotiates
 * STATS_VQ (+ DEFLATE_ON_OOM), hands the device a statistics buffer, inflates to the
 * target in the config space (PFNs of pages it dirtied first), checks the host released
 * them (they read back as zero), reports `actual`, refills statistics when the device asks,
 * deflates half and reports again. With snap=1 it then stops at a snapshot point (see
 * probe_snapshot_point) and does a second round on the same queues: one more statistics
 * refill, and inflation up to the config target if the host raised it. */
#include "probe.h"

#define VIRTIO_ID_BALLOON 5
#define BALLOON_F_STATS_VQ (1ull << 1)
#define BALLOON_F_DEFLATE_ON_OOM (1ull << 2)
#define CONFIG_NUM_PAGES 0x100
#define CONFIG_ACTUAL 0x104
#define PFNS_PER_REQUEST 256
#define STAT_ENTRIES 10
#define PROBE_FREE_MEMORY_BYTES 0x1234000ull
#define CHECKED_PAGES 64
#define MAX_TARGET_PAGES 4096

struct __attribute__((packed)) stat_entry {
    uint16_t tag;
    uint64_t val;
};

static struct virtq inflate_q, deflate_q, stats_q;
static struct stat_entry stats[STAT_ENTRIES];
static uint32_t pfns[PFNS_PER_REQUEST];

static void fill_stats(uint64_t round)
{
    for (uint16_t i = 0; i < STAT_ENTRIES; i++) {
        stats[i].tag = i;
        stats[i].val = 1000 * (i + 1) + round;
    }
    stats[4].val = PROBE_FREE_MEMORY_BYTES;   /* free_memory */
    stats[5].val = g_mem_bytes;               /* total_memory */
}

static void give_stats(void)
{
    stats_q.desc[0].addr = (uint64_t)stats;
    stats_q.desc[0].len = sizeof(stats);
    stats_q.desc[0].flags = 0;
    virtq_publish(&stats_q, 0);
}

static int send_pfns(struct virtq *q, uint32_t n)
{
    q->desc[0].addr = (uint64_t)pfns;
    q->desc[0].len = n * 4;
    q->desc[0].flags = 0;
    virtq_publish(q, 0);
    return virtq_wait_used(q, 0, 0);
}

/* Dirties `count` fresh pages and inflates them; the host must have released them (they
 * read back as zero). Returns the pages, or NULL after printing the failure. */
static uint8_t *inflate_fresh_pages(uint32_t count)
{
    uint8_t *pages = alloc_pages_nozero(count);
    /* Dirty every page (one word per 512 bytes: enough to make it resident on the host,
     * and cheap on an instruction-emulating KVM). */
    for (uint64_t i = 0; i < (uint64_t)count * PROBE_PAGE_BYTES; i += 512)
        *(volatile uint64_t *)(pages + i) = 0xababababababababull;
    uint32_t done = 0;
    while (done < count) {
        uint32_t n = count - done > PFNS_PER_REQUEST ? PFNS_PER_REQUEST : count - done;
        for (uint32_t i = 0; i < n; i++)
            pfns[i] = (uint32_t)(((uint64_t)pages >> 12) + done + i);
        if (send_pfns(&inflate_q, n)) {
            put_line("PROBE balloon FAIL inflate not acknowledged");
            return 0;
        }
        done += n;
    }
    /* Released pages read back as zero. Check the first CHECKED_PAGES only: reading a page
     * faults it back into host memory, and the host measures what stays released. */
    uint32_t nonzero = 0;
    uint32_t checked = count < CHECKED_PAGES ? count : CHECKED_PAGES;
    for (uint64_t i = 0; i < (uint64_t)checked * PROBE_PAGE_BYTES; i += 512)
        nonzero += pages[i] != 0;
    put_str("inflated pages ");
    put_dec(done);
    put_str(" nonzero-after-release ");
    put_dec(nonzero);
    put_char('\n');
    if (nonzero) {
        put_line("PROBE balloon FAIL inflated pages were not released by the host");
        return 0;
    }
    return pages;
}

static void put_queue_positions(void)
{
    put_str("queue positions inflate=");
    put_dec(inflate_q.last_used);
    put_str(" deflate=");
    put_dec(deflate_q.last_used);
    put_str(" stats=");
    put_dec(stats_q.last_used);
    put_char('\n');
}

/* After the snapshot point: the device must answer on the rings where it left off. */
static int second_round(uint64_t base, uint32_t in_balloon)
{
    if (virtq_wait_used(&stats_q, 0, 0) || !virtq_used_in_step(&stats_q)) {
        put_line("PROBE balloon FAIL no statistics request in step after the snapshot point");
        return 1;
    }
    fill_stats(2);
    give_stats();
    put_line("statistics refilled");
    uint32_t target = mmio_read32(base + CONFIG_NUM_PAGES);
    put_str("target pages ");
    put_dec(target);
    put_char('\n');
    if (target > MAX_TARGET_PAGES) {
        put_line("PROBE balloon FAIL target must be at most 4096 pages for this probe");
        return 1;
    }
    if (target > in_balloon) {
        if (!inflate_fresh_pages(target - in_balloon))
            return 1;
        mmio_write32(base + CONFIG_ACTUAL, target);
    }
    if (!virtq_used_in_step(&inflate_q) || !virtq_used_in_step(&deflate_q)) {
        put_line("PROBE balloon FAIL used ring out of step after the snapshot point");
        return 1;
    }
    put_queue_positions();
    return 0;
}

int probe_main(void)
{
    uint64_t base = virtio_find(VIRTIO_ID_BALLOON, 0);
    if (!base) {
        put_line("PROBE balloon FAIL no balloon device on the command line");
        return 1;
    }
    uint64_t features = virtio_negotiate(base, BALLOON_F_STATS_VQ | BALLOON_F_DEFLATE_ON_OOM);
    if (!(features & BALLOON_F_STATS_VQ)) {
        put_line("PROBE balloon FAIL feature negotiation");
        return 1;
    }
    put_str("features accepted ");
    put_hex(features);
    put_char('\n');
    if (virtq_setup(&inflate_q, base, 0, 64) || virtq_setup(&deflate_q, base, 1, 64) ||
        virtq_setup(&stats_q, base, 2, 64)) {
        put_line("PROBE balloon FAIL queue setup");
        return 1;
    }
    virtio_driver_ok(base);
    fill_stats(0);
    give_stats();

    uint32_t target = mmio_read32(base + CONFIG_NUM_PAGES);
    put_str("target pages ");
    put_dec(target);
    put_char('\n');
    if (target == 0 || target > MAX_TARGET_PAGES) {
        put_line("PROBE balloon FAIL target must be in 1..4096 pages for this probe");
        return 1;
    }
    uint8_t *pages = inflate_fresh_pages(target);
    if (!pages)
        return 1;
    mmio_write32(base + CONFIG_ACTUAL, target);

    /* The device returns the statistics buffer when it wants fresh numbers. */
    uint32_t id, len;
    if (virtq_wait_used(&stats_q, &id, &len)) {
        put_line("PROBE balloon FAIL no statistics request from the device");
        return 1;
    }
    fill_stats(1);
    give_stats();
    put_line("statistics refilled");

    uint32_t half = target / 2;
    for (uint32_t i = 0; i < half; i++)
        pfns[i % PFNS_PER_REQUEST] = (uint32_t)(((uint64_t)pages >> 12) + i);
    if (half && send_pfns(&deflate_q, half > PFNS_PER_REQUEST ? PFNS_PER_REQUEST : half)) {
        put_line("PROBE balloon FAIL deflate not acknowledged");
        return 1;
    }
    uint32_t deflated = half > PFNS_PER_REQUEST ? PFNS_PER_REQUEST : half;
    mmio_write32(base + CONFIG_ACTUAL, target - deflated);
    put_str("deflated pages ");
    put_dec(deflated);
    put_char('\n');
    if (cmdline_get_u64("snap", 0)) {
        put_queue_positions();
        if (probe_snapshot_point("balloon")) {
            put_line("PROBE balloon FAIL no byte from the host at the snapshot point");
            return 1;
        }
        if (second_round(base, target - deflated))
            return 1;
    }
    /* Wait for the device to have read the second statistics buffer (it holds it). */
    if (cmdline_get_u64("hold", 0)) {
        put_line("PROBE balloon OK (holding)");
        halt_forever();
    }
    put_line("PROBE balloon OK");
    return 0;
}
