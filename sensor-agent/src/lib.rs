//! The sensor agent: it runs beside a sensor service, detects the runtimes
//! installed on the host, registers with the worker registry, streams
//! heartbeats and deregisters when stopped. It never opens a database.
//!
//! - [`cli`]: command-line flags.
//! - [`config`]: layered configuration (defaults, YAML, environment, flags).
//! - [`detect`] and [`probe`]: runtime detection with killed-on-timeout probes.
//! - [`state`]: the instance id kept across restarts.
//! - [`agent`]: the register, heartbeat and deregister loop.
//! - [`backoff`]: retry delays with full jitter.
//! - [`shutdown`]: SIGINT and SIGTERM handling.

#![warn(missing_docs)]

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod detect;
pub mod probe;
pub mod shutdown;
pub mod state;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use serde::Serialize;
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigWarning, LogFormat, RuntimesSource, Settings};

/// Returns the system host name, or `localhost` when it cannot be read.
pub fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Starts logging to stderr in the configured format. `RUST_LOG` sets the
/// filter and defaults to `info`. Text logs are coloured only when stderr
/// is a terminal and `NO_COLOR` is unset or empty.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = use_ansi(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Tells whether log lines may contain ANSI colour codes. Any non-empty
/// `NO_COLOR` value turns them off, following the common `NO_COLOR`
/// convention.
fn use_ansi(is_terminal: bool, no_color: Option<OsString>) -> bool {
    is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Effective configuration as `print-config` prints it: the settings, plus
/// the runtime list with its source and the state directory in use.
#[derive(Debug, Serialize)]
pub struct EffectiveConfig<'a> {
    #[serde(flatten)]
    settings: &'a Settings,
    runtimes: RuntimesConfig<'a>,
    state_dir: StateDirConfig,
}

/// Runtime list to register, or only its source when detection decides.
#[derive(Debug, Serialize)]
struct RuntimesConfig<'a> {
    source: RuntimesSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    names: Option<&'a [String]>,
}

/// State directory the agent would keep its instance id in.
#[derive(Debug, Serialize)]
struct StateDirConfig {
    /// `None` when no default directory is usable.
    path: Option<PathBuf>,
    /// `configured` or `default`.
    source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'static str>,
}

impl<'a> EffectiveConfig<'a> {
    /// Resolves the state directory without creating anything.
    pub fn new(settings: &'a Settings) -> EffectiveConfig<'a> {
        let runtimes = RuntimesConfig {
            source: settings.runtimes_source,
            names: settings.runtimes.as_deref(),
        };
        let path = state::effective_dir(settings.state_dir.as_deref());
        let state_dir = StateDirConfig {
            note: path
                .is_none()
                .then_some("no writable state directory; the instance id lasts for one run only"),
            path,
            source: if settings.state_dir.is_some() {
                "configured"
            } else {
                "default"
            },
        };
        EffectiveConfig {
            settings,
            runtimes,
            state_dir,
        }
    }
}

/// Logs the warnings that resolving the configuration collected.
pub fn log_config_warnings(settings: &Settings) {
    for warning in &settings.warnings {
        match warning {
            ConfigWarning::RegistryUrlIgnored { url, urls } => tracing::warn!(
                registry_url = %url,
                registry_urls = ?urls,
                "registry.url and registry.urls are both set; using registry.urls and ignoring registry.url"
            ),
        }
    }
}

/// Detects runtimes and combines them with the configured list, logging
/// each configured runtime that is not installed.
pub async fn detect_runtimes(settings: &Settings) -> detect::Report {
    let search_path = detect::process_search_path();
    let detected = detect::detect(search_path.as_deref(), settings.probe_timeout).await;
    let report = detect::resolve(detected, settings.runtimes.as_deref(), settings.runtimes_source);

    for name in &report.not_detected {
        tracing::warn!(
            runtime = %name,
            source = report.source.as_str(),
            "configured runtime not detected on this host; registering it anyway because configuration wins"
        );
    }
    report
}

/// Runs the agent until SIGINT or SIGTERM, then deregisters.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Handlers go in first, so that a signal during detection already
    // stops the agent cleanly.
    let shutdown = shutdown::install()?;

    let report = detect_runtimes(&settings).await;
    for runtime in &report.runtimes {
        tracing::info!(
            name = %runtime.name,
            version = %runtime.version,
            path = %runtime.path,
            source = report.source.as_str(),
            "runtime"
        );
    }

    let instance = state::load_or_create(settings.state_dir.as_deref())?;
    tracing::info!(
        worker_name = %settings.worker_name,
        instance_id = %instance.id,
        registry = ?settings.registry_urls,
        heartbeat_interval = %humantime::format_duration(settings.heartbeat_interval),
        "starting"
    );

    let agent = agent::Agent::new(&settings, &report.runtimes, &instance.id, shutdown)?;
    agent.run().await?;

    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Colour codes appear only on a terminal without a non-empty `NO_COLOR`.
    #[test]
    fn ansi_follows_terminal_and_no_color() {
        assert!(use_ansi(true, None));
        assert!(use_ansi(true, Some(OsString::new())));
        assert!(!use_ansi(true, Some(OsString::from("1"))));
        assert!(!use_ansi(false, None));
    }
}
