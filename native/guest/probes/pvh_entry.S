/* pvh_entry.S — PVH boot entry for probe guests, so the same probe ELF boots under the
 * native core and under QEMU (`qemu-system-x86_64 -kernel probe.elf`, -M microvm or pc).
 *
 * The PVH boot ABI (Xen's docs/misc/pvh.pandoc, used by QEMU and by the native core's
 * load_elf for a PVH vmlinux): the loader finds the ELF note XEN_ELFNOTE_PHYS32_ENTRY and
 * jumps there in 32-bit protected mode, paging off, flat CS/DS/ES/SS, interrupts off,
 * %ebx = physical address of struct hvm_start_info. No stack, no usable GDT.
 *
 * This stub loads its own GDT, switches to long mode on page tables built at link time
 * (identity map of the low 4 GiB with 2 MiB pages, as the native core's raw 64-bit entry
 * provides), sets a stack in .bss and calls pvh_start64() (probe_lib.c), which reads the
 * command line and RAM size out of hvm_start_info and enters _start(cmdline, mem_bytes):
 * from there on the probe runs the same C code as through the raw 64-bit ELF entry.
 *
 * Linked only into the probes listed in PVH_PROBES (native/build_native.py); without this
 * object a probe has no PVH note and the native core enters _start directly in 64-bit mode.
 * Everything is static data (no page-table loop): on an instruction-emulating KVM every
 * guest instruction costs microseconds. */

/* Name this object: without it the assembler names it after gcc's random temporary file,
 * and the probe ELF (shipped in the wheel) differs from build to build. */
	.file "pvh_entry.S"

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define CODE64_SELECTOR 0x08
#define DATA_SELECTOR 0x10
#define GDT_CODE64 0x00af9a000000ffff   /* present, DPL 0, execute/read, L=1, G=1 */
#define GDT_DATA 0x00cf92000000ffff     /* present, DPL 0, read/write, D/B=1, G=1 */
#define CR0_PE 0x00000001
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xc0000080
#define EFER_LME 0x00000100
#define PTE_PRESENT_RW 0x3
#define PDE_HUGE_PRESENT_RW 0x83
#define HUGE_PAGE_BYTES 0x200000
#define IDENTITY_MAP_PD_COUNT 4         /* 4 x 1 GiB: the low 4 GiB, virtio-mmio included */
#define PAGE_BYTES 4096
#define STACK_BYTES 65536

/* The note QEMU's load_elfboot() and the native core's find_pvh_entry() look for. Name
 * "Xen", 8-byte descriptor (QEMU reads a size_t), 4-byte alignment (QEMU aligns the name
 * to the PT_NOTE segment's p_align). */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                             /* namesz: "Xen\0" */
    .long 8                             /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32

    .section .text.pvh, "ax", @progbits
    .code32
    .globl pvh_entry32
pvh_entry32:
    cli
    cld
    movl %ebx, %edi                     /* hvm_start_info, first argument of pvh_start64 */
    lgdt pvh_gdt_pointer
    movl $DATA_SELECTOR, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $pvh_stack_top, %esp
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pvh_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $CODE64_SELECTOR, $pvh_entry64

    .code64
pvh_entry64:
    movl %edi, %edi                     /* upper halves are undefined after the switch */
    movq $pvh_stack_top, %rsp
    xorl %ebp, %ebp
    call pvh_start64                    /* noreturn */
1:  cli
    hlt
    jmp 1b

    .section .data.pvh, "aw", @progbits
    .balign 16
pvh_gdt:
    .quad 0
    .quad GDT_CODE64
    .quad GDT_DATA
pvh_gdt_end:
pvh_gdt_pointer:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt

    .balign PAGE_BYTES
pvh_pml4:
    .quad pvh_pdpt + PTE_PRESENT_RW
    .fill 511, 8, 0
pvh_pdpt:
    .set pd_index, 0
    .rept IDENTITY_MAP_PD_COUNT
    .quad pvh_pd + pd_index * PAGE_BYTES + PTE_PRESENT_RW
    .set pd_index, pd_index + 1
    .endr
    .fill 512 - IDENTITY_MAP_PD_COUNT, 8, 0
pvh_pd:
    .set huge_page, 0
    .rept IDENTITY_MAP_PD_COUNT * 512
    .quad huge_page * HUGE_PAGE_BYTES + PDE_HUGE_PRESENT_RW
    .set huge_page, huge_page + 1
    .endr

    .section .bss.pvh, "aw", @nobits
    .balign 16
pvh_stack:
    .skip STACK_BYTES
pvh_stack_top:

    .section .note.GNU-stack, "", @progbits
