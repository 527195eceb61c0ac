//! Runtime detection through the real `sensor-agent detect --json`, with
//! fake interpreters as the only programs on `PATH`.

mod common;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{is_running, live_processes_in_group, run_agent_command, write_script};
use serde_json::Value as Json;

/// Runs `detect --json` with `PATH` set to `path` and returns the report.
fn detect(path: &OsString, probe_timeout: &str) -> Json {
    let env = HashMap::from([("PATH".to_string(), path.clone())]);
    let (status, stdout, stderr) = run_agent_command(&env, &["detect", "--json", "--probe-timeout", probe_timeout]);
    assert!(status.success(), "detect failed with {status}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("detect printed invalid JSON ({e}): {stdout}"))
}

/// Returns the detected runtime named `name`, if any.
fn runtime<'a>(report: &'a Json, name: &str) -> Option<&'a Json> {
    report["detected"]
        .as_array()
        .expect("detected is an array")
        .iter()
        .find(|runtime| runtime["name"] == name)
}

fn fake_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

fn path_of(dir: &Path) -> OsString {
    dir.as_os_str().to_owned()
}

fn read_pid(file: &Path) -> i32 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds {text:?}: {e}", file.display()))
}

/// A python3 that prints Python 2 to stderr is not reported as python.
#[test]
fn python2_is_not_python() {
    let dir = fake_dir();
    write_script(dir.path(), "python3", "#!/bin/sh\necho 'Python 2.7.18' >&2\n");

    let report = detect(&path_of(dir.path()), "2s");

    assert_eq!(runtime(&report, "python"), None, "report: {report}");
}

/// A Python 3 release candidate is reported with its full version and path.
#[test]
fn python3_rc_version_is_kept() {
    let dir = fake_dir();
    let script = write_script(dir.path(), "python3", "#!/bin/sh\necho 'Python 3.13.0rc1'\n");

    let report = detect(&path_of(dir.path()), "2s");

    let python = runtime(&report, "python").unwrap_or_else(|| panic!("no python in {report}"));
    assert_eq!(python["version"], "3.13.0rc1");
    assert_eq!(python["path"], script.display().to_string());
}

/// When python3 is Python 2, a Python 3 named python is used instead.
#[test]
fn python_falls_back_to_python() {
    let dir = fake_dir();
    write_script(dir.path(), "python3", "#!/bin/sh\necho 'Python 2.7.18' >&2\n");
    let fallback = write_script(dir.path(), "python", "#!/bin/sh\necho 'Python 3.9.1'\n");

    let report = detect(&path_of(dir.path()), "2s");

    let python = runtime(&report, "python").unwrap_or_else(|| panic!("no python in {report}"));
    assert_eq!(python["version"], "3.9.1");
    assert_eq!(python["path"], fallback.display().to_string());
}

/// A node that prints v20.11.1 is reported as node 20.11.1.
#[test]
fn node_version_drops_v_prefix() {
    let dir = fake_dir();
    let script = write_script(dir.path(), "node", "#!/bin/sh\necho v20.11.1\n");

    let report = detect(&path_of(dir.path()), "2s");

    let node = runtime(&report, "node").unwrap_or_else(|| panic!("no node in {report}"));
    assert_eq!(node["version"], "20.11.1");
    assert_eq!(node["path"], script.display().to_string());
}

/// nodejs is used when there is no node.
#[test]
fn nodejs_is_node() {
    let dir = fake_dir();
    write_script(dir.path(), "nodejs", "#!/bin/sh\necho v18.19.0\n");

    let report = detect(&path_of(dir.path()), "2s");

    let node = runtime(&report, "node").unwrap_or_else(|| panic!("no node in {report}"));
    assert_eq!(node["version"], "18.19.0");
}

/// Interpreters that print nothing count as absent, while shell and native
/// are always reported.
#[test]
fn empty_output_means_absent() {
    let dir = fake_dir();
    write_script(dir.path(), "python3", "#!/bin/sh\nexit 0\n");
    write_script(dir.path(), "node", "#!/bin/sh\nexit 0\n");

    let report = detect(&path_of(dir.path()), "2s");

    assert_eq!(runtime(&report, "python"), None, "report: {report}");
    assert_eq!(runtime(&report, "node"), None, "report: {report}");
    assert!(runtime(&report, "shell").is_some(), "report: {report}");
    assert!(runtime(&report, "native").is_some(), "report: {report}");
}

