/* counter probe: counts forever and prints "COUNT <n>" every `every=` iterations (command
 * line, default 20000). The count lives in guest RAM, so a VM restored from a snapshot
 * continues from where the snapshot was taken (tests/native/test_snapshot_native.py).
 * fill=<pages> first writes a pattern into that many pages; each print then re-reads one of
 * them (rotating) and prints "FILL BAD <page>" if the pattern changed: guest RAM restored
 * from a snapshot is checked, and reading it must not copy it (copy-on-write sharing). */
#include "probe.h"

static volatile uint64_t g_count;

static uint64_t fill_word(uint64_t page) { return 0x5a5a000000000000ull | (page * 0x9e3779b1ull); }

int probe_main(void)
{
    uint64_t every = cmdline_get_u64("every", 20000);
    uint64_t fill_pages = cmdline_get_u64("fill", 0);
    if (every == 0)
        every = 1;
    volatile uint64_t *fill = fill_pages ? alloc_pages_nozero(fill_pages) : 0;
    for (uint64_t p = 0; p < fill_pages; p++)
        for (uint64_t w = 0; w < PROBE_PAGE_BYTES / 8; w++)
            fill[p * (PROBE_PAGE_BYTES / 8) + w] = fill_word(p) + w;
    put_line("PROBE counter READY");
    uint64_t check = 0;
    for (;;) {
        g_count++;
        if (g_count % every == 0) {
            if (fill_pages) {
                uint64_t p = check++ % fill_pages, w = g_count % (PROBE_PAGE_BYTES / 8);
                if (fill[p * (PROBE_PAGE_BYTES / 8) + w] != fill_word(p) + w) {
                    put_str("FILL BAD ");
                    put_dec(p);
                    put_char('\n');
                }
            }
            put_str("COUNT ");
            put_dec(g_count);
            put_char('\n');
        }
    }
}
