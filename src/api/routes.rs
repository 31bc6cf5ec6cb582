//! Firecracker's API paths and bodies, read into [`ApiRequest`]s (docs/firecracker-compat.md,
//! "The API"): one function from a method, a path and a body to a request or a
//! [`RouteError`], with no state and no I/O, so that it is tested and fuzzed alone.
//!
//! Contract: every input is a client's and hostile; nothing here panics; every body is JSON of
//! Firecracker's shape with unknown fields refused (as Firecracker's parser does); a path's id
//! is 1 to 64 ASCII letters, digits or `_` and must equal the body's.

use std::path::PathBuf;

use serde::Deserialize;

use crate::firecracker::config_file::{
    Balloon, BootSource, Drive, Entropy, MachineConfig, Metrics, NetworkInterface, SamepageExtensions, Vsock,
};

/// Longest id in a path (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;

/// What a client asked for.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET /`: the instance's id, state and version.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /vm/config`: the whole configuration, in the configuration file's shape.
    GetVmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`: the fields given change.
    PatchMachineConfig(MachineConfigPatch),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`: adds the drive or replaces the one of that id.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(DrivePatch),
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `GET /balloon`: its configuration.
    GetBalloon,
    /// `PATCH /balloon`: a new target.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStatistics,
    /// `PUT /entropy`.
    PutEntropy(Entropy),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /logger`: accepted, not used (samepage logs to standard error).
    PutLogger,
    /// `PUT /samepage`: samepage's own settings, an extension.
    PutSamepage(SamepageExtensions),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateRequest),
    /// `PUT /snapshot/create`.
    SnapshotCreate(SnapshotCreate),
    /// `PUT /snapshot/load`.
    SnapshotLoad(SnapshotLoad),
    /// A Firecracker endpoint samepage does not implement (named in the reply).
    NotImplemented(&'static str),
}

/// `PATCH /machine-config`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest RAM, MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT (only off).
    pub smt: Option<bool>,
    /// Accepted, ignored.
    pub track_dirty_pages: Option<bool>,
    /// Only `None`.
    pub cpu_template: Option<String>,
    /// Only `None`.
    pub huge_pages: Option<String>,
}

/// `PATCH /drives/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    /// The drive.
    pub drive_id: String,
    /// A new image.
    pub path_on_host: Option<PathBuf>,
    /// Not implemented: refused when set.
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The memory the guest is asked to give up, MiB.
    pub amount_mib: u64,
}

/// `PUT /actions`' `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

/// `PATCH /vm`'s `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    /// Park every vCPU until resumed.
    Paused,
    /// Run on.
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmStateRequest,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// `Full` (samepage's only kind); `Diff` is refused.
    pub snapshot_type: Option<String>,
    /// Where the state goes (samepage's `state.json`).
    pub snapshot_path: PathBuf,
    /// Where guest RAM goes.
    pub mem_file_path: PathBuf,
    /// A snapshot format version to write: refused (samepage writes its own).
    pub version: Option<String>,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The state a `snapshot/create` wrote.
    pub snapshot_path: PathBuf,
    /// Guest RAM (Firecracker's older field).
    pub mem_file_path: Option<PathBuf>,
    /// Guest RAM (Firecracker's newer field).
    pub mem_backend: Option<MemBackend>,
    /// Accepted when false.
    pub enable_diff_snapshots: Option<bool>,
    /// Accepted when false.
    pub track_dirty_pages: Option<bool>,
    /// Run the VM once loaded; paused otherwise (`PATCH /vm` resumes it).
    #[serde(default)]
    pub resume_vm: bool,
    /// Network overrides: refused when given (samepage has no network device).
    pub network_overrides: Option<serde_json::Value>,
}

/// `mem_backend` of a snapshot load.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// `File` (samepage's only backend: the file is mapped copy-on-write); `Uffd` is refused.
    pub backend_type: String,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// Why a request has no [`ApiRequest`].
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No such endpoint, or not with this method.
    #[error("Invalid request method and/or path: {method} {path}.")]
    UnknownPath {
        /// The method.
        method: String,
        /// The path (control characters escaped).
        path: String,
    },
    /// The body is not the endpoint's JSON (the parser's message, which quotes the client's
    /// field names, with control characters escaped).
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Body(String),
    /// An id that is not 1 to 64 letters, digits or `_`.
    #[error("Invalid ID: {0:?}: an id is 1 to {MAX_ID_LEN} ASCII letters, digits or underscores.")]
    BadId(String),
    /// The path's id is not the body's.
    #[error("The id from the path ({path}) does not match the id from the body ({body})!")]
    IdMismatch {
        /// The path's.
        path: String,
        /// The body's.
        body: String,
    },
}

