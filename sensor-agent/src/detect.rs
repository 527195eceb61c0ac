//! Detection of the runtimes installed on this host.
//!
//! `shell` and `native` are always reported. `python` is the first of
//! `python3` and `python` on `PATH` that reports a Python 3 version, and
//! `node` the first of `node` and `nodejs` that reports any version. Every
//! probe runs at the same time, so detection takes at most one probe
//! timeout plus a short drain.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use worker_registry::domain::runtime::{NATIVE, NODE, PYTHON, SHELL};
use worker_registry::proto;
use worker_registry::validation::MAX_RUNTIME_VERSION_LEN;

use crate::config::RuntimesSource;
use crate::probe;

/// One runtime found on this host or named in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Runtime {
    /// Normalized name, such as `python`.
    pub name: String,
    /// Version the interpreter reported; empty when unknown.
    pub version: String,
    /// Absolute path of the interpreter; empty when unknown.
    pub path: String,
}

impl Runtime {
    fn bare(name: &str) -> Runtime {
        Runtime {
            name: name.to_string(),
            version: String::new(),
            path: String::new(),
        }
    }

    /// Converts the runtime into its protocol message.
    pub fn to_proto(&self) -> proto::Runtime {
        proto::Runtime {
            name: self.name.clone(),
            version: self.version.clone(),
            path: self.path.clone(),
        }
    }
}

/// Interpreters tried for one runtime, in order of preference.
struct Family {
    name: &'static str,
    candidates: &'static [&'static str],
    parse: fn(&str) -> Option<String>,
}

const PYTHON_FAMILY: Family = Family {
    name: PYTHON,
    candidates: &["python3", "python"],
    parse: parse_python_version,
};

const NODE_FAMILY: Family = Family {
    name: NODE,
    candidates: &["node", "nodejs"],
    parse: parse_node_version,
};

/// Detects the runtimes on this host, searching the directories of
/// `search_path` (a `PATH` value) and killing each probe after `timeout`.
pub async fn detect(search_path: Option<&OsStr>, timeout: Duration) -> Vec<Runtime> {
    let (shell, python, node) = tokio::join!(
        detect_shell(search_path, timeout),
        detect_family(&PYTHON_FAMILY, search_path, timeout),
        detect_family(&NODE_FAMILY, search_path, timeout),
    );

    let mut runtimes = vec![shell];
    runtimes.extend(python);
    runtimes.extend(node);
    runtimes.push(Runtime::bare(NATIVE));
    runtimes
}

/// Reports `shell` with the path of `bash`, or of `sh` when there is no
/// bash. The version comes from `bash --version`; `sh` has no portable
/// version flag, so its version stays empty.
async fn detect_shell(search_path: Option<&OsStr>, timeout: Duration) -> Runtime {
    if let Some(bash) = find_executable("bash", search_path) {
        let version = match probe::run(&bash, &["--version"], timeout).await {
            Ok(output) if output.succeeded() => parse_bash_version(&output.stdout).unwrap_or_default(),
            Ok(_) | Err(_) => String::new(),
        };
        return Runtime {
            name: SHELL.to_string(),
            version,
            path: bash.display().to_string(),
        };
    }

    match find_executable("sh", search_path) {
        Some(sh) => Runtime {
            name: SHELL.to_string(),
            version: String::new(),
            path: sh.display().to_string(),
        },
        None => Runtime::bare(SHELL),
    }
}

/// Probes every candidate of a family at once and keeps the first one, in
/// order of preference, that reported a version its parser accepts.
async fn detect_family(family: &Family, search_path: Option<&OsStr>, timeout: Duration) -> Option<Runtime> {
    let candidates: Vec<PathBuf> = family
        .candidates
        .iter()
        .filter_map(|candidate| find_executable(candidate, search_path))
        .collect();

    let probes = candidates.iter().map(|path| probe_version(family, path, timeout));
    let versions = futures::future::join_all(probes).await;

    candidates.into_iter().zip(versions).find_map(|(path, version)| {
        version.map(|version| Runtime {
            name: family.name.to_string(),
            version,
            path: path.display().to_string(),
        })
    })
}

async fn probe_version(family: &Family, path: &Path, timeout: Duration) -> Option<String> {
    let output = match probe::run(path, &["--version"], timeout).await {
        Ok(output) => output,
        Err(error) => {
            tracing::debug!(runtime = family.name, path = %path.display(), %error, "probe failed to start");
            return None;
        }
    };

    if output.timed_out() {
        tracing::warn!(
            runtime = family.name,
            path = %path.display(),
            timeout = %humantime::format_duration(timeout),
            "probe timed out; runtime skipped"
        );
        return None;
    }
    if !output.succeeded() {
        tracing::debug!(runtime = family.name, path = %path.display(), status = ?output.status, "probe failed");
        return None;
    }

    // Python 2 prints its version to stderr and Python 3 to stdout, so both
    // are read, stdout first.
    let version = (family.parse)(&output.stdout).or_else(|| (family.parse)(&output.stderr));
    if version.is_none() {
        tracing::debug!(
            runtime = family.name,
            path = %path.display(),
            stdout = %output.stdout.trim(),
            stderr = %output.stderr.trim(),
            "probe output has no usable version"
        );
    }
    version
}

