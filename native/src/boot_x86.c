/* boot_x86.c — loading the guest: bzImage (Linux boot protocol, 64-bit entry), PVH ELF
 * vmlinux (XEN_ELFNOTE_PHYS32_ENTRY + hvm_start_info), raw 64-bit ELF (probe guests);
 * e820 map, command line, initrd, MP table, GDT and identity page tables. */
#define _GNU_SOURCE
#include "sm_internal.h"
#include "mptable.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* Linux boot protocol (Documentation/x86/boot.rst): offsets into the setup header /
 * boot_params ("zero page"). */
#define BP_E820_ENTRIES_OFFSET 0x1e8
#define BP_SETUP_SECTS_OFFSET 0x1f1
#define BP_JUMP_OFFSET 0x200
#define BP_HEADER_MAGIC_OFFSET 0x202
#define BP_VERSION_OFFSET 0x206
#define BP_TYPE_OF_LOADER_OFFSET 0x210
#define BP_LOADFLAGS_OFFSET 0x211
#define BP_RAMDISK_IMAGE_OFFSET 0x218
#define BP_RAMDISK_SIZE_OFFSET 0x21c
#define BP_HEAP_END_PTR_OFFSET 0x224
#define BP_CMD_LINE_PTR_OFFSET 0x228
#define BP_INITRD_ADDR_MAX_OFFSET 0x22c
#define BP_XLOADFLAGS_OFFSET 0x236
#define BP_CMDLINE_SIZE_OFFSET 0x238
#define BP_INIT_SIZE_OFFSET 0x260
#define BP_E820_TABLE_OFFSET 0x2d0
#define BP_E820_MAX_ENTRIES 128
#define BP_HEADER_MAGIC 0x53726448u /* "HdrS" */
#define BP_MIN_VERSION_64BIT_ENTRY 0x20c
#define BP_XLF_KERNEL_64 0x1
#define BP_LOADFLAG_LOADED_HIGH 0x01
#define BP_LOADFLAG_CAN_USE_HEAP 0x80
#define BP_TYPE_OF_LOADER_UNDEFINED 0xff
#define BP_SECTOR_BYTES 512
#define BP_STARTUP_64_OFFSET 0x200
#define E820_TYPE_RAM 1

/* PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h). */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC_VALUE 0x336ec578u
#define HVM_START_INFO_VERSION 1

#define PAGE_TABLE_PRESENT_RW 0x3ULL
#define PAGE_TABLE_HUGE_PRESENT_RW 0x83ULL
#define HUGE_PAGE_BYTES (2ULL * 1024 * 1024)
#define IDENTITY_MAP_PD_COUNT 4 /* 4 x 1 GiB = the low 4 GiB, MMIO hole included */

/* What KVM's in-kernel irqchip reports (arch/x86/kvm/lapic.c, ioapic.h). */
#define KVM_LAPIC_VERSION 0x14
#define KVM_IOAPIC_VERSION 0x11
#define VGA_HOLE_START_GPA 0xa0000ULL

_Static_assert(SM_MPTABLE_GPA >= SM_EBDA_START_GPA &&
                   SM_MPTABLE_GPA + SM_MPTABLE_MAX_BYTES <= VGA_HOLE_START_GPA,
               "the MP table must lie outside the e820 RAM, below the VGA hole");

#define GDT_NULL 0x0000000000000000ULL
#define GDT_CODE64 0x00af9b000000ffffULL
#define GDT_CODE32 0x00cf9b000000ffffULL
#define GDT_DATA 0x00cf93000000ffffULL
#define GDT_TSS 0x008f8b000000ffffULL

struct hvm_start_info {
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

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

struct hvm_modlist_entry {
    uint64_t paddr;
    uint64_t size;
    uint64_t cmdline_paddr;
    uint64_t reserved;
};

typedef struct file_image {
    uint8_t *data;
    size_t size;
} file_image;

static int read_file(const char *path, file_image *img, char *err, size_t err_len)
{
    img->data = NULL;
    img->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, err_len, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= 0) {
        snprintf(err, err_len, "%s is not a non-empty regular file", path);
        close(fd);
        return -1;
    }
    img->size = (size_t)st.st_size;
    img->data = malloc(img->size);
    if (!img->data) {
        snprintf(err, err_len, "out of memory reading %s", path);
        close(fd);
        return -1;
    }
    size_t got = 0;
    while (got < img->size) {
        ssize_t n = read(fd, img->data + got, img->size - got);
        if (n <= 0) {
            snprintf(err, err_len, "short read on %s", path);
            free(img->data);
            img->data = NULL;
            close(fd);
            return -1;
        }
        got += (size_t)n;
    }
    close(fd);
    return 0;
}

