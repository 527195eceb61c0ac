//! The instance id: a random 128-bit hex string that identifies one agent
//! installation across restarts.
//!
//! The registry lets a Register with the same instance id take over a live
//! lease at once, so an agent that restarts after a crash is listed again
//! without waiting for its old lease to expire. The id lives in the file
//! `instance_id` inside the state directory.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use worker_registry::validation::MAX_INSTANCE_ID_LEN;

/// Name of the file that keeps the instance id.
pub const INSTANCE_ID_FILE: &str = "instance_id";

/// Directory used by a root agent when no state directory is configured.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/sensor-agent";

/// The instance id and the file it was read from or written to.
#[derive(Debug, Clone)]
pub struct InstanceId {
    /// The id sent in every Register request.
    pub id: String,
    /// File that keeps the id; `None` when no directory was writable and the
    /// id lasts only as long as this process.
    pub file: Option<PathBuf>,
}

/// A state directory that cannot hold the instance id.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the instance id in {path}: {error}; make the directory writable or set --state-dir")]
pub struct StateError {
    /// File or directory that failed.
    pub path: PathBuf,
    /// The underlying error. The message already contains it, so it is not
    /// also returned by `source()`, which would print it twice in a chain.
    pub error: io::Error,
}

/// Loads the instance id from `configured_dir`, creating the directory and
/// the id when they do not exist yet.
///
/// Without a configured directory the first usable one of
/// `$STATE_DIRECTORY` (set by systemd), `/var/lib/sensor-agent`,
/// `$XDG_STATE_HOME/sensor-agent` and `$HOME/.local/state/sensor-agent` is
/// used. When none is usable, the id is random for this run only and a
/// warning explains that a restart then waits for the old lease to expire.
pub fn load_or_create(configured_dir: Option<&Path>) -> Result<InstanceId, StateError> {
    if let Some(dir) = configured_dir {
        return load_or_create_in(dir);
    }

    for dir in default_dirs() {
        match load_or_create_in(&dir) {
            Ok(instance) => return Ok(instance),
            Err(error) => tracing::debug!(dir = %dir.display(), %error, "state directory not usable"),
        }
    }

    let instance = InstanceId {
        id: new_id(),
        file: None,
    };
    tracing::warn!(
        instance_id = %instance.id,
        "no writable state directory; the instance id lasts for this run only, so a restart waits for the old lease to expire (set --state-dir)"
    );
    Ok(instance)
}

/// Returns the state directory `load_or_create` would use, without
/// creating or writing anything: the configured one, else the first
/// default directory that contains a valid id or could be created and
/// written. Returns `None` when no default directory is usable.
///
/// NOTE: writability comes from access(2), which can accept a directory
/// where creating fails (a full disk, or `/proc` for root), so the agent may
/// still fall back to a later directory.
pub fn effective_dir(configured_dir: Option<&Path>) -> Option<PathBuf> {
    match configured_dir {
        Some(dir) => Some(dir.to_path_buf()),
        None => first_usable_dir(default_dirs()),
    }
}

fn first_usable_dir(dirs: Vec<PathBuf>) -> Option<PathBuf> {
    dirs.into_iter().find(|dir| is_usable_dir(dir))
}

/// Tells whether `load_or_create_in` would succeed in `dir`, following the
/// same steps without writing.
fn is_usable_dir(dir: &Path) -> bool {
    match fs::read_to_string(dir.join(INSTANCE_ID_FILE)) {
        Ok(text) if is_valid_id(text.trim()) => true,
        Ok(_) => is_writable_dir(dir),
        Err(error) if error.kind() == io::ErrorKind::NotFound => can_create_in(dir),
        Err(_) => false,
    }
}

/// Tells whether `dir`, or the nearest existing directory above it that
/// `create_dir_all` would create it in, is writable.
fn can_create_in(dir: &Path) -> bool {
    match dir.ancestors().find(|ancestor| ancestor.exists()) {
        Some(existing) => is_writable_dir(existing),
        None => false,
    }
}

/// Tells whether the process may create files in `dir`. access(2) decides,
/// so root, ACLs and read-only mounts count as they would for a write.
fn is_writable_dir(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and
    // access(2) only reads it.
    unsafe { nix::libc::access(path.as_ptr(), nix::libc::W_OK | nix::libc::X_OK) == 0 }
}

