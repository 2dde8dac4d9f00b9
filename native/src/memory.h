/* memory.h — guest RAM: mmap'd regions placed around the 32-bit MMIO hole. */
#ifndef SM_MEMORY_H
#define SM_MEMORY_H

#include <stddef.h>
#include <stdint.h>

#define SM_PAGE_SIZE_BYTES 4096ULL
#define SM_MIB_BYTES (1024ULL * 1024ULL)
#define SM_MAX_MEMORY_REGIONS 2

typedef struct sm_memory_region {
    uint64_t gpa;
    uint64_t size_bytes;
    uint8_t *host;
} sm_memory_region;

typedef struct sm_guest_memory {
    sm_memory_region regions[SM_MAX_MEMORY_REGIONS];
    uint32_t n_regions;
    uint64_t total_bytes;
    int file_backed;   /* regions map a snapshot's memory file (sm_memory_init_file) */
} sm_guest_memory;

/* Map memory_bytes of anonymous RAM: [0, min(size, hole)) and the rest above 4 GiB. */
int sm_memory_init(sm_guest_memory *mem, uint64_t memory_bytes, uint64_t hole_start_gpa,
                   uint64_t hole_end_gpa, char *err, size_t err_len);
/* Same layout, but each region is a copy-on-write (MAP_PRIVATE) mapping of fd: region i at
 * file offset = sum of the sizes before it. Many VMs mapping one file share its pages until
 * they write them. */
int sm_memory_init_file(sm_guest_memory *mem, int fd, uint64_t memory_bytes,
                        uint64_t hole_start_gpa, uint64_t hole_end_gpa, char *err, size_t err_len);
void sm_memory_destroy(sm_guest_memory *mem);

/* Host pointer for [gpa, gpa+len) if it lies entirely inside one region (overflow-safe),
 * else NULL. len == 0 is treated as 1. Guest-controlled gpa/len are fine here. */
uint8_t *sm_memory_ptr(const sm_guest_memory *mem, uint64_t gpa, uint64_t len);

/* Copy helpers: 0 on success, -1 if the range is not guest RAM. */
int sm_memory_read(const sm_guest_memory *mem, uint64_t gpa, void *dst, uint64_t len);
int sm_memory_write(const sm_guest_memory *mem, uint64_t gpa, const void *src, uint64_t len);

/* Release [gpa, gpa+len) back to the host (MADV_DONTNEED). It reads as zero afterwards in a
 * booted VM; in a restored VM (RAM mapped from a snapshot's memory.bin) it reads as the
 * snapshot's bytes again, which a balloon allows (the spec promises no contents without
 * VIRTIO_BALLOON_F_PAGE_POISON, which we do not offer).
 * Returns 0, or -1 if the range is not page aligned guest RAM. */
int sm_memory_discard(const sm_guest_memory *mem, uint64_t gpa, uint64_t len);

/* For each page of region `region`, writes 1 into written[page] if the guest may have written
 * it and 0 if it certainly reads as zero: anonymous memory neither present nor swapped out
 * (/proc/self/pagemap) was never written or was discarded. Returns 0, or -1 when that cannot
 * be told (file-backed RAM, whose absent pages hold file data; pagemap unreadable). */
int sm_memory_written_pages(const sm_guest_memory *mem, uint32_t region, uint8_t *written);

/* Bytes of guest RAM resident in host memory (mincore). */
uint64_t sm_memory_resident_bytes(const sm_guest_memory *mem);

/* Highest guest physical address + 1 of RAM below the MMIO hole. */
uint64_t sm_memory_low_end(const sm_guest_memory *mem);

#endif
