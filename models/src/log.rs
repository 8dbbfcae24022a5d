//! App logs of a device: lines with a time, a level, the app that wrote them and a text,
//! stored per twin and queried by time range like metrics (see `twinfleet_actors::logs`).

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// How severe a log line is, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    #[serde(alias = "warn")]
    Warning,
    Error,
}

impl LogLevel {
    pub const ALL: [LogLevel; 4] = [LogLevel::Debug, LogLevel::Info, LogLevel::Warning, LogLevel::Error];

    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = LogError;
    fn from_str(s: &str) -> Result<Self, LogError> {
        match s {
            "warn" => Ok(LogLevel::Warning),
            _ => LogLevel::ALL
                .into_iter()
                .find(|l| l.name() == s)
                .ok_or_else(|| LogError::BadLevel(s.chars().take(32).collect())),
        }
    }
}

/// One line of an app's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    pub at: Timestamp,
    pub level: LogLevel,
    /// The app (or component) that wrote it.
    pub app: String,
    pub text: String,
}

/// Lines accepted in one batch.
pub const MAX_LOG_LINES: usize = 1_000;
/// Bytes of one line's text.
pub const MAX_LOG_TEXT: usize = 8 * 1024;
/// Bytes of an app name.
pub const MAX_APP_NAME: usize = 64;

/// Why a log batch was refused (whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("a log batch must not be empty")]
    Empty,
    #[error("log batch has {0} lines; at most {MAX_LOG_LINES} are accepted")]
    TooManyLines(usize),
    #[error(
        "line {0}: app name is empty, longer than {MAX_APP_NAME} bytes, or has characters other than letters, digits and . _ : / -"
    )]
    BadApp(usize),
    #[error("line {index}: {len} bytes of text; at most {MAX_LOG_TEXT}")]
    TooLong { index: usize, len: usize },
    #[error("line {index}: timestamp {at} is {ahead_ms} ms ahead of the platform clock (at most {max_ms} ms)")]
    FutureTimestamp { index: usize, at: Timestamp, ahead_ms: u64, max_ms: u64 },
    #[error("unknown log level {0:?} (debug, info, warning, error)")]
    BadLevel(String),
}

impl LogError {
    /// The rejection reason counted in /metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            LogError::FutureTimestamp { .. } => "future_timestamp",
            _ => "bad_log",
        }
    }
}

/// Whether `app` may name an app: 1 to 64 bytes of letters, digits and `. _ : / -`.
pub fn app_name_ok(app: &str) -> bool {
    !app.is_empty()
        && app.len() <= MAX_APP_NAME
        && app.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

/// Checks a batch at time `now`; lines may be at most `max_future_ms` ahead of it.
pub fn validate_logs(lines: &[LogLine], now: Timestamp, max_future_ms: u64) -> Result<(), LogError> {
    if lines.is_empty() {
        return Err(LogError::Empty);
    }
    if lines.len() > MAX_LOG_LINES {
        return Err(LogError::TooManyLines(lines.len()));
    }
    for (index, l) in lines.iter().enumerate() {
        if !app_name_ok(&l.app) {
            return Err(LogError::BadApp(index));
        }
        if l.text.len() > MAX_LOG_TEXT {
            return Err(LogError::TooLong { index, len: l.text.len() });
        }
        let ahead_ms = l.at.since(now);
        if ahead_ms > max_future_ms {
            return Err(LogError::FutureTimestamp { index, at: l.at, ahead_ms, max_ms: max_future_ms });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(app: &str, text: &str, at: i64) -> LogLine {
        LogLine { at: Timestamp(at), level: LogLevel::Info, app: app.into(), text: text.into() }
    }

    #[test]
    fn batches_are_checked_whole() {
        let now = Timestamp(1_000_000);
        assert!(validate_logs(&[line("fw", "booted", 999_000)], now, 1_000).is_ok());
        assert_eq!(validate_logs(&[], now, 1_000), Err(LogError::Empty));
        assert_eq!(validate_logs(&[line("fw", "x", 1), line("", "x", 1)], now, 1_000), Err(LogError::BadApp(1)));
        assert_eq!(validate_logs(&[line("a b", "x", 1)], now, 1_000), Err(LogError::BadApp(0)));
        let long = "x".repeat(MAX_LOG_TEXT + 1);
        assert!(matches!(validate_logs(&[line("fw", &long, 1)], now, 1_000), Err(LogError::TooLong { .. })));
        let e = validate_logs(&[line("fw", "x", 1_002_000)], now, 1_000).unwrap_err();
        assert_eq!(e.reason(), "future_timestamp");
        let many = vec![line("fw", "x", 1); MAX_LOG_LINES + 1];
        assert_eq!(validate_logs(&many, now, 1_000), Err(LogError::TooManyLines(MAX_LOG_LINES + 1)));
    }

    #[test]
    fn levels_parse_and_order() {
        assert_eq!("warn".parse::<LogLevel>().unwrap(), LogLevel::Warning);
        assert_eq!("error".parse::<LogLevel>().unwrap(), LogLevel::Error);
        assert!("loud".parse::<LogLevel>().is_err());
        assert!(LogLevel::Debug < LogLevel::Error);
        let l: LogLevel = serde_json::from_str("\"warn\"").unwrap();
        assert_eq!(l, LogLevel::Warning);
    }
}