/// A probe that sleeps for 600 s is killed with its child at the timeout.
#[test]
fn sleeping_probe_is_killed() {
    let dir = fake_dir();
    let pid_file = dir.path().join("python3.pid");
    let child_file = dir.path().join("python3.child");
    write_script(
        dir.path(),
        "python3",
        &format!(
            "#!/bin/sh\necho $$ > {}\n/bin/sleep 600 &\necho $! > {}\nwait\n",
            pid_file.display(),
            child_file.display()
        ),
    );
    let started = Instant::now();

    let report = detect(&path_of(dir.path()), "1s");

    let elapsed = started.elapsed();
    // One second of probe timeout plus process start-up on a loaded machine.
    assert!(elapsed < Duration::from_secs(3), "detect took {elapsed:?}");
    assert_eq!(runtime(&report, "python"), None, "report: {report}");
    assert_probe_killed(read_pid(&pid_file), read_pid(&child_file));
}

/// A probe whose background child keeps stdout open is read without waiting
/// for the timeout, and the child is killed.
#[test]
fn child_holding_stdout_is_killed() {
    let dir = fake_dir();
    let pid_file = dir.path().join("node.pid");
    let child_file = dir.path().join("node.child");
    write_script(
        dir.path(),
        "node",
        &format!(
            "#!/bin/sh\necho $$ > {}\n/bin/sleep 600 &\necho $! > {}\necho v20.11.1\n",
            pid_file.display(),
            child_file.display()
        ),
    );
    let started = Instant::now();

    let report = detect(&path_of(dir.path()), "10s");

    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "detect waited {elapsed:?}, close to the 10 s probe timeout"
    );
    let node = runtime(&report, "node").unwrap_or_else(|| panic!("no node in {report}"));
    assert_eq!(node["version"], "20.11.1");
    assert_probe_killed(read_pid(&pid_file), read_pid(&child_file));
}

/// Asserts that the probe process group led by `leader`, and its
/// background `child`, are gone. SIGKILL takes effect when the kernel next
/// schedules each process, so on a busy machine this waits up to 2 s.
fn assert_probe_killed(leader: i32, child: i32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while (!live_processes_in_group(leader).is_empty() || is_running(child)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        live_processes_in_group(leader),
        Vec::<i32>::new(),
        "probe group {leader} survived"
    );
    assert!(!is_running(child), "probe child {child} survived");
}

/// Returns the first executable named `name` on this process's `PATH`.
fn which(name: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .map(|path| path.display().to_string())
}

/// Returns what `program --version` prints on stdout and stderr together.
fn version_output(program: &str) -> String {
    let output = Command::new(program)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} --version: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The host's real python3 and node are found with the versions and paths
/// they report themselves.
#[test]
fn real_interpreters_are_found() {
    let python_path = which("python3").expect("python3 must be installed on the test host");
    let node_path = which("node").expect("node must be installed on the test host");
    let python_version = version_output("python3")
        .trim()
        .strip_prefix("Python ")
        .expect("python3 --version prints Python X.Y.Z")
        .to_string();
    let node_version = version_output("node")
        .trim()
        .strip_prefix('v')
        .expect("node --version prints vX.Y.Z")
        .to_string();

    let report = detect(&std::env::var_os("PATH").unwrap_or_default(), "5s");

    let python = runtime(&report, "python").unwrap_or_else(|| panic!("no python in {report}"));
    assert_eq!(python["version"], python_version.as_str());
    assert_eq!(python["path"], python_path.as_str());
    let node = runtime(&report, "node").unwrap_or_else(|| panic!("no node in {report}"));
    assert_eq!(node["version"], node_version.as_str());
    assert_eq!(node["path"], node_path.as_str());
    let shell = runtime(&report, "shell").unwrap_or_else(|| panic!("no shell in {report}"));
    let shell_path = which("bash").or_else(|| which("sh")).expect("bash or sh on PATH");
    assert_eq!(shell["path"], shell_path.as_str());
}
