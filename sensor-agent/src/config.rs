//! Agent configuration, layered from lowest to highest precedence: built-in
//! defaults, a YAML file, `ATTUNE__SECTION__KEY` environment variables and
//! command-line flags.
//!
//! The list keys `sensor.capabilities.runtimes` and `registry.urls` accept a
//! comma-separated value when they come from the environment, such as
//! `ATTUNE__REGISTRY__URLS=http://127.0.0.1:50051,http://127.0.0.1:50052`.
//! Environment variable names are case-insensitive, so a label set through
//! `ATTUNE__SENSOR__LABELS__ZONE` gets the lowercase key `zone`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};
use worker_registry::validation::{self, MAX_HOST_LEN};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "ATTUNE";
/// Environment variable that names the YAML configuration file when
/// `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "ATTUNE_CONFIG";
/// Environment variable with a comma-separated runtime list that overrides
/// `sensor.capabilities.runtimes` and detection.
pub const RUNTIMES_ENV: &str = "ATTUNE_SENSOR_RUNTIMES";
/// Registry address used when neither `registry.url` nor `registry.urls` is set.
pub const DEFAULT_REGISTRY_URL: &str = "http://127.0.0.1:50051";
/// Heartbeat interval requested when none is configured. The registry
/// clamps it to its own bounds.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Number of sensors the agent reports it can run at once.
pub const DEFAULT_MAX_CONCURRENT_SENSORS: u32 = 10;
/// Time one runtime probe may take before its process group is killed.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// First retry delay of the registration backoff, before jitter.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Largest retry delay of the registration backoff, before jitter.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Time allowed to open a connection to one registry address.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings as read from the file and environment layers, before flags
/// and defaults that depend on the host are applied.
#[derive(Debug, Clone, Default, Deserialize)]
// Unknown sections and keys are ignored here, because the agent and
// registry-server often share one YAML file or environment, and keys such
// as `database.url` or `registry.listen` belong to the server. The sensor
// section, which only the agent reads, still rejects unknown keys.
#[serde(default)]
pub struct FileSettings {
    /// Section `sensor`.
    pub sensor: SensorSection,
    /// Section `registry`.
    pub registry: RegistrySection,
    /// Section `log`.
    pub log: LogSection,
}

/// Section `sensor` of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SensorSection {
    /// Unique worker name; `sensor-<hostname>` when unset.
    pub worker_name: Option<String>,
    /// Host name reported to the registry; the system host name when unset.
    pub host: Option<String>,
    /// Configured capabilities.
    pub capabilities: CapabilitiesSection,
    /// Number of sensors this agent can run at once.
    pub max_concurrent_sensors: u32,
    /// Heartbeat interval to request from the registry.
    #[serde(deserialize_with = "worker_registry::duration::serde::deserialize")]
    pub heartbeat_interval: Duration,
    /// Labels sent with the registration.
    pub labels: BTreeMap<String, String>,
    /// Time one runtime probe may take.
    #[serde(deserialize_with = "worker_registry::duration::serde::deserialize")]
    pub probe_timeout: Duration,
    /// Directory that keeps the instance id file.
    pub state_dir: Option<PathBuf>,
}

impl Default for SensorSection {
    fn default() -> Self {
        SensorSection {
            worker_name: None,
            host: None,
            capabilities: CapabilitiesSection::default(),
            max_concurrent_sensors: DEFAULT_MAX_CONCURRENT_SENSORS,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            labels: BTreeMap::new(),
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            state_dir: None,
        }
    }
}

/// Section `sensor.capabilities` of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilitiesSection {
    /// Runtime names that replace detection when set.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub runtimes: Option<Vec<String>>,
}

/// Section `registry` of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RegistrySection {
    /// Address of one registry.
    pub url: Option<String>,
    /// Addresses of several registries, tried in order on connection failure.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub urls: Option<Vec<String>>,
    /// First retry delay of the registration backoff.
    #[serde(deserialize_with = "worker_registry::duration::serde::deserialize")]
    pub backoff_base: Duration,
    /// Largest retry delay of the registration backoff.
    #[serde(deserialize_with = "worker_registry::duration::serde::deserialize")]
    pub backoff_cap: Duration,
    /// Time allowed to open a connection to one registry address.
    #[serde(deserialize_with = "worker_registry::duration::serde::deserialize")]
    pub connect_timeout: Duration,
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            url: None,
            urls: None,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_cap: DEFAULT_BACKOFF_CAP,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Deserializes a list written as a YAML sequence or, as environment
