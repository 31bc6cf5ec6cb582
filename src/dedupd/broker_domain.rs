//! A domain's store in the broker: its pages, index and holders (`SharedPages`), which store
//! of that name it is, and the housekeeping that gives back memory stale mappings took.

use crate::dedup::shared_pages::SharedPages;
use crate::dedup::PAGE_SIZE;

/// A domain's store while it has holders (clients, departed clients, or leaving ones).
pub struct BrokerDomain {
    /// The store, index and references.
    pub shared: SharedPages,
    /// Which store of this name this is (a CHECK under way notices a store made anew).
    pub generation: u64,
    /// Times its free slots were punched again.
    pub repunches: u64,
}

impl BrokerDomain {
    /// Punches the free slots again if the store holds more memory than its live pages: a
    /// client's stale private mapping that faults a punched page refills it with zeros.
    pub fn repunch(&mut self, name: &str) {
        let live = self.shared.live_pages() as u64 * PAGE_SIZE as u64;
        let held = match self.shared.allocated_bytes() {
            Ok(bytes) => bytes,
            Err(e) => {
                log::warn!("domain {name}: {}", crate::error_chain(&e));
                return;
            }
        };
        if held <= live {
            return;
        }
        self.repunches += 1;
        match self.shared.punch_free() {
            Ok(pages) if self.repunches.is_power_of_two() => log::info!(
                "domain {name}: the store held {held} bytes for {live} bytes of live pages; punched {pages} \
                 free slots again ({} times so far)",
                self.repunches
            ),
            Ok(_) => {}
            Err(e) => log::warn!("domain {name}: {}", crate::error_chain(&e)),
        }
    }
}
