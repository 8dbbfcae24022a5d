//! Installs driven by the twin (Maree et al. 2024, 4.4.3 and 7.7): an app version the
//! store found compatible goes through optional manual approval, waits for the device's
//! maintenance window, is sent as `install_app`, and is awaited under a watchdog until the
//! device answers; success updates the twin's app inventory. Pure: the job, its phases
//! and the maintenance window; the steps are decided in `TwinState::decide`
//! (`TwinCommand::Install`, `ApproveInstall`, the install wait and the command's ack).
//!
//! **Maintenance windows** are written `22:00-05:00 Europe/Berlin weekdays`: a start and
//! an end in local time (an end at or before the start runs into the next day), an IANA
//! time zone, and the days a window *starts* on (`daily`, `weekdays`, `weekends`, or a
//! list such as `mon,wed,fri`). Local times follow the zone's daylight-saving rules: a
//! start that falls into a spring-forward gap opens when the gap ends.

use crate::command::CommandId;
use crate::time::Timestamp;
use chrono::{Datelike, Duration, NaiveTime, TimeZone, Weekday};
use serde::{Deserialize, Serialize};

/// Where an install stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum InstallPhase {
    /// An operator must approve it first (`POST /twins/{id}/installs/{app}/approve`).
    AwaitingApproval,
    /// Approved (or needing no approval), it waits for the maintenance window.
    AwaitingWindow {
        #[cfg_attr(feature = "openapi", schema(value_type = i64))]
        opens: Timestamp,
    },
    /// Sent to the device; its answer is awaited until `deadline`.
    Installing {
        #[cfg_attr(feature = "openapi", schema(value_type = u64))]
        command: CommandId,
        #[cfg_attr(feature = "openapi", schema(value_type = i64))]
        deadline: Timestamp,
    },
    /// The device reported success.
    Installed {
        #[cfg_attr(feature = "openapi", schema(value_type = i64))]
        at: Timestamp,
    },
    /// The device reported failure (its reason), or did not answer in time.
    Failed {
        reason: String,
        #[cfg_attr(feature = "openapi", schema(value_type = i64))]
        at: Timestamp,
    },
}

impl InstallPhase {
    /// Its name, as serialized.
    pub fn name(&self) -> &'static str {
        match self {
            InstallPhase::AwaitingApproval => "awaiting_approval",
            InstallPhase::AwaitingWindow { .. } => "awaiting_window",
            InstallPhase::Installing { .. } => "installing",
            InstallPhase::Installed { .. } => "installed",
            InstallPhase::Failed { .. } => "failed",
        }
    }

    /// Whether the install is over (installed or failed).
    pub fn is_final(&self) -> bool {
        matches!(self, InstallPhase::Installed { .. } | InstallPhase::Failed { .. })
    }
}

/// One install of an app version on a twin's device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstallJob {
    pub app: String,
    pub version: String,
    pub artifact_url: String,
    #[serde(flatten)]
    pub phase: InstallPhase,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub requested_at: Timestamp,
    /// The maintenance window it waits for, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// The rollout it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// The version installed before (to roll back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// The device's last progress report (percent), from its reported
    /// `apps.<app>.progress`; each report starts the watchdog again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// It removes the app (`version`: the one removed) instead of installing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uninstall: bool,
}

/// A recurring maintenance window (see the module docs for its format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    from: NaiveTime,
    to: NaiveTime,
    tz: chrono_tz::Tz,
    /// The days a window starts on.
    days: Vec<Weekday>,
    text: String,
}

impl MaintenanceWindow {
    /// Reads `22:00-05:00 Europe/Berlin weekdays`; a bad part is named.
    pub fn parse(text: &str) -> Result<MaintenanceWindow, String> {
        let usage = "write a maintenance window as \"22:00-05:00 Europe/Berlin weekdays\" (days: daily, weekdays, weekends or e.g. mon,wed,fri)";
        let parts: Vec<&str> = text.split_whitespace().filter(|p| *p != "on").collect();
        let [span, zone, rest @ ..] = parts.as_slice() else {
            return Err(format!("maintenance window {text:?}: {usage}"));
        };
        let (from, to) = span
            .split_once(['-', '–'])
            .ok_or_else(|| format!("maintenance window {text:?}: {span:?} is not a span like 22:00-05:00"))?;
        let time = |s: &str| {
            NaiveTime::parse_from_str(s.trim(), "%H:%M")
                .map_err(|_| format!("maintenance window {text:?}: {s:?} is not a time of day like 22:00"))
        };
        let (from, to) = (time(from)?, time(to)?);
        let tz: chrono_tz::Tz = zone.parse().map_err(|_| {
            format!("maintenance window {text:?}: {zone:?} is not an IANA time zone like Europe/Berlin")
        })?;
        let days = match rest {
            [] | ["daily"] => Weekday::Mon.num_days_from_monday()..7,
            ["weekdays"] => 0..5,
            ["weekends"] => 5..7,
            [list] => {
                let mut days = Vec::new();
                for d in list.split(',') {
                    let day = d
                        .parse::<Weekday>()
                        .map_err(|_| format!("maintenance window {text:?}: {d:?} is not a day (mon, tue, ...)"))?;
                    days.push(day);
                }
                return Ok(MaintenanceWindow { from, to, tz, days, text: text.to_string() });
            }
            _ => return Err(format!("maintenance window {text:?}: {usage}")),
        };
        let days = days.map(|n| Weekday::try_from(n as u8).expect("0..7 are days")).collect();
        Ok(MaintenanceWindow { from, to, tz, days, text: text.to_string() })
    }

