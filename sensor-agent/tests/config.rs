//! Configuration precedence through the real binary: flags over
//! environment over YAML over detection and defaults.

mod common;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;

use common::{run_agent_command, write_script};
use serde_json::Value as Json;

/// YAML that sets every key the precedence cases check.
const YAML: &str = "\
sensor:
  worker_name: yaml-name
  heartbeat_interval: 5
  capabilities:
    runtimes: [python]
";

/// How the YAML file reaches the agent.
#[derive(Clone, Copy, Debug)]
enum YamlVia {
    None,
    Flag,
    Env,
}

struct Case {
    label: &'static str,
    yaml: YamlVia,
    env: &'static [(&'static str, &'static str)],
    flags: &'static [&'static str],
    runtimes: &'static [&'static str],
    source: &'static str,
    /// Expected worker name; `None` means `sensor-<hostname>`.
    name: Option<&'static str>,
    interval: &'static str,
}

const CASES: &[Case] = &[
    Case {
        label: "defaults and detection",
        yaml: YamlVia::None,
        env: &[],
        flags: &[],
        runtimes: &["shell", "node", "native"],
        source: "detection",
        name: None,
        interval: "30s",
    },
    Case {
        label: "yaml through --config",
        yaml: YamlVia::Flag,
        env: &[],
        flags: &[],
        runtimes: &["python"],
        source: "config",
        name: Some("yaml-name"),
        interval: "5s",
    },
    Case {
        label: "yaml through ATTUNE_CONFIG",
        yaml: YamlVia::Env,
        env: &[],
        flags: &[],
        runtimes: &["python"],
        source: "config",
        name: Some("yaml-name"),
        interval: "5s",
    },
    Case {
        label: "environment over yaml",
        yaml: YamlVia::Flag,
        env: &[
            ("ATTUNE__SENSOR__WORKER_NAME", "env-name"),
            ("ATTUNE__SENSOR__HEARTBEAT_INTERVAL", "200ms"),
            ("ATTUNE__SENSOR__CAPABILITIES__RUNTIMES", "shell,nodejs"),
        ],
        flags: &[],
        runtimes: &["shell", "node"],
        source: "config",
        name: Some("env-name"),
        interval: "200ms",
    },
    Case {
        label: "ATTUNE_SENSOR_RUNTIMES over every list",
        yaml: YamlVia::Env,
        env: &[
            ("ATTUNE__SENSOR__CAPABILITIES__RUNTIMES", "shell"),
            ("ATTUNE_SENSOR_RUNTIMES", "node,native"),
        ],
        flags: &[],
        runtimes: &["node", "native"],
        source: "env",
        name: Some("yaml-name"),
        interval: "5s",
    },
    Case {
        label: "flags over environment",
        yaml: YamlVia::Flag,
        env: &[
            ("ATTUNE__SENSOR__WORKER_NAME", "env-name"),
            ("ATTUNE__SENSOR__HEARTBEAT_INTERVAL", "200ms"),
            ("ATTUNE_SENSOR_RUNTIMES", "node,native"),
        ],
        flags: &[
            "--worker-name",
            "flag-name",
            "--heartbeat-interval",
            "2s",
            "--runtimes",
            "shell",
        ],
        runtimes: &["shell"],
        source: "flag",
        name: Some("flag-name"),
        interval: "2s",
    },
];

/// Runs one command of the agent for a case and parses its JSON output.
fn run_json(case: &Case, yaml: &Path, path: &OsString, command: &[&str]) -> (Json, String) {
    let mut env: HashMap<String, OsString> = HashMap::from([("PATH".to_string(), path.clone())]);
    for (key, value) in case.env {
        env.insert(key.to_string(), OsString::from(value));
    }
    let yaml_text = yaml.display().to_string();
    let mut args: Vec<&str> = command.to_vec();
    match case.yaml {
        YamlVia::None => {}
        YamlVia::Flag => args.extend(["--config", yaml_text.as_str()]),
        YamlVia::Env => {
            env.insert("ATTUNE_CONFIG".to_string(), yaml.as_os_str().to_owned());
        }
    }
    args.extend(case.flags);

    let (status, stdout, stderr) = run_agent_command(&env, &args);
    assert!(
        status.success(),
        "case {:?}: {args:?} failed with {status}: {stderr}",
        case.label
    );
    let json =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("case {:?}: invalid JSON ({e}): {stdout}", case.label));
    (json, stderr)
}

