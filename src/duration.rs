//! Durations in configuration: a number of seconds (`30`, `0.5`) or a
//! humantime string (`200ms`, `2m`, `1h 30m`).

use std::time::Duration;

/// Parses a duration given as seconds or as a humantime string.
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if let Ok(seconds) = trimmed.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("invalid duration {text:?}: seconds must be a finite number of at least 0"));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("invalid duration {text:?}: {e}; use seconds such as 30 or a value such as 200ms or 2m"))
}

/// Serde helpers for duration fields in configuration files and
/// environment variables.
pub mod serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// A duration written as a number of seconds or a humantime string.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(f64),
        Text(String),
    }

    /// Deserializes a duration from seconds or a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid duration {seconds}: seconds must be finite and at least 0"
                ))
            }),
            Raw::Text(text) => super::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_seconds_and_units() {
        assert_eq!(parse("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse("-1").is_err());
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }
}