/// variables write it, as one comma-separated string.
fn list_or_comma_separated<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }

    let list = match Raw::deserialize(deserializer)? {
        Raw::List(items) => items,
        Raw::Text(text) => text.split(',').map(|item| item.trim().to_string()).collect(),
    };
    Ok(Some(list))
}

/// Section `log` of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LogSection {
    /// Output format.
    pub format: LogFormat,
}

/// Source of the runtime list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimesSource {
    /// The `--runtimes` flag.
    Flag,
    /// The `ATTUNE_SENSOR_RUNTIMES` environment variable.
    Env,
    /// The `sensor.capabilities.runtimes` key of the file or environment layers.
    Config,
    /// Nothing was configured, so detection decides.
    Detection,
}

impl RuntimesSource {
    /// Returns the name used in logs and in `detect --json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimesSource::Flag => "flag",
            RuntimesSource::Env => "env",
            RuntimesSource::Config => "config",
            RuntimesSource::Detection => "detection",
        }
    }
}

/// Configuration that is valid but probably not what was meant, logged as
/// a warning once logging has started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// Both `registry.url` and `registry.urls` are set, so `registry.url`
    /// is ignored.
    RegistryUrlIgnored {
        /// Value of `registry.url`.
        url: String,
        /// Value of `registry.urls`, which is used.
        urls: Vec<String>,
    },
}

/// Values given on the command line; each one overrides every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// YAML file to read.
    pub config_file: Option<PathBuf>,
    /// Value of `--worker-name`.
    pub worker_name: Option<String>,
    /// Value of `--host`.
    pub host: Option<String>,
    /// Values of `--registry-url`.
    pub registry_urls: Vec<String>,
    /// Value of `--heartbeat-interval`.
    pub heartbeat_interval: Option<Duration>,
    /// Value of `--max-concurrent-sensors`.
    pub max_concurrent_sensors: Option<u32>,
    /// Values of `--label KEY=VALUE`.
    pub labels: Vec<(String, String)>,
    /// Value of `--runtimes` or `ATTUNE_SENSOR_RUNTIMES`, with its source.
    pub runtimes: Option<(Vec<String>, RuntimesSource)>,
    /// Value of `--probe-timeout`.
    pub probe_timeout: Option<Duration>,
    /// Value of `--backoff-cap`.
    pub backoff_cap: Option<Duration>,
    /// Value of `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// Value of `--log-format`.
    pub log_format: Option<LogFormat>,
}

/// Effective agent settings after every layer is applied and validated.
/// Serializing leaves out the runtimes and the state directory, which
/// `print-config` prints in their resolved form.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Unique worker name.
    pub worker_name: String,
    /// Host name reported to the registry.
    pub host: String,
    /// Configured runtime names, normalized; `None` means detection decides.
    #[serde(skip)]
    pub runtimes: Option<Vec<String>>,
    /// Source of `runtimes`.
    #[serde(skip)]
    pub runtimes_source: RuntimesSource,
    /// Number of sensors this agent can run at once.
    pub max_concurrent_sensors: u32,
    /// Heartbeat interval to request from the registry.
    #[serde(with = "duration_text")]
    pub heartbeat_interval: Duration,
    /// Labels sent with the registration.
    pub labels: BTreeMap<String, String>,
    /// Registry addresses in fail-over order; never empty.
    pub registry_urls: Vec<String>,
    /// Time one runtime probe may take.
    #[serde(with = "duration_text")]
    pub probe_timeout: Duration,
    /// First retry delay of the registration backoff.
    #[serde(with = "duration_text")]
    pub backoff_base: Duration,
    /// Largest retry delay of the registration backoff.
    #[serde(with = "duration_text")]
    pub backoff_cap: Duration,
    /// Time allowed to open a connection to one registry address.
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    /// Directory for the instance id file; `None` picks a default.
    #[serde(skip)]
    pub state_dir: Option<PathBuf>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Warnings about the configuration, to log once logging has started.
    #[serde(skip)]
    pub warnings: Vec<ConfigWarning>,
}