/// Runtimes, worker name and interval follow flags > environment > YAML >
/// detection and defaults.
#[test]
fn precedence_table() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    write_script(&bin, "node", "#!/bin/sh\necho v20.11.1\n");
    let yaml = dir.path().join("agent.yaml");
    std::fs::write(&yaml, YAML).unwrap();
    let path = bin.as_os_str().to_owned();
    let default_name = format!("sensor-{}", sensor_agent::system_hostname());

    for case in CASES {
        let (report, _) = run_json(case, &yaml, &path, &["detect", "--json"]);
        let (settings, _) = run_json(case, &yaml, &path, &["print-config"]);

        let names: Vec<&str> = report["runtimes"]
            .as_array()
            .expect("runtimes is an array")
            .iter()
            .map(|runtime| runtime["name"].as_str().expect("name is a string"))
            .collect();
        assert_eq!(names, case.runtimes, "case {:?}: runtimes", case.label);
        assert_eq!(report["source"], case.source, "case {:?}: source", case.label);
        let expected_name = case.name.map(str::to_string).unwrap_or_else(|| default_name.clone());
        assert_eq!(
            settings["worker_name"],
            expected_name.as_str(),
            "case {:?}: name",
            case.label
        );
        assert_eq!(
            settings["heartbeat_interval"], case.interval,
            "case {:?}: interval",
            case.label
        );
        assert_eq!(
            settings["runtimes"]["source"], case.source,
            "case {:?}: printed runtimes source",
            case.label
        );
        if case.source == "detection" {
            assert_eq!(
                settings["runtimes"].get("names"),
                None,
                "case {:?}: printed runtimes",
                case.label
            );
        } else {
            assert_eq!(
                settings["runtimes"]["names"],
                serde_json::json!(case.runtimes),
                "case {:?}: printed runtimes",
                case.label
            );
        }
    }
}

/// A configured runtime that is not installed is still registered, without
/// version or path, and a warning names it.
#[test]
fn missing_configured_runtime_warns() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "node", "#!/bin/sh\necho v20.11.1\n");
    let env = HashMap::from([
        ("PATH".to_string(), dir.path().as_os_str().to_owned()),
        ("ATTUNE_SENSOR_RUNTIMES".to_string(), OsString::from("python3,node")),
    ]);

    let (status, stdout, stderr) = run_agent_command(&env, &["detect", "--json", "--log-format", "json"]);

    assert!(status.success(), "detect failed with {status}: {stderr}");
    let report: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["runtimes"][0]["name"], "python");
    assert_eq!(report["runtimes"][0]["version"], "");
    assert_eq!(report["runtimes"][0]["path"], "");
    assert_eq!(report["runtimes"][1]["version"], "20.11.1");
    assert_eq!(report["not_detected"], serde_json::json!(["python"]));
    let warning = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Json>(line).ok())
        .find(|entry| entry["level"] == "WARN" && entry["fields"]["runtime"] == "python");
    assert!(warning.is_some(), "no warning naming python in: {stderr}");
}

/// Environment lists split on commas, and labels come from nested variables.
#[test]
fn environment_lists_and_labels() {
    let env = HashMap::from([
        ("PATH".to_string(), OsString::from("/nonexistent")),
        (
            "ATTUNE__REGISTRY__URLS".to_string(),
            OsString::from("http://127.0.0.1:50051,http://[::1]:50052"),
        ),
        ("ATTUNE__SENSOR__LABELS__ZONE".to_string(), OsString::from("eu-1")),
        (
            "ATTUNE__SENSOR__MAX_CONCURRENT_SENSORS".to_string(),
            OsString::from("4"),
        ),
    ]);

    let (status, stdout, stderr) = run_agent_command(&env, &["print-config"]);

    assert!(status.success(), "print-config failed with {status}: {stderr}");
    let settings: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        settings["registry_urls"],
        serde_json::json!(["http://127.0.0.1:50051", "http://[::1]:50052"])
    );
    assert_eq!(settings["labels"]["zone"], "eu-1");
    assert_eq!(settings["max_concurrent_sensors"], 4);
}

/// Invalid configuration exits with status 2 and a message naming the key.
#[test]
fn invalid_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("bad.yaml");
    std::fs::write(&yaml, "sensor:\n  heartbeat_intreval: 5\n").unwrap();
    let yaml_text = yaml.display().to_string();
    // Each case: environment variables, arguments, text the error must contain.
    type ErrorCase<'a> = (&'a [(&'a str, &'a str)], Vec<&'a str>, &'a str);
    let cases: [ErrorCase; 4] = [
        (&[], vec!["print-config", "--config", &yaml_text], "heartbeat_intreval"),
        (
            &[("ATTUNE__SENSOR__WORKER_NAME", "no spaces allowed")],
            vec!["print-config"],
            "sensor.worker_name",
        ),
        (
            &[("ATTUNE__REGISTRY__URL", "https://127.0.0.1:1")],
            vec!["print-config"],
            "registry.url",
        ),
        (&[], vec!["print-config", "--heartbeat-interval", "soon"], "soon"),
    ];

    for (vars, args, expected) in cases {
        let mut env: HashMap<String, OsString> = HashMap::from([("PATH".to_string(), OsString::from("/nonexistent"))]);
        for (key, value) in vars {
            env.insert(key.to_string(), OsString::from(value));
        }

        let (status, _, stderr) = run_agent_command(&env, &args);

        assert_eq!(status.code(), Some(2), "args {args:?} vars {vars:?}: {stderr}");
        assert!(stderr.contains(expected), "args {args:?} vars {vars:?}: {stderr}");
    }
}

