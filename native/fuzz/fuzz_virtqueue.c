/* fuzz_virtqueue.c — fuzz driver for the split-virtqueue parser (native/src/devices/
 * virtio_queue.c) against a small fake guest RAM.
 *
 * Each input decides the queue geometry (size, ring addresses, sometimes outside RAM or
 * misaligned) and the whole RAM contents (descriptors, rings, indexes), then the driver
 * activates the queue, pops chains, gathers/scatters through them and returns them,
 * checking invariants the devices rely on: every buffer lies inside guest RAM, chains are
 * bounded, counts add up. A violated invariant aborts (this is the harness, not the VMM).
 *
 * Two front ends:
 *   - standalone (gcc or clang): `fuzz_virtqueue [iterations] [seed]` runs a seeded
 *     xorshift generator, structure-aware (valid-looking chains, loops, wild indexes);
 *   - libFuzzer (clang -fsanitize=fuzzer -DSM_LIBFUZZER): LLVMFuzzerTestOneInput.
 * Build with -fsanitize=address,undefined so memory errors surface. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/devices/virtio_queue.h"
#include "../src/memory.h"

#define FUZZ_RAM_BYTES (16u * 1024u)
#define FUZZ_RAM_GPA 0x1000u
#define FUZZ_MAX_POPS 16
/* flags generator: NEXT and/or WRITE, rarely INDIRECT */
#define VRING_NEXT_OR_WRITE(r) ((uint16_t)(((r) % 16 == 0) ? SM_VRING_DESC_F_INDIRECT : ((r) % 4)))

static uint8_t *g_ram;
static unsigned long long g_outcomes[SM_VQ_ERROR_COUNT];
static unsigned long long g_activate_failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            abort();                                                                 \
        }                                                                            \
    } while (0)

typedef struct byte_source {
    const uint8_t *data;
    size_t len, pos;
} byte_source;

static uint64_t take(byte_source *s, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)(s->pos < s->len ? s->data[s->pos++] : 0) << (8 * i);
    return v;
}

static void run_one(const uint8_t *data, size_t len)
{
    byte_source src = {data, len, 0};
    sm_guest_memory mem;
    memset(&mem, 0, sizeof(mem));
    mem.regions[0].gpa = FUZZ_RAM_GPA;
    mem.regions[0].size_bytes = FUZZ_RAM_BYTES;
    mem.regions[0].host = g_ram;
    mem.n_regions = 1;
    mem.total_bytes = FUZZ_RAM_BYTES;

    uint16_t max_size = (uint16_t)(1u << (take(&src, 1) % 9)); /* 1..256 */
    sm_virtqueue q;
    sm_vq_init(&q, &mem, max_size);
    q.size = (uint16_t)take(&src, 2);
    if (take(&src, 1) & 1)
        q.size = (uint16_t)(1u << (q.size % 9));
    /* Ring addresses: mostly inside RAM, sometimes anywhere. */
    uint64_t sel = take(&src, 1);
    q.desc_gpa = (sel & 1) ? take(&src, 8) : FUZZ_RAM_GPA + take(&src, 2) % FUZZ_RAM_BYTES;
    q.avail_gpa = (sel & 2) ? take(&src, 8) : FUZZ_RAM_GPA + take(&src, 2) % FUZZ_RAM_BYTES;
    q.used_gpa = (sel & 4) ? take(&src, 8) : FUZZ_RAM_GPA + take(&src, 2) % FUZZ_RAM_BYTES;
    if (!(sel & 8)) {
        q.desc_gpa &= ~15ULL;
        q.avail_gpa &= ~1ULL;
        q.used_gpa &= ~3ULL;
    }
    /* RAM contents: the rest of the input, repeated. */
    size_t rest = src.pos < len ? len - src.pos : 0;
    if (rest) {
        for (size_t i = 0; i < FUZZ_RAM_BYTES; i += rest)
            memcpy(g_ram + i, data + src.pos, FUZZ_RAM_BYTES - i < rest ? FUZZ_RAM_BYTES - i : rest);
    } else {
        memset(g_ram, 0, FUZZ_RAM_BYTES);
    }
    if (sm_vq_activate(&q) != SM_VQ_OK) {
        g_activate_failures++;
        CHECK(!q.ready);
        return;
    }
    CHECK(q.ready && q.size && q.size <= max_size && (q.size & (q.size - 1)) == 0);
    CHECK(q.desc >= g_ram && q.desc + (size_t)q.size * 16 <= g_ram + FUZZ_RAM_BYTES);
    sm_vq_chain chain;
    uint8_t scratch[256];
    for (int i = 0; i < FUZZ_MAX_POPS; i++) {
        int rc = sm_vq_pop(&q, &chain);
        CHECK(rc >= 0 && rc < SM_VQ_ERROR_COUNT);
        CHECK(sm_vq_error_message(rc) != NULL);
        g_outcomes[rc]++;
        if (rc != SM_VQ_OK)
            break;
        CHECK(chain.head < q.size);
        CHECK(chain.n >= 1 && chain.n <= SM_VQ_MAX_CHAIN_DESCRIPTORS && chain.n <= q.size);
        uint64_t r = 0, w = 0;
        for (uint16_t j = 0; j < chain.n; j++) {
            const sm_vq_buffer *b = &chain.bufs[j];
            uint64_t len_or_1 = b->len ? b->len : 1;
            CHECK(b->host >= g_ram && b->host + len_or_1 <= g_ram + FUZZ_RAM_BYTES);
            CHECK(b->host == g_ram + (b->gpa - FUZZ_RAM_GPA));
            if (b->device_writable) w += b->len; else r += b->len;
            /* touch every byte: ASan catches a wrong pointer */
            if (b->len) {
                volatile uint8_t x = b->host[0];
                (void)x;
                x = b->host[b->len - 1];
            }
        }
        CHECK(r == chain.readable_bytes && w == chain.writable_bytes);
        CHECK(r + w <= SM_VQ_MAX_CHAIN_BYTES);
        uint32_t got = sm_vq_chain_read(&chain, (uint32_t)take(&src, 1), scratch, sizeof(scratch));
        CHECK(got <= sizeof(scratch) && got <= chain.readable_bytes);
        uint32_t put = sm_vq_chain_write(&chain, (uint32_t)take(&src, 1), scratch, got);
        CHECK(put <= got && put <= chain.writable_bytes);
        if (take(&src, 1) & 1)
            sm_vq_undo_pop(&q);
        else
            CHECK(sm_vq_push_used(&q, chain.head, put) == SM_VQ_OK);
        /* the guest keeps scribbling: move the avail index around */
        if (take(&src, 1) & 1) {
            uint16_t idx = (uint16_t)take(&src, 2);
            memcpy(g_ram + (q.avail_gpa - FUZZ_RAM_GPA) + 2, &idx, 2);
        }
    }
    CHECK(sm_vq_push_used(&q, q.size, 0) == SM_VQ_ERR_USED_HEAD_OUT_OF_RANGE);
}

