//! Port I/O (allowed at CPL3 because the start-up code sets RFLAGS.IOPL = 3), the polled COM1
//! 8250 UART, the exit-status port and the i8042 reset.

use core::arch::asm;
use core::fmt;

/// COM1 base port (PC/AT convention).
const COM1: u16 = 0x3f8;
/// 8250 registers, offsets from the base (National Semiconductor PC16550D datasheet).
const UART_DATA: u16 = 0; // RBR (read) / THR (write); DLL when LCR.DLAB
const UART_IER: u16 = 1; // interrupt enable; DLM when LCR.DLAB
const UART_FCR: u16 = 2;
const UART_LCR: u16 = 3;
const UART_MCR: u16 = 4;
const UART_LSR: u16 = 5;
/// LSR bit 0: data ready.
const LSR_DR: u8 = 0x01;
/// LSR bit 5: transmitter holding register empty.
const LSR_THRE: u8 = 0x20;
/// LCR: 8 data bits, no parity, 1 stop bit.
const LCR_8N1: u8 = 0x03;
/// LCR bit 7: divisor latch access.
const LCR_DLAB: u8 = 0x80;

/// Exit-status port: a one-byte write ends the VM with that status (docs/guest-interface.md;
/// QEMU's isa-debug-exit at the same port reports `(value << 1) | 1`).
const EXIT_PORT: u16 = 0xf4;
/// i8042 command port; 0xfe pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory; the ports used here are the platform's serial,
    // exit and reset ports.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

/// Programs COM1 for polled use: no interrupts, 115200 8N1.
pub fn serial_init() {
    outb(COM1 + UART_IER, 0);
    outb(COM1 + UART_LCR, LCR_DLAB);
    outb(COM1 + UART_DATA, 1); // divisor 1 = 115200 baud
    outb(COM1 + UART_IER, 0);
    outb(COM1 + UART_LCR, LCR_8N1);
    outb(COM1 + UART_FCR, 0);
    outb(COM1 + UART_MCR, 0x03); // DTR | RTS, no loopback
}

/// Writes one byte to COM1, waiting for the transmitter.
pub fn serial_putc(byte: u8) {
    while inb(COM1 + UART_LSR) & LSR_THRE == 0 {
        core::hint::spin_loop();
    }
    outb(COM1 + UART_DATA, byte);
}

/// Reads one byte from COM1, waiting for it.
pub fn serial_getc() -> u8 {
    while inb(COM1 + UART_LSR) & LSR_DR == 0 {
        core::hint::spin_loop();
    }
    inb(COM1 + UART_DATA)
}

/// `fmt::Write` over COM1; `\n` becomes `\r\n`.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                serial_putc(b'\r');
            }
            serial_putc(b);
        }
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::io::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => {
        $crate::print!("\n")
    };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}

/// Exit status for success and for any failure.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAIL: u8 = 1;

/// Prints a `FAIL:` line and exits with status 1.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {{
        $crate::println!("FAIL: {}", format_args!($($arg)*));
        $crate::io::exit($crate::io::EXIT_FAIL)
    }};
}

/// Ends the VM with `status` through the exit-status port. If the port does nothing (a VMM
/// without it), spins.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    loop {
        core::hint::spin_loop();
    }
}

/// Asks the i8042 to reset the machine.
pub fn i8042_reset() {
    outb(I8042_COMMAND, I8042_RESET);
}
