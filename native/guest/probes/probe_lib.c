/* probe_lib.c — runtime for freestanding probe guests (see probe.h). */
#include "probe.h"

#define COM1_PORT 0x3f8
#define COM1_LSR_OFFSET 5
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20
#define I8042_COMMAND_PORT 0x64
#define I8042_RESET 0xfe

const char *g_cmdline;
uint64_t g_mem_bytes;
extern char _end[];
static uint64_t g_next_free;

/* String instructions, eight bytes at a time: where KVM is emulated every instruction costs
 * about a microsecond, and one `rep movsq` step costs about what one byte-loop step does. */
void *memset(void *d, int c, size_t n)
{
    uint64_t word = 0x0101010101010101ull * (unsigned char)c;
    void *p = d;
    size_t words = n / 8, bytes = n % 8;
    __asm__ volatile("rep stosq" : "+D"(p), "+c"(words) : "a"(word) : "memory");
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(bytes) : "a"(word) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *p = d;
    size_t words = n / 8, bytes = n % 8;
    __asm__ volatile("rep movsq" : "+D"(p), "+S"(s), "+c"(words) : : "memory");
    __asm__ volatile("rep movsb" : "+D"(p), "+S"(s), "+c"(bytes) : : "memory");
    return d;
}

/* Forward copying is safe when moving towards lower addresses; an overlap the other way
 * is copied backwards, byte by byte. */
void *memmove(void *d, const void *s, size_t n)
{
    if ((uint64_t)d <= (uint64_t)s || (uint64_t)d >= (uint64_t)s + n)
        return memcpy(d, s, n);
    const uint8_t *from = (const uint8_t *)s + n - 1;
    uint8_t *to = (uint8_t *)d + n - 1;
    __asm__ volatile("std; rep movsb; cld" : "+D"(to), "+S"(from), "+c"(n) : : "memory");
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}
size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }

void put_char(char c)
{
    while (!(inb(COM1_PORT + COM1_LSR_OFFSET) & LSR_THR_EMPTY))
        ;
    outb(COM1_PORT, (uint8_t)c);
}

void put_str(const char *s) { while (*s) put_char(*s++); }
void put_line(const char *s) { put_str(s); put_char('\n'); }

void put_hex(uint64_t v)
{
    char buf[19];
    buf[0] = '0';
    buf[1] = 'x';
    int n = 0;
    char tmp[16];
    do { tmp[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    for (int i = 0; i < n; i++) buf[2 + i] = tmp[n - 1 - i];
    buf[2 + n] = 0;
    put_str(buf);
}

void put_dec(uint64_t v)
{
    char tmp[21];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) put_char(tmp[--n]);
}

int get_char(void)
{
    for (uint64_t i = 0; i < PROBE_SPIN_LIMIT; i++)
        if (inb(COM1_PORT + COM1_LSR_OFFSET) & LSR_DATA_READY)
            return inb(COM1_PORT);
    return -1;
}

uint64_t parse_u64(const char *s)
{
    uint64_t v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2;; s++) {
            char c = *s;
            if (c >= '0' && c <= '9') v = v * 16 + (uint64_t)(c - '0');
            else if (c >= 'a' && c <= 'f') v = v * 16 + (uint64_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v = v * 16 + (uint64_t)(c - 'A' + 10);
            else break;
        }
        return v;
    }
    for (; *s >= '0' && *s <= '9'; s++) v = v * 10 + (uint64_t)(*s - '0');
    return v;
}

int cmdline_get(const char *key, char *out, size_t out_len)
{
    size_t klen = strlen(key);
    const char *p = g_cmdline;
    while (*p) {
        while (*p == ' ') p++;
        const char *w = p;
        while (*p && *p != ' ') p++;
        if ((size_t)(p - w) > klen && memcmp(w, key, klen) == 0 && w[klen] == '=') {
            size_t n = (size_t)(p - w) - klen - 1;
            if (n >= out_len) n = out_len - 1;
            memcpy(out, w + klen + 1, n);
            out[n] = 0;
            return 1;
        }
    }
    return 0;
}

