//! The keyspaces of the twins' data, declared by the layer that owns them (the runtime
//! stores prefixed keys and knows none of these). Numbers are on disk: never reuse one.

use twinfleet_runtime::Space;

/// Installation secrets (the key of device-token hashes).
pub const META: Space = Space(0);
/// Device type id → `DeviceTypeSpec`.
pub const DEVICE_TYPE: Space = Space(1);
/// DTA id → `DtaSpec`.
pub const DTA: Space = Space(2);
/// Packed initial records of twins created in bulk (thousands per record).
pub const FLEET: Space = Space(3);
/// Twin id → its snapshot, written every `snapshot_every` events or when idle.
pub const SNAPSHOT: Space = Space(4);
/// Per-twin journal: key = twin id, 0x00, big-endian seq of the record's first event;
/// value = the events of one snapshot interval (`codec::Chunk`), written with the
/// snapshot that covers them (older data directories: one event per record).
pub const JOURNAL: Space = Space(5);
// 6 is the runtime's `Space::ALERT`; 7 is unused (a quarantined record stays where it is).
/// Device credentials: twin id → keyed hash of its token.
pub const CREDENTIAL: Space = Space(8);
/// Telemetry: key = twin id, 0x00, first point's millis (BE), record id (BE); value =
/// a packed batch whose points all fall in one clock hour.
pub const TELEMETRY: Space = Space(9);
/// Users, groups and API tokens of the operator API: `user/<name>`, `group/<name>`,
/// `token/<keyed hash>`, `meta/bootstrapped`.
pub const ACCESS: Space = Space(10);
/// The audit log: key = big-endian id (increasing), value = one entry.
pub const AUDIT: Space = Space(11);
/// Long-running jobs: key = big-endian job id (the job), + 0x01 (its resolved work).
pub const JOB: Space = Space(12);
/// The newest value of each metric of a twin: key = twin id.
pub const TELEMETRY_LATEST: Space = Space(13);
/// Twins whose journal has events after their stored snapshot: key = twin id, value =
/// the id of the journal page holding the first such event (empty in data directories
/// of before the pages: the events are then per-event `JOURNAL` records). Written with
/// the first such event, deleted with the next snapshot.
pub const TAIL: Space = Space(14);
/// The journal's write-ahead pages: key = page id (big-endian, commit order), value =
/// the events of every twin in one group commit that are not in a snapshot yet
/// (`codec::page_item`). A page is deleted once no `TAIL` names it or an older one.
pub const JOURNAL_PAGE: Space = Space(15);
/// App logs: key = twin id, 0x00, millis (BE, sign flipped), sequence (BE); value = one
/// line's level, app and text (`crate::logs`).
pub const LOGS: Space = Space(16);
/// Provisioning processes: key = device type, 0x00, serial; value = the claim (identity,
/// the process with its step log, the token held until the device confirms).
pub const PROVISIONING: Space = Space(17);
/// Pre-registered batches: key = device type, 0x00, batch name; value = the batch (its
/// mode, size, who imported it when). Its claim token is a `CREDENTIAL` of holder
/// `#claim/<type>/<batch>`.
pub const BATCH: Space = Space(18);
/// Pre-registered devices: key = device type, 0x00, serial; value = its batch and the
/// identity announced for it.
pub const REGISTRATION: Space = Space(19);
/// Provisioning processes not finished yet: key = device type, 0x00, serial (as in
/// `PROVISIONING`); empty value. Written and deleted with the process record, so a start
/// reads only these (`META` `provisioning-open-index` marks a data directory where it
/// is complete).
pub const PROVISIONING_OPEN: Space = Space(20);
/// Monitoring alerts: key = alert id (BE, increasing); value = the `RuleAlert`.
pub const RULE_ALERT: Space = Space(21);
/// Open monitoring alerts: key = twin id, 0x00, rule id; value = the alert id (BE). At
/// most one per twin and rule.
pub const OPEN_ALERT: Space = Space(22);
/// The alerts' change log: key = revision (BE, increasing); value = the `RuleAlert` as
/// that change left it. The live stream resumes from it (`Last-Event-ID`) and the
/// notification sinks deliver from it, each from its own cursor. The newest
/// `alerting::MAX_CHANGES` are kept.
pub const ALERT_CHANGE: Space = Space(23);
/// Notification sinks' cursors: key = sink name; value = the last change-log revision it
/// delivered (BE).
pub const NOTIFY_CURSOR: Space = Space(24);
/// Silences of notifications: key = silence id (BE); value = the `notify::Silence`.
pub const SILENCE: Space = Space(25);
/// History exports' cursors: key = export name; value = its `exports::ExportCursor`.
pub const EXPORT_CURSOR: Space = Space(26);
/// Configuration templates: key = device type, 0, version (BE u32); value = the
/// `template::ConfigTemplate`.
pub const TEMPLATE: Space = Space(27);
/// Each device type's applied template: key = device type; value = its version (BE u32).
pub const TEMPLATE_ACTIVE: Space = Space(28);
/// App versions of the app store: key = app, 0, version; value = the
/// `apps::AppVersion` with its artifacts (the files are in `artifacts/`).
pub const APP: Space = Space(29);
/// Fleet rollouts: key = rollout id; value = the `rollout::Rollout` after its last step.
pub const ROLLOUT: Space = Space(30);