/// Reads one request: `method` and `path` as the request line gave them (a query string is
/// ignored), `body` its bytes (empty when it had none).
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let trimmed = path.trim_end_matches('/');
    let parts: Vec<&str> = trimmed.split('/').skip(1).collect();
    let unknown = || RouteError::UnknownPath { method: escape(method), path: escape(path) };
    let request = match (method, parts.as_slice()) {
        ("GET", []) => ApiRequest::GetInstanceInfo,
        ("GET", ["version"]) => ApiRequest::GetVersion,
        ("GET", ["vm", "config"]) => ApiRequest::GetVmConfig,
        ("GET", ["machine-config"]) => ApiRequest::GetMachineConfig,
        ("PUT", ["machine-config"]) => ApiRequest::PutMachineConfig(json(body)?),
        ("PATCH", ["machine-config"]) => ApiRequest::PatchMachineConfig(json(body)?),
        ("PUT", ["boot-source"]) => ApiRequest::PutBootSource(json(body)?),
        ("PUT", ["drives", id]) => {
            check_id(id)?;
            let drive: Drive = json(body)?;
            same_id(id, &drive.drive_id)?;
            ApiRequest::PutDrive(drive)
        }
        ("PATCH", ["drives", id]) => {
            check_id(id)?;
            let patch: DrivePatch = json(body)?;
            same_id(id, &patch.drive_id)?;
            ApiRequest::PatchDrive(patch)
        }
        ("PUT", ["balloon"]) => ApiRequest::PutBalloon(json(body)?),
        ("PUT", ["entropy"]) => ApiRequest::PutEntropy(json(body)?),
        ("PUT", ["metrics"]) => ApiRequest::PutMetrics(json(body)?),
        ("PUT", ["logger"]) => {
            json::<serde_json::Map<String, serde_json::Value>>(body)?;
            ApiRequest::PutLogger
        }
        ("PUT", ["samepage"]) => ApiRequest::PutSamepage(json(body)?),
        ("PUT", ["actions"]) => ApiRequest::Action(json::<ActionBody>(body)?.action_type),
        ("PATCH", ["vm"]) => ApiRequest::PatchVm(json::<VmBody>(body)?.state),
        ("PUT", ["snapshot", "create"]) => ApiRequest::SnapshotCreate(json(body)?),
        ("PUT", ["snapshot", "load"]) => ApiRequest::SnapshotLoad(json(body)?),
        ("PUT", ["network-interfaces", id]) => {
            let iface: NetworkInterface = json(body)?;
            same_id(id, &iface.iface_id)?;
            ApiRequest::PutNetworkInterface(iface)
        }
        ("PATCH", ["network-interfaces", id]) => {
            check_id(id)?;
            ApiRequest::NotImplemented("changing a network interface's rate limiters")
        }
        ("PUT", ["vsock"]) => ApiRequest::PutVsock(json(body)?),
        ("GET" | "PUT" | "PATCH", ["mmds", ..]) => ApiRequest::NotImplemented("MMDS"),
        ("PUT", ["cpu-config"]) => ApiRequest::NotImplemented("cpu-config"),
        ("GET", ["balloon"]) => ApiRequest::GetBalloon,
        ("PATCH", ["balloon"]) => ApiRequest::PatchBalloon(json(body)?),
        ("GET", ["balloon", "statistics"]) => ApiRequest::GetBalloonStatistics,
        ("PATCH", ["balloon", "statistics"]) => {
            ApiRequest::NotImplemented("changing the balloon's statistics interval after its start")
        }
        ("PUT", ["balloon", "hinting", ..]) | ("GET", ["balloon", "hinting", ..]) => {
            ApiRequest::NotImplemented("free page hinting")
        }
        _ => return Err(unknown()),
    };
    Ok(request)
}

/// The body as `T`; an empty body is refused as JSON refuses it.
fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, RouteError> {
    serde_json::from_slice(body).map_err(|e| RouteError::Body(escape(&e.to_string())))
}

fn check_id(id: &str) -> Result<(), RouteError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(RouteError::BadId(escape(id)))
    }
}

