//! The Intel MultiProcessor Specification 1.4 table, which tells a kernel without ACPI how many
//! CPUs there are and how ISA interrupts reach the I/O APIC.
//!
//! Built as bytes in little-endian order, field by field as chapter 4 of the spec lists them.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_LAST};

/// MP spec revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Local APIC version of an integrated APIC (0x1X, spec §4.3.1).
const APIC_VERSION: u8 = 0x14;
/// I/O APIC version KVM's in-kernel IOAPIC reports.
const IOAPIC_VERSION: u8 = 0x11;
/// Entry types, spec Table 4-3.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Processor flags: enabled, bootstrap processor (spec §4.3.1).
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Interrupt types, spec Table 4-8.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// The one bus: ISA, ID 0.
const ISA_BUS_ID: u8 = 0;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many CPUs for the space below the EBDA's end.
    #[error("MP table for {0} vCPUs does not fit in the EBDA")]
    TooBig(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// The entries that follow the table header.
fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = vcpus;
    let mut out = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        out.extend([ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        out.extend(0x600u32.to_le_bytes()); // CPU signature: family 6
        out.extend(0x201u32.to_le_bytes()); // feature flags: FPU, APIC
        out.extend([0u8; 8]);
        count += 1;
    }
    out.extend([ENTRY_BUS, ISA_BUS_ID]);
    out.extend(*b"ISA   ");
    out.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    out.extend((IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for irq in 0..=IRQ_LAST as u8 {
        // Type, interrupt type, flags (conforming polarity and trigger), source bus and IRQ,
        // destination I/O APIC and pin: ISA IRQ n on pin n, as KVM's default routing has it.
        out.extend([ENTRY_IO_INTERRUPT, INT_VECTORED, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is ExtINT and LINT1 NMI on every local APIC (destination 0xff: all).
    out.extend([ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    out.extend([ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;
    (out, count)
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs, as placed at
/// [`EBDA_START`].
pub fn build(vcpus: u8) -> Vec<u8> {
    let table_addr = EBDA_START as u32 + 16;
    let mut pointer = Vec::with_capacity(16);
    pointer.extend(*b"_MP_");
    pointer.extend(table_addr.to_le_bytes());
    pointer.extend([1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev, checksum, features
    pointer[10] = checksum(&pointer);

    let (body, count) = entries(vcpus);
    let length = (44 + body.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend(*b"PCMP");
    table.extend(length.to_le_bytes());
    table.extend([MP_SPEC_REV, 0]);
    table.extend(*b"SAMEPAGE");
    table.extend(*b"000000000000");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend((APIC_START as u32).to_le_bytes());
    table.extend(0u32.to_le_bytes()); // extended table length, checksum, reserved
    table.extend(body);
    table[7] = checksum(&table);

    pointer.extend(table);
    pointer
}

/// Writes the MP table into the EBDA.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus);
    if EBDA_START + bytes.len() as u64 > super::layout::LOW_RAM_END {
        return Err(MptableError::TooBig(vcpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::MAX_VCPUS;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for vcpus in [1u8, 2, MAX_VCPUS] {
            let table = build(vcpus);
            assert_eq!(&table[..4], b"_MP_");
            assert_eq!(sum(&table[..16]), 0);
            let config = &table[16..];
            assert_eq!(&config[..4], b"PCMP");
            let length = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(length, config.len());
            assert_eq!(sum(config), 0);
            let count = u16::from_le_bytes([config[34], config[35]]);
            assert_eq!(count, u16::from(vcpus) + 2 + 24 + 2);
            let cpus =
                config[44..].chunks(20).take(vcpus as usize).filter(|e| e[0] == ENTRY_PROCESSOR).count();
            assert_eq!(cpus, vcpus as usize);
        }
    }

    #[test]
    fn the_most_vcpus_fit_in_the_ebda() {
        let mem = crate::memory::create_guest_memory(&crate::x86_64::vm_layout::VmLayout::new(32 << 20, 0))
            .expect("memory");
        write(&mem, MAX_VCPUS).expect("fits");
    }
}
