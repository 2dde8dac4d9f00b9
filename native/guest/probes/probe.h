/* probe.h — the tiny runtime shared by the freestanding probe guests: port I/O, MMIO,
 * UART output, command line parsing, a bump allocator, and a virtio-mmio driver that
 * follows the same steps as Linux's virtio_mmio + virtio_ring. */
#ifndef SM_PROBE_H
#define SM_PROBE_H

#include <stdint.h>
#include <stddef.h>

#define PROBE_PAGE_BYTES 4096u
#define PROBE_SPIN_LIMIT 200000000ull

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)addr = v; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

void put_char(char c);
void put_str(const char *s);
void put_hex(uint64_t v);
void put_dec(uint64_t v);
void put_line(const char *s);
/* Read one byte from the UART, spinning; -1 after PROBE_SPIN_LIMIT polls. */
int get_char(void);

/* Value of "key=" on the command line copied into out (NUL terminated); 0 if absent. */
int cmdline_get(const char *key, char *out, size_t out_len);
uint64_t cmdline_get_u64(const char *key, uint64_t dflt);
uint64_t parse_u64(const char *s);

void *alloc_pages(size_t pages);   /* zeroed, page aligned, from the end of the image */
void *alloc_pages_nozero(size_t pages); /* same, not cleared (fresh guest RAM reads as zero) */
uint64_t probe_pages_left(uint64_t ram_end); /* pages the allocator has left below ram_end */

void guest_reset(void) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));

extern const char *g_cmdline;
extern uint64_t g_mem_bytes;

/* ---- virtio-mmio ---- */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 0x40
#define VIRTIO_F_VERSION_1 (1ull << 32)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq {
    uint64_t base;      /* transport MMIO base */
    uint32_t index;
    uint16_t size;
    volatile struct vring_desc *desc;
    volatile uint16_t *avail;  /* flags, idx, ring[size], used_event */
    volatile uint8_t *used;    /* flags, idx, ring[size] of {id, len}, avail_event */
    uint16_t avail_idx;
    uint16_t last_used;
};

/* Finds the n-th (0-based) virtio-mmio device with device_id from the command line. */
uint64_t virtio_find(uint32_t device_id, uint32_t nth);
/* The interrupt line of the device at base (its command line entry's ":<irq>"); 0 if unknown. */
uint32_t virtio_irq(uint64_t base);
/* Reset, ACK, DRIVER, features (VERSION_1 | wanted & offered), FEATURES_OK check.
 * Returns the accepted features, or 0 if FEATURES_OK did not stick. */
uint64_t virtio_negotiate(uint64_t base, uint64_t wanted);
/* Sets up queue `index` with `size` entries (rings allocated here). 0 on success. */
int virtq_setup(struct virtq *q, uint64_t base, uint32_t index, uint16_t size);
void virtio_driver_ok(uint64_t base);
/* Publishes head `head` (descriptors already written) and notifies the device. */
void virtq_publish(struct virtq *q, uint16_t head);
/* Waits for one used element; 0 on success (id/len out), -1 on timeout. */
int virtq_wait_used(struct virtq *q, uint32_t *id, uint32_t *len);
/* Nonzero if a used element is pending. */
int virtq_used_pending(struct virtq *q);
void virtio_ack_interrupts(uint64_t base);
/* Nonzero if the device's used index is exactly the driver's consumed count: the device
 * neither lost nor replayed ring positions (after a snapshot restore, say). */
int virtq_used_in_step(struct virtq *q);

/* With snap=1 on the command line: prints "PROBE <name> SNAPSHOT-POINT" and waits for one
 * byte on the UART (the host snapshots the VM there, then sends the byte to the VM or to its
 * restores). Returns 0 at once without snap=1; -1 if no byte came. */
int probe_snapshot_point(const char *name);

int probe_main(void);

#endif