/// Serializes durations as humantime strings such as `1s 500ms`, so that
/// `print-config` output reads the way the configuration is written.
mod duration_text {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*duration).to_string())
    }
}

/// Configuration that cannot be used, with the key and the fix in the message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment layers could not be read or parsed.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value broke a rule.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// Configuration key, such as `sensor.worker_name`.
        key: &'static str,
        /// The broken rule and the fix.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Reads the file and environment layers. `env` replaces the process
/// environment when given, so that tests control every variable.
pub fn load_layers(
    config_file: Option<&Path>,
    env: Option<HashMap<String, String>>,
) -> Result<FileSettings, ConfigError> {
    let mut builder = Config::builder();

    if let Some(path) = config_file {
        builder = builder.add_source(File::from(path).format(FileFormat::Yaml).required(true));
    }

    // Every value stays a string here. The config crate's try_parsing would
    // split lists, but it would also turn a worker name such as 1e5 into
    // the number 100000, so list keys split commas in their deserializer.
    let environment = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .ignore_empty(true)
        .source(env);
    builder = builder.add_source(environment);

    let layers: FileSettings = builder.build()?.try_deserialize()?;
    Ok(layers)
}

/// Applies the flags and host defaults to the file and environment layers
/// and validates the result.
pub fn resolve(layers: FileSettings, overrides: Overrides, hostname: &str) -> Result<Settings, ConfigError> {
    let sensor = layers.sensor;
    let registry = layers.registry;

    let host = overrides.host.or(sensor.host).unwrap_or_else(|| hostname.to_string());
    validation::validate_text("sensor.host", &host, MAX_HOST_LEN)
        .map_err(|e| invalid("sensor.host", format!("{host:?}: {}", e.rule)))?;
    if host.chars().any(char::is_whitespace) {
        return Err(invalid(
            "sensor.host",
            format!("{host:?} contains whitespace; remove it"),
        ));
    }

    let worker_name = overrides
        .worker_name
        .or(sensor.worker_name)
        .unwrap_or_else(|| format!("sensor-{hostname}"));
    validation::validate_worker_name("sensor.worker_name", &worker_name).map_err(|e| {
        invalid(
            "sensor.worker_name",
            format!(
                "{worker_name:?} {}; set --worker-name or ATTUNE__SENSOR__WORKER_NAME",
                e.rule
            ),
        )
    })?;

    let (runtimes, runtimes_source) = match overrides.runtimes {
        Some((names, source)) => (Some(names), source),
        None => match sensor.capabilities.runtimes {
            Some(names) => (Some(names), RuntimesSource::Config),
            None => (None, RuntimesSource::Detection),
        },
    };
    let runtimes = runtimes.map(|names| normalize_runtime_list(&names)).transpose()?;

    let max_concurrent_sensors = overrides
        .max_concurrent_sensors
        .unwrap_or(sensor.max_concurrent_sensors);
    if max_concurrent_sensors == 0 {
        return Err(invalid("sensor.max_concurrent_sensors", "must be at least 1, got 0"));
    }

    let heartbeat_interval = overrides.heartbeat_interval.unwrap_or(sensor.heartbeat_interval);
    if heartbeat_interval.is_zero() {
        return Err(invalid(
            "sensor.heartbeat_interval",
            "must be greater than 0; use seconds such as 30 or a value such as 500ms",
        ));
    }

    let mut labels = sensor.labels;
    labels.extend(overrides.labels);
    let label_map: HashMap<String, String> = labels.clone().into_iter().collect();
    validation::validate_labels("sensor.labels", &label_map)
        .map_err(|e| invalid("sensor.labels", format!("{}: {}", e.field, e.rule)))?;

    let mut warnings = Vec::new();
    // Flags replace both keys, so a warning is due only when the two keys
    // compete with each other.
    if overrides.registry_urls.is_empty() {
        if let (Some(url), Some(urls)) = (&registry.url, &registry.urls) {
            if !urls.is_empty() {
                warnings.push(ConfigWarning::RegistryUrlIgnored {
                    url: url.clone(),
                    urls: urls.clone(),
                });
            }
        }
    }
    let registry_urls = resolve_registry_urls(overrides.registry_urls, registry.url, registry.urls)?;

    let probe_timeout = overrides.probe_timeout.unwrap_or(sensor.probe_timeout);
    if probe_timeout.is_zero() {
        return Err(invalid("sensor.probe_timeout", "must be greater than 0, such as 2s"));
    }

    let backoff_cap = overrides.backoff_cap.unwrap_or(registry.backoff_cap);
    if backoff_cap.is_zero() {
        return Err(invalid("registry.backoff_cap", "must be greater than 0, such as 30s"));
    }
    if registry.backoff_base.is_zero() {
        return Err(invalid(
            "registry.backoff_base",
            "must be greater than 0, such as 200ms",
        ));
    }
    if registry.connect_timeout.is_zero() {
        return Err(invalid(
            "registry.connect_timeout",
            "must be greater than 0, such as 5s",
        ));
    }

    let settings = Settings {
        worker_name,
        host,
        runtimes,
        runtimes_source,
        max_concurrent_sensors,
        heartbeat_interval,
        labels,
        registry_urls,
        probe_timeout,
        backoff_base: registry.backoff_base,
        backoff_cap,
        connect_timeout: registry.connect_timeout,
        state_dir: overrides.state_dir.or(sensor.state_dir),
        log_format: overrides.log_format.unwrap_or(layers.log.format),
        warnings,
    };
    Ok(settings)
}