typedef struct e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
} e820_entry;

/* Our e820 map: conventional memory below the EBDA, then RAM from 1 MiB, then above 4 GiB. */
static uint32_t build_e820(const struct sm_vm *vm, e820_entry *out)
{
    uint32_t n = 0;
    out[n++] = (e820_entry){0, SM_EBDA_START_GPA, E820_TYPE_RAM};
    uint64_t low_end = sm_memory_low_end(&vm->mem);
    if (low_end > SM_HIGH_MEMORY_START_GPA)
        out[n++] = (e820_entry){SM_HIGH_MEMORY_START_GPA, low_end - SM_HIGH_MEMORY_START_GPA,
                                E820_TYPE_RAM};
    if (vm->mem.n_regions > 1)
        out[n++] = (e820_entry){vm->mem.regions[1].gpa, vm->mem.regions[1].size_bytes,
                                E820_TYPE_RAM};
    return n;
}

static int write_cmdline(struct sm_vm *vm, const char *cmdline, uint32_t max_bytes, char *err,
                         size_t err_len)
{
    size_t len = strlen(cmdline);
    if (len + 1 > max_bytes || len + 1 > SM_CMDLINE_MAX_BYTES) {
        snprintf(err, err_len, "command line is %zu bytes, the kernel accepts at most %u", len,
                 max_bytes - 1);
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (sm_memory_write(&vm->mem, SM_CMDLINE_GPA, cmdline, len + 1) < 0) {
        snprintf(err, err_len, "guest RAM too small for the command line");
        return SM_ERR_INVALID_ARGUMENT;
    }
    return SM_OK;
}

/* Initrd goes as high as allowed, page aligned, above kernel_end. */
static int place_initrd(struct sm_vm *vm, const char *initrd_path, uint64_t kernel_end,
                        uint64_t addr_max, uint64_t *gpa_out, uint64_t *size_out, char *err,
                        size_t err_len)
{
    *gpa_out = 0;
    *size_out = 0;
    if (!initrd_path || !*initrd_path)
        return SM_OK;
    file_image img;
    if (read_file(initrd_path, &img, err, err_len) < 0)
        return SM_ERR_INITRD_LOAD;
    uint64_t top = sm_memory_low_end(&vm->mem);
    if (addr_max && top > addr_max + 1)
        top = addr_max + 1;
    if (img.size > top) {
        snprintf(err, err_len, "initrd %s (%zu bytes) does not fit in guest RAM", initrd_path,
                 img.size);
        free(img.data);
        return SM_ERR_INITRD_LOAD;
    }
    uint64_t gpa = (top - img.size) & ~(SM_PAGE_SIZE_BYTES - 1);
    if (gpa < kernel_end) {
        snprintf(err, err_len, "initrd %s (%zu bytes) overlaps the kernel; give the VM more memory",
                 initrd_path, img.size);
        free(img.data);
        return SM_ERR_INITRD_LOAD;
    }
    if (sm_memory_write(&vm->mem, gpa, img.data, img.size) < 0) {
        snprintf(err, err_len, "initrd does not fit at 0x%llx", (unsigned long long)gpa);
        free(img.data);
        return SM_ERR_INITRD_LOAD;
    }
    *gpa_out = gpa;
    *size_out = img.size;
    free(img.data);
    return SM_OK;
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static int load_bzimage(struct sm_vm *vm, const file_image *img, const char *initrd_path,
                        const char *cmdline, char *err, size_t err_len)
{
    if (img->size < BP_INIT_SIZE_OFFSET + 4) {
        snprintf(err, err_len, "bzImage too small");
        return SM_ERR_KERNEL_LOAD;
    }
    uint16_t version = rd16(img->data + BP_VERSION_OFFSET);
    uint16_t xloadflags = rd16(img->data + BP_XLOADFLAGS_OFFSET);
    if (version < BP_MIN_VERSION_64BIT_ENTRY || !(xloadflags & BP_XLF_KERNEL_64)) {
        snprintf(err, err_len,
                 "bzImage boot protocol %u.%02u without XLF_KERNEL_64: no 64-bit entry point",
                 version >> 8, version & 0xff);
        return SM_ERR_KERNEL_LOAD;
    }
    uint32_t setup_sects = img->data[BP_SETUP_SECTS_OFFSET];
    if (setup_sects == 0)
        setup_sects = 4;
    size_t kernel_offset = (size_t)(setup_sects + 1) * BP_SECTOR_BYTES;
    if (kernel_offset >= img->size) {
        snprintf(err, err_len, "bzImage setup_sects %u points past the file", setup_sects);
        return SM_ERR_KERNEL_LOAD;
    }
    size_t kernel_bytes = img->size - kernel_offset;
    uint32_t init_size = rd32(img->data + BP_INIT_SIZE_OFFSET);
    uint64_t kernel_end = SM_KERNEL_LOAD_GPA + (init_size > kernel_bytes ? init_size : kernel_bytes);
    if (kernel_end > sm_memory_low_end(&vm->mem)) {
        snprintf(err, err_len, "kernel needs %llu bytes from 1 MiB; guest RAM too small",
                 (unsigned long long)(kernel_end - SM_KERNEL_LOAD_GPA));
        return SM_ERR_KERNEL_LOAD;
    }
    if (sm_memory_write(&vm->mem, SM_KERNEL_LOAD_GPA, img->data + kernel_offset, kernel_bytes) < 0) {
        snprintf(err, err_len, "kernel does not fit in guest RAM");
        return SM_ERR_KERNEL_LOAD;
    }

    uint8_t zero_page[SM_PAGE_SIZE_BYTES];
    memset(zero_page, 0, sizeof(zero_page));
    size_t header_end = BP_JUMP_OFFSET + 2 + img->data[BP_JUMP_OFFSET + 1];
    if (header_end > sizeof(zero_page))
        header_end = sizeof(zero_page);
    if (header_end > img->size)
        header_end = img->size;
    memcpy(zero_page + BP_SETUP_SECTS_OFFSET, img->data + BP_SETUP_SECTS_OFFSET,
           header_end - BP_SETUP_SECTS_OFFSET);
    zero_page[BP_TYPE_OF_LOADER_OFFSET] = BP_TYPE_OF_LOADER_UNDEFINED;
    zero_page[BP_LOADFLAGS_OFFSET] |= BP_LOADFLAG_LOADED_HIGH | BP_LOADFLAG_CAN_USE_HEAP;
    wr16(zero_page + BP_HEAP_END_PTR_OFFSET, 0xfe00);

    uint32_t cmdline_size = rd32(img->data + BP_CMDLINE_SIZE_OFFSET);
    if (cmdline_size == 0)
        cmdline_size = 256;
    int rc = write_cmdline(vm, cmdline, cmdline_size + 1, err, err_len);
    if (rc != SM_OK)
        return rc;
    wr32(zero_page + BP_CMD_LINE_PTR_OFFSET, (uint32_t)SM_CMDLINE_GPA);

    uint64_t initrd_gpa, initrd_size;
    uint32_t addr_max = rd32(img->data + BP_INITRD_ADDR_MAX_OFFSET);
    rc = place_initrd(vm, initrd_path, kernel_end, addr_max ? addr_max : 0x37ffffff, &initrd_gpa,
                      &initrd_size, err, err_len);
    if (rc != SM_OK)
        return rc;
    wr32(zero_page + BP_RAMDISK_IMAGE_OFFSET, (uint32_t)initrd_gpa);
    wr32(zero_page + BP_RAMDISK_SIZE_OFFSET, (uint32_t)initrd_size);

    e820_entry e820[4];
    uint32_t n = build_e820(vm, e820);
    zero_page[BP_E820_ENTRIES_OFFSET] = (uint8_t)n;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = zero_page + BP_E820_TABLE_OFFSET + i * 20;
        memcpy(e, &e820[i].addr, 8);
        memcpy(e + 8, &e820[i].size, 8);
        memcpy(e + 16, &e820[i].type, 4);
    }
    sm_memory_write(&vm->mem, SM_ZERO_PAGE_GPA, zero_page, sizeof(zero_page));

    vm->boot.mode = SM_ENTRY_LONG_MODE;
    vm->boot.rip = SM_KERNEL_LOAD_GPA + BP_STARTUP_64_OFFSET;
    vm->boot.rsi = SM_ZERO_PAGE_GPA;
    vm->boot.rsp = SM_ZERO_PAGE_GPA; /* the decompressor sets up its own stack */
    return SM_OK;
}

/* Loads every PT_LOAD segment at its physical address; returns the highest end. */
static int load_elf_segments(struct sm_vm *vm, const file_image *img, uint64_t *end_out,
                             char *err, size_t err_len)
{
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)(const void *)img->data;
    uint64_t end = 0;
    if (eh->e_phentsize != sizeof(Elf64_Phdr) || eh->e_phoff > img->size ||
        (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > img->size - eh->e_phoff) {
        snprintf(err, err_len, "ELF program headers out of file bounds");
        return SM_ERR_KERNEL_LOAD;
    }
    for (uint32_t i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr ph;
        memcpy(&ph, img->data + eh->e_phoff + (uint64_t)i * sizeof(ph), sizeof(ph));
        if (ph.p_type != PT_LOAD || ph.p_memsz == 0)
            continue;
        if (ph.p_filesz > ph.p_memsz || ph.p_offset > img->size ||
            ph.p_filesz > img->size - ph.p_offset) {
            snprintf(err, err_len, "ELF segment %u out of file bounds", i);
            return SM_ERR_KERNEL_LOAD;
        }
        uint8_t *dst = sm_memory_ptr(&vm->mem, ph.p_paddr, ph.p_memsz);
        if (!dst) {
            snprintf(err, err_len, "ELF segment %u [0x%llx, +0x%llx) is outside guest RAM", i,
                     (unsigned long long)ph.p_paddr, (unsigned long long)ph.p_memsz);
            return SM_ERR_KERNEL_LOAD;
        }
        memcpy(dst, img->data + ph.p_offset, ph.p_filesz);
        memset(dst + ph.p_filesz, 0, ph.p_memsz - ph.p_filesz);
        if (ph.p_paddr + ph.p_memsz > end)
            end = ph.p_paddr + ph.p_memsz;
    }
    if (end == 0) {
        snprintf(err, err_len, "ELF has no loadable segment");
        return SM_ERR_KERNEL_LOAD;
    }
    *end_out = end;
    return SM_OK;
}

/* Finds XEN_ELFNOTE_PHYS32_ENTRY; 0 if the ELF has none. */
static uint64_t find_pvh_entry(const file_image *img)
{
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)(const void *)img->data;
    for (uint32_t i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr ph;
        memcpy(&ph, img->data + eh->e_phoff + (uint64_t)i * sizeof(ph), sizeof(ph));
        if (ph.p_type != PT_NOTE || ph.p_offset > img->size || ph.p_filesz > img->size - ph.p_offset)
            continue;
        uint64_t off = ph.p_offset, end = ph.p_offset + ph.p_filesz;
        while (off + 12 <= end) {
            uint32_t namesz = rd32(img->data + off), descsz = rd32(img->data + off + 4);
            uint32_t type = rd32(img->data + off + 8);
            uint64_t name_off = off + 12;
            uint64_t desc_off = name_off + ((namesz + 3ULL) & ~3ULL);
            uint64_t next = desc_off + ((descsz + 3ULL) & ~3ULL);
            if (next > end)
                break;
            if (type == XEN_ELFNOTE_PHYS32_ENTRY && namesz == 4 &&
                memcmp(img->data + name_off, "Xen", 4) == 0 && descsz >= 4) {
                return descsz >= 8 ? (uint64_t)rd32(img->data + desc_off) |
                                         ((uint64_t)rd32(img->data + desc_off + 4) << 32)
                                   : rd32(img->data + desc_off);
            }
            off = next;
        }
    }
    return 0;
}

