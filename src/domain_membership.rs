//! A VM's place in a dedup domain: joined once the VM's guest RAM exists, in a domain of this
//! process or the broker's, and left on drop, which releases the VM's merged pages.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::bus::lock;
use crate::config::{DedupMode, VmConfig};
use crate::dedup::BrokerConfig;
use crate::dedup::{Domain, Limits, VmId, PAGE_SIZE};
use crate::error::VmmError;
use crate::memory;
use crate::pause::PauseControl;

/// A VM's place in a dedup domain; leaving it (on drop) releases the VM's merged pages.
pub struct DomainMembership {
    /// The domain.
    pub domain: Arc<Mutex<Domain>>,
    /// The VM's id in it.
    pub vm: VmId,
    /// The VM's name, for logs.
    pub vm_label: String,
    /// Whether its refresh sweeps its RAM for pages of zeros and gives them back (hinted
    /// merging; not in the baselines: `--dedup off` merges nothing, `ksm` is KSM alone).
    pub gives_back_zero_pages: bool,
}

impl DomainMembership {
    /// The VM joins `domain` (a domain of this process that other VMs share), or else one made
    /// as `config.dedup` says: through its broker, or for this VM alone (docs/boot.md, step 7).
    /// Its guest RAM `mem` is what the domain may merge.
    ///
    /// # Safety
    ///
    /// `mem` must stay mapped for as long as the membership lives: the domain maps pages over
    /// it until the membership is dropped.
    pub(crate) unsafe fn join(
        config: &VmConfig,
        label: &str,
        domain: Option<Arc<Mutex<Domain>>>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, VmmError> {
        let domain = match (domain, &config.dedup.broker) {
            (Some(domain), _) => domain,
            (None, Some(broker)) => {
                let remote = BrokerConfig {
                    socket: broker.socket.clone(),
                    domain: broker.domain.clone(),
                    label: label.to_string(),
                    ram_pages: config.mem_bytes / PAGE_SIZE as u64,
                };
                Arc::new(Mutex::new(Domain::with_broker(label, Limits::default(), remote)?))
            }
            (None, None) => Arc::new(Mutex::new(Domain::new(label, Limits::default())?)),
        };
        // SAFETY: the regions are vm-memory's private anonymous guest RAM mappings, which the
        // caller keeps mapped while this membership lives, and guest RAM is only touched
        // through vm-memory's volatile accessors and by KVM.
        let vm = unsafe { lock(&domain).register_vm(label, memory::ram_regions(mem)) };
        Ok(DomainMembership {
            domain,
            vm,
            vm_label: label.to_string(),
            gives_back_zero_pages: config.dedup.mode == DedupMode::Hinted,
        })
    }

    /// The periodic refresh of the VM's merged pages (its event loop runs it): copy-on-write
    /// breaks found, store pages nobody maps any more freed; then the pages the host found to
    /// merge without a report (the kernel pages the guest wrote, `docs/boot.md`, "The kernel
    /// held once"; image pages left in page-cache blocks given back, `docs/fphash.md`) merged,
    /// and a slice of the VM's RAM swept for pages of zeros, those found given back
    /// (`docs/fphash.md`, "Pages of zeros"), with its vCPUs paused by `pause`.
    pub fn refresher(&self, pause: Arc<PauseControl>) -> impl FnMut() + Send + 'static {
        let (domain, vm, sweeps) = (self.domain.clone(), self.vm, self.gives_back_zero_pages);
        // All of it counts as merge CPU: the refresh is what keeping pages merged costs.
        move || {
            crate::merge_cpu::measure_refresh(|| {
                let (unreported, zeros) = {
                    let mut domain = lock(&domain);
                    if let Err(e) = domain.refresh_vm_periodically(vm) {
                        log::warn!("dedup {}: refresh of {vm} failed: {e}", domain.name());
                    }
                    let swept = if sweeps { domain.sweep_zero_pages(vm) } else { Ok(0) };
                    let zeros = swept.unwrap_or_else(|e| {
                        log::warn!("dedup {}: sweep of {vm} for pages of zeros failed: {e}", domain.name());
                        0
                    });
                    (domain.unreported_pages_waiting(vm), zeros)
                };
                if unreported == 0 && zeros == 0 {
                    return;
                }
                // Paused first, locked second, as the fphash device does.
                if let Some(_paused) = pause.pause_all() {
                    let mut domain = lock(&domain);
                    domain.merge_unreported_pages(vm);
                    if let Err(e) = domain.give_back_zero_pages(vm) {
                        log::warn!("dedup {}: {vm}: {e}", domain.name());
                    }
                }
            })
        }
    }
}

impl Drop for DomainMembership {
    fn drop(&mut self) {
        lock(&self.domain).unregister_vm(self.vm);
    }
}
