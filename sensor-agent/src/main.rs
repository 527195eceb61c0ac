//! `sensor-agent`: parses flags and configuration, starts logging and runs
//! the requested command.

use std::process::ExitCode;

use sensor_agent::cli::{self, Command};
use sensor_agent::config::{self, Settings};
use sensor_agent::detect::Report;

/// Exit status for configuration the agent or the registry rejects.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let (cli, overrides) = cli::parse();

    let settings = match load_settings(overrides) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("sensor-agent: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    sensor_agent::init_logging(settings.log_format);
    sensor_agent::log_config_warnings(&settings);

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sensor-agent: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };

    match cli.command.unwrap_or(Command::Run) {
        Command::Run => match runtime.block_on(sensor_agent::run(settings)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "agent stopped");
                if error.downcast_ref::<sensor_agent::agent::AgentError>().is_some() {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        },
        Command::Detect { json } => {
            let report = runtime.block_on(sensor_agent::detect_runtimes(&settings));
            print_report(&report, json)
        }
        Command::PrintConfig => print_json(&sensor_agent::EffectiveConfig::new(&settings)),
    }
}

fn load_settings(overrides: config::Overrides) -> Result<Settings, config::ConfigError> {
    let layers = config::load_layers(overrides.config_file.as_deref(), None)?;
    config::resolve(layers, overrides, &sensor_agent::system_hostname())
}

fn print_report(report: &Report, json: bool) -> ExitCode {
    if json {
        return print_json(report);
    }

    println!("{:<8} {:<20} PATH", "RUNTIME", "VERSION");
    for runtime in &report.runtimes {
        println!("{:<8} {:<20} {}", runtime.name, runtime.version, runtime.path);
    }
    if !report.not_detected.is_empty() {
        println!("configured but not detected: {}", report.not_detected.join(", "));
    }
    ExitCode::SUCCESS
}

fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sensor-agent: failed to encode the output as JSON: {error}");
            ExitCode::FAILURE
        }
    }
}
