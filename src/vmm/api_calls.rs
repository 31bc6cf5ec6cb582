//! The API's calls while the VM runs, answered on the VMM thread between its other work
//! (`Vm::wait_for_stop` wakes for each): state, pause and resume, snapshots, metrics.
//! Configuration is over once the VM started: such calls are refused with Firecracker's words.

use std::time::Instant;

use crate::api::preboot::{not_implemented, InstanceInfo, NO_BALLOON, VMM_VERSION};
use samepage_virtio::block::Block;

use crate::api::routes::{ActionType, ApiRequest, DrivePatch, SnapshotCreate, VmStateRequest};
use crate::api::ApiResponse;
use crate::bus::lock;
use crate::snapshot::SnapshotFiles;

/// Firecracker's words for what only a VM that has not started takes.
const NOT_AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

impl super::Vm {
    /// Answers every call waiting in the API's inbox.
    pub(super) fn answer_api_calls(&mut self, started: Instant) {
        loop {
            let Some(call) = self.api.as_ref().and_then(|(inbox, _)| inbox.try_next()) else { return };
            let response = self.answer_api(&call.request, started);
            if response.status >= 400 {
                log::warn!("{}: API: {}", self.label, response.message());
            }
            call.answer(response);
        }
    }

    fn answer_api(&mut self, request: &ApiRequest, started: Instant) -> ApiResponse {
        let config = self.api.as_ref().map(|(_, config)| config.clone()).unwrap_or_default();
        match request {
            ApiRequest::GetInstanceInfo => ApiResponse::json(&InstanceInfo {
                id: &self.label,
                state: if self.pause.is_held() { "Paused" } else { "Running" },
                vmm_version: VMM_VERSION,
                app_name: "samepage",
            }),
            ApiRequest::GetVersion => {
                ApiResponse::json(&serde_json::json!({ "firecracker_version": VMM_VERSION }))
            }
            ApiRequest::GetVmConfig => ApiResponse::json(&config),
            ApiRequest::GetMachineConfig => ApiResponse::json(&config["machine-config"]),
            ApiRequest::PatchVm(VmStateRequest::Paused) => {
                if self.pause.hold() {
                    log::info!("{}: paused through the API", self.label);
                    ApiResponse::no_content()
                } else {
                    ApiResponse::bad_request("The VM is stopping.")
                }
            }
            ApiRequest::PatchVm(VmStateRequest::Resumed) => {
                self.pause.resume();
                log::info!("{}: resumed through the API", self.label);
                ApiResponse::no_content()
            }
            ApiRequest::SnapshotCreate(create) => self.snapshot_on_request(create),
            ApiRequest::GetBalloon => match &self.balloon {
                // As configured, with the target it has now.
                Some(balloon) => {
                    let configured = config.get("balloon").filter(|b| b.is_object()).cloned();
                    let mut shown = configured.unwrap_or_else(|| serde_json::json!({}));
                    shown["amount_mib"] = serde_json::json!(balloon.metrics().target_bytes >> 20);
                    ApiResponse::json(&shown)
                }
                None => ApiResponse::bad_request(NO_BALLOON),
            },
            ApiRequest::PatchBalloon(update) => match &self.balloon {
                Some(balloon) => {
                    match update.amount_mib.checked_mul(1 << 20).map(|bytes| balloon.set_target(bytes)) {
                        Some(Ok(())) => {
                            log::info!(
                                "{}: balloon target {} MiB through the API",
                                self.label,
                                update.amount_mib
                            );
                            ApiResponse::no_content()
                        }
                        Some(Err(e)) => ApiResponse::bad_request(e),
                        None => {
                            ApiResponse::bad_request(format!("amount_mib {} is too large", update.amount_mib))
                        }
                    }
                }
                None => ApiResponse::bad_request(NO_BALLOON),
            },
            ApiRequest::GetBalloonStatistics => match &self.balloon {
                Some(balloon) => ApiResponse::json(&balloon_statistics(&balloon.metrics())),
                None => ApiResponse::bad_request(NO_BALLOON),
            },
            ApiRequest::Action(ActionType::FlushMetrics) => match &self.metrics {
                Some(path) => match crate::metrics::write(path, &self.metrics_now(started)) {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::bad_request(crate::error_chain(&e)),
                },
                None => {
                    ApiResponse::bad_request("No metrics file is configured (PUT /metrics before the start).")
                }
            },
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                if lock(&self.i8042).send_ctrl_alt_del() {
                    log::info!("{}: Ctrl+Alt+Del sent through the API", self.label);
                    ApiResponse::no_content()
                } else {
                    ApiResponse::bad_request(
                        "The guest has not read the keys sent before (the i8042's buffer is full).",
                    )
                }
            }
            ApiRequest::PatchDrive(patch) => self.patch_drive(patch),
            ApiRequest::NotImplemented(what) => not_implemented(what),
            ApiRequest::Action(ActionType::InstanceStart)
            | ApiRequest::PutMachineConfig(_)
            | ApiRequest::PatchMachineConfig(_)
            | ApiRequest::PutBootSource(_)
            | ApiRequest::PutDrive(_)
            | ApiRequest::PutBalloon(_)
            | ApiRequest::PutEntropy(_)
            | ApiRequest::PutVsock(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::PutMetrics(_)
            | ApiRequest::PutLogger
            | ApiRequest::PutSamepage(_)
            | ApiRequest::SnapshotLoad(_) => ApiResponse::bad_request(NOT_AFTER_START),
        }
    }