#ifdef SM_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
    if (!g_ram)
        g_ram = malloc(FUZZ_RAM_BYTES);
    run_one(data, len);
    return 0;
}
#else
static uint64_t g_rng;

static uint64_t next_random(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

/* Structure-aware input: a header steering the geometry, then a RAM image in which the
 * descriptor table and rings sit where the header says, filled with plausible chains
 * (valid buffers, NEXT links, loops, huge lengths, wild indexes) plus random noise. */
static size_t make_input(uint8_t *buf, size_t cap)
{
    size_t n = 0;
    uint8_t max_log2 = (uint8_t)(next_random() % 9);
    uint16_t max_size = (uint16_t)(1u << max_log2);
    buf[n++] = max_log2;
    uint16_t size = (uint16_t)(next_random() % 8 ? 1u << (next_random() % (max_log2 + 1)) : next_random());
    memcpy(buf + n, &size, 2), n += 2;
    buf[n++] = 0;                                    /* take size as is */
    buf[n++] = (uint8_t)(next_random() % 16 ? 0 : next_random());  /* wild/misaligned rings */
    uint16_t offs[3] = {0, 8192, 12288};             /* desc, avail, used */
    if (next_random() % 8 == 0)
        for (int i = 0; i < 3; i++)
            offs[i] = (uint16_t)(next_random() % FUZZ_RAM_BYTES);
    for (int i = 0; i < 3; i++)
        memcpy(buf + n, &offs[i], 2), n += 2;
    (void)max_size;
    uint8_t *ram = buf + n;
    size_t ram_len = FUZZ_RAM_BYTES;
    if (n + ram_len > cap)
        ram_len = cap - n;
    memset(ram, 0, ram_len);
    for (int i = 0; i < 64; i++)
        ram[next_random() % ram_len] = (uint8_t)next_random();
    uint16_t qsize = size ? size : 1;
    int mode = (int)(next_random() % 5);
    for (uint32_t d = 0; d < qsize && offs[0] + (d + 1) * 16u <= ram_len; d++) {
        uint64_t addr = FUZZ_RAM_GPA + next_random() % FUZZ_RAM_BYTES;
        uint32_t len = (uint32_t)(next_random() % 600);
        uint16_t flags = (uint16_t)(next_random() % 3 ? VRING_NEXT_OR_WRITE(next_random()) : 0);
        uint16_t next = (uint16_t)((d + 1) % qsize);
        switch (mode) {
        case 0: break;                                               /* mostly valid */
        case 1: next = (uint16_t)(next_random() % (qsize + 2)); break; /* loops, out of range */
        case 2: if (next_random() % 4 == 0) len = (uint32_t)next_random(); break;
        case 3: if (next_random() % 4 == 0) addr = next_random(); break;
        default: flags = (uint16_t)next_random(); break;
        }
        uint8_t *p = ram + offs[0] + d * 16u;
        memcpy(p, &addr, 8), memcpy(p + 8, &len, 4), memcpy(p + 12, &flags, 2), memcpy(p + 14, &next, 2);
    }
    uint16_t avail_idx = (uint16_t)(next_random() % 8 ? next_random() % (qsize + 1) : next_random());
    if (offs[1] + 4u + 2u * qsize <= ram_len) {
        memcpy(ram + offs[1] + 2, &avail_idx, 2);
        for (uint32_t i = 0; i < qsize; i++) {
            uint16_t head = (uint16_t)(next_random() % 8 ? next_random() % qsize : next_random());
            memcpy(ram + offs[1] + 4 + 2 * i, &head, 2);
        }
    }
    return n + ram_len;
}

int main(int argc, char **argv)
{
    unsigned long long iterations = argc > 1 ? strtoull(argv[1], NULL, 0) : 100000ULL;
    g_rng = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed5eed5eedULL;
    if (!g_rng)
        g_rng = 1;
    g_ram = malloc(FUZZ_RAM_BYTES);
    static uint8_t input[FUZZ_RAM_BYTES + 64];
    for (unsigned long long i = 0; i < iterations; i++) {
        size_t len = make_input(input, sizeof(input));
        run_one(input, len);
    }
    printf("fuzz_virtqueue: %llu inputs, no invariant violated; %llu queues rejected at activation\n",
           iterations, g_activate_failures);
    for (int i = 0; i < SM_VQ_ERROR_COUNT; i++)
        if (g_outcomes[i])
            printf("  pop -> %-2d %-70s %llu\n", i, sm_vq_error_message(i), g_outcomes[i]);
    free(g_ram);
    return 0;
}
#endif