    /// The window as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// When the window that contains `now` opened, or the next one opens (`now` itself
    /// if it is open).
    pub fn next_open(&self, now: Timestamp) -> Timestamp {
        let Some(utc) = chrono::DateTime::from_timestamp_millis(now.0) else { return now };
        let local = utc.with_timezone(&self.tz);
        // A window that started yesterday may still be open (it runs past midnight).
        for back in [1i64, 0] {
            let day = local.date_naive() - Duration::days(back);
            if let Some((start, end)) = self.window_on(day)
                && start <= now
                && now < end
            {
                return now;
            }
        }
        (0..8)
            .filter_map(|ahead| self.window_on(local.date_naive() + Duration::days(ahead)))
            .map(|(start, _)| start)
            .find(|start| *start > now)
            .unwrap_or(now)
    }

    /// The window that starts on local date `day`, if `day` is one of its days: its
    /// start and end as instants.
    fn window_on(&self, day: chrono::NaiveDate) -> Option<(Timestamp, Timestamp)> {
        if !self.days.contains(&day.weekday()) {
            return None;
        }
        let end_day = if self.to <= self.from { day + Duration::days(1) } else { day };
        Some((self.instant(day.and_time(self.from))?, self.instant(end_day.and_time(self.to))?))
    }

    /// A local time as an instant: the earlier of two (a fall-back overlap), or, in a
    /// spring-forward gap, the first instant after it.
    fn instant(&self, local: chrono::NaiveDateTime) -> Option<Timestamp> {
        let mut t = local;
        for _ in 0..4 {
            if let Some(dt) = self.tz.from_local_datetime(&t).earliest() {
                return Some(Timestamp(dt.timestamp_millis()));
            }
            t += Duration::minutes(30);
        }
        None
    }
}

/// The configuration key (type defaults, DTA layers, overrides) of a twin's maintenance
/// window.
pub const WINDOW_KEY: &str = "maintenance_window";
/// The configuration key that makes every install of the type's (or group's) twins wait
/// for an operator's approval.
pub const APPROVAL_KEY: &str = "install_approval";

/// Checks the install settings of a configuration document: a maintenance window that
/// does not parse, or an approval flag that is not a boolean, is named.
pub fn check_config(values: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    use serde_json::Value;
    match values.get(WINDOW_KEY) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            MaintenanceWindow::parse(s)?;
        }
        Some(v) => {
            return Err(format!("{WINDOW_KEY} must be a string like \"22:00-05:00 Europe/Berlin weekdays\", not {v}"));
        }
    }
    match values.get(APPROVAL_KEY) {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
        Some(v) => Err(format!("{APPROVAL_KEY} must be true or false, not {v}")),
    }
}

/// What a twin's effective configuration says of its installs: its maintenance window
/// (`None`: always open) and whether each install waits for an operator's approval.
pub fn settings_of(
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<(Option<MaintenanceWindow>, bool), String> {
    let approval = config.get(APPROVAL_KEY).and_then(serde_json::Value::as_bool) == Some(true);
    Ok((window_of(config)?, approval))
}

/// A twin's maintenance window from its effective configuration (`None`: always open).
pub fn window_of(config: &serde_json::Map<String, serde_json::Value>) -> Result<Option<MaintenanceWindow>, String> {
    match config.get(WINDOW_KEY) {
        Some(serde_json::Value::String(s)) => MaintenanceWindow::parse(s).map(Some),
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => Err(format!("{WINDOW_KEY} must be a string, not {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        Timestamp(chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis())
    }

    #[test]
    fn a_weekday_night_window_in_berlin_follows_daylight_saving_time() {
        let w = MaintenanceWindow::parse("22:00-05:00 Europe/Berlin weekdays").unwrap();
        // Wednesday 2026-07-15 12:00 UTC (14:00 in Berlin, summer time): tonight 22:00
        // CEST is 20:00 UTC.
        assert_eq!(w.next_open(at("2026-07-15T12:00:00Z")), at("2026-07-15T20:00:00Z"));
        // In winter 22:00 CET is 21:00 UTC.
        assert_eq!(w.next_open(at("2026-01-14T12:00:00Z")), at("2026-01-14T21:00:00Z"));
        // Open: Thursday 03:00 Berlin belongs to Wednesday's window.
        assert_eq!(w.next_open(at("2026-01-15T02:00:00Z")), at("2026-01-15T02:00:00Z"));
        // Friday night's window runs into Saturday morning; Saturday's does not exist:
        // Saturday noon waits for Monday 22:00.
        assert_eq!(w.next_open(at("2026-01-17T11:00:00Z")), at("2026-01-19T21:00:00Z"));
        assert_eq!(w.next_open(at("2026-01-17T03:00:00Z")), at("2026-01-17T03:00:00Z"), "Friday's, still open");
    }

    #[test]
    fn a_start_in_the_spring_forward_gap_opens_when_the_gap_ends() {
        // 2026-03-29 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        let w = MaintenanceWindow::parse("02:30-04:00 Europe/Berlin sun").unwrap();
        assert_eq!(w.next_open(at("2026-03-28T12:00:00Z")), at("2026-03-29T01:00:00Z"));
    }

    #[test]
    fn a_bad_window_is_named() {
        for (text, says) in [
            ("22:00 Europe/Berlin", "span"),
            ("25:00-05:00 Europe/Berlin", "time of day"),
            ("22:00-05:00 Mars/Olympus", "time zone"),
            ("22:00-05:00 Europe/Berlin someday", "not a day"),
            ("", "write a maintenance window"),
        ] {
            let e = MaintenanceWindow::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        assert!(MaintenanceWindow::parse("01:00–03:00 UTC on mon,thu").is_ok());
    }
}