static int load_elf(struct sm_vm *vm, const file_image *img, const char *initrd_path,
                    const char *cmdline, char *err, size_t err_len)
{
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)(const void *)img->data;
    if (img->size < sizeof(Elf64_Ehdr) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_machine != EM_X86_64) {
        snprintf(err, err_len, "kernel ELF is not a 64-bit x86-64 ELF");
        return SM_ERR_KERNEL_LOAD;
    }
    uint64_t end;
    int rc = load_elf_segments(vm, img, &end, err, err_len);
    if (rc != SM_OK)
        return rc;
    rc = write_cmdline(vm, cmdline, SM_CMDLINE_MAX_BYTES, err, err_len);
    if (rc != SM_OK)
        return rc;
    uint64_t pvh_entry = find_pvh_entry(img);
    if (pvh_entry == 0) {
        /* Raw 64-bit ELF (probe guest): long mode at e_entry, rdi = cmdline, rsi = RAM. */
        if (initrd_path && *initrd_path) {
            snprintf(err, err_len, "an initrd needs a Linux kernel (bzImage or PVH vmlinux)");
            return SM_ERR_INVALID_ARGUMENT;
        }
        vm->boot.mode = SM_ENTRY_LONG_MODE;
        vm->boot.rip = eh->e_entry;
        vm->boot.rsp = SM_PROBE_STACK_TOP_GPA - 8;
        vm->boot.rdi = SM_CMDLINE_GPA;
        vm->boot.rsi = vm->mem.total_bytes;
        return SM_OK;
    }
    uint64_t initrd_gpa, initrd_size;
    rc = place_initrd(vm, initrd_path, end, 0xffffffffULL, &initrd_gpa, &initrd_size, err, err_len);
    if (rc != SM_OK)
        return rc;
    struct hvm_start_info si;
    memset(&si, 0, sizeof(si));
    si.magic = HVM_START_MAGIC_VALUE;
    si.version = HVM_START_INFO_VERSION;
    si.cmdline_paddr = SM_CMDLINE_GPA;
    e820_entry e820[4];
    uint32_t n = build_e820(vm, e820);
    for (uint32_t i = 0; i < n; i++) {
        struct hvm_memmap_table_entry m = {e820[i].addr, e820[i].size, e820[i].type, 0};
        sm_memory_write(&vm->mem, SM_PVH_MEMMAP_GPA + i * sizeof(m), &m, sizeof(m));
    }
    si.memmap_paddr = SM_PVH_MEMMAP_GPA;
    si.memmap_entries = n;
    if (initrd_size) {
        struct hvm_modlist_entry mod = {initrd_gpa, initrd_size, 0, 0};
        sm_memory_write(&vm->mem, SM_PVH_MODLIST_GPA, &mod, sizeof(mod));
        si.nr_modules = 1;
        si.modlist_paddr = SM_PVH_MODLIST_GPA;
    }
    sm_memory_write(&vm->mem, SM_PVH_START_INFO_GPA, &si, sizeof(si));
    vm->boot.mode = SM_ENTRY_PVH_32;
    vm->boot.rip = pvh_entry;
    vm->boot.rbx = SM_PVH_START_INFO_GPA;
    vm->boot.rsp = 0;
    return SM_OK;
}

