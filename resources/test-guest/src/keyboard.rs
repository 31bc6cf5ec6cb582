//! `testguest.mode=ctrlaltdel`: waits (polling the i8042's status port, without interrupts)
//! for the host to press Ctrl+Alt+Del (the API's `SendCtrlAltDel`), checks the keys against
//! scancode set 1 (the controller translates by default) and exits with status 0x42; another
//! sequence fails.

use crate::io;

/// The i8042's data and status ports.
const DATA: u16 = 0x60;
const STATUS: u16 = 0x64;
/// Ctrl, Alt, Delete pressed, then released, in scancode set 1.
const CTRL_ALT_DEL: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The exit status that says the keys came.
const EXIT_CTRL_ALT_DEL: u8 = 0x42;

pub fn run() -> ! {
    println!("keyboard: waiting for Ctrl+Alt+Del");
    let mut got = [0u8; CTRL_ALT_DEL.len()];
    for slot in got.iter_mut() {
        while io::inb(STATUS) & 0x01 == 0 {
            core::hint::spin_loop();
        }
        *slot = io::inb(DATA);
    }
    if got != CTRL_ALT_DEL {
        fail!("keyboard: got {:?}, not Ctrl+Alt+Del", got);
    }
    println!("keyboard: Ctrl+Alt+Del pressed and released");
    io::exit(EXIT_CTRL_ALT_DEL)
}
