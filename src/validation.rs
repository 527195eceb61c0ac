//! Input limits and the checks that enforce them before any SQL runs.
//!
//! Every check returns a [`ValidationError`] that names the field and the
//! rule it broke, so that a client can fix its request without guessing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value as Json};

use crate::domain::{normalize_runtime, Role, Status};
use crate::json::struct_to_json;
use crate::proto;

/// Maximum length of a worker name in bytes, the length of a DNS name.
pub const MAX_NAME_LEN: usize = 253;
/// Maximum length of a host name in bytes.
pub const MAX_HOST_LEN: usize = 253;
/// Maximum length of an instance id in bytes.
pub const MAX_INSTANCE_ID_LEN: usize = 128;
/// Maximum number of runtimes one worker reports.
pub const MAX_RUNTIMES: usize = 16;
/// Maximum length of a runtime name in bytes.
pub const MAX_RUNTIME_NAME_LEN: usize = 32;
/// Maximum length of a runtime version in bytes.
pub const MAX_RUNTIME_VERSION_LEN: usize = 64;
/// Maximum length of a runtime path in bytes.
pub const MAX_RUNTIME_PATH_LEN: usize = 1024;
/// Maximum number of labels on one worker, and of label pairs in a filter.
pub const MAX_LABELS: usize = 32;
/// Maximum length of a label key in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Maximum length of a label value in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Maximum size of the extra capabilities, encoded as compact JSON.
pub const MAX_CAPABILITIES_BYTES: usize = 16 * 1024;
/// Maximum nesting depth of the extra capabilities; the top-level object is depth 1.
pub const MAX_CAPABILITIES_DEPTH: usize = 8;
/// Maximum size of one decoded gRPC message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Maximum length of a session token in bytes.
pub const MAX_SESSION_TOKEN_LEN: usize = 128;
/// Page size used when a List request gives none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a List request gets; larger requests are reduced to it.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Capability keys the registry derives from other fields. A client that
/// sends one of them in `capabilities` gets an error naming the field to use.
pub const RESERVED_CAPABILITY_KEYS: [(&str, &str); 4] = [
    ("runtimes", "runtimes"),
    ("runtime_versions", "runtimes[].version"),
    ("detected_interpreters", "runtimes[].path"),
    ("labels", "labels"),
];

/// A request field that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Path of the field, such as `runtimes[2].name`.
    pub field: String,
    /// The rule, phrased so that the client knows what to send instead.
    pub rule: String,
}

impl ValidationError {
    /// Creates an error for `field` that broke `rule`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.rule)
    }
}

impl std::error::Error for ValidationError {}

type Result<T> = std::result::Result<T, ValidationError>;

/// One runtime after validation, with a normalized name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSpec {
    /// Normalized name, such as `python`.
    pub name: String,
    /// Reported version; empty when unknown.
    pub version: String,
    /// Absolute interpreter path; empty when unknown.
    pub path: String,
}

/// A validated Register request.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Unique worker name.
    pub name: String,
    /// Role; `UNSPECIFIED` in the request means [`Role::Action`].
    pub role: Role,
    /// Host the worker runs on; may be empty.
    pub host: String,
    /// Runtimes with normalized, distinct names.
    pub runtimes: Vec<RuntimeSpec>,
    /// Labels, sorted by key.
    pub labels: BTreeMap<String, String>,
    /// Extra capability keys from the client.
    pub extra_capabilities: Map<String, Json>,
    /// Stable id of the agent installation; may be empty.
    pub instance_id: String,
    /// Heartbeat interval the client asked for, if any.
    pub requested_interval: Option<Duration>,
}