/// Normalizes and checks configured runtime names, dropping empty entries
/// (a trailing comma) and duplicates while keeping the order.
fn normalize_runtime_list(names: &[String]) -> Result<Vec<String>, ConfigError> {
    let mut normalized: Vec<String> = Vec::with_capacity(names.len());
    for name in names.iter().filter(|name| !name.trim().is_empty()) {
        let runtime = validation::validate_runtime_name("sensor.capabilities.runtimes", name)
            .map_err(|e| invalid("sensor.capabilities.runtimes", format!("runtime {name:?} {}", e.rule)))?;
        if !normalized.contains(&runtime) {
            normalized.push(runtime);
        }
    }
    if normalized.is_empty() {
        return Err(invalid(
            "sensor.capabilities.runtimes",
            "lists no runtime; name at least one, such as shell, or unset it to detect runtimes",
        ));
    }
    if normalized.len() > validation::MAX_RUNTIMES {
        return Err(invalid(
            "sensor.capabilities.runtimes",
            format!(
                "lists {} runtimes; the registry accepts at most {}",
                normalized.len(),
                validation::MAX_RUNTIMES
            ),
        ));
    }
    Ok(normalized)
}

/// Picks the registry addresses: flags first, then `registry.urls`, then
/// `registry.url`, then the default. Each must be an `http://` URL with a host.
fn resolve_registry_urls(
    flag_urls: Vec<String>,
    url: Option<String>,
    urls: Option<Vec<String>>,
) -> Result<Vec<String>, ConfigError> {
    let chosen: Vec<String> = if !flag_urls.is_empty() {
        flag_urls
    } else if let Some(urls) = urls.filter(|urls| !urls.is_empty()) {
        urls
    } else if let Some(url) = url {
        vec![url]
    } else {
        vec![DEFAULT_REGISTRY_URL.to_string()]
    };

    let mut checked = Vec::with_capacity(chosen.len());
    for url in chosen {
        let url = url.trim().to_string();
        if url.is_empty() {
            continue;
        }
        check_registry_url(&url)?;
        checked.push(url);
    }
    if checked.is_empty() {
        return Err(invalid(
            "registry.urls",
            "lists no address; give one such as http://127.0.0.1:50051",
        ));
    }
    Ok(checked)
}