/// Accepts `Python 3.x.y` (with suffixes such as `rc1` or `+`) and rejects
/// every other major version.
fn parse_python_version(output: &str) -> Option<String> {
    let version = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Python "))?
        .split_whitespace()
        .next()?;
    if !version.starts_with("3.") {
        return None;
    }
    checked_version(version)
}

/// Accepts `v20.11.1` and reports `20.11.1`.
fn parse_node_version(output: &str) -> Option<String> {
    let line = output.lines().map(str::trim).find(|line| !line.is_empty())?;
    let version = line.strip_prefix('v').unwrap_or(line);
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    checked_version(version)
}

/// Takes `5.2.15(1)-release` from `GNU bash, version 5.2.15(1)-release (x86_64-pc-linux-gnu)`.
fn parse_bash_version(output: &str) -> Option<String> {
    let first_line = output.lines().next()?;
    let (_, rest) = first_line.split_once("version ")?;
    checked_version(rest.split_whitespace().next()?)
}

/// Keeps a version only if the registry would accept it: at most 64 bytes
/// of visible ASCII starting with a digit.
fn checked_version(version: &str) -> Option<String> {
    let valid = version.len() <= MAX_RUNTIME_VERSION_LEN
        && version.starts_with(|c: char| c.is_ascii_digit())
        && version.chars().all(|c| c.is_ascii_graphic());
    valid.then(|| version.to_string())
}

/// Finds `name` in the directories of `search_path` and returns its
/// absolute path if it is an executable file. Empty and relative `PATH`
/// entries are skipped, because they depend on the working directory.
pub fn find_executable(name: &str, search_path: Option<&OsStr>) -> Option<PathBuf> {
    let search_path = search_path?;
    std::env::split_paths(search_path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Returns the `PATH` of this process.
pub fn process_search_path() -> Option<OsString> {
    std::env::var_os("PATH")
}

/// Detected and effective runtimes, as `sensor-agent detect` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Runtimes found on this host.
    pub detected: Vec<Runtime>,
    /// Runtimes the agent registers with.
    pub runtimes: Vec<Runtime>,
    /// Source of the effective list.
    pub source: RuntimesSource,
    /// Configured runtimes that detection did not find on this host.
    pub not_detected: Vec<String>,
}

/// Combines detection with the configured runtime list. A configured list
/// wins: each configured runtime is registered, with the detected version
/// and path when detection found it and without them otherwise.
pub fn resolve(detected: Vec<Runtime>, configured: Option<&[String]>, source: RuntimesSource) -> Report {
    let Some(configured) = configured else {
        return Report {
            runtimes: detected.clone(),
            detected,
            source: RuntimesSource::Detection,
            not_detected: Vec::new(),
        };
    };

    let mut runtimes = Vec::with_capacity(configured.len());
    let mut not_detected = Vec::new();
    for name in configured {
        match detected.iter().find(|runtime| &runtime.name == name) {
            Some(found) => runtimes.push(found.clone()),
            None => {
                not_detected.push(name.clone());
                runtimes.push(Runtime::bare(name));
            }
        }
    }

    Report {
        detected,
        runtimes,
        source,
        not_detected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_versions() {
        let cases = [
            ("Python 3.11.7\n", Some("3.11.7")),
            ("Python 3.13.0rc1", Some("3.13.0rc1")),
            ("Python 2.7.18", None),
            ("", None),
            ("pyenv: python3: command not found", None),
            ("Python 3", None),
        ];
        for (output, expected) in cases {
            assert_eq!(parse_python_version(output).as_deref(), expected, "output {output:?}");
        }
    }

    #[test]
    fn node_versions() {
        let cases = [
            ("v20.11.1\n", Some("20.11.1")),
            ("\n18.0.0", Some("18.0.0")),
            ("", None),
            ("node: not found", None),
        ];
        for (output, expected) in cases {
            assert_eq!(parse_node_version(output).as_deref(), expected, "output {output:?}");
        }
    }

    #[test]
    fn bash_version() {
        let output = "GNU bash, version 5.2.15(1)-release (x86_64-pc-linux-gnu)\nCopyright";

        assert_eq!(parse_bash_version(output).as_deref(), Some("5.2.15(1)-release"));
    }

    #[test]
    fn configured_runtime_wins_over_detection() {
        let detected = vec![
            Runtime::bare(SHELL),
            Runtime {
                name: PYTHON.into(),
                version: "3.11.7".into(),
                path: "/usr/bin/python3".into(),
            },
            Runtime::bare(NATIVE),
        ];
        let configured = vec![PYTHON.to_string(), NODE.to_string()];

        let report = resolve(detected, Some(&configured), RuntimesSource::Env);

        assert_eq!(report.runtimes.len(), 2);
        assert_eq!(report.runtimes[0].version, "3.11.7");
        assert_eq!(report.runtimes[1], Runtime::bare(NODE));
        assert_eq!(report.not_detected, vec![NODE.to_string()]);
        assert_eq!(report.source, RuntimesSource::Env);
    }

    #[test]
    fn relative_path_entries_are_skipped() {
        let found = find_executable("sh", Some(OsStr::new("relative/bin::/bin")));

        assert_eq!(found, Some(PathBuf::from("/bin/sh")));
    }
}