fn default_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();

    // systemd's StateDirectory= may list several directories separated by colons.
    if let Some(systemd) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = std::env::split_paths(&systemd).next() {
            dirs.push(first);
        }
    }
    dirs.push(PathBuf::from(SYSTEM_STATE_DIR));
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|value| !value.is_empty()) {
        dirs.push(PathBuf::from(xdg).join("sensor-agent"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|value| !value.is_empty()) {
        dirs.push(PathBuf::from(home).join(".local/state/sensor-agent"));
    }
    dirs.retain(|dir| dir.is_absolute());
    dirs
}

fn load_or_create_in(dir: &Path) -> Result<InstanceId, StateError> {
    let file = dir.join(INSTANCE_ID_FILE);
    let error_at = |path: &Path| {
        let path = path.to_path_buf();
        move |error| StateError { path, error }
    };

    match fs::read_to_string(&file) {
        Ok(text) if is_valid_id(text.trim()) => {
            return Ok(InstanceId {
                id: text.trim().to_string(),
                file: Some(file),
            });
        }
        Ok(_) => tracing::warn!(file = %file.display(), "instance id file is malformed; writing a new id"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error_at(&file)(error)),
    }

    fs::create_dir_all(dir).map_err(error_at(dir))?;
    let id = new_id();
    write_atomically(dir, &file, &id).map_err(error_at(&file))?;
    tracing::info!(instance_id = %id, file = %file.display(), "created instance id");

    Ok(InstanceId { id, file: Some(file) })
}

/// Writes through a temporary file and a rename, so that a crash never
/// leaves a half-written id behind.
fn write_atomically(dir: &Path, file: &Path, id: &str) -> io::Result<()> {
    let temporary = dir.join(format!(".{INSTANCE_ID_FILE}.{}.tmp", std::process::id()));
    let mut handle = fs::File::create(&temporary)?;
    handle.write_all(format!("{id}\n").as_bytes())?;
    handle.sync_all()?;
    drop(handle);
    fs::rename(&temporary, file)
}

/// Returns a random 128-bit id as 32 lowercase hex digits.
fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks an id read from the file: 1 to 128 visible ASCII characters, as
/// the registry accepts.
fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_INSTANCE_ID_LEN && id.chars().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_created_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("nested/state");

        let first = load_or_create(Some(&state_dir)).unwrap();
        let second = load_or_create(Some(&state_dir)).unwrap();

        assert_eq!(first.id.len(), 32);
        assert!(first.id.chars().all(|c| c.is_ascii_hexdigit()), "{}", first.id);
        assert_eq!(first.id, second.id);
        assert_eq!(second.file, Some(state_dir.join(INSTANCE_ID_FILE)));
    }

    #[test]
    fn malformed_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INSTANCE_ID_FILE), "has space\n").unwrap();

        let instance = load_or_create(Some(dir.path())).unwrap();

        assert_eq!(instance.id.len(), 32);
        let stored = fs::read_to_string(dir.path().join(INSTANCE_ID_FILE)).unwrap();
        assert_eq!(stored.trim(), instance.id);
    }

    #[test]
    fn unusable_configured_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();

        let error = load_or_create(Some(&blocker.join("state"))).unwrap_err();

        assert!(error.to_string().contains("--state-dir"), "{error}");
    }

    /// The preview skips a directory that cannot be created and picks the
    /// next one, as `load_or_create` does, without creating it.
    #[test]
    fn effective_dir_skips_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let unusable = blocker.join("state");
        let usable = dir.path().join("nested/state");

        let chosen = first_usable_dir(vec![unusable, usable.clone()]);

        assert_eq!(chosen, Some(usable.clone()));
        assert!(!usable.exists(), "the preview created {}", usable.display());
    }

    /// A directory that already contains a valid id is used.
    #[test]
    fn effective_dir_takes_existing_id() {
        let dir = tempfile::tempdir().unwrap();
        let instance = load_or_create(Some(dir.path())).unwrap();
        assert!(instance.file.is_some());

        assert_eq!(
            first_usable_dir(vec![dir.path().to_path_buf()]),
            Some(dir.path().to_path_buf())
        );
        assert_eq!(first_usable_dir(Vec::new()), None);
    }

    /// A configured directory is used as given, even before it exists.
    #[test]
    fn effective_dir_prefers_configured() {
        let configured = Path::new("/nonexistent/state");

        assert_eq!(effective_dir(Some(configured)), Some(configured.to_path_buf()));
    }

    #[test]
    fn ids_differ() {
        assert_ne!(new_id(), new_id());
    }
}