fn same_id(path: &str, body: &str) -> Result<(), RouteError> {
    check_id(path)?;
    if path != body {
        return Err(RouteError::IdMismatch { path: escape(path), body: escape(body) });
    }
    Ok(())
}

/// A client's text for a message: at most 200 characters, control characters escaped.
fn escape(text: &str) -> String {
    let mut short: String = text.chars().take(200).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    crate::escape_controls(&short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> ApiRequest {
        parse(method, path, body.as_bytes()).unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"))
    }

    fn refused(method: &str, path: &str, body: &str) -> String {
        match parse(method, path, body.as_bytes()) {
            Ok(request) => panic!("{method} {path} {body}: taken as {request:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn firecrackers_endpoints_are_read_with_their_bodies() {
        assert!(matches!(ok("GET", "/", ""), ApiRequest::GetInstanceInfo));
        assert!(matches!(ok("GET", "/vm/config", ""), ApiRequest::GetVmConfig));
        assert!(matches!(ok("GET", "/machine-config?x=1", ""), ApiRequest::GetMachineConfig));
        match ok("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#) {
            ApiRequest::PutMachineConfig(m) => assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256)),
            other => panic!("{other:?}"),
        }
        match ok(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/i", "is_root_device": true}"#,
        ) {
            ApiRequest::PutDrive(d) => assert!(d.is_root_device && d.drive_id == "rootfs"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            ApiRequest::Action(ActionType::InstanceStart)
        ));
        assert!(matches!(
            ok("PATCH", "/vm", r#"{"state": "Paused"}"#),
            ApiRequest::PatchVm(VmStateRequest::Paused)
        ));
        match ok(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Full", "snapshot_path": "s", "mem_file_path": "m"}"#,
        ) {
            ApiRequest::SnapshotCreate(c) => assert_eq!(c.mem_file_path, PathBuf::from("m")),
            other => panic!("{other:?}"),
        }
        match ok(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}, "resume_vm": true}"#,
        ) {
            ApiRequest::SnapshotLoad(l) => assert!(l.resume_vm && l.mem_backend.is_some()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ok("PUT", "/logger", r#"{"log_path": "/dev/null"}"#), ApiRequest::PutLogger));
        assert!(matches!(ok("GET", "/balloon", ""), ApiRequest::GetBalloon));
        assert!(matches!(ok("GET", "/balloon/statistics", ""), ApiRequest::GetBalloonStatistics));
        match ok("PATCH", "/balloon", r#"{"amount_mib": 24}"#) {
            ApiRequest::PatchBalloon(update) => assert_eq!(update.amount_mib, 24),
            other => panic!("{other:?}"),
        }
        match ok("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#) {
            ApiRequest::PutNetworkInterface(i) => assert_eq!(i.host_dev_name, "tap0"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ok("PATCH", "/network-interfaces/eth0", r#"{}"#), ApiRequest::NotImplemented(_)));
    }

    #[test]
    fn unknown_paths_bad_bodies_and_ids_are_refused_with_firecrackers_words() {
        assert_eq!(refused("GET", "/nope", ""), "Invalid request method and/or path: GET /nope.");
        assert!(refused("DELETE", "/drives/a", "").starts_with("Invalid request method"));
        assert!(refused("PUT", "/machine-config", "").contains("deserializing the json body"));
        assert!(refused("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 1, "x": 1}"#)
            .contains("unknown field"));
        assert!(refused("PUT", "/actions", r#"{"action_type": "Reboot"}"#).contains("unknown variant"));
        assert!(refused(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "x", "is_root_device": false}"#
        )
        .contains("does not match"));
        assert!(refused("PUT", "/drives/a-b", r#"{"drive_id": "a-b", "is_root_device": false}"#)
            .contains("Invalid ID"));
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(refused("PUT", &format!("/drives/{long}"), "{}").contains("Invalid ID"));
        // Control characters a client sends come back escaped (in a path or in a field name
        // the JSON parser quotes), and long paths cut short.
        let field = refused("PUT", "/machine-config", r#"{"vcpu\u007f\u001b[2J": 1}"#);
        assert!(!field.chars().any(char::is_control) && field.contains("unknown field"), "{field}");
        let message = refused("GET", &format!("/\x1b[2J{}", "x".repeat(1000)), "");
        assert!(!message.contains('\x1b') && message.len() < 300, "{message}");
    }
}
