//! Wall-clock waits at CPL3: the TSC (RDTSC is allowed at CPL3 while CR4.TSD is clear, which
//! the start-up code leaves so), calibrated once against PIT channel 2.
//!
//! Calibration as Linux's `pit_calibrate_tsc()` (arch/x86/kernel/tsc.c): gate channel 2 on
//! through port 0x61 with the speaker off, program mode 0 (interrupt on terminal count) with a
//! 50 ms count, and read TSC ticks until OUT2 (port 0x61 bit 5) goes high. The PIT runs at
//! 1.193182 MHz (Intel 8254 datasheet; PC/AT clock). samepage has KVM's in-kernel PIT with the
//! dummy speaker port, so this works there; each port access traps (see io.rs) but costs only
//! microseconds, so the error is well under 1%.

use crate::io::{inb, outb};

/// PIT input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// PIT mode/command register and channel 2 data port.
const PIT_COMMAND: u16 = 0x43;
const PIT_CH2: u16 = 0x42;
/// Channel 2, access lobyte/hibyte, mode 0, binary.
const PIT_CH2_MODE0: u8 = 0xb0;
/// NMI status and control port: bit 0 gates channel 2, bit 1 enables the speaker, bit 5 is
/// OUT2.
const PORT_61: u16 = 0x61;
const GATE2: u8 = 0x01;
const SPEAKER: u8 = 0x02;
const OUT2: u8 = 0x20;
/// Calibration interval.
const CALIBRATE_MS: u64 = 50;
/// Give up calibrating after this many TSC ticks (several seconds at any plausible rate).
const CALIBRATE_GIVE_UP: u64 = 20_000_000_000;

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: reads the TSC; allowed at CPL3 (CR4.TSD clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond, measured against the PIT, or an error if the PIT does not count.
pub fn tsc_per_ms() -> Result<u64, &'static str> {
    let count = PIT_HZ * CALIBRATE_MS / 1000; // 59659, fits 16 bits
    outb(PORT_61, (inb(PORT_61) & !SPEAKER) | GATE2);
    outb(PIT_COMMAND, PIT_CH2_MODE0);
    outb(PIT_CH2, count as u8);
    outb(PIT_CH2, (count >> 8) as u8);
    let start = rdtsc();
    while inb(PORT_61) & OUT2 == 0 {
        if rdtsc().wrapping_sub(start) > CALIBRATE_GIVE_UP {
            return Err("PIT channel 2 never reached its terminal count");
        }
    }
    let per_ms = rdtsc().wrapping_sub(start) / CALIBRATE_MS;
    if per_ms == 0 {
        return Err("TSC does not advance");
    }
    Ok(per_ms)
}

/// Spins for about `ms` milliseconds at `per_ms` TSC ticks per millisecond.
pub fn spin_ms(ms: u64, per_ms: u64) {
    let start = rdtsc();
    let ticks = ms.saturating_mul(per_ms);
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}
