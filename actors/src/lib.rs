//! The twins of twinfleet as actors (actix 0.13), after Maree et al. 2024:
//!
//! - [`dti`]: a DTI per device: state, journal, desired-state watchdog;
//! - [`tdta`]: a TDTA per device type: creates its DTIs (in bulk), holds type defaults,
//!   supervises and restarts its DTIs;
//! - [`dta`]: a DTA per group: configuration layers reaching every member, nesting;
//! - [`supervisor`]: the platform supervisor and [`TwinRuntime`], the handle to it all;
//! - [`restore`]: how a platform comes back from its data directory.
//!
//! Actix types stay inside this crate: callers get [`TwinHandle`], [`DtaHandle`],
//! [`TypeHandle`] and [`TwinRuntime`].

pub mod access;
pub mod alerting;
pub mod apps;
pub mod batches;
pub mod catalog;
mod claims;
mod codec;
pub mod compaction;
pub mod context;
pub mod credentials;
mod directory;
pub mod dta;
pub mod dti;
pub mod env;
pub mod error;
pub mod exports;
pub mod group;
pub mod handle;
pub mod inspection;
pub mod jobs;
mod latest;
pub mod logs;
mod maps;
pub mod provisioning;
mod queued;
pub mod records;
pub mod restore;
pub mod rollouts;
pub mod sessions;
pub mod spaces;
pub mod supervisor;
pub mod tdta;
pub mod telemetry;
pub(crate) mod templates;
pub mod workflow;

pub use access::{API_TOKEN_PREFIX, AccessControl, AuditEntry, AuditQuery, Group, Principal, TokenInfo, User};
pub use alerting::{AlertBook, AlertQuery};
pub use batches::BatchView;
pub use catalog::{LifecycleFilter, TwinFilter, TwinPage, TwinSummary};
pub use compaction::CompactionReport;
pub use context::{DeviceLink, Infra, Settings};
pub use credentials::{AuthError, CLAIM_PREFIX, MIN_PROOF_LEN, TOKEN_PREFIX, seal_token, unseal_token};
pub use dta::DtaHandle;
pub use dti::FleetReport;
pub use dti::{LatestPoint, TwinView, WaitView};
pub use env::TwinEnv;
pub use error::TwinError;
pub use group::DtaInfo;
pub use handle::TwinHandle;
pub use inspection::{ActorPage, ActorQuery, FleetSummary, KindSummary};
pub use jobs::{Generate, Job, JobSpec, JobState, Jobs};
pub use logs::{LogPage, LogQuery};
pub use provisioning::{Claim, ClaimAnswer, ClaimView};
pub use records::{DeviceTypeSpec, DtaSpec, TwinSpec};
pub use restore::{QuarantineEntry, RestoreReport};
pub use sessions::{CredentialChange, DeviceSessions, Session};
pub use supervisor::TwinRuntime;
pub use tdta::{ClaimCredential, TypeHandle, TypeInfo};
pub use telemetry::{MAX_BUCKETS, MetricBuckets, TelemetryPage, TelemetryQuery};
pub use twinfleet_models::DeviceCommand;