fn check_registry_url(url: &str) -> Result<(), ConfigError> {
    let uri: tonic::transport::Uri = url.parse().map_err(|e| {
        invalid(
            "registry.url",
            format!("{url:?} is not a URL ({e}); use one such as http://127.0.0.1:50051"),
        )
    })?;

    // This build of tonic has no TLS support, so an https address could
    // never connect; reject it at start-up instead of retrying forever.
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            "registry.url",
            format!("{url:?} must start with http:// because this agent is built without TLS"),
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(
            "registry.url",
            format!("{url:?} has no host; use one such as http://127.0.0.1:50051"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn write_yaml(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn defaults_use_hostname() {
        let layers = load_layers(None, env(&[])).unwrap();

        let settings = resolve(layers, Overrides::default(), "box1").unwrap();

        assert_eq!(settings.worker_name, "sensor-box1");
        assert_eq!(settings.host, "box1");
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(settings.max_concurrent_sensors, 10);
        assert_eq!(settings.registry_urls, vec![DEFAULT_REGISTRY_URL.to_string()]);
        assert_eq!(settings.backoff_cap, Duration::from_secs(30));
        assert_eq!(settings.probe_timeout, Duration::from_secs(2));
        assert_eq!(settings.runtimes, None);
        assert_eq!(settings.runtimes_source, RuntimesSource::Detection);
        assert_eq!(settings.log_format, LogFormat::Text);
    }

    #[test]
    fn env_lists_split_on_commas() {
        let layers = load_layers(
            None,
            env(&[
                ("ATTUNE__SENSOR__CAPABILITIES__RUNTIMES", "shell,python3"),
                ("ATTUNE__REGISTRY__URLS", "http://127.0.0.1:1,http://127.0.0.1:2"),
            ]),
        )
        .unwrap();

        let settings = resolve(layers, Overrides::default(), "h").unwrap();

        assert_eq!(settings.runtimes, Some(vec!["shell".to_string(), "python".to_string()]));
        assert_eq!(settings.runtimes_source, RuntimesSource::Config);
        assert_eq!(settings.registry_urls, vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    }

    #[test]
    fn env_single_item_list_is_a_list() {
        let layers = load_layers(None, env(&[("ATTUNE__SENSOR__CAPABILITIES__RUNTIMES", "node")])).unwrap();

        assert_eq!(layers.sensor.capabilities.runtimes, Some(vec!["node".to_string()]));
    }

    #[test]
    fn env_numbers_become_settings() {
        let layers = load_layers(
            None,
            env(&[
                ("ATTUNE__SENSOR__HEARTBEAT_INTERVAL", "0.5"),
                ("ATTUNE__SENSOR__MAX_CONCURRENT_SENSORS", "4"),
                ("ATTUNE__SENSOR__WORKER_NAME", "1e5"),
                ("ATTUNE__REGISTRY__BACKOFF_CAP", "2s"),
            ]),
        )
        .unwrap();

        let settings = resolve(layers, Overrides::default(), "h").unwrap();

        assert_eq!(settings.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(settings.max_concurrent_sensors, 4);
        assert_eq!(settings.worker_name, "1e5");
        assert_eq!(settings.backoff_cap, Duration::from_secs(2));
    }

    #[test]
    fn env_numeric_labels_stay_text() {
        let layers = load_layers(
            None,
            env(&[
                ("ATTUNE__SENSOR__LABELS__RACK", "12"),
                ("ATTUNE__SENSOR__LABELS__GPU", "true"),
            ]),
        )
        .unwrap();

        let settings = resolve(layers, Overrides::default(), "h").unwrap();

        assert_eq!(settings.labels.get("rack").map(String::as_str), Some("12"));
        assert_eq!(settings.labels.get("gpu").map(String::as_str), Some("true"));
    }

    #[test]
    fn env_overrides_yaml() {
        let file = write_yaml(
            "sensor:\n  worker_name: from-yaml\n  heartbeat_interval: 200ms\n  labels:\n    Zone: a\nregistry:\n  url: http://127.0.0.1:7\n",
        );
        let layers = load_layers(Some(file.path()), env(&[("ATTUNE__SENSOR__WORKER_NAME", "from-env")])).unwrap();

        let settings = resolve(layers, Overrides::default(), "h").unwrap();

        assert_eq!(settings.worker_name, "from-env");
        assert_eq!(settings.heartbeat_interval, Duration::from_millis(200));
        assert_eq!(settings.labels.get("Zone").map(String::as_str), Some("a"));
        assert_eq!(settings.registry_urls, vec!["http://127.0.0.1:7"]);
    }

    #[test]
    fn flags_override_env() {
        let layers = load_layers(
            None,
            env(&[
                ("ATTUNE__SENSOR__WORKER_NAME", "from-env"),
                ("ATTUNE__SENSOR__CAPABILITIES__RUNTIMES", "shell"),
            ]),
        )
        .unwrap();
        let overrides = Overrides {
            worker_name: Some("from-flag".into()),
            runtimes: Some((vec!["node".into()], RuntimesSource::Env)),
            heartbeat_interval: Some(Duration::from_secs(2)),
            ..Overrides::default()
        };

        let settings = resolve(layers, overrides, "h").unwrap();

        assert_eq!(settings.worker_name, "from-flag");
        assert_eq!(settings.runtimes, Some(vec!["node".to_string()]));
        assert_eq!(settings.runtimes_source, RuntimesSource::Env);
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(2));
    }

    /// With both `registry.url` and `registry.urls` set, `registry.urls` is
    /// used and a warning names both values.
    #[test]
    fn url_and_urls_warn() {
        let layers = load_layers(
            None,
            env(&[
                ("ATTUNE__REGISTRY__URL", "http://127.0.0.1:1"),
                ("ATTUNE__REGISTRY__URLS", "http://127.0.0.1:2,http://127.0.0.1:3"),
            ]),
        )
        .unwrap();

        let settings = resolve(layers, Overrides::default(), "h").unwrap();

        assert_eq!(settings.registry_urls, vec!["http://127.0.0.1:2", "http://127.0.0.1:3"]);
        let expected = ConfigWarning::RegistryUrlIgnored {
            url: "http://127.0.0.1:1".to_string(),
            urls: vec!["http://127.0.0.1:2".to_string(), "http://127.0.0.1:3".to_string()],
        };
        assert_eq!(settings.warnings, vec![expected]);
    }

    /// Flags replace both keys, so no warning is raised about them.
    #[test]
    fn url_flags_suppress_url_warning() {
        let layers = load_layers(
            None,
            env(&[
                ("ATTUNE__REGISTRY__URL", "http://127.0.0.1:1"),
                ("ATTUNE__REGISTRY__URLS", "http://127.0.0.1:2"),
            ]),
        )
        .unwrap();
        let overrides = Overrides {
            registry_urls: vec!["http://127.0.0.1:4".to_string()],
            ..Overrides::default()
        };

        let settings = resolve(layers, overrides, "h").unwrap();

        assert_eq!(settings.registry_urls, vec!["http://127.0.0.1:4"]);
        assert!(settings.warnings.is_empty(), "{:?}", settings.warnings);
    }

    #[test]
    fn unknown_key_is_rejected() {
        let file = write_yaml("sensor:\n  worker_nmae: typo\n");

        let error = load_layers(Some(file.path()), env(&[])).unwrap_err().to_string();

        assert!(error.contains("worker_nmae"), "{error}");
    }

    #[test]
    fn missing_file_is_rejected() {
        let error = load_layers(Some(Path::new("/nonexistent/agent.yaml")), env(&[]))
            .unwrap_err()
            .to_string();

        assert!(error.contains("/nonexistent/agent.yaml"), "{error}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("ATTUNE__SENSOR__WORKER_NAME", "bad name")], "sensor.worker_name"),
            (
                &[("ATTUNE__SENSOR__HEARTBEAT_INTERVAL", "0")],
                "sensor.heartbeat_interval",
            ),
            (
                &[("ATTUNE__SENSOR__MAX_CONCURRENT_SENSORS", "0")],
                "sensor.max_concurrent_sensors",
            ),
            (&[("ATTUNE__REGISTRY__URL", "https://127.0.0.1:1")], "registry.url"),
            (&[("ATTUNE__REGISTRY__URL", "not a url")], "registry.url"),
            (
                &[("ATTUNE__SENSOR__CAPABILITIES__RUNTIMES", "py thon")],
                "sensor.capabilities.runtimes",
            ),
        ];
        for (vars, key) in cases {
            let layers = load_layers(None, env(vars)).unwrap();

            let error = resolve(layers, Overrides::default(), "h").unwrap_err().to_string();

            assert!(error.contains(key), "vars {vars:?}: {error}");
        }
    }

    #[test]
    fn bad_duration_is_rejected() {
        let error = load_layers(None, env(&[("ATTUNE__SENSOR__HEARTBEAT_INTERVAL", "soon")]))
            .unwrap_err()
            .to_string();

        assert!(error.contains("soon"), "{error}");
    }

    #[test]
    fn runtime_list_is_normalized_and_deduplicated() {
        let names: Vec<String> = ["Python3", "bash", "sh", "", "node.js"].map(String::from).to_vec();

        let normalized = normalize_runtime_list(&names).unwrap();

        assert_eq!(normalized, vec!["python", "shell", "node"]);
    }
}
