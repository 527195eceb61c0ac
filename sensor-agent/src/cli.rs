//! Command-line interface. Every flag overrides the configuration file and
//! the `ATTUNE__SECTION__KEY` environment variables.

use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{LogFormat, Overrides, RuntimesSource, CONFIG_FILE_ENV, RUNTIMES_ENV};

/// Registers this host's sensor runtimes with the worker registry and keeps
/// the registration alive until stopped.
#[derive(Debug, Parser)]
#[command(name = "sensor-agent", version, about, long_about = None)]
pub struct Cli {
    /// Command to run; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Settings shared by every command.
    #[command(flatten)]
    pub options: Options,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Registers, heartbeats and deregisters on SIGINT or SIGTERM (the default).
    Run,
    /// Prints the detected and the effective runtimes, then exits.
    Detect {
        /// Prints JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints the effective configuration as JSON, then exits. Runtimes left
    /// to detection are listed by `detect`.
    PrintConfig,
}

/// Flags shared by every command.
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// YAML configuration file.
    #[arg(long, global = true, env = CONFIG_FILE_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Unique worker name [default: sensor-<hostname>].
    #[arg(long, global = true, value_name = "NAME")]
    pub worker_name: Option<String>,

    /// Host name reported to the registry [default: the system host name].
    #[arg(long, global = true, value_name = "HOST")]
    pub host: Option<String>,

    /// Registry address such as http://127.0.0.1:50051. Repeat the flag to
    /// list fail-over addresses in order [default: http://127.0.0.1:50051].
    #[arg(long = "registry-url", global = true, value_name = "URL")]
    pub registry_urls: Vec<String>,

    /// Heartbeat interval to request, in seconds or with a unit such as 500ms [default: 30].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// Number of sensors this agent can run at once [default: 10].
    #[arg(long, global = true, value_name = "COUNT")]
    pub max_concurrent_sensors: Option<u32>,

    /// Label sent with the registration; repeat it for several labels.
    #[arg(long = "label", global = true, value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Comma-separated runtimes to register instead of the detected ones, such as shell,python.
    #[arg(long, global = true, env = RUNTIMES_ENV, value_name = "NAMES", value_delimiter = ',')]
    pub runtimes: Option<Vec<String>>,

    /// Time one runtime probe may take before it is killed [default: 2s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub probe_timeout: Option<Duration>,

    /// Largest delay between registration retries [default: 30s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub backoff_cap: Option<Duration>,

    /// Directory that keeps the instance id [default: /var/lib/sensor-agent or ~/.local/state/sensor-agent].
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Log output format [default: text].
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Parses the process arguments; exits with a usage message on bad input.
pub fn parse() -> (Cli, Overrides) {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let overrides = overrides(&cli.options, runtimes_source(&matches));
    (cli, overrides)
}

/// Tells whether `--runtimes` came from the flag or from `ATTUNE_SENSOR_RUNTIMES`.
fn runtimes_source(matches: &ArgMatches) -> RuntimesSource {
    let source = matches
        .value_source("runtimes")
        .or_else(|| matches.subcommand().and_then(|(_, sub)| sub.value_source("runtimes")));
    match source {
        Some(ValueSource::EnvVariable) => RuntimesSource::Env,
        _ => RuntimesSource::Flag,
    }
}

fn overrides(options: &Options, runtimes_source: RuntimesSource) -> Overrides {
    Overrides {
        config_file: options.config.clone(),
        worker_name: options.worker_name.clone(),
        host: options.host.clone(),
        registry_urls: options.registry_urls.clone(),
        heartbeat_interval: options.heartbeat_interval,
        max_concurrent_sensors: options.max_concurrent_sensors,
        labels: options.labels.clone(),
        // An empty ATTUNE_SENSOR_RUNTIMES counts as unset, as an empty
        // ATTUNE__SECTION__KEY variable does.
        runtimes: options
            .runtimes
            .clone()
            .filter(|names| names.iter().any(|name| !name.trim().is_empty()))
            .map(|names| (names, runtimes_source)),
        probe_timeout: options.probe_timeout,
        backoff_cap: options.backoff_cap,
        state_dir: options.state_dir.clone(),
        log_format: options.log_format,
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    worker_registry::duration::parse(text)
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("invalid label {text:?}: use KEY=VALUE, such as zone=eu-1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_after_subcommand_are_accepted() {
        let matches = Cli::command()
            .try_get_matches_from(["sensor-agent", "detect", "--json", "--runtimes", "shell,python"])
            .unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();

        assert_eq!(
            cli.options.runtimes,
            Some(vec!["shell".to_string(), "python".to_string()])
        );
        assert_eq!(runtimes_source(&matches), RuntimesSource::Flag);
        assert!(matches!(cli.command, Some(Command::Detect { json: true })));
    }

    #[test]
    fn labels_need_an_equals_sign() {
        assert_eq!(parse_label("zone=eu-1"), Ok(("zone".into(), "eu-1".into())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=x").is_err());
    }
}
