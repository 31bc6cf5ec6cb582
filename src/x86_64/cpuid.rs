//! CPUID for each vCPU: what KVM supports, with the KVM signature, the hypervisor bit and a
//! topology (one thread per core, one package) that matches `--vcpus`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// CPUID leaf 1 ECX bit 31: running under a hypervisor (SDM Vol. 2A CPUID, reserved for it).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX bit 28: HTT, "max APIC IDs reserved field is valid".
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb/0x1f level types in ECX[15:8] (SDM Vol. 2A, "Extended Topology Enumeration").
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// Hypervisor leaf with the vendor signature (Documentation/virt/kvm/x86/cpuid.rst).
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// Highest hypervisor leaf KVM defines (KVM_CPUID_FEATURES).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// What KVM can virtualize on this host.
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// The guest-physical address width the vCPUs get (leaf 0x8000_0008 EAX[7:0], MAXPHYADDR), if
/// KVM reports that leaf.
pub fn phys_addr_bits(cpuid: &CpuId) -> Option<u8> {
    cpuid.as_slice().iter().find(|e| e.function == 0x8000_0008).map(|e| (e.eax & 0xff) as u8)
}

/// Bits needed to number `count` things (for the x2APIC ID shift of a topology level).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// CPUID flag for entries whose output depends on the subleaf in ECX.
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Makes sure leaf 0xb has its SMT (0), core (1) and terminating (2) subleaves, which KVM may
/// leave out, so that the patched topology can be expressed.
fn ensure_topology_subleaves(cpuid: &mut CpuId) {
    let max_leaf = cpuid.as_slice().iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    if max_leaf < 0xb {
        return;
    }
    for index in 0..3 {
        if !cpuid.as_slice().iter().any(|e| e.function == 0xb && e.index == index) {
            let entry = kvm_cpuid_entry2 {
                function: 0xb,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            if cpuid.push(entry).is_err() {
                log::warn!("CPUID table full: leaf 0xb subleaf {index} left out");
            }
        }
    }
}

/// Patches one vCPU's copy of the supported CPUID.
pub fn patch_for_vcpu(cpuid: &mut CpuId, index: u8, vcpus: u8) {
    ensure_topology_subleaves(cpuid);
    let apic_id = u32::from(index);
    let count = u32::from(vcpus);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, count, vcpus);
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, vcpus: u8) {
    match entry.function {
        1 => {
            entry.ebx = (apic_id << 24) | (count << 16) | (entry.ebx & 0xffff);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if vcpus > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        4 => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: logical CPUs sharing this cache - 1
            // (all of them for the last level, one for the others).
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        0xb | 0x1f => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(vcpus);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        // AMD: ECX[7:0] threads in the package - 1, ECX[15:12] bits of the APIC ID that number
        // them (AMD64 APM Vol. 3, CPUID Fn8000_0008).
        0x8000_0008 => {
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(vcpus) << 12) | (count - 1);
        }
        // AMD: extended APIC ID, core ID, one thread per core, one node (Fn8000_001E).
        0x8000_001e => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        KVM_CPUID_SIGNATURE => {
            entry.eax = entry.eax.max(KVM_CPUID_FEATURES);
            [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut e = entry(1, 0);
        patch_entry(&mut e, 3, 4, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_matches_vcpus() {
        let mut core = entry(0xb, 1);
        patch_entry(&mut core, 1, 3, 3);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, LEVEL_TYPE_CORE, 1));
        let mut smt = entry(0xb, 0);
        patch_entry(&mut smt, 1, 3, 3);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8), (0, 1, LEVEL_TYPE_SMT));
    }

    #[test]
    fn kvm_signature_is_set() {
        let mut e = entry(KVM_CPUID_SIGNATURE, 0);
        patch_entry(&mut e, 0, 1, 1);
        let bytes: Vec<u8> = [e.ebx, e.ecx, e.edx].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
    }
}
