//! COM1: vm-superio's 8250 UART on ports 0x3f8-0x3ff, raising IRQ 4 through an irqfd.

use std::io::Write;

use vm_superio::serial::{Error as SerialError, NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's registers and receive FIFO as a snapshot keeps them (vm-superio's
/// `SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegisters {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR in that order.
    pub registers: [u8; 9],
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

type Uart = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The guest's console UART.
pub struct SerialConsole {
    uart: Uart,
    /// Output bytes the console refused (a full disk or device, a stopped terminal). The
    /// guest writes a byte at a time, so only the first failure is logged; the count is
    /// logged when the console goes.
    lost_bytes: u64,
}

impl SerialConsole {
    /// A UART whose output goes to `out` and whose interrupt is `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole { uart: Serial::new(IrqTrigger(irq), out), lost_bytes: 0 }
    }

    /// Output bytes lost so far.
    pub fn lost_bytes(&self) -> u64 {
        self.lost_bytes
    }

    /// Queues bytes typed by the user; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl SerialConsole {
    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialRegisters {
        let s = self.uart.state();
        SerialRegisters {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Puts saved registers and FIFO back (a restore, before the vCPUs run); the output and
    /// interrupt stay this console's.
    pub fn restore_state(&mut self, saved: &SerialRegisters) -> Result<(), String> {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = saved.registers;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: saved.in_buffer.clone(),
        };
        let irq = |uart: &Uart| uart.interrupt_evt().0.try_clone().map_err(|e| e.to_string());
        let placeholder =
            Serial::new(IrqTrigger(irq(&self.uart)?), Box::new(std::io::sink()) as Box<dyn Write + Send>);
        let old = std::mem::replace(&mut self.uart, placeholder);
        let trigger = IrqTrigger(irq(&old)?);
        self.uart =
            Serial::from_state(&state, trigger, NoEvents, old.into_writer()).map_err(|e| format!("{e:?}"))?;
        Ok(())
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([byte], Ok(offset)) = (&mut *data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            match self.uart.write(offset, *byte) {
                Ok(()) => {}
                // The UART raised its interrupt anyway: the guest goes on as if sent.
                Err(SerialError::IOError(e)) => {
                    self.lost_bytes += 1;
                    if self.lost_bytes == 1 {
                        log::warn!("serial: cannot write console output ({e}); further losses are counted");
                    }
                }
                Err(e) => log::warn!("serial: cannot raise the interrupt: {e}"),
            }
        }
    }
}

impl Drop for SerialConsole {
    fn drop(&mut self) {
        if self.lost_bytes > 0 {
            log::warn!("serial: {} bytes of console output lost in all", self.lost_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            crate::bus::lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives_bytes() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut console = SerialConsole::new(irq.try_clone().expect("clone"), Box::new(sink.clone()));
        console.write(0, b"A");
        assert_eq!(*crate::bus::lock(&sink.0), b"A");
        assert_eq!(console.enqueue_input(b"hi"), 2);
        let mut byte = [0u8];
        console.read(0, &mut byte);
        assert_eq!(&byte, b"h");
        let mut wide = [0u8; 2];
        console.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff], "wide accesses are not UART accesses");
    }

    #[test]
    fn output_that_fails_is_counted_and_the_uart_goes_on() {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut console = SerialConsole::new(irq.try_clone().expect("clone"), Box::new(full));
        console.write(1, &[0x02]); // IER: THR-empty interrupt on
        for byte in b"lost" {
            console.write(0, &[*byte]);
        }
        assert_eq!(console.lost_bytes(), 4);
        assert!(irq.read().expect("interrupt raised") > 0);
    }
}
