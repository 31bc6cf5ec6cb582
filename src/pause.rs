//! Holding a VM's vCPUs outside `KVM_RUN`: for a moment while the merge engine reads a guest
//! page, verifies it and maps the shared copy over it (nothing may write the page in between),
//! and for good when the VM stops.
//!
//! One kick is enough: the pauser sets its flag under the lock, then signals each vCPU thread
//! once. The signal handler sets the thread's `kvm_run.immediate_exit` (see `vcpu.rs`), so a
//! kick that lands before the thread enters `KVM_RUN` still makes it return at once; each vCPU
//! clears the flag and then looks at the state here before it enters `KVM_RUN` again.
//!
//! Lock order: whoever pauses holds no device lock while it waits for the vCPUs to park, and a
//! parked vCPU holds none; so a vCPU never blocks on a device whose user waits for it to park.

use std::sync::{Condvar, Mutex};

use crate::bus::lock;

#[derive(Default)]
struct State {
    /// Pauses wanted or in force (each [`PauseGuard`] counts one until dropped).
    requested: usize,
    /// Errands asked of parked vCPUs so far ([`PauseGuard::run_errand`]).
    errand: u64,
    /// The VM is stopping: vCPUs leave their loop and pauses end at once.
    stopping: bool,
    /// A pause held until [`PauseControl::resume`] (the API's `Paused` state), counted in
    /// `requested` once however often it is asked for.
    held: bool,
    /// vCPU threads waiting in [`PauseControl::before_run`].
    parked: usize,
    /// vCPU threads in their run loop.
    running: usize,
    /// Threads to kick (pthread ids of the vCPU threads in their run loop).
    threads: Vec<libc::pthread_t>,
}

/// How long pauses took to take hold (metrics: the merge path pauses for every batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseStats {
    /// Pauses that took hold.
    pub pauses: u64,
    /// Time from asking to every vCPU parked, summed (ns).
    pub wait_ns: u64,
    /// The longest such time (ns).
    pub max_wait_ns: u64,
}

/// One VM's pause switch, shared by its vCPU threads and whoever merges its pages.
pub struct PauseControl {
    state: Mutex<State>,
    changed: Condvar,
    kick: fn(libc::pthread_t),
    stats: Mutex<PauseStats>,
}

/// While alive, every vCPU of the VM is parked outside `KVM_RUN`.
pub struct PauseGuard<'a> {
    control: &'a PauseControl,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.control.state);
        state.requested = state.requested.saturating_sub(1);
        drop(state);
        self.control.changed.notify_all();
    }
}

impl PauseGuard<'_> {
    /// Asks every parked vCPU thread to run an errand (a snapshot's save of its vCPU): each
    /// leaves its wait once, gets [`Gate::Errand`] from [`PauseControl::gate`], and parks
    /// again, since this pause is still in force.
    pub fn run_errand(&self) {
        lock(&self.control.state).errand += 1;
        self.control.changed.notify_all();
    }
}

/// What a vCPU thread does next ([`PauseControl::gate`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    /// Enter `KVM_RUN`.
    Run,
    /// Leave the run loop: the VM stops.
    Stop,
    /// Run the errand a pauser asked for, then ask again.
    Errand,
}

impl PauseControl {
    /// A control with no vCPU running yet; `kick` interrupts one thread's `KVM_RUN`.
    pub fn new(kick: fn(libc::pthread_t)) -> Self {
        PauseControl { state: Mutex::default(), changed: Condvar::new(), kick, stats: Mutex::default() }
    }

