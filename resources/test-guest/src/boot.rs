//! CPL0 start-up: PVH entry, long mode, GDT/TSS, SSE, then the drop to CPL3.
//!
//! Why CPL3: on hosts whose KVM emulates guest CPL0 code instruction by instruction (this
//! project's development machine serves `/dev/kvm` that way, about 1 µs per instruction) only
//! CPL3 code runs at native speed. So the CPL0 part is this short, straight-line start-up using
//! only common instructions (lgdt, mov to CRn, rdmsr/wrmsr, ljmp, ltr, lidt, iretq, in/out),
//! and all real work — command line parsing, virtio, BLAKE3 — runs at CPL3.
//!
//! Port I/O at CPL3: RFLAGS.IOPL is 3, which allows it on real hardware and VMX/SVM KVM (Intel
//! SDM Vol. 1 §19.5.1). This machine's KVM does not honour IOPL for guest CPL3 code and raises
//! #GP instead; a tiny CPL0 #GP handler then performs the trapped one-byte `in`/`out` and
//! resumes after it. So the same binary does port I/O natively wherever IOPL works, and through
//! ~10 emulated instructions per access here. Interrupts stay disabled (IF=0): the guest polls.
//!
//! Boot steps, in order:
//! 1. PVH entry (xen/include/public/arch-x86/hvm/start_info.h): 32-bit protected mode, paging
//!    off, %ebx = physical address of `struct hvm_start_info`.
//! 2. Load our GDT (null, code64, data, user data, user code64, TSS) and flat data segments.
//! 3. CR4.PAE|OSFXSR|OSXMMEXCPT, CR3 = identity map of 0-4 GiB (2 MiB pages, U/S set at every
//!    level so CPL3 reaches RAM and the MMIO gap), EFER.LME, CR0.PG|NE|MP (EM, TS clear).
//! 4. Far jump to 64-bit code; fill in the TSS descriptor's base and RSP0; ltr.
//! 5. lidt with an IDT that has only the #GP gate (port I/O emulation, see above): any other
//!    exception cannot be delivered, so it triple-faults and the VMM reports it.
//! 6. iretq to CPL3 with IOPL=3, IF=0, on the user stack; zero .bss there and call
//!    `rust_main(start_info)`.

use core::arch::global_asm;

/// `XEN_ELFNOTE_PHYS32_ENTRY` (xen/include/public/elfnote.h).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// GDT selectors (index * 8 | RPL).
pub const KERNEL_CS: u16 = 0x08;
/// Ring-0 data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Ring-3 data segment with RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// Ring-3 64-bit code segment with RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// 64-bit TSS.
pub const TSS_SEL: u16 = 0x28;