/// Server keys in a shared file or environment are ignored, so the agent and
/// registry-server can share one configuration.
#[test]
fn server_keys_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("shared.yaml");
    std::fs::write(
        &yaml,
        "database:\n  url: sqlite://registry.db\nregistry:\n  listen: 127.0.0.1:50051\n  url: http://127.0.0.1:50099\n\
         log:\n  level: debug\nsensor:\n  worker_name: sensor-shared\n",
    )
    .unwrap();
    let env: HashMap<String, OsString> = HashMap::from([
        ("PATH".to_string(), OsString::from("/nonexistent")),
        ("ATTUNE__DATABASE__URL".to_string(), OsString::from("sqlite://other.db")),
        ("ATTUNE__REGISTRY__SWEEP_INTERVAL".to_string(), OsString::from("5s")),
    ]);
    let yaml_text = yaml.display().to_string();

    let (status, stdout, stderr) = run_agent_command(&env, &["print-config", "--config", &yaml_text]);

    assert_eq!(status.code(), Some(0), "{stderr}");
    let printed: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed["worker_name"], "sensor-shared");
    assert!(stdout.contains("http://127.0.0.1:50099"), "{stdout}");
}

/// An unusable state directory fails with its cause printed once.
#[test]
fn state_dir_error_names_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let state_dir = blocker.join("state").display().to_string();
    let env = HashMap::from([("PATH".to_string(), OsString::from("/nonexistent"))]);
    let url = format!("http://127.0.0.1:{}", common::free_port());
    let args = [
        "run",
        "--runtimes",
        "shell",
        "--registry-url",
        &url,
        "--state-dir",
        &state_dir,
    ];

    let (status, _, stderr) = run_agent_command(&env, &args);

    assert!(
        !status.success(),
        "agent started with an unusable state directory: {stderr}"
    );
    assert!(stderr.contains("--state-dir"), "{stderr}");
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");
}

/// Text logs written to a pipe contain no ANSI colour codes.
#[test]
fn piped_logs_have_no_colour() {
    let env = HashMap::from([
        ("PATH".to_string(), OsString::from("/nonexistent")),
        ("ATTUNE_SENSOR_RUNTIMES".to_string(), OsString::from("python")),
    ]);

    let (status, _, stderr) = run_agent_command(&env, &["detect", "--log-format", "text"]);

    assert!(status.success(), "detect failed with {status}: {stderr}");
    assert!(stderr.contains("WARN"), "no warning logged: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape code in: {stderr:?}");
}

/// With both `registry.url` and `registry.urls` set, the agent uses
/// `registry.urls` and logs a warning that names both keys.
#[test]
fn url_and_urls_warn_at_start() {
    let env = HashMap::from([
        ("PATH".to_string(), OsString::from("/nonexistent")),
        (
            "ATTUNE__REGISTRY__URL".to_string(),
            OsString::from("http://127.0.0.1:50051"),
        ),
        (
            "ATTUNE__REGISTRY__URLS".to_string(),
            OsString::from("http://127.0.0.1:50052"),
        ),
    ]);

    let (status, stdout, stderr) = run_agent_command(&env, &["print-config", "--log-format", "json"]);

    assert!(status.success(), "print-config failed with {status}: {stderr}");
    let settings: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(settings["registry_urls"], serde_json::json!(["http://127.0.0.1:50052"]));
    let warning = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Json>(line).ok())
        .find(|entry| entry["level"] == "WARN")
        .unwrap_or_else(|| panic!("no warning in: {stderr}"));
    let message = warning["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("registry.url "), "{message}");
    assert!(message.contains("using registry.urls"), "{message}");
    assert_eq!(warning["fields"]["registry_url"], "http://127.0.0.1:50051");
}

/// `print-config` prints the state directory the agent would use: the
/// configured one, else the first usable default, and creates neither.
#[test]
fn print_config_shows_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let systemd_dir = dir.path().join("systemd-state");
    let flag_dir = dir.path().join("flag-state");
    let env = HashMap::from([
        ("PATH".to_string(), OsString::from("/nonexistent")),
        ("STATE_DIRECTORY".to_string(), systemd_dir.as_os_str().to_owned()),
    ]);
    let flag_text = flag_dir.display().to_string();

    let (status, stdout, stderr) = run_agent_command(&env, &["print-config"]);
    let (flag_status, flag_stdout, flag_stderr) = run_agent_command(&env, &["print-config", "--state-dir", &flag_text]);

    assert!(status.success(), "print-config failed with {status}: {stderr}");
    let printed: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed["state_dir"]["path"], systemd_dir.display().to_string());
    assert_eq!(printed["state_dir"]["source"], "default");
    assert!(
        flag_status.success(),
        "print-config failed with {flag_status}: {flag_stderr}"
    );
    let flag_printed: Json = serde_json::from_str(&flag_stdout).unwrap();
    assert_eq!(flag_printed["state_dir"]["path"], flag_text.as_str());
    assert_eq!(flag_printed["state_dir"]["source"], "configured");
    assert!(!systemd_dir.exists(), "print-config created {}", systemd_dir.display());
    assert!(!flag_dir.exists(), "print-config created {}", flag_dir.display());
}