uint64_t cmdline_get_u64(const char *key, uint64_t dflt)
{
    char buf[32];
    return cmdline_get(key, buf, sizeof(buf)) ? parse_u64(buf) : dflt;
}

static void alloc_init(void)
{
    if (!g_next_free)
        g_next_free = ((uint64_t)_end + PROBE_PAGE_BYTES - 1) & ~(uint64_t)(PROBE_PAGE_BYTES - 1);
}

uint64_t probe_pages_left(uint64_t ram_end)
{
    alloc_init();
    return g_next_free < ram_end ? (ram_end - g_next_free) / PROBE_PAGE_BYTES : 0;
}

void *alloc_pages_nozero(size_t pages)
{
    alloc_init();
    void *p = (void *)g_next_free;
    g_next_free += pages * PROBE_PAGE_BYTES;
    return p;
}

void *alloc_pages(size_t pages)
{
    void *p = alloc_pages_nozero(pages);
    memset(p, 0, pages * PROBE_PAGE_BYTES);
    return p;
}

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void guest_reset(void)
{
    outb(I8042_COMMAND_PORT, I8042_RESET);
    halt_forever();
}

/* The next "virtio_mmio.device=4K@0xd0000000:5" entry of the command line at or after *p:
 * its base and IRQ; 0 when there is none. */
static int next_virtio_entry(const char **p, uint64_t *base, uint32_t *irq)
{
    const char *key = "virtio_mmio.device=";
    size_t klen = strlen(key);
    while (**p) {
        while (**p == ' ') (*p)++;
        const char *w = *p;
        while (**p && **p != ' ') (*p)++;
        if ((size_t)(*p - w) <= klen || memcmp(w, key, klen) != 0)
            continue;
        const char *at = w + klen;
        while (at < *p && *at != '@') at++;
        if (at >= *p)
            continue;
        const char *colon = at;
        while (colon < *p && *colon != ':') colon++;
        *base = parse_u64(at + 1);
        *irq = colon < *p ? (uint32_t)parse_u64(colon + 1) : 0;
        return 1;
    }
    return 0;
}

/* Entries in command line order. */
uint64_t virtio_find(uint32_t device_id, uint32_t nth)
{
    const char *p = g_cmdline;
    uint64_t base;
    uint32_t irq;
    while (next_virtio_entry(&p, &base, &irq)) {
        if (mmio_read32(base + VIRTIO_MMIO_MAGIC) == 0x74726976 &&
            mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) == device_id) {
            if (nth == 0)
                return base;
            nth--;
        }
    }
    return 0;
}

uint32_t virtio_irq(uint64_t device_base)
{
    const char *p = g_cmdline;
    uint64_t base;
    uint32_t irq;
    while (next_virtio_entry(&p, &base, &irq))
        if (base == device_base)
            return irq;
    return 0;
}

uint64_t virtio_negotiate(uint64_t base, uint64_t wanted)
{
    mmio_write32(base + VIRTIO_MMIO_STATUS, 0);
    mmio_write32(base + VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    mmio_write32(base + VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t offered = mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (uint64_t)mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    uint64_t accept = (wanted | VIRTIO_F_VERSION_1) & offered;
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accept);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accept >> 32));
    mmio_write32(base + VIRTIO_MMIO_STATUS,
                 VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(mmio_read32(base + VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK))
        return 0;
    return accept;
}

int virtq_setup(struct virtq *q, uint64_t base, uint32_t index, uint16_t size)
{
    memset(q, 0, sizeof(*q));
    q->base = base;
    q->index = index;
    q->size = size;
    mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, index);
    if (mmio_read32(base + VIRTIO_MMIO_QUEUE_READY))
        return -1;
    uint32_t max = mmio_read32(base + VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0 || size > max)
        return -1;
    q->desc = alloc_pages(1 + (size * 16u) / PROBE_PAGE_BYTES);
    q->avail = alloc_pages(1);
    q->used = alloc_pages(1 + (size * 8u) / PROBE_PAGE_BYTES);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_NUM, size);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)(uint64_t)q->desc);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)q->desc >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)q->avail);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)q->avail >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)q->used);
    mmio_write32(base + VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)q->used >> 32));
    mmio_write32(base + VIRTIO_MMIO_QUEUE_READY, 1);
    return mmio_read32(base + VIRTIO_MMIO_QUEUE_READY) == 1 ? 0 : -1;
}

