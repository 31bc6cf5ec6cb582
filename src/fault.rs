//! Fault injection for tests of the VMM's own robustness (never for guests):
//! `SAMEPAGE_TEST_FAULT=<name>` in the environment turns one fault on. Known faults:
//! - `wedge-fphash`: the device thread wedges for good, holding the fphash transport's lock,
//!   on the first queue notification (the stop path must still end the process).

use std::sync::OnceLock;

/// The environment variable that names the fault.
pub const FAULT_ENV: &str = "SAMEPAGE_TEST_FAULT";

/// Whether fault `name` is on.
pub fn injected(name: &str) -> bool {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    FAULT.get_or_init(|| std::env::var(FAULT_ENV).ok()).as_deref() == Some(name)
}