    /// `PATCH /drives/{id}` on the running VM: the drive's disk gets the image at
    /// `path_on_host` (as Kata swaps its placeholder drives for container images), the guest
    /// hears of the new capacity through a configuration change.
    fn patch_drive(&mut self, patch: &DrivePatch) -> ApiResponse {
        if patch.rate_limiter.is_some() {
            return not_implemented("a drive's rate_limiter");
        }
        let Some(config) = self.api.as_mut().map(|(_, config)| config) else {
            return ApiResponse::bad_request("No API configuration.");
        };
        let Some(index) = disk_index(config, &patch.drive_id) else {
            return ApiResponse::bad_request(format!("Could not find a drive with id {:?}.", patch.drive_id));
        };
        let Some(path) = &patch.path_on_host else { return ApiResponse::no_content() };
        let Some(transport) = self.disk_transports.get(index) else {
            return ApiResponse::bad_request(format!("Drive {:?} has no disk.", patch.drive_id));
        };
        let mut transport = lock(transport);
        let block = transport.device_mut().as_any_mut().and_then(|device| device.downcast_mut::<Block>());
        let Some(block) = block else {
            return ApiResponse::bad_request(format!("Drive {:?} is not a block device.", patch.drive_id));
        };
        match block.replace_image(path) {
            Ok(sectors) => {
                transport.config_changed();
                drop(transport);
                if let Some(drive) = config["drives"]
                    .as_array_mut()
                    .and_then(|drives| drives.iter_mut().find(|d| d["drive_id"] == patch.drive_id.as_str()))
                {
                    drive["path_on_host"] = serde_json::json!(path);
                }
                log::info!(
                    "{}: drive {:?} is now {} ({sectors} sectors)",
                    self.label,
                    patch.drive_id,
                    path.display()
                );
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::bad_request(crate::error_chain(&e)),
        }
    }

    /// `PUT /snapshot/create`: as Firecracker, only of a paused VM, and only full snapshots.
    fn snapshot_on_request(&mut self, create: &SnapshotCreate) -> ApiResponse {
        if create.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
            return not_implemented("snapshot_type other than Full");
        }
        if create.version.is_some() {
            return not_implemented("snapshot/create's version (samepage writes its own format)");
        }
        if !self.pause.is_held() {
            return ApiResponse::bad_request(
                "Cannot create a snapshot of a running microVM: pause it first (PATCH /vm).",
            );
        }
        let Some(snapshotter) = self.snapshotter.as_ref() else {
            return ApiResponse::bad_request("snapshot: this VM was not built to be snapshotted");
        };
        let files =
            SnapshotFiles { state: create.snapshot_path.clone(), memory: create.mem_file_path.clone() };
        if files.state == files.memory {
            return ApiResponse::bad_request("snapshot_path and mem_file_path are one file.");
        }
        match snapshotter.take(&self.vm, &self.mem, &self.pause, &self.serial, &files) {
            Ok(taken) => {
                log::info!(
                    "{}: snapshot written to {} and {} through the API: {:.1} ms, {:.1} MiB of RAM written",
                    self.label,
                    files.state.display(),
                    files.memory.display(),
                    taken.paused.as_secs_f64() * 1e3,
                    taken.ram_written as f64 / (1 << 20) as f64
                );
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::bad_request(crate::error_chain(&e)),
        }
    }
}

/// `GET /balloon/statistics` in Firecracker's shape: the target and `actual` in pages and MiB,
/// and the guest's latest figures where it gave them (with `stats=SECS`).
fn balloon_statistics(m: &crate::balloon::BalloonMetrics) -> serde_json::Value {
    let page = samepage_virtio::PAGE_SIZE as u64;
    let mut out = serde_json::json!({
        "target_pages": m.target_bytes / page,
        "actual_pages": m.actual_bytes / page,
        "target_mib": m.target_bytes >> 20,
        "actual_mib": m.actual_bytes >> 20,
    });
    if let (Some(stats), Some(map)) = (&m.guest_stats, out.as_object_mut()) {
        if let Ok(serde_json::Value::Object(figures)) = serde_json::to_value(stats) {
            map.extend(figures.into_iter().filter(|(_, v)| !v.is_null()));
        }
    }
    out
}

/// Which of the VM's disks drive `id` is, from the configuration the API shows: the root
/// device first, then the others in order (as the configuration file's drives become disks).
fn disk_index(config: &serde_json::Value, id: &str) -> Option<usize> {
    let drives = config["drives"].as_array()?;
    let is_root = |d: &serde_json::Value| d["is_root_device"].as_bool() == Some(true);
    let order = drives.iter().filter(|d| is_root(d)).chain(drives.iter().filter(|d| !is_root(d)));
    order.map(|d| d["drive_id"].as_str()).position(|d| d == Some(id))
}

#[cfg(test)]
mod tests {
    use super::disk_index;

    #[test]
    fn drives_are_disks_in_the_configuration_files_order_the_root_first() {
        let config = serde_json::json!({"drives": [
            {"drive_id": "drive_0", "is_root_device": false},
            {"drive_id": "rootfs", "is_root_device": true},
            {"drive_id": "drive_1", "is_root_device": false}
        ]});
        assert_eq!(disk_index(&config, "rootfs"), Some(0));
        assert_eq!(disk_index(&config, "drive_0"), Some(1));
        assert_eq!(disk_index(&config, "drive_1"), Some(2));
        assert_eq!(disk_index(&config, "nope"), None);
        assert_eq!(disk_index(&serde_json::json!({}), "rootfs"), None);
    }
}
