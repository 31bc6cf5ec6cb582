//! `samepage run` (and `firecracker`): one VM built from the command line, restored from a
//! snapshot, or configured and started through Firecracker's API (`--api-sock`), then run
//! until it stops; with the API, answering its calls while it runs.
//!
//! Contract: the API socket is bound before the VM and removed after it; a VM configured
//! through the API starts only on `InstanceStart` or `PUT /snapshot/load`, and a stop signal
//! before that ends the process as it would a running VM.

use std::sync::Arc;
use std::time::Instant;

use crate::api::preboot::{self, Start};
use crate::api::resources::VmResources;
use crate::api::{ApiError, ApiInbox, ApiSocket};
use crate::error::VmmError;
use crate::firecracker::config_file::FirecrackerConfig;
use crate::run_args::RunArgs;
use crate::snapshot::SnapshotFiles;
use crate::stop::{VmExit, VmStop};
use crate::vmm::{Vm, VmContext, STOP_GRACE};

/// Why a VM did not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Building or running it failed.
    #[error(transparent)]
    Vm(#[from] VmmError),
    /// The API socket could not be served.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The API socket went away, or a stop signal came, before a VM was started through it.
    #[error("no VM was started through the API socket")]
    NotStarted,
}

/// Runs the VM `args` give (a Firecracker configuration file's sections in `config`, when one
/// was given with `--api-sock`, for `GET /vm/config`); returns how it stopped.
pub fn run(args: &RunArgs, config: Option<FirecrackerConfig>) -> Result<VmExit, RunError> {
    let stop = Arc::new(VmStop::new());
    let Some(path) = &args.api_sock else {
        let vm = build(Start::Boot(args.clone()), &stop, false)?;
        return run_vm(vm, args.hold_until_eof).map_err(RunError::from);
    };
    let (server, inbox) = ApiSocket::bind(path)?.serve(stop.clone())?;
    log::info!("serving Firecracker's API on {}", path.display());
    let result = run_with_api(args, config, &stop, inbox);
    if !server.stop(Instant::now() + STOP_GRACE) {
        log::error!("the API thread did not stop within {} s; leaving it behind", STOP_GRACE.as_secs());
    }
    result
}

fn run_with_api(
    args: &RunArgs,
    config: Option<FirecrackerConfig>,
    stop: &Arc<VmStop>,
    inbox: ApiInbox,
) -> Result<VmExit, RunError> {
    let configured_here = args.kernel.is_some() || args.restore.is_some() || config.is_some();
    let (mut vm, resources) = if configured_here {
        let resources = match config {
            Some(config) => VmResources::from_config(args.clone(), config),
            None => VmResources::from_run_args(args),
        };
        (build(Start::Boot(args.clone()), stop, true)?, resources)
    } else {
        crate::signals::watch(stop);
        let mut resources = VmResources::new(args.clone());
        let started =
            preboot::configure(&inbox, stop, &mut resources, &args.name, |start| build(start, stop, true));
        let Some((vm, runs)) = started else {
            // A stop signal ends an unstarted VMM as it ends a running one.
            return stop.wait(std::time::Duration::ZERO).ok_or(RunError::NotStarted);
        };
        if !runs {
            vm.start_paused();
        }
        (vm, resources)
    };
    vm.serve_api(inbox, resources.to_json());
    run_vm(vm, args.hold_until_eof).map_err(RunError::from)
}

/// Builds (or restores) the VM `start` describes; `api`: it may be asked for snapshots.
fn build(start: Start, stop: &Arc<VmStop>, api: bool) -> Result<Vm, VmmError> {
    let context = |args: &RunArgs| VmContext {
        label: args.name.clone(),
        metrics: args.metrics.clone(),
        stop: stop.clone(),
        snapshots_on_request: api,
        ..VmContext::default()
    };
    match start {
        Start::Boot(args) => match &args.restore {
            Some(dir) => Vm::restore_in(&SnapshotFiles::in_dir(dir), &args.vm_config(), context(&args)),
            None => Vm::build_in(&args.vm_config(), context(&args)),
        },
        Start::Restore { args, files, .. } => Vm::restore_in(&files, &args.vm_config(), context(&args)),
    }
}

/// Runs a built VM until it stops; `hold`: then keeps its memory until standard input ends.
fn run_vm(vm: Vm, hold: bool) -> Result<VmExit, VmmError> {
    log::info!("kernel command line: {}", vm.cmdline);
    let (exit, stopped) = vm.run_and_keep()?;
    if hold {
        // Until the caller closes our standard input (or goes away).
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    }
    drop(stopped);
    Ok(exit)
}
