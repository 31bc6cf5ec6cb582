//! Pausing every vCPU of a VM for a moment: the merge engine must read a guest page, verify
//! it and map the shared copy over it with no vCPU able to write the page in between.
//!
//! The pauser sets a flag and kicks the vCPU threads out of `KVM_RUN`; each vCPU parks as soon
//! as `KVM_RUN` returns and waits until the pause ends. A kick can land just before a thread
//! enters `KVM_RUN`, so the pauser repeats it until every running vCPU is parked.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::bus::lock;

#[derive(Default)]
struct State {
    /// A pause is wanted or in force.
    requested: bool,
    /// vCPU threads waiting in [`PauseControl::park_if_requested`].
    parked: usize,
    /// vCPU threads in their run loop.
    running: usize,
    /// Threads to kick (pthread ids of the vCPU threads).
    threads: Vec<libc::pthread_t>,
}

/// One VM's pause switch, shared by its vCPU threads and whoever merges its pages.
#[derive(Default)]
pub struct PauseControl {
    state: Mutex<State>,
    changed: Condvar,
}

/// While alive, every vCPU of the VM is parked outside `KVM_RUN`.
pub struct PauseGuard<'a> {
    control: &'a PauseControl,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        lock(&self.control.state).requested = false;
        self.control.changed.notify_all();
    }
}

impl PauseControl {
    /// A control with no vCPU running yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A vCPU thread enters its run loop (call from that thread).
    pub fn vcpu_started(&self) {
        let mut state = lock(&self.state);
        state.running += 1;
        // SAFETY: pthread_self has no preconditions.
        state.threads.push(unsafe { libc::pthread_self() });
    }

    /// A vCPU thread leaves its run loop for good (call from that thread).
    pub fn vcpu_stopped(&self) {
        let mut state = lock(&self.state);
        state.running = state.running.saturating_sub(1);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // SAFETY: pthread_equal only compares the two ids.
        state.threads.retain(|&t| unsafe { libc::pthread_equal(t, me) } == 0);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread each time `KVM_RUN` returns: waits while a pause is in force.
    pub fn park_if_requested(&self) {
        let mut state = lock(&self.state);
        if !state.requested {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.requested {
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.parked -= 1;
    }

    /// Parks every running vCPU and returns once they all are; `kick` interrupts one thread's
    /// `KVM_RUN`. The pause lasts until the guard is dropped.
    pub fn pause_all(&self, kick: impl Fn(libc::pthread_t)) -> PauseGuard<'_> {
        let mut state = lock(&self.state);
        state.requested = true;
        while state.parked < state.running {
            state.threads.iter().for_each(|&t| kick(t));
            let (next, _) = self
                .changed
                .wait_timeout(state, Duration::from_micros(500))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state = next;
        }
        PauseGuard { control: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn no_vcpu_runs_while_paused() {
        let control = Arc::new(PauseControl::new());
        let counter = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (control, counter, done) = (control.clone(), counter.clone(), done.clone());
                std::thread::spawn(move || {
                    control.vcpu_started();
                    while !done.load(Ordering::SeqCst) {
                        counter.fetch_add(1, Ordering::SeqCst);
                        control.park_if_requested();
                    }
                    control.vcpu_stopped();
                })
            })
            .collect();
        while lock(&control.state).running < 3 {
            std::thread::yield_now();
        }
        for _ in 0..20 {
            let guard = control.pause_all(|_| {});
            let before = counter.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(counter.load(Ordering::SeqCst), before, "a vCPU ran during the pause");
            drop(guard);
        }
        done.store(true, Ordering::SeqCst);
        threads.into_iter().for_each(|t| t.join().expect("join"));
        // With no vCPU running, a pause returns at once.
        drop(control.pause_all(|_| panic!("nothing to kick")));
    }
}
