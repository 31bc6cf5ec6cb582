//! Firecracker's command line (`firecracker --help`, v1.x), for a samepage binary started
//! under the name `firecracker` (a link to it) or as `samepage firecracker`: `--no-api
//! --config-file FILE` runs the VM the file describes; the options a jailer or an orchestrator
//! passes are accepted; what samepage does not implement is refused with its name.

use std::path::PathBuf;

use clap::Parser;

use super::config_file::{self, ConfigFileError, FirecrackerConfig};
use crate::run_args::RunArgs;
use crate::seccomp::Seccomp;

/// Firecracker's options.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct FirecrackerArgs {
    /// Path of the API socket (Firecracker's default: /run/firecracker.socket; none with
    /// --no-api).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_API_SOCK)]
    pub api_sock: PathBuf,
    /// Firecracker's JSON configuration file: the VM to run (docs/firecracker-compat.md).
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// No API socket: run the VM of --config-file.
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    pub no_api: bool,
    /// The VM's name (samepage's --name).
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Where metrics go (samepage's --metrics: one JSON object, not Firecracker's lines).
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,
    /// A custom seccomp filter file: not implemented, refused.
    #[arg(long, value_name = "PATH")]
    pub seccomp_filter: Option<PathBuf>,
    /// Logging options: accepted; samepage logs to standard error at the level RUST_LOG sets.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// See --log-path.
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// See --log-path.
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// See --log-path.
    #[arg(long)]
    pub show_level: bool,
    /// See --log-path.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Accepted, ignored: samepage logs when vCPU 0 first enters the guest (`RUST_LOG=info`).
    #[arg(long)]
    pub boot_timer: bool,
    /// A larger limit on API request bodies: accepted, not applied (samepage's limit is
    /// Firecracker's default, 51,200 bytes).
    #[arg(long, value_name = "BYTES")]
    pub http_api_max_payload_size: Option<u64>,
    /// See --http-api-max-payload-size.
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<u64>,
    /// Passed by Firecracker's jailer: accepted, ignored.
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// See --start-time-us.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// See --start-time-us.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Not implemented, refused.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
}

/// Where Firecracker serves its API unless told otherwise.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// The command line of a binary named `firecracker`.
#[derive(Parser, Debug)]
#[command(
    name = "firecracker",
    version,
    about = "samepage, started as Firecracker (docs/firecracker-compat.md)"
)]
pub struct FirecrackerCli {
    /// Its options.
    #[command(flatten)]
    pub args: FirecrackerArgs,
}

/// samepage's defaults for `run`, before a configuration file fills them in.
#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    run: RunArgs,
}

impl FirecrackerArgs {
    /// The seccomp setting these options ask for.
    pub fn seccomp(&self) -> Seccomp {
        if self.no_seccomp {
            Seccomp::Off
        } else {
            Seccomp::On
        }
    }

    /// `samepage run`'s options for what these options ask: with `--no-api`, the VM of the
    /// configuration file; otherwise the API socket, and the configuration file's VM started
    /// at once when one is given (its sections returned for `GET /vm/config`).
    pub fn launch(&self) -> Result<(RunArgs, Option<FirecrackerConfig>), ConfigFileError> {
        let refuse = |what: &str| {
            Err(ConfigFileError::Unsupported(format!(
                "{what} is not implemented by samepage (docs/firecracker-compat.md)"
            )))
        };
        if self.seccomp_filter.is_some() {
            return refuse("--seccomp-filter");
        }
        if self.describe_snapshot.is_some() {
            return refuse("--describe-snapshot");
        }
        // A placeholder kernel that the configuration (file or API) replaces.
        let mut args = Defaults::try_parse_from(["firecracker", "--kernel", "set-by-the-configuration"])
            .map_err(|e| ConfigFileError::Invalid(e.to_string()))?
            .run;
        args.kernel = None;
        args.name = self.id.clone();
        args.seccomp = self.seccomp();
        if !self.no_api {
            args.api_sock = Some(self.api_sock.clone());
        }
        let config = match &self.config_file {
            Some(file) => {
                let config = config_file::load(file)?;
                config.clone().apply(&mut args)?;
                Some(config)
            }
            None => None,
        };
        if self.metrics_path.is_some() {
            args.metrics = self.metrics_path.clone();
        }
        Ok((args, config))
    }
}