impl Registration {
    /// Builds the stored capabilities document: the extra keys plus
    /// `runtimes` (names), `runtime_versions` (name to version),
    /// `detected_interpreters` (`{name, path, version}` for runtimes with a
    /// path) and `labels`.
    pub fn capabilities_document(&self) -> Map<String, Json> {
        let mut document = self.extra_capabilities.clone();

        let names: Vec<Json> = self.runtimes.iter().map(|r| Json::String(r.name.clone())).collect();

        let versions: Map<String, Json> = self
            .runtimes
            .iter()
            .filter(|r| !r.version.is_empty())
            .map(|r| (r.name.clone(), Json::String(r.version.clone())))
            .collect();

        let interpreters: Vec<Json> = self
            .runtimes
            .iter()
            .filter(|r| !r.path.is_empty())
            .map(|r| serde_json::json!({"name": r.name, "path": r.path, "version": r.version}))
            .collect();

        let labels: Map<String, Json> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect();

        document.insert("runtimes".into(), Json::Array(names));
        document.insert("runtime_versions".into(), Json::Object(versions));
        document.insert("detected_interpreters".into(), Json::Array(interpreters));
        document.insert("labels".into(), Json::Object(labels));
        document
    }
}

/// Checks a Register request and returns its validated form.
pub fn validate_register(request: &proto::RegisterRequest) -> Result<Registration> {
    validate_worker_name("name", &request.name)?;

    let role = match request.role {
        0 => Role::Action,
        value => Role::from_proto(value).ok_or_else(|| {
            ValidationError::new(
                "role",
                format!("unknown value {value}: use WORKER_ROLE_ACTION, WORKER_ROLE_SENSOR or WORKER_ROLE_HYBRID"),
            )
        })?,
    };

    validate_text("host", &request.host, MAX_HOST_LEN)?;
    validate_no_whitespace("host", &request.host)?;
    validate_text("instance_id", &request.instance_id, MAX_INSTANCE_ID_LEN)?;
    validate_no_whitespace("instance_id", &request.instance_id)?;

    let runtimes = validate_runtimes(&request.runtimes)?;
    let labels = validate_labels("labels", &request.labels)?;
    let extra_capabilities = match &request.capabilities {
        Some(capabilities) => validate_capabilities(capabilities)?,
        None => Map::new(),
    };

    let requested_interval = match &request.heartbeat_interval {
        Some(interval) => Some(validate_duration("heartbeat_interval", interval)?),
        None => None,
    };

    let registration = Registration {
        name: request.name.clone(),
        role,
        host: request.host.clone(),
        runtimes,
        labels,
        extra_capabilities,
        instance_id: request.instance_id.clone(),
        requested_interval,
    };
    Ok(registration)
}

/// Checks a worker name: 1 to 253 bytes of ASCII letters, digits, `.`,
/// `_`, `-`, `:` and `@`, starting with a letter or digit.
pub fn validate_worker_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_NAME_LEN} bytes, got {}", name.len()),
        ));
    }
    if let Some(bad) = name.chars().find(|c| !is_name_char(*c)) {
        return Err(ValidationError::new(
            field,
            format!("contains {bad:?}; use only ASCII letters, digits and . _ - : @"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(ValidationError::new(field, "must start with a letter or digit"));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')
}

/// Checks a free-text field: at most `max_len` bytes and no control
/// characters (NUL, newline and the rest of Unicode category Cc).
pub fn validate_text(field: &str, text: &str, max_len: usize) -> Result<()> {
    if text.len() > max_len {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max_len} bytes, got {}", text.len()),
        ));
    }
    if let Some(bad) = text.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            format!("contains the control character {bad:?}; remove it"),
        ));
    }
    Ok(())
}

fn validate_no_whitespace(field: &str, text: &str) -> Result<()> {
    if text.chars().any(char::is_whitespace) {
        return Err(ValidationError::new(field, "must not contain whitespace"));
    }
    Ok(())
}

fn validate_runtimes(runtimes: &[proto::Runtime]) -> Result<Vec<RuntimeSpec>> {
    if runtimes.len() > MAX_RUNTIMES {
        return Err(ValidationError::new(
            "runtimes",
            format!("at most {MAX_RUNTIMES} runtimes are allowed, got {}", runtimes.len()),
        ));
    }

    let mut validated: Vec<RuntimeSpec> = Vec::with_capacity(runtimes.len());
    for (index, runtime) in runtimes.iter().enumerate() {
        let name = validate_runtime_name(&format!("runtimes[{index}].name"), &runtime.name)?;
        if validated.iter().any(|seen| seen.name == name) {
            return Err(ValidationError::new(
                format!("runtimes[{index}].name"),
                format!("runtime {name:?} is listed twice; list each runtime once"),
            ));
        }

        validate_text(
            &format!("runtimes[{index}].version"),
            &runtime.version,
            MAX_RUNTIME_VERSION_LEN,
        )?;

        let path_field = format!("runtimes[{index}].path");
        validate_text(&path_field, &runtime.path, MAX_RUNTIME_PATH_LEN)?;
        if !runtime.path.is_empty() && !runtime.path.starts_with('/') {
            return Err(ValidationError::new(path_field, "must be an absolute path or empty"));
        }

        validated.push(RuntimeSpec {
            name,
            version: runtime.version.clone(),
            path: runtime.path.clone(),
        });
    }
    Ok(validated)
}