void virtio_driver_ok(uint64_t base)
{
    mmio_write32(base + VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                                                VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

void virtq_publish(struct virtq *q, uint16_t head)
{
    q->avail[2 + (q->avail_idx % q->size)] = head;
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    barrier();
    mmio_write32(q->base + VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_used_pending(struct virtq *q)
{
    barrier();
    return *(volatile uint16_t *)(q->used + 2) != q->last_used;
}

int virtq_wait_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
    for (uint64_t i = 0; i < PROBE_SPIN_LIMIT; i++) {
        if (virtq_used_pending(q)) {
            volatile uint8_t *e = q->used + 4 + 8u * (q->last_used % q->size);
            if (id) *id = *(volatile uint32_t *)e;
            if (len) *len = *(volatile uint32_t *)(e + 4);
            q->last_used++;
            return 0;
        }
        __asm__ volatile("pause");
    }
    return -1;
}

void virtio_ack_interrupts(uint64_t base)
{
    uint32_t s = mmio_read32(base + VIRTIO_MMIO_INTERRUPT_STATUS);
    mmio_write32(base + VIRTIO_MMIO_INTERRUPT_ACK, s);
}

int virtq_used_in_step(struct virtq *q)
{
    barrier();
    return *(volatile uint16_t *)(q->used + 2) == q->last_used;
}

int probe_snapshot_point(const char *name)
{
    if (!cmdline_get_u64("snap", 0))
        return 0;
    put_str("PROBE ");
    put_str(name);
    put_line(" SNAPSHOT-POINT");
    return get_char() < 0 ? -1 : 0;
}

/* Entry: the core jumps here in 64-bit mode (raw ELF entry), or pvh_start64() does. */
__attribute__((section(".text._start"), used, noreturn)) void _start(const char *cmdline, uint64_t mem_bytes)
{
    g_cmdline = cmdline;
    g_mem_bytes = mem_bytes;
    int rc = probe_main();
    put_str("PROBE-EXIT ");
    put_dec((uint64_t)rc);
    put_char('\n');
    guest_reset();
}

/* ---- PVH entry (pvh_entry.S switches to long mode, then calls pvh_start64) ----
 * struct hvm_start_info, xen/include/public/arch-x86/hvm/start_info.h; the memory map
 * (version >= 1) is e820-like. */
#define HVM_START_MAGIC_VALUE 0x336ec578u
#define HVM_START_INFO_MEMMAP_VERSION 1
#define E820_TYPE_RAM 1
#define FOUR_GIB (1ull << 32)

struct pvh_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct pvh_memmap_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

/* Guest RAM as the raw entry's rsi reports it: the end of RAM below 4 GiB plus the RAM above
 * (both the native core and QEMU lay RAM out that way around the 32-bit MMIO hole). */
static uint64_t pvh_ram_bytes(const struct pvh_start_info *si)
{
    const struct pvh_memmap_entry *m = (const struct pvh_memmap_entry *)si->memmap_paddr;
    uint64_t low_end = 0, high = 0;
    for (uint32_t i = 0; i < si->memmap_entries; i++) {
        if (m[i].type != E820_TYPE_RAM)
            continue;
        if (m[i].addr >= FOUR_GIB)
            high += m[i].size;
        else if (m[i].addr + m[i].size > low_end)
            low_end = m[i].addr + m[i].size;
    }
    return low_end + high;
}

__attribute__((used, noreturn)) void pvh_start64(const struct pvh_start_info *si)
{
    const char *cmdline = "";
    uint64_t mem_bytes = 0;
    if (si && si->magic == HVM_START_MAGIC_VALUE) {
        if (si->cmdline_paddr)
            cmdline = (const char *)si->cmdline_paddr;
        if (si->version >= HVM_START_INFO_MEMMAP_VERSION && si->memmap_paddr)
            mem_bytes = pvh_ram_bytes(si);
    }
    _start(cmdline, mem_bytes);
}
