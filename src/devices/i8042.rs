//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status and command): enough of
//! it for Linux's i8042 and atkbd drivers to find a controller with a keyboard, its CPU-reset
//! command (what Linux's `reboot` uses on a machine without ACPI), and Ctrl+Alt+Del pressed
//! from the host (the API's `SendCtrlAltDel`, as Firecracker has it), which raises IRQ 1.
//!
//! No mouse port, no typematic repeat; the keyboard answers its commands (reset, identify,
//! LEDs, scancode set, enable, disable) with what a real one does. Every guest write is a
//! command or its argument; an unknown controller command is ignored and an unknown keyboard
//! command answered "resend" (0xfe), as hardware does; the output buffer holds at most
//! [`BUFFER_LEN`] bytes (keystrokes beyond are lost, as on a real controller).

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::stop::{VmExit, VmStop};

/// Most bytes waiting for the guest in the output buffer.
pub const BUFFER_LEN: usize = 16;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Controller configuration byte bits: keyboard interrupt, system flag, mouse disabled,
/// translation to scancode set 1 (what a PC's firmware leaves).
const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
const CTR_DEFAULT: u8 = CTR_KBD_INTERRUPT | CTR_SYSTEM | CTR_AUX_DISABLED | CTR_TRANSLATE;

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Ctrl, Alt, Delete pressed and released, in scancode set 1 (the controller translating) and
/// set 2 (not translating).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

/// What the next byte written to the data port is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expecting {
    /// A keyboard command.
    KeyboardCommand,
    /// The controller configuration byte (after command 0x60).
    Configuration,
    /// The output port (after 0xd1): bit 0 clear resets the CPU.
    OutputPort,
    /// A byte to put in the output buffer as if the keyboard sent it (after 0xd2).
    KeyboardOutput,
    /// The argument of keyboard command 0xed (LEDs), 0xf3 (typematic rate) or 0xf0 (set).
    KeyboardArgument(u8),
}

/// Raises IRQ 1 (an irqfd the VM build registered).
pub trait KeyboardInterrupt: Send {
    /// Raises the interrupt once.
    fn raise(&self);
}

impl KeyboardInterrupt for EventFd {
    fn raise(&self) {
        // A full eventfd counter is already a pending interrupt.
        let _ = self.write(1);
    }
}

/// The controller.
pub struct I8042 {
    stop: Arc<VmStop>,
    interrupt: Box<dyn KeyboardInterrupt>,
    configuration: u8,
    output: VecDeque<u8>,
    expecting: Expecting,
    last_was_command: bool,
    /// Keystrokes lost to a full buffer.
    lost: u64,
}

impl I8042 {
    /// A controller whose reset stops the VM through `stop` and whose keyboard raises
    /// `interrupt`.
    pub fn new(stop: Arc<VmStop>, interrupt: Box<dyn KeyboardInterrupt>) -> Self {
        I8042 {
            stop,
            interrupt,
            configuration: CTR_DEFAULT,
            output: VecDeque::with_capacity(BUFFER_LEN),
            expecting: Expecting::KeyboardCommand,
            last_was_command: false,
            lost: 0,
        }
    }

