//! Before the VM starts: the main thread answers API calls, configuring the VM
//! ([`VmResources`]), until `InstanceStart` boots it or `PUT /snapshot/load` restores one.
//!
//! Contract: every call gets one answer; a start that fails is answered 400 with its error
//! and the client may fix the configuration and start again; what only a running VM does is
//! refused with Firecracker's words.

use serde::Serialize;

use super::resources::VmResources;
use super::routes::{ActionType, ApiRequest, SnapshotLoad};
use super::{ApiInbox, ApiResponse};
use crate::run_args::RunArgs;
use crate::snapshot::SnapshotFiles;
use crate::stop::VmStop;

/// The version `GET /` and `GET /version` give: samepage's.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `GET /`'s answer.
#[derive(Serialize)]
pub struct InstanceInfo<'a> {
    /// The VM's name (`--id`).
    pub id: &'a str,
    /// `Not started`, `Running` or `Paused`.
    pub state: &'a str,
    /// samepage's version.
    pub vmm_version: &'a str,
    /// `samepage`.
    pub app_name: &'a str,
}

/// How the configured VM starts.
pub enum Start {
    /// Boot it with these options.
    Boot(RunArgs),
    /// Restore the snapshot in `files` with these options (its hardware is the snapshot's);
    /// paused unless `resume`.
    Restore {
        /// The process's options (console, merging, name).
        args: RunArgs,
        /// The snapshot.
        files: SnapshotFiles,
        /// Run at once.
        resume: bool,
    },
}

/// The words Firecracker answers an action the VM's state does not allow with.
pub const NOT_BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

/// Answers the calls in `inbox` until one starts a VM through `start`; returns what `start`
/// made and whether it runs (false: a snapshot loaded paused), or `None` when the API server
/// has stopped or `stop` was asked to stop (a stop signal).
pub fn configure<V, E: std::error::Error>(
    inbox: &ApiInbox,
    stop: &VmStop,
    resources: &mut VmResources,
    id: &str,
    mut start: impl FnMut(Start) -> Result<V, E>,
) -> Option<(V, bool)> {
    while let Some(call) = inbox.next_unless_stopped(stop) {
        let how = match &call.request {
            ApiRequest::Action(ActionType::InstanceStart) => match resources.run_args() {
                Ok(args) => Ok((Start::Boot(args), true)),
                Err(e) => Err(ApiResponse::bad_request(crate::error_chain(&e))),
            },
            ApiRequest::SnapshotLoad(load) => restore(load, resources.base()),
            _ => {
                let response = answer(&call.request, resources, id);
                call.answer(response);
                continue;
            }
        };
        let (how, resume) = match how {
            Ok(how) => how,
            Err(response) => {
                call.answer(response);
                continue;
            }
        };
        match start(how) {
            Ok(vm) => {
                call.answer(ApiResponse::no_content());
                return Some((vm, resume));
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                log::warn!("API: the VM did not start: {message}");
                call.answer(ApiResponse::bad_request(message));
            }
        }
    }
    None
}

/// A snapshot load as a start, or why it is refused.
fn restore(load: &SnapshotLoad, base: &RunArgs) -> Result<(Start, bool), ApiResponse> {
    let unsupported = |what: &str| {
        Err(ApiResponse::bad_request(format!(
            "{what} is not implemented by samepage (docs/firecracker-compat.md)"
        )))
    };
    if load.enable_diff_snapshots == Some(true) || load.track_dirty_pages == Some(true) {
        return unsupported("snapshot/load with dirty page tracking");
    }
    if load.network_overrides.is_some() {
        return unsupported("snapshot/load network_overrides");
    }
    let memory = match (&load.mem_backend, &load.mem_file_path) {
        (Some(backend), None) if backend.backend_type == "File" => backend.backend_path.clone(),
        (Some(_), None) => return unsupported("a mem_backend other than File (Uffd)"),
        (None, Some(path)) => path.clone(),
        _ => {
            return Err(ApiResponse::bad_request(
                "snapshot/load takes one of mem_backend and mem_file_path.",
            ));
        }
    };
    let files = SnapshotFiles { state: load.snapshot_path.clone(), memory };
    Ok((Start::Restore { args: base.clone(), files, resume: load.resume_vm }, load.resume_vm))
}

/// The answer to a call that configures or asks, before the start.
fn answer(request: &ApiRequest, resources: &mut VmResources, id: &str) -> ApiResponse {
    let done = |result: Result<(), crate::firecracker::config_file::ConfigFileError>| match result {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::bad_request(crate::error_chain(&e)),
    };
    match request {
        ApiRequest::GetInstanceInfo => ApiResponse::json(&InstanceInfo {
            id,
            state: "Not started",
            vmm_version: VMM_VERSION,
            app_name: "samepage",
        }),
        ApiRequest::GetVersion => {
            ApiResponse::json(&serde_json::json!({ "firecracker_version": VMM_VERSION }))
        }
        ApiRequest::GetVmConfig => ApiResponse::json(&resources.to_json()),
        ApiRequest::GetMachineConfig => ApiResponse::json(resources.machine()),
        ApiRequest::PutMachineConfig(m) => done(resources.set_machine(m.clone())),
        ApiRequest::PatchMachineConfig(m) => done(resources.patch_machine(m.clone())),
        ApiRequest::PutBootSource(b) => done(resources.set_boot_source(b.clone())),
        ApiRequest::PutDrive(d) => done(resources.put_drive(d.clone())),
        ApiRequest::PatchDrive(d) => done(resources.patch_drive(d.clone())),
        ApiRequest::PutBalloon(b) => done(resources.set_balloon(b.clone())),
        ApiRequest::GetBalloon => match resources.balloon() {
            Some(balloon) => ApiResponse::json(balloon),
            None => ApiResponse::bad_request(NO_BALLOON),
        },
        ApiRequest::PatchBalloon(_) | ApiRequest::GetBalloonStatistics => {
            ApiResponse::bad_request(NOT_BEFORE_START)
        }
        ApiRequest::PutEntropy(e) => done(resources.set_entropy(e.clone())),
        ApiRequest::PutVsock(v) => done(resources.set_vsock(v.clone())),
        ApiRequest::PutNetworkInterface(i) => done(resources.put_network_interface(i.clone())),
        ApiRequest::PutMetrics(m) => done(resources.set_metrics(m.clone())),
        ApiRequest::PutLogger => {
            resources.set_logger();
            ApiResponse::no_content()
        }
        ApiRequest::PutSamepage(s) => done(resources.set_samepage(s.clone())),
        ApiRequest::NotImplemented(what) => not_implemented(what),
        ApiRequest::Action(ActionType::SendCtrlAltDel) => not_implemented("SendCtrlAltDel"),
        ApiRequest::Action(_) | ApiRequest::PatchVm(_) | ApiRequest::SnapshotCreate(_) => {
            ApiResponse::bad_request(NOT_BEFORE_START)
        }
        // Taken by `configure` before it gets here.
        ApiRequest::SnapshotLoad(_) => ApiResponse::bad_request(NOT_BEFORE_START),
    }
}

/// Firecracker's words for a balloon call to a VM without one.
pub const NO_BALLOON: &str = "The balloon device is not configured (PUT /balloon before the start).";

/// A Firecracker feature samepage does not have.
pub fn not_implemented(what: &str) -> ApiResponse {
    ApiResponse::bad_request(format!("{what} is not implemented by samepage (docs/firecracker-compat.md)"))
}