global_asm!(
    r#"
    /* PVH entry note. The descriptor is 8 bytes like Linux's (_ASM_PTR): QEMU reads a 64-bit
       value, samepage (linux-loader) the low 32 bits. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 8                 /* descsz */
    .long {note_type}       /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad _start32
    .balign 4
    .popsection

    /* Page tables: PML4 -> 1 PDPT -> 4 PDs of 2 MiB pages = identity map of 0-4 GiB.
       Flags 0x87 = present | writable | user | page size. The top GiB (MMIO gap part
       0xc0000000-0xffffffff) is also PCD|PWT (uncached). Intel SDM Vol. 3A §4.5. */
    .pushsection .data.boot, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x7
    .quad pd0 + 0x1000 + 0x7
    .quad pd0 + 0x2000 + 0x7
    .quad pd0 + 0x3000 + 0x1f
    .fill 508, 8, 0
pd0:
    .set i, 0
    .rept 1536
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
    .rept 512
    .quad (i << 21) | 0x9f
    .set i, i + 1
    .endr

    /* GDT. Intel SDM Vol. 3A §3.4.5, §7.2.3 (64-bit TSS descriptor). */
    .balign 16
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00af9a000000ffff        /* 0x08 ring-0 code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 ring-0 data, flat */
    .quad 0x00cff2000000ffff        /* 0x18 ring-3 data, flat */
    .quad 0x00affa000000ffff        /* 0x20 ring-3 code, 64-bit */
    .quad 0x0000890000000067        /* 0x28 TSS (base filled in at run time), limit 103 */
    .quad 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .long 0
    /* IDT with one gate, #GP (vector 13), filled in at run time; every other vector is absent
       or beyond the limit, so any other exception ends in a triple fault. */
    .balign 16
idt:
    .fill 14 * 16, 1, 0
idt_end:
    .balign 8
idt_ptr:
    .word idt_end - idt - 1
    .quad idt

    /* 64-bit TSS (Intel SDM Vol. 3A §7.7): RSP0 at offset 4, I/O map base at 102 (= limit + 1:
       no I/O permission bitmap; IOPL=3 allows all ports). */
    .balign 16
tss:
    .fill 102, 1, 0
    .word 104
    .popsection

    .pushsection .stack, "aw", @nobits
    .balign 4096
kstack_bottom:
    .skip 4096
kstack_top:
ustack_bottom:
    .skip 256 * 1024
ustack_top:
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    movl %ebx, %edi                 /* hvm_start_info, kept for rust_main */
    lgdt gdt_ptr
    movl ${kernel_ds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $0x620, %eax               /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xfffffff3, %eax          /* clear EM, TS */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp ${kernel_cs}, $start64

    .code64
start64:
    movl %edi, %edi                 /* zero-extend start_info */
    leaq tss(%rip), %rax            /* TSS descriptor base 0:15, 16:23, 24:31, 32:63 */
    movw %ax, gdt + 0x2a(%rip)
    shrq $16, %rax
    movb %al, gdt + 0x2c(%rip)
    movb %ah, gdt + 0x2f(%rip)
    shrq $16, %rax
    movl %eax, gdt + 0x30(%rip)
    leaq kstack_top(%rip), %rax
    movq %rax, tss + 4(%rip)        /* RSP0 */
    movw ${tss_sel}, %ax
    ltr %ax
    leaq gp_handler(%rip), %rax     /* #GP gate: offset, CS, P|DPL0|interrupt gate */
    leaq idt + 13 * 16(%rip), %rcx
    movw %ax, (%rcx)
    movw ${kernel_cs}, 2(%rcx)
    movw $0x8e00, 4(%rcx)
    shrq $16, %rax
    movw %ax, 6(%rcx)
    shrq $16, %rax
    movl %eax, 8(%rcx)
    lidt idt_ptr(%rip)
    /* Drop to CPL3 with IOPL=3 (port I/O allowed), IF=0. PVH leaves %esp undefined, so the
       iretq frame goes on our kernel stack. */
    leaq kstack_top(%rip), %rsp
    leaq ustack_top(%rip), %rax
    pushq ${user_ds}
    pushq %rax
    pushq $0x3002                   /* IOPL=3 | reserved bit 1 */
    pushq ${user_cs}
    leaq user_entry(%rip), %rax
    pushq %rax
    iretq

    /* CPL3 from here on: native speed on hosts that emulate CPL0. */
user_entry:
    movq %rdi, %rbx
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movq %rbx, %rdi
    call rust_main
    ud2

    /* #GP handler (CPL0): emulates a CPL3 `out %al,%dx` (0xee) or `in %dx,%al` (0xec) that
       trapped because the host does not honour IOPL=3 (this machine's KVM does not), then
       resumes after it. Anything else: ud2 here, which cannot be delivered, so the machine
       triple-faults. Stack on entry: error code, RIP, CS, RFLAGS, RSP, SS. */
gp_handler:
    pushq %rsi
    movq 16(%rsp), %rsi             /* faulting RIP */
    cmpb $0xee, (%rsi)
    je 1f
    cmpb $0xec, (%rsi)
    je 2f
    ud2
1:  outb %al, %dx
    jmp 3f
2:  inb %dx, %al
3:  incq 16(%rsp)                   /* skip the one-byte instruction */
    popq %rsi
    addq $8, %rsp                   /* drop the error code */
    iretq
    .popsection
    "#,
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    kernel_cs = const KERNEL_CS,
    kernel_ds = const KERNEL_DS,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    tss_sel = const TSS_SEL,
    options(att_syntax)
);
