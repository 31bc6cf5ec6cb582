//! Boot-time vCPU state: GDT, identity page tables, segment and general registers, FPU,
//! model-specific registers and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::EntryPoint;
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

/// Errors while setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("KVM {what} on vCPU {vcpu} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// vCPU index.
        vcpu: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing GDT or page tables into guest memory failed.
    #[error("cannot write {what} to guest memory")]
    GuestMemory {
        /// Which table.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
}

// Control-register and EFER bits, Intel SDM Vol. 3A §2.5 and §2.2.1.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set (SDM Vol. 1 §3.4.3).
const RFLAGS_RESERVED: u64 = 1 << 1;

// Descriptor flags as (access byte | flags nibble << 12), SDM Vol. 3A §3.4.5.
/// Present, ring 0, code, execute/read, accessed; long mode (L), 4 KiB granularity.
const GDT_CODE64: u16 = 0xa09b;
/// Present, ring 0, code, execute/read, accessed; 32-bit (D), 4 KiB granularity.
const GDT_CODE32: u16 = 0xc09b;
/// Present, ring 0, data, read/write, accessed; 32-bit, 4 KiB granularity.
const GDT_DATA: u16 = 0xc093;
/// Present, 64-bit busy TSS.
const GDT_TSS: u16 = 0x808b;

// Page-table entry bits, SDM Vol. 3A §4.5.
const PTE_PRESENT_WRITABLE: u64 = 0x3;
const PDE_HUGE_PAGE: u64 = 0x80;

/// Encodes one 8-byte segment descriptor.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM view of a descriptor at GDT index `index`.
fn segment(flags: u16, index: u16) -> kvm_segment {
    let bit = |n: u16| ((flags >> n) & 1) as u8;
    let granular = bit(15) == 1;
    kvm_segment {
        base: 0,
        limit: if granular { 0xffff_ffff } else { 0xfffff },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: bit(7),
        dpl: ((flags >> 5) & 0x3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: 0,
        padding: 0,
    }
}

fn write_guest(mem: &GuestMemoryMmap, what: &'static str, addr: u64, value: u64) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr)).map_err(|source| RegsError::GuestMemory { what, source })
}

/// Writes the GDT and an empty IDT, and fills the segment registers for `entry`.
fn setup_segments(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs, entry: EntryPoint) -> Result<(), RegsError> {
    let code = match entry {
        EntryPoint::Pvh(_) => GDT_CODE32,
        EntryPoint::Linux64(_) => GDT_CODE64,
    };
    let table = [
        gdt_entry(0, 0, 0),
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ];
    for (i, descriptor) in table.iter().enumerate() {
        write_guest(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *descriptor)?;
    }
    write_guest(mem, "IDT", BOOT_IDT_START, 0)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(code, 1);
    let data = segment(GDT_DATA, 2);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(GDT_TSS, 3);
    Ok(())
}

/// Writes identity page tables for the first 1 GiB (2 MiB pages).
fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    write_guest(mem, "PML4", PML4_START, PDPTE_START | PTE_PRESENT_WRITABLE)?;
    write_guest(mem, "PDPT", PDPTE_START, PDE_START | PTE_PRESENT_WRITABLE)?;
    for i in 0..512u64 {
        write_guest(mem, "PD", PDE_START + i * 8, (i << 21) | PDE_HUGE_PAGE | PTE_PRESENT_WRITABLE)?;
    }
    Ok(())
}

/// Sets the boot CPU's special registers for `entry`: protected mode for PVH, long mode with
/// identity paging for the 64-bit protocol.
pub fn setup_sregs(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { what, vcpu: 0, source };
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    setup_segments(mem, &mut sregs, entry)?;
    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
}

/// Sets the boot CPU's general registers: entry point, stack and the boot-info pointer.
pub fn setup_regs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let regs = match entry {
        EntryPoint::Pvh(rip) => {
            kvm_regs { rflags: RFLAGS_RESERVED, rip: rip.0, rbx: PVH_INFO_START, ..Default::default() }
        }
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: rip.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(|source| RegsError::Kvm { what: "KVM_SET_REGS", vcpu: 0, source })
}

/// x87 and SSE control words at their reset values (SDM Vol. 1 §8.1.5, §10.2.3).
pub fn setup_fpu(vcpu: &VcpuFd, index: u8) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|source| RegsError::Kvm { what: "KVM_SET_FPU", vcpu: index, source })
}

// MSR numbers, SDM Vol. 4 Table 2-2.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE bit 0: fast-string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// Model-specific registers at the values a kernel expects from firmware.
pub fn setup_msrs(vcpu: &VcpuFd, index: u8) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect();
    let wanted = entries.len();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs { set: 0, wanted })?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| RegsError::Kvm {
        what: "KVM_SET_MSRS",
        vcpu: index,
        source,
    })?;
    if set != wanted {
        return Err(RegsError::Msrs { set, wanted });
    }
    Ok(())
}

// Local APIC LVT registers and delivery modes, SDM Vol. 3A §11.5.1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as PC firmware does (MP spec §5.1).
pub fn setup_lint(vcpu: &VcpuFd, index: u8) -> Result<(), RegsError> {
    let kvm = |what| move |source| RegsError::Kvm { what, vcpu: index, source };
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = byte as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_like_the_sdm_says() {
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_TSS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_flags() {
        let cs = segment(GDT_CODE64, 1);
        assert_eq!((cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present), (8, 0xb, 1, 0, 1, 1));
        let cs32 = segment(GDT_CODE32, 1);
        assert_eq!((cs32.l, cs32.db), (0, 1));
    }

    #[test]
    fn identity_page_tables_map_the_first_gigabyte() {
        let mem = crate::memory::create_guest_memory(&crate::x86_64::vm_layout::VmLayout::new(32 << 20, 0))
            .expect("memory");
        setup_page_tables(&mem).expect("tables");
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 511)).expect("pde");
        assert_eq!(pde, (511 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("pml4");
        assert_eq!(pml4, PDPTE_START | 3);
    }

    #[test]
    fn lint_delivery_modes_replace_only_bits_8_to_10() {
        assert_eq!(set_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
        assert_eq!(set_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }
}