    /// A vCPU thread enters its run loop (call from that thread).
    pub fn vcpu_started(&self) {
        let mut state = lock(&self.state);
        state.running += 1;
        // SAFETY: pthread_self has no preconditions.
        state.threads.push(unsafe { libc::pthread_self() });
        self.changed.notify_all();
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

    /// Called by a vCPU thread before each `KVM_RUN`: waits while a pause is in force; returns
    /// false when the VM is stopping (the thread must leave its loop). Errands are skipped: for
    /// threads that have none to run.
    pub fn before_run(&self) -> bool {
        let mut seen = lock(&self.state).errand;
        loop {
            match self.gate(&mut seen) {
                Gate::Run => return true,
                Gate::Stop => return false,
                Gate::Errand => {}
            }
        }
    }

    /// Called by a vCPU thread before each `KVM_RUN`: waits while a pause is in force, unless
    /// an errand newer than `seen` (the last one the thread ran) is asked for.
    pub fn gate(&self, seen: &mut u64) -> Gate {
        let mut state = lock(&self.state);
        if state.requested > 0 && !state.stopping {
            state.parked += 1;
            self.changed.notify_all();
            while state.requested > 0 && !state.stopping && state.errand == *seen {
                state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.parked -= 1;
        }
        if state.stopping {
            return Gate::Stop;
        }
        if state.errand != *seen {
            *seen = state.errand;
            return Gate::Errand;
        }
        Gate::Run
    }

    /// The errands asked for so far: a vCPU thread starts with this as its `seen`.
    pub fn errands(&self) -> u64 {
        lock(&self.state).errand
    }

    /// Parks every running vCPU and returns once they all are; the pause lasts until the guard
    /// is dropped. `None` when the VM is stopping (nothing may rely on the vCPUs being parked).
    pub fn pause_all(&self) -> Option<PauseGuard<'_>> {
        let asked = std::time::Instant::now();
        let mut state = lock(&self.state);
        if state.stopping {
            return None;
        }
        state.requested += 1;
        state.threads.iter().for_each(|&t| (self.kick)(t));
        while state.parked < state.running && !state.stopping {
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.stopping {
            state.requested = state.requested.saturating_sub(1);
            return None;
        }
        drop(state);
        let waited = asked.elapsed().as_nanos() as u64;
        let mut stats = lock(&self.stats);
        stats.pauses += 1;
        stats.wait_ns += waited;
        stats.max_wait_ns = stats.max_wait_ns.max(waited);
        Some(PauseGuard { control: self })
    }

    /// Parks every vCPU until [`PauseControl::resume`] (a client's `Paused`): vCPUs that have
    /// not started yet park before their first entry into the guest. Returns once every running
    /// vCPU is parked; false when the VM is stopping. Holding an already held pause changes
    /// nothing.
    pub fn hold(&self) -> bool {
        let mut state = lock(&self.state);
        if state.stopping {
            return false;
        }
        if !state.held {
            state.held = true;
            state.requested += 1;
            state.threads.iter().for_each(|&t| (self.kick)(t));
        }
        while state.parked < state.running && !state.stopping {
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        !state.stopping
    }

    /// Ends the pause [`PauseControl::hold`] took (nothing when none is held); the vCPUs run on
    /// unless another pause is in force.
    pub fn resume(&self) {
        let mut state = lock(&self.state);
        if state.held {
            state.held = false;
            state.requested = state.requested.saturating_sub(1);
            drop(state);
            self.changed.notify_all();
        }
    }

    /// Whether a pause taken by [`PauseControl::hold`] is in force.
    pub fn is_held(&self) -> bool {
        lock(&self.state).held
    }

    /// How long pauses took to take hold, so far.
    pub fn stats(&self) -> PauseStats {
        *lock(&self.stats)
    }

    /// Whether every running vCPU is parked by a pause in force now.
    pub fn all_parked(&self) -> bool {
        let state = lock(&self.state);
        state.requested > 0 && !state.stopping && state.parked == state.running
    }

    /// The VM stops: wakes parked vCPUs and kicks running ones, once, so that they all leave
    /// their loops; ends any pause.
    pub fn stop_all(&self) {
        let mut state = lock(&self.state);
        state.stopping = true;
        state.threads.iter().for_each(|&t| (self.kick)(t));
        self.changed.notify_all();
    }

    /// Waits until no vCPU thread is in its run loop, or `deadline` passes; returns how many
    /// still are.
    pub fn wait_stopped(&self, deadline: std::time::Instant) -> usize {
        let mut state = lock(&self.state);
        while state.running > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        state.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn no_kick(_: libc::pthread_t) {}

    /// vCPU stand-ins: count while they may run, park when asked, stop when told.
    fn spawn_vcpus(
        control: &Arc<PauseControl>,
        n: usize,
        counter: &Arc<AtomicU64>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let threads = (0..n)
            .map(|_| {
                let (control, counter) = (control.clone(), counter.clone());
                std::thread::spawn(move || {
                    control.vcpu_started();
                    while control.before_run() {
                        counter.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                    }
                    control.vcpu_stopped();
                })
            })
            .collect();
        while lock(&control.state).running < n {
            std::thread::yield_now();
        }
        threads
    }

    #[test]
    fn no_vcpu_runs_while_paused() {
        let control = Arc::new(PauseControl::new(no_kick));
        let counter = Arc::new(AtomicU64::new(0));
        let threads = spawn_vcpus(&control, 3, &counter);
        for _ in 0..20 {
            let guard = control.pause_all().expect("not stopping");
            assert!(control.all_parked());
            let before = counter.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(counter.load(Ordering::SeqCst), before, "a vCPU ran during the pause");
            drop(guard);
            assert!(!control.all_parked());
        }
        control.stop_all();
        assert_eq!(control.wait_stopped(Instant::now() + Duration::from_secs(10)), 0);
        threads.into_iter().for_each(|t| t.join().expect("join"));
        // With no vCPU running, a pause of a stopped VM gives nothing to rely on.
        assert!(control.pause_all().is_none());
    }

    #[test]
    fn a_held_pause_lasts_until_resumed_and_outlives_the_pauses_inside_it() {
        let control = Arc::new(PauseControl::new(no_kick));
        let counter = Arc::new(AtomicU64::new(0));
        let threads = spawn_vcpus(&control, 2, &counter);
        assert!(control.hold() && control.hold(), "held twice: still one pause");
        assert!(control.is_held() && control.all_parked());
        // A snapshot's pause inside the held one ends without letting the vCPUs run.
        drop(control.pause_all().expect("pause"));
        let before = counter.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(counter.load(Ordering::SeqCst), before, "a vCPU ran while the pause was held");
        control.resume();
        control.resume();
        assert!(!control.is_held());
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter.load(Ordering::SeqCst) == before && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(counter.load(Ordering::SeqCst) > before, "the vCPUs did not run on after resume");
        control.stop_all();
        assert_eq!(control.wait_stopped(Instant::now() + Duration::from_secs(10)), 0);
        threads.into_iter().for_each(|t| t.join().expect("join"));
        assert!(!control.hold(), "a stopping VM holds no pause");
    }

    #[test]
    fn stopping_ends_a_pause_and_releases_parked_vcpus() {
        let control = Arc::new(PauseControl::new(no_kick));
        let counter = Arc::new(AtomicU64::new(0));
        let threads = spawn_vcpus(&control, 2, &counter);
        let paused = Arc::new(AtomicBool::new(false));
        let guard = control.pause_all().expect("pause");
        paused.store(true, Ordering::SeqCst);
        let stopper = {
            let control = control.clone();
            std::thread::spawn(move || control.stop_all())
        };
        assert_eq!(control.wait_stopped(Instant::now() + Duration::from_secs(10)), 0);
        assert!(!control.all_parked());
        drop(guard);
        stopper.join().expect("join");
        threads.into_iter().for_each(|t| t.join().expect("join"));
    }

    #[test]
    fn an_errand_runs_once_on_every_parked_vcpu_and_they_stay_parked() {
        let control = Arc::new(PauseControl::new(no_kick));
        let (ran, counter) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (control, ran, counter) = (control.clone(), ran.clone(), counter.clone());
                std::thread::spawn(move || {
                    control.vcpu_started();
                    let mut seen = control.errands();
                    loop {
                        match control.gate(&mut seen) {
                            Gate::Run => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                std::thread::yield_now();
                            }
                            Gate::Errand => {
                                ran.fetch_add(1, Ordering::SeqCst);
                            }
                            Gate::Stop => break,
                        }
                    }
                    control.vcpu_stopped();
                })
            })
            .collect();
        while lock(&control.state).running < 3 {
            std::thread::yield_now();
        }
        let guard = control.pause_all().expect("pause");
        let before = counter.load(Ordering::SeqCst);
        guard.run_errand();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ran.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 3, "each vCPU runs the errand once");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(counter.load(Ordering::SeqCst), before, "a vCPU ran during the pause");
        assert_eq!(ran.load(Ordering::SeqCst), 3, "an errand ran twice");
        drop(guard);
        control.stop_all();
        threads.into_iter().for_each(|t| t.join().expect("join"));
    }

    #[test]
    fn a_second_pause_keeps_the_vcpus_parked_when_the_first_ends() {
        let control = Arc::new(PauseControl::new(no_kick));
        let counter = Arc::new(AtomicU64::new(0));
        let threads = spawn_vcpus(&control, 2, &counter);
        let first = control.pause_all().expect("pause");
        let second = control.pause_all().expect("pause");
        drop(first);
        let before = counter.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(counter.load(Ordering::SeqCst), before, "vCPUs ran while a pause was in force");
        assert!(control.all_parked());
        drop(second);
        control.stop_all();
        threads.into_iter().for_each(|t| t.join().expect("join"));
    }

    #[test]
    fn a_pause_waiting_for_a_vcpu_that_never_parks_ends_when_the_vm_stops() {
        let control = Arc::new(PauseControl::new(no_kick));
        // A vCPU that entered its loop but is stuck elsewhere (never calls before_run).
        lock(&control.state).running = 1;
        let pauser = {
            let control = control.clone();
            std::thread::spawn(move || control.pause_all().is_some())
        };
        std::thread::sleep(Duration::from_millis(20));
        control.stop_all();
        assert!(!pauser.join().expect("join"), "the pause must not claim the vCPU parked");
    }
}
