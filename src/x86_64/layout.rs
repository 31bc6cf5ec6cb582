//! Every guest-physical address, I/O port and IRQ that samepage uses, in one place.
//!
//! Low memory (below 1 MiB) follows the conventions of the Linux x86 boot protocol
//! (Documentation/arch/x86/boot.rst) and of PVH (xen/include/public/arch-x86/hvm/start_info.h);
//! the MMIO gap below 4 GiB mirrors a PC's 32-bit PCI hole so that 32-bit guests and PVH entry
//! code can reach device registers.

/// Global descriptor table: 4 entries (null, code64, data, tss). Intel SDM Vol. 3A §3.5.1.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table pointer: an empty IDT, so any exception before the guest installs
/// its own triple-faults and the VMM reports it. Intel SDM Vol. 3A §6.10.
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info` (Xen public header `arch-x86/hvm/start_info.h`), handed in %ebx.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Room for memory-map entries at [`PVH_MEMMAP_START`] (24 bytes each, below the zero page).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;

/// The "zero page" (`struct boot_params`) for the 64-bit and bzImage boot protocols, in %rsi.
/// Linux boot protocol §"64-bit boot protocol".
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer for the boot CPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables for 64-bit entry: PML4, one PDPT, one PD of 2 MiB pages that
/// map the first 1 GiB. Intel SDM Vol. 3A §4.5.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 × 2 MiB pages).
pub const PDE_START: u64 = 0xb000;

/// Kernel command line. Linux x86 `COMMAND_LINE_SIZE` is 2048 bytes including the NUL.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, with its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the extended BIOS data area, where the MP floating pointer and table live
/// (Intel MultiProcessor Specification 1.4 §4: "in the first kilobyte of the EBDA").
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional RAM below 1 MiB: 0xa0000-0xfffff is the VGA/BIOS hole, not RAM.
pub const LOW_RAM_END: u64 = 0xa0000;

/// Kernels load at 1 MiB (boot protocol "HIMEM"); the e820 map's second RAM range starts here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB (like a PC's PCI hole).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (exclusive); RAM beyond [`MMIO_GAP_START`] continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// First virtio-mmio device window. Each device gets [`VIRTIO_MMIO_SIZE`] bytes, announced to
/// Linux as `virtio_mmio.device=4K@<base>:<irq>` (drivers/virtio/virtio_mmio.c).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio register window (virtio 1.2 §4.2.2 uses offsets below 0x100,
/// config space follows at 0x100).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// I/O APIC MMIO base (Intel 82093AA datasheet; also where KVM's in-kernel IOAPIC sits).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base (Intel SDM Vol. 3A §11.4.1, the reset default).
pub const APIC_START: u64 = 0xfee0_0000;

/// Three pages KVM needs for the TSS it uses to run real-mode code on Intel VMX
/// (KVM_SET_TSS_ADDRESS, Documentation/virt/kvm/api.rst); inside the MMIO gap, below the BIOS.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// COM1 8250 UART I/O ports (PC/AT convention).
pub const SERIAL_COM1_PORT: u16 = 0x3f8;
/// Number of 8250 registers.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// COM1 interrupt line (PC/AT convention, ISA IRQ 4).
pub const SERIAL_COM1_IRQ: u32 = 4;

/// i8042 keyboard controller data port (PC/AT): keyboard bytes and command arguments.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042's keyboard interrupt line (PC/AT convention, ISA IRQ 1): keystrokes the host
/// sends (the API's `SendCtrlAltDel`).
pub const KEYBOARD_IRQ: u32 = 1;
/// i8042 command/status port: writing 0xfe pulses the CPU reset line, which Linux uses for
/// `reboot` (arch/x86/kernel/reboot.c, BOOT_KBD).
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Guest exit-status channel: a one-byte `out` to this port ends the VM and samepage exits
/// with that byte as its status (docs/guest-interface.md). Same port number as QEMU's
/// conventional `isa-debug-exit` (which, unlike samepage, reports `(value << 1) | 1`).
pub const EXIT_STATUS_PORT: u16 = 0xf4;

/// First IRQ given to virtio-mmio devices; IRQs 0-4 are the ISA timer, keyboard, cascade, COM2
/// and COM1.
pub const VIRTIO_IRQ_FIRST: u32 = 5;
/// Last IRQ usable by devices: the in-kernel IOAPIC has 24 pins (0-23).
pub const IRQ_LAST: u32 = 23;
/// Most virtio-mmio devices: one IRQ each.
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as usize;

/// Most vCPUs samepage starts: the MP table (20 bytes a CPU) must fit, with its other
/// entries, in the 1 KiB from [`EBDA_START`] to [`LOW_RAM_END`].
pub const MAX_VCPUS: u8 = 32;