    /// Presses and releases Ctrl+Alt+Del, in the scancode set the guest reads; false if the
    /// output buffer had no room for it (nothing is queued then).
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        let codes: &[u8] =
            if self.configuration & CTR_TRANSLATE != 0 { &CTRL_ALT_DEL_SET1 } else { &CTRL_ALT_DEL_SET2 };
        if self.output.len() + codes.len() > BUFFER_LEN {
            self.lost += 1;
            return false;
        }
        self.push(codes);
        true
    }

    /// Keystrokes lost to a full buffer.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Queues bytes for the guest (as many as fit) and raises the interrupt when the guest
    /// wants it.
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.output.len() < BUFFER_LEN {
                self.output.push_back(b);
            }
        }
        self.raise_if_wanted();
    }

    fn raise_if_wanted(&self) {
        if !self.output.is_empty() && self.configuration & CTR_KBD_INTERRUPT != 0 {
            self.interrupt.raise();
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        // An empty buffer reads as its last byte did on hardware; 0 here.
        let value = self.output.pop_front().unwrap_or(0);
        // The next byte raises the line again (edge-triggered through the irqfd).
        self.raise_if_wanted();
        value
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        self.expecting = Expecting::KeyboardCommand;
        match command {
            0x20 => self.push(&[self.configuration]),
            0x60 => self.expecting = Expecting::Configuration,
            0xa7 => self.configuration |= CTR_AUX_DISABLED,
            0xa8 => {}                  // no mouse port: it stays disabled
            0xa9 => self.push(&[0xff]), // mouse port test: no mouse port
            0xaa => self.push(&[0x55]), // controller self-test passed
            0xab => self.push(&[0x00]), // keyboard port test passed
            0xad => self.configuration |= CTR_KBD_DISABLED,
            0xae => self.configuration &= !CTR_KBD_DISABLED,
            0xd1 => self.expecting = Expecting::OutputPort,
            0xd2 => self.expecting = Expecting::KeyboardOutput,
            // Pulse output lines: bit 0 low is the CPU reset.
            0xf0..=0xff if command & 0x01 == 0 => self.stop.request(VmExit::Reset),
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        let expecting = std::mem::replace(&mut self.expecting, Expecting::KeyboardCommand);
        match expecting {
            Expecting::Configuration => {
                // The system flag is the firmware's; the guest cannot clear it.
                self.configuration = value | CTR_SYSTEM;
                self.raise_if_wanted();
            }
            Expecting::OutputPort => {
                if value & 0x01 == 0 {
                    self.stop.request(VmExit::Reset);
                }
            }
            Expecting::KeyboardOutput => self.push(&[value]),
            Expecting::KeyboardArgument(0xf0) => {
                // Scancode set: 0 asks which (2), others are taken.
                if value == 0 {
                    self.push(&[KBD_ACK, 0x02]);
                } else {
                    self.push(&[KBD_ACK]);
                }
            }
            Expecting::KeyboardArgument(_) => self.push(&[KBD_ACK]),
            Expecting::KeyboardCommand => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, command: u8) {
        match command {
            0xff => self.push(&[KBD_ACK, KBD_SELF_TEST_OK]),
            // Identify: an MF2 keyboard (0xab 0x83; 0x41 when the controller translates).
            0xf2 => {
                let second = if self.configuration & CTR_TRANSLATE != 0 { 0x41 } else { 0x83 };
                self.push(&[KBD_ACK, 0xab, second]);
            }
            0xed | 0xf3 | 0xf0 => {
                self.expecting = Expecting::KeyboardArgument(command);
                self.push(&[KBD_ACK]);
            }
            0xee => self.push(&[0xee]), // echo
            // Enable, disable, defaults and the set-3 key modes: acknowledged.
            0xf4..=0xfd => self.push(&[KBD_ACK]),
            _ => self.push(&[KBD_RESEND]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.read_data(),
            4 => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            0 => self.write_data(*value),
            4 => self.command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    struct Count(Arc<AtomicU32>);

    impl KeyboardInterrupt for Count {
        fn raise(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn controller() -> (I8042, Arc<AtomicU32>, Arc<VmStop>) {
        let (irqs, stop) = (Arc::new(AtomicU32::new(0)), Arc::new(VmStop::new()));
        (I8042::new(stop.clone(), Box::new(Count(irqs.clone()))), irqs, stop)
    }

    fn out(c: &mut I8042, offset: u64, value: u8) {
        c.write(offset, &[value]);
    }

    fn input(c: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        c.read(offset, &mut b);
        b[0]
    }

    fn drain(c: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        while input(c, 4) & STATUS_OUTPUT_FULL != 0 {
            got.push(input(c, 0));
        }
        got
    }

    #[test]
    fn linux_finds_a_controller_and_a_keyboard() {
        let (mut c, _, stop) = controller();
        // i8042_controller_check / selftest / CTR read and write, as drivers/input/serio/i8042.c.
        assert_ne!(input(&mut c, 4), 0xff);
        out(&mut c, 4, 0xaa);
        assert_eq!(drain(&mut c), [0x55]);
        out(&mut c, 4, 0x20);
        let ctr = drain(&mut c)[0];
        assert_eq!(ctr, CTR_DEFAULT);
        out(&mut c, 4, 0x60);
        out(&mut c, 0, ctr & !CTR_KBD_INTERRUPT);
        out(&mut c, 4, 0x20);
        assert_eq!(drain(&mut c), [ctr & !CTR_KBD_INTERRUPT]);
        out(&mut c, 4, 0xab);
        assert_eq!(drain(&mut c), [0x00]);
        // atkbd: reset, identify, scancode set, LEDs, enable.
        out(&mut c, 0, 0xff);
        assert_eq!(drain(&mut c), [KBD_ACK, KBD_SELF_TEST_OK]);
        out(&mut c, 0, 0xf2);
        assert_eq!(drain(&mut c), [KBD_ACK, 0xab, 0x41]);
        out(&mut c, 0, 0xf0);
        out(&mut c, 0, 0x00);
        assert_eq!(drain(&mut c), [KBD_ACK, KBD_ACK, 0x02]);
        out(&mut c, 0, 0xed);
        out(&mut c, 0, 0x07);
        assert_eq!(drain(&mut c), [KBD_ACK, KBD_ACK]);
        out(&mut c, 0, 0xf4);
        assert_eq!(drain(&mut c), [KBD_ACK]);
        out(&mut c, 0, 0x42);
        assert_eq!(drain(&mut c), [KBD_RESEND], "an unknown keyboard command");
        assert!(!stop.is_stopped());
    }

    #[test]
    fn ctrl_alt_del_comes_in_the_guests_scancode_set_with_an_interrupt_and_is_bounded() {
        let (mut c, irqs, _) = controller();
        assert!(c.send_ctrl_alt_del());
        assert!(irqs.load(Ordering::Relaxed) > 0);
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET1);
        out(&mut c, 4, 0x60);
        out(&mut c, 0, CTR_KBD_INTERRUPT);
        assert!(c.send_ctrl_alt_del());
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET2);
        // A guest that reads nothing: the buffer fills, the rest is refused whole.
        assert!(c.send_ctrl_alt_del());
        assert!(!c.send_ctrl_alt_del());
        assert_eq!(c.lost(), 1);
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET2);
        // Without the keyboard interrupt enabled, no interrupt.
        out(&mut c, 4, 0x60);
        out(&mut c, 0, 0);
        let before = irqs.load(Ordering::Relaxed);
        assert!(c.send_ctrl_alt_del());
        assert_eq!(irqs.load(Ordering::Relaxed), before);
    }

    #[test]
    fn the_reset_line_stops_the_vm_and_nothing_a_guest_writes_panics() {
        let (mut c, _, stop) = controller();
        out(&mut c, 4, 0xfe);
        assert_eq!(stop.wait(std::time::Duration::ZERO), Some(VmExit::Reset));
        let (mut c, _, stop) = controller();
        out(&mut c, 4, 0xd1);
        out(&mut c, 0, 0x00);
        assert_eq!(stop.wait(std::time::Duration::ZERO), Some(VmExit::Reset));
        let (mut c, _, stop) = controller();
        for value in 0..=255u8 {
            if value & 0xf1 == 0xf0 || value == 0xd1 {
                continue; // the reset commands, tested above
            }
            out(&mut c, 4, value);
            out(&mut c, 0, value);
            let _ = input(&mut c, 0);
            let _ = input(&mut c, 4);
            c.read(2, &mut [0; 2]);
            c.write(1, &[1, 2]);
        }
        assert!(c.output.len() <= BUFFER_LEN);
        assert!(!stop.is_stopped());
    }
}