/// Checks and normalizes one runtime name: 1 to 32 bytes of lowercase
/// ASCII letters, digits, `.`, `_` and `-` after normalization.
pub fn validate_runtime_name(field: &str, name: &str) -> Result<String> {
    validate_text(field, name, MAX_RUNTIME_NAME_LEN)?;
    let normalized = normalize_runtime(name);
    if normalized.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if let Some(bad) = normalized
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ValidationError::new(
            field,
            format!("contains {bad:?}; use ASCII letters, digits and . _ -"),
        ));
    }
    Ok(normalized)
}

/// Checks a label map: at most 32 pairs, keys of 1 to 63 bytes made of
/// ASCII letters, digits, `.`, `_`, `-` and `/` that start with a letter or
/// digit, values of at most 256 bytes without control characters.
pub fn validate_labels(field: &str, labels: &HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("at most {MAX_LABELS} labels are allowed, got {}", labels.len()),
        ));
    }

    // Sorting first makes the reported field the same on every call.
    let sorted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (key, value) in &sorted {
        validate_label_key(field, key)?;
        validate_text(&format!("{field}[{key}]"), value, MAX_LABEL_VALUE_LEN)?;
    }
    Ok(sorted)
}

fn validate_label_key(field: &str, key: &str) -> Result<()> {
    let key_field = format!("{field} key {key:?}");
    if key.is_empty() {
        return Err(ValidationError::new(format!("{field} key"), "must not be empty"));
    }
    if key.len() > MAX_LABEL_KEY_LEN {
        return Err(ValidationError::new(
            key_field,
            format!("must be at most {MAX_LABEL_KEY_LEN} bytes, got {}", key.len()),
        ));
    }
    let valid_chars = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !valid_chars || !key.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(ValidationError::new(
            key_field,
            "must start with a letter or digit and contain only ASCII letters, digits and . _ - /",
        ));
    }
    Ok(())
}

fn validate_capabilities(capabilities: &prost_types::Struct) -> Result<Map<String, Json>> {
    let object = struct_to_json("capabilities", capabilities).map_err(|e| ValidationError::new("capabilities", e))?;

    for (key, replacement) in RESERVED_CAPABILITY_KEYS {
        if object.contains_key(key) {
            return Err(ValidationError::new(
                format!("capabilities.{key}"),
                format!("is set by the registry; send it in the {replacement} field instead"),
            ));
        }
    }

    let document = Json::Object(object);
    let depth = json_depth(&document);
    if depth > MAX_CAPABILITIES_DEPTH {
        return Err(ValidationError::new(
            "capabilities",
            format!("must be nested at most {MAX_CAPABILITIES_DEPTH} levels deep, got {depth}"),
        ));
    }

    let size = document.to_string().len();
    if size > MAX_CAPABILITIES_BYTES {
        return Err(ValidationError::new(
            "capabilities",
            format!("must encode to at most {MAX_CAPABILITIES_BYTES} bytes of JSON, got {size}"),
        ));
    }

    check_json_strings("capabilities", &document)?;

    let Json::Object(object) = document else {
        unreachable!("the document was built from an object");
    };
    Ok(object)
}

