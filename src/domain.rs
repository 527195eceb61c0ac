//! Worker roles, statuses and runtime names as the registry stores them.

use std::fmt;
use std::str::FromStr;

use crate::proto;

/// Kind of work a worker does; stored as `worker_role_enum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs actions.
    Action,
    /// Watches for events.
    Sensor,
    /// Does both.
    Hybrid,
}

impl Role {
    /// Every role, in the order of the database enum.
    pub const ALL: [Role; 3] = [Role::Action, Role::Sensor, Role::Hybrid];

    /// Returns the database label, such as `sensor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Action => "action",
            Role::Sensor => "sensor",
            Role::Hybrid => "hybrid",
        }
    }

    /// Converts a protocol value. `UNSPECIFIED` gives `None`, and so does a
    /// number outside the enum, which callers report as invalid.
    pub fn from_proto(value: i32) -> Option<Role> {
        match proto::WorkerRole::try_from(value).ok()? {
            proto::WorkerRole::Unspecified => None,
            proto::WorkerRole::Action => Some(Role::Action),
            proto::WorkerRole::Sensor => Some(Role::Sensor),
            proto::WorkerRole::Hybrid => Some(Role::Hybrid),
        }
    }

    /// Returns the protocol value.
    pub fn to_proto(self) -> proto::WorkerRole {
        match self {
            Role::Action => proto::WorkerRole::Action,
            Role::Sensor => proto::WorkerRole::Sensor,
            Role::Hybrid => proto::WorkerRole::Hybrid,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| format!("unknown worker role {s:?}: expected action, sensor or hybrid"))
    }
}

/// Liveness state of a worker; stored as `worker_status_enum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Holds a live lease and accepts work.
    Active,
    /// Stopped, expired or deregistered.
    Inactive,
    /// Holds a live lease but reports itself busy.
    Busy,
    /// Reported broken by an operator or another tool.
    Error,
}

impl Status {
    /// Every status, in the order of the database enum.
    pub const ALL: [Status; 4] = [Status::Active, Status::Inactive, Status::Busy, Status::Error];

    /// Returns the database label, such as `active`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Inactive => "inactive",
            Status::Busy => "busy",
            Status::Error => "error",
        }
    }

    /// Tells whether a worker in this status holds a lease that can expire.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Active | Status::Busy)
    }

    /// Converts a protocol value. `UNSPECIFIED` and numbers outside the enum
    /// give `None`.
    pub fn from_proto(value: i32) -> Option<Status> {
        match proto::WorkerStatus::try_from(value).ok()? {
            proto::WorkerStatus::Unspecified => None,
            proto::WorkerStatus::Active => Some(Status::Active),
            proto::WorkerStatus::Inactive => Some(Status::Inactive),
            proto::WorkerStatus::Busy => Some(Status::Busy),
            proto::WorkerStatus::Error => Some(Status::Error),
        }
    }

    /// Returns the protocol value.
    pub fn to_proto(self) -> proto::WorkerStatus {
        match self {
            Status::Active => proto::WorkerStatus::Active,
            Status::Inactive => proto::WorkerStatus::Inactive,
            Status::Busy => proto::WorkerStatus::Busy,
            Status::Error => proto::WorkerStatus::Error,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown worker status {s:?}: expected active, inactive, busy or error"))
    }
}

/// Runtime names every agent reports the same way.
pub mod runtime {
    /// POSIX shell scripts (`bash` or `sh`).
    pub const SHELL: &str = "shell";
    /// Python 3.
    pub const PYTHON: &str = "python";
    /// Node.js.
    pub const NODE: &str = "node";
    /// Code built into the worker itself.
    pub const NATIVE: &str = "native";
}

/// Normalizes a runtime name: lowercases it, trims it and maps the aliases
/// `python3`, `nodejs`, `node.js`, `bash`, `sh` and `builtin` to the
/// standard names. Other names pass through lowercased.
pub fn normalize_runtime(name: &str) -> String {
    let lowered = name.trim().to_ascii_lowercase();
    let standard = match lowered.as_str() {
        "python" | "python3" => runtime::PYTHON,
        "node" | "nodejs" | "node.js" => runtime::NODE,
        "shell" | "bash" | "sh" => runtime::SHELL,
        "native" | "builtin" => runtime::NATIVE,
        _ => return lowered,
    };
    standard.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_aliases_normalize() {
        let cases = [
            ("python3", "python"),
            ("Python", "python"),
            ("nodejs", "node"),
            ("node.js", "node"),
            ("bash", "shell"),
            ("sh", "shell"),
            ("builtin", "native"),
            (" Ruby ", "ruby"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize_runtime(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn role_and_status_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(Role::from_proto(role.to_proto() as i32), Some(role));
        }
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>().unwrap(), status);
            assert_eq!(Status::from_proto(status.to_proto() as i32), Some(status));
        }
        assert_eq!(Role::from_proto(0), None);
        assert_eq!(Role::from_proto(99), None);
        assert_eq!(Status::from_proto(99), None);
    }
}
