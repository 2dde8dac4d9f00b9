/* memory.c — guest RAM regions and bounds-checked access. */
#define _GNU_SOURCE
#include "memory.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

/* Map guest RAM as up to two regions around the 32-bit MMIO hole: anonymous memory (fd < 0)
 * or a copy-on-write private mapping of a snapshot's memory file (fd >= 0: several VMs
 * restored from one file share its page cache until they write). */
static int map_regions(sm_guest_memory *mem, int fd, uint64_t memory_bytes, uint64_t hole_start_gpa,
                       uint64_t hole_end_gpa, char *err, size_t err_len)
{
    memset(mem, 0, sizeof(*mem));
    if (memory_bytes == 0 || memory_bytes % SM_PAGE_SIZE_BYTES != 0) {
        snprintf(err, err_len, "memory size %llu is not a positive multiple of 4 KiB",
                 (unsigned long long)memory_bytes);
        return -1;
    }
    uint64_t low = memory_bytes < hole_start_gpa ? memory_bytes : hole_start_gpa;
    uint64_t sizes[2] = {low, memory_bytes - low};
    uint64_t gpas[2] = {0, hole_end_gpa};
    uint64_t offset = 0;
    for (int i = 0; i < 2; i++) {
        if (sizes[i] == 0)
            continue;
        void *p = fd < 0 ? mmap(NULL, sizes[i], PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
                         : mmap(NULL, sizes[i], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE,
                                fd, (off_t)offset);
        if (p == MAP_FAILED) {
            snprintf(err, err_len, "%smmap of %llu MiB guest RAM%s failed: %s",
                     fd < 0 ? "" : "copy-on-write ", (unsigned long long)(sizes[i] / SM_MIB_BYTES),
                     fd < 0 ? "" : " from the snapshot", strerror(errno));
            sm_memory_destroy(mem);
            return -1;
        }
        /* Guest RAM is not worth a core dump and must not leak into a fork. */
        madvise(p, sizes[i], MADV_DONTDUMP);
        madvise(p, sizes[i], MADV_DONTFORK);
        mem->regions[mem->n_regions].gpa = gpas[i];
        mem->regions[mem->n_regions].size_bytes = sizes[i];
        mem->regions[mem->n_regions].host = p;
        mem->n_regions++;
        offset += sizes[i];
    }
    mem->total_bytes = memory_bytes;
    mem->file_backed = fd >= 0;
    return 0;
}

int sm_memory_init(sm_guest_memory *mem, uint64_t memory_bytes, uint64_t hole_start_gpa,
                   uint64_t hole_end_gpa, char *err, size_t err_len)
{
    return map_regions(mem, -1, memory_bytes, hole_start_gpa, hole_end_gpa, err, err_len);
}

int sm_memory_init_file(sm_guest_memory *mem, int fd, uint64_t memory_bytes,
                        uint64_t hole_start_gpa, uint64_t hole_end_gpa, char *err, size_t err_len)
{
    if (fd < 0) {
        snprintf(err, err_len, "snapshot memory file descriptor is invalid");
        return -1;
    }
    return map_regions(mem, fd, memory_bytes, hole_start_gpa, hole_end_gpa, err, err_len);
}

void sm_memory_destroy(sm_guest_memory *mem)
{
    for (uint32_t i = 0; i < mem->n_regions; i++) {
        if (mem->regions[i].host)
            munmap(mem->regions[i].host, mem->regions[i].size_bytes);
        mem->regions[i].host = NULL;
    }
    mem->n_regions = 0;
}

uint8_t *sm_memory_ptr(const sm_guest_memory *mem, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        len = 1;
    for (uint32_t i = 0; i < mem->n_regions; i++) {
        const sm_memory_region *r = &mem->regions[i];
        if (gpa < r->gpa)
            continue;
        uint64_t off = gpa - r->gpa;
        if (off >= r->size_bytes)
            continue;
        if (len > r->size_bytes - off) /* no overflow: both sides bounded by size */
            return NULL;
        return r->host + off;
    }
    return NULL;
}

int sm_memory_read(const sm_guest_memory *mem, uint64_t gpa, void *dst, uint64_t len)
{
    uint8_t *p = sm_memory_ptr(mem, gpa, len);
    if (!p)
        return -1;
    memcpy(dst, p, len);
    return 0;
}

int sm_memory_write(const sm_guest_memory *mem, uint64_t gpa, const void *src, uint64_t len)
{
    uint8_t *p = sm_memory_ptr(mem, gpa, len);
    if (!p)
        return -1;
    memcpy(p, src, len);
    return 0;
}

int sm_memory_discard(const sm_guest_memory *mem, uint64_t gpa, uint64_t len)
{
    if (gpa % SM_PAGE_SIZE_BYTES || len % SM_PAGE_SIZE_BYTES || len == 0)
        return -1;
    uint8_t *p = sm_memory_ptr(mem, gpa, len);
    if (!p)
        return -1;
    return madvise(p, len, MADV_DONTNEED) == 0 ? 0 : -1;
}

uint64_t sm_memory_low_end(const sm_guest_memory *mem)
{
    return mem->n_regions ? mem->regions[0].gpa + mem->regions[0].size_bytes : 0;
}

uint64_t sm_memory_resident_bytes(const sm_guest_memory *mem)
{
    uint64_t resident = 0;
    for (uint32_t i = 0; i < mem->n_regions; i++) {
        const sm_memory_region *r = &mem->regions[i];
        size_t pages = r->size_bytes / SM_PAGE_SIZE_BYTES;
        unsigned char *vec = malloc(pages);
        if (!vec)
            continue;
        if (mincore(r->host, r->size_bytes, vec) == 0)
            for (size_t p = 0; p < pages; p++)
                resident += (vec[p] & 1) ? SM_PAGE_SIZE_BYTES : 0;
        free(vec);
    }
    return resident;
}

#define PAGEMAP_ENTRY_BYTES 8
#define PAGEMAP_PRESENT_BIT 63
#define PAGEMAP_SWAPPED_BIT 62
#define PAGEMAP_CHUNK_ENTRIES 4096

int sm_memory_written_pages(const sm_guest_memory *mem, uint32_t region, uint8_t *written)
{
    if (mem->file_backed || region >= mem->n_regions)
        return -1;
    const sm_memory_region *r = &mem->regions[region];
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    uint64_t pages = r->size_bytes / SM_PAGE_SIZE_BYTES;
    uint64_t first = (uint64_t)(uintptr_t)r->host / SM_PAGE_SIZE_BYTES;
    uint64_t entries[PAGEMAP_CHUNK_ENTRIES];
    for (uint64_t done = 0; done < pages;) {
        uint64_t want = pages - done < PAGEMAP_CHUNK_ENTRIES ? pages - done : PAGEMAP_CHUNK_ENTRIES;
        ssize_t n = pread(fd, entries, want * PAGEMAP_ENTRY_BYTES,
                          (off_t)((first + done) * PAGEMAP_ENTRY_BYTES));
        if (n <= 0 || n % PAGEMAP_ENTRY_BYTES) {
            close(fd);
            return -1;
        }
        for (uint64_t i = 0; i < (uint64_t)n / PAGEMAP_ENTRY_BYTES; i++)
            written[done + i] = (entries[i] >> PAGEMAP_PRESENT_BIT & 1) ||
                                (entries[i] >> PAGEMAP_SWAPPED_BIT & 1);
        done += (uint64_t)n / PAGEMAP_ENTRY_BYTES;
    }
    close(fd);
    return 0;
}