/// Counts nesting levels: a scalar is 0, an object or array is one more
/// than its deepest member.
fn json_depth(value: &Json) -> usize {
    match value {
        Json::Object(object) => 1 + object.values().map(json_depth).max().unwrap_or(0),
        Json::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Rejects control characters in keys and string values, because
/// PostgreSQL's JSONB cannot store NUL and operators read these values.
fn check_json_strings(path: &str, value: &Json) -> Result<()> {
    match value {
        Json::String(s) => validate_text(path, s, usize::MAX),
        Json::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                check_json_strings(&format!("{path}[{index}]"), item)?;
            }
            Ok(())
        }
        Json::Object(object) => {
            for (key, item) in object {
                let item_path = format!("{path}.{}", key.escape_debug());
                if key.is_empty() || key.chars().any(char::is_control) {
                    return Err(ValidationError::new(
                        item_path,
                        "keys must be non-empty and contain no control characters",
                    ));
                }
                check_json_strings(&item_path, item)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Converts a protobuf Duration, rejecting negative or malformed values.
pub fn validate_duration(field: &str, duration: &prost_types::Duration) -> Result<Duration> {
    let malformed = duration.seconds < 0 || duration.nanos < 0 || duration.nanos >= 1_000_000_000;
    if malformed {
        return Err(ValidationError::new(
            field,
            format!(
                "must be a non-negative duration such as \"30s\", got {}",
                format_proto_duration(duration)
            ),
        ));
    }
    Ok(Duration::new(duration.seconds as u64, duration.nanos as u32))
}

/// Formats a protobuf Duration the way its JSON form reads, such as `-5.5s`.
fn format_proto_duration(duration: &prost_types::Duration) -> String {
    let total = duration.seconds as f64 + f64::from(duration.nanos) / 1e9;
    format!("{total}s")
}

/// Checks the worker id and session token of a Heartbeat or Deregister.
pub fn validate_session(worker_id: i64, session_token: &str) -> Result<()> {
    if worker_id <= 0 {
        return Err(ValidationError::new(
            "worker_id",
            format!("must be a positive worker id from RegisterResponse, got {worker_id}"),
        ));
    }
    if session_token.is_empty() {
        return Err(ValidationError::new(
            "session_token",
            "must not be empty; send the token from RegisterResponse",
        ));
    }
    validate_text("session_token", session_token, MAX_SESSION_TOKEN_LEN)
}

/// Checks the optional status of a heartbeat: `UNSPECIFIED` keeps the
/// current status, and only `ACTIVE` and `BUSY` may be reported.
pub fn validate_heartbeat_status(value: i32) -> Result<Option<Status>> {
    if value == 0 {
        return Ok(None);
    }
    match Status::from_proto(value) {
        Some(status @ (Status::Active | Status::Busy)) => Ok(Some(status)),
        _ => Err(ValidationError::new(
            "status",
            format!(
                "must be WORKER_STATUS_ACTIVE, WORKER_STATUS_BUSY or unset, got {}",
                status_name(value)
            ),
        )),
    }
}

/// Returns the protocol name of a status value, or the number when it is
/// outside the enum.
fn status_name(value: i32) -> String {
    match proto::WorkerStatus::try_from(value) {
        Ok(status) => status.as_str_name().to_string(),
        Err(_) => value.to_string(),
    }
}

/// A validated List filter, without the page token, which the server decodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ListFilter {
    /// Only this role, if set.
    pub role: Option<Role>,
    /// Only these statuses, if any.
    pub statuses: Vec<Status>,
    /// Normalized runtime names that must all be present.
    pub runtimes: Vec<String>,
    /// Label pairs that must all match.
    pub labels: BTreeMap<String, String>,
    /// Only workers whose last heartbeat is at most this old.
    pub max_heartbeat_age: Option<Duration>,
    /// Only names that start with this prefix.
    pub name_prefix: String,
    /// Number of workers per page, 1 to [`MAX_PAGE_SIZE`].
    pub page_size: usize,
}

/// Checks a List request and returns its filter.
pub fn validate_list(request: &proto::ListRequest) -> Result<ListFilter> {
    let role = match request.role {
        0 => None,
        value => Some(
            Role::from_proto(value).ok_or_else(|| ValidationError::new("role", format!("unknown value {value}")))?,
        ),
    };

    let mut statuses = Vec::new();
    for (index, value) in request.statuses.iter().enumerate() {
        let status = Status::from_proto(*value).ok_or_else(|| {
            ValidationError::new(
                format!("statuses[{index}]"),
                format!(
                    "unknown or unspecified value {}: use WORKER_STATUS_ACTIVE, WORKER_STATUS_INACTIVE, \
                     WORKER_STATUS_BUSY or WORKER_STATUS_ERROR",
                    status_name(*value)
                ),
            )
        })?;
        if !statuses.contains(&status) {
            statuses.push(status);
        }
    }
    statuses.sort_by_key(|s| *s as u8);

    if request.runtimes.len() > MAX_RUNTIMES {
        return Err(ValidationError::new(
            "runtimes",
            format!(
                "at most {MAX_RUNTIMES} runtimes are allowed, got {}",
                request.runtimes.len()
            ),
        ));
    }
    let mut runtimes = Vec::new();
    for (index, name) in request.runtimes.iter().enumerate() {
        let normalized = validate_runtime_name(&format!("runtimes[{index}]"), name)?;
        if !runtimes.contains(&normalized) {
            runtimes.push(normalized);
        }
    }
    runtimes.sort();

    let labels = validate_labels("labels", &request.labels)?;

    let max_heartbeat_age = match &request.max_heartbeat_age {
        Some(age) => Some(validate_duration("max_heartbeat_age", age)?),
        None => None,
    };

    validate_text("name_prefix", &request.name_prefix, MAX_NAME_LEN)?;

    let page_size = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size if size < 0 => {
            return Err(ValidationError::new(
                "page_size",
                format!("must be 0 for the default or a positive number, got {size}"),
            ))
        }
        size => (size as usize).min(MAX_PAGE_SIZE),
    };

    let filter = ListFilter {
        role,
        statuses,
        runtimes,
        labels,
        max_heartbeat_age,
        name_prefix: request.name_prefix.clone(),
        page_size,
    };
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(name: &str) -> proto::RegisterRequest {
        proto::RegisterRequest {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn worker_name_rules() {
        assert!(validate_worker_name("name", "sensor-host1.example").is_ok());
        assert!(validate_worker_name("name", "").is_err());
        assert!(validate_worker_name("name", "a\0b").is_err());
        assert!(validate_worker_name("name", "a\nb").is_err());
        assert!(validate_worker_name("name", "-leading").is_err());
        assert!(validate_worker_name("name", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn duplicate_runtime_after_normalization() {
        let mut request = register("w1");
        request.runtimes = vec![
            proto::Runtime {
                name: "python".into(),
                ..Default::default()
            },
            proto::Runtime {
                name: "python3".into(),
                ..Default::default()
            },
        ];

        let error = validate_register(&request).unwrap_err();

        assert_eq!(error.field, "runtimes[1].name");
    }

    #[test]
    fn reserved_capability_key() {
        let mut request = register("w1");
        let object = serde_json::json!({"runtimes": ["python"]});
        request.capabilities = Some(crate::json::json_to_struct(object.as_object().unwrap()));

        let error = validate_register(&request).unwrap_err();

        assert_eq!(error.field, "capabilities.runtimes");
    }

    #[test]
    fn capabilities_document_has_derived_keys() {
        let mut request = register("w1");
        request.runtimes = vec![proto::Runtime {
            name: "Python3".into(),
            version: "3.11.7".into(),
            path: "/usr/bin/python3".into(),
        }];
        request.labels.insert("zone".into(), "a".into());

        let document = validate_register(&request).unwrap().capabilities_document();

        assert_eq!(document["runtimes"], serde_json::json!(["python"]));
        assert_eq!(document["runtime_versions"], serde_json::json!({"python": "3.11.7"}));
        assert_eq!(
            document["detected_interpreters"],
            serde_json::json!([{"name": "python", "path": "/usr/bin/python3", "version": "3.11.7"}])
        );
        assert_eq!(document["labels"], serde_json::json!({"zone": "a"}));
    }

    #[test]
    fn list_page_size_is_clamped() {
        let request = proto::ListRequest {
            page_size: 5000,
            ..Default::default()
        };
        assert_eq!(validate_list(&request).unwrap().page_size, MAX_PAGE_SIZE);

        let request = proto::ListRequest::default();
        assert_eq!(validate_list(&request).unwrap().page_size, DEFAULT_PAGE_SIZE);

        let request = proto::ListRequest {
            page_size: -1,
            ..Default::default()
        };
        assert_eq!(validate_list(&request).unwrap_err().field, "page_size");
    }
}