/* The MP table: one processor entry per vCPU and the in-kernel IOAPIC as KVM has it now. */
static int write_mptable(struct sm_vm *vm, char *err, size_t err_len)
{
    sm_mptable_config cfg = {
        .n_cpus = vm->n_vcpus,
        .lapic_version = KVM_LAPIC_VERSION,
        .ioapic_version = KVM_IOAPIC_VERSION,
        .ioapic_pins = KVM_IOAPIC_NUM_PINS,
    };
    for (uint32_t i = 0; i < vm->cpuid->nent; i++) {
        if (vm->cpuid->entries[i].function == 1) {
            cfg.cpu_signature = vm->cpuid->entries[i].eax;
            cfg.cpu_features = vm->cpuid->entries[i].edx;
        }
    }
    struct kvm_irqchip chip = {.chip_id = KVM_IRQCHIP_IOAPIC};
    if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &chip) < 0) {
        snprintf(err, err_len, "KVM_GET_IRQCHIP (IOAPIC) failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    cfg.ioapic_id = (uint8_t)chip.chip.ioapic.id;
    uint8_t table[SM_MPTABLE_MAX_BYTES];
    size_t n = sm_mptable_build(table, sizeof(table), SM_MPTABLE_GPA, &cfg);
    if (n == 0) {
        snprintf(err, err_len, "cannot build the MP table for %u vCPUs (IOAPIC id %u)",
                 vm->n_vcpus, cfg.ioapic_id);
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (sm_memory_write(&vm->mem, SM_MPTABLE_GPA, table, n) < 0) {
        snprintf(err, err_len, "guest RAM too small for the MP table");
        return SM_ERR_INVALID_ARGUMENT;
    }
    return SM_OK;
}

int sm_boot_load(struct sm_vm *vm, const char *kernel_path, const char *initrd_path,
                 const char *cmdline, char *err, size_t err_len)
{
    file_image img;
    if (read_file(kernel_path, &img, err, err_len) < 0)
        return SM_ERR_KERNEL_LOAD;
    int rc;
    if (img.size >= 4 && memcmp(img.data, ELFMAG, SELFMAG) == 0) {
        rc = load_elf(vm, &img, initrd_path, cmdline, err, err_len);
    } else if (img.size > BP_HEADER_MAGIC_OFFSET + 4 &&
               rd32(img.data + BP_HEADER_MAGIC_OFFSET) == BP_HEADER_MAGIC) {
        rc = load_bzimage(vm, &img, initrd_path, cmdline, err, err_len);
    } else {
        snprintf(err, err_len, "%s is neither an ELF nor a bzImage", kernel_path);
        rc = SM_ERR_KERNEL_LOAD;
    }
    free(img.data);
    if (rc == SM_OK)
        rc = write_mptable(vm, err, err_len);
    if (rc == SM_OK)
        rc = sm_boot_write_page_tables(vm, err, err_len);
    return rc;
}

int sm_boot_write_page_tables(struct sm_vm *vm, char *err, size_t err_len)
{
    uint64_t gdt[4] = {GDT_NULL, vm->boot.mode == SM_ENTRY_LONG_MODE ? GDT_CODE64 : GDT_CODE32,
                       GDT_DATA, GDT_TSS};
    uint64_t idt_null = 0;
    if (sm_memory_write(&vm->mem, SM_GDT_GPA, gdt, sizeof(gdt)) < 0 ||
        sm_memory_write(&vm->mem, SM_IDT_GPA, &idt_null, sizeof(idt_null)) < 0) {
        snprintf(err, err_len, "guest RAM too small for the GDT");
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (vm->boot.mode != SM_ENTRY_LONG_MODE)
        return SM_OK;
    uint64_t *pml4 = (uint64_t *)(void *)sm_memory_ptr(&vm->mem, SM_PML4_GPA, SM_PAGE_SIZE_BYTES);
    uint64_t *pdpt = (uint64_t *)(void *)sm_memory_ptr(&vm->mem, SM_PDPT_GPA, SM_PAGE_SIZE_BYTES);
    uint64_t *pd = (uint64_t *)(void *)sm_memory_ptr(&vm->mem, SM_PD_GPA,
                                                     IDENTITY_MAP_PD_COUNT * SM_PAGE_SIZE_BYTES);
    if (!pml4 || !pdpt || !pd) {
        snprintf(err, err_len, "guest RAM too small for the page tables");
        return SM_ERR_INVALID_ARGUMENT;
    }
    memset(pml4, 0, SM_PAGE_SIZE_BYTES);
    memset(pdpt, 0, SM_PAGE_SIZE_BYTES);
    pml4[0] = SM_PDPT_GPA | PAGE_TABLE_PRESENT_RW;
    for (uint64_t i = 0; i < IDENTITY_MAP_PD_COUNT; i++)
        pdpt[i] = (SM_PD_GPA + i * SM_PAGE_SIZE_BYTES) | PAGE_TABLE_PRESENT_RW;
    for (uint64_t i = 0; i < IDENTITY_MAP_PD_COUNT * 512; i++)
        pd[i] = (i * HUGE_PAGE_BYTES) | PAGE_TABLE_HUGE_PRESENT_RW;
    return SM_OK;
}
