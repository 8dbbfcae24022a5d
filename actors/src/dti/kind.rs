//! A device type as its twins and handles see it: the context a TDTA and its DTIs share
//! (identity, defaults, domain model, retention, the index of packed fleet records), and
//! the messages a TDTA answers. The TDTA actor itself lives in `tdta`, above this
//! module; a twin reaches it only through these ports.

use super::TwinSlot;
use crate::context::Infra;
use crate::error::TwinError;
use crate::queued::Queued;
use crate::records::{DeviceTypeSpec, TwinSpec};
use actix::prelude::*;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use twinfleet_models::DeviceTypeId;
use twinfleet_runtime::{ActorStats, ActorStatus};

/// What a TDTA and its DTIs share; outlives restarts of the TDTA actor.
#[derive(Debug)]
pub struct TypeContext {
    pub(crate) device_type: DeviceTypeId,
    pub(crate) model: Arc<str>,
    /// `tdta/<id>`: the parent of every DTI of this type in the actor tree.
    pub(crate) path: Arc<str>,
    pub(crate) infra: Arc<Infra>,
    pub(crate) stats: ActorStats,
    defaults: RwLock<Arc<Map<String, Value>>>,
    /// Bumped whenever the defaults change: the twins resolve their rules again.
    rules_version: std::sync::atomic::AtomicU64,
    /// The rules of the defaults alone, resolved once per version for every twin whose
    /// layers add none.
    type_rules: Mutex<Option<TypeRules>>,
    /// The messages its TDTA answers, while it runs.
    tdta: RwLock<Option<TdtaPorts>>,
    /// Keys of the packed fleet records, indexed by `TwinSlot::origin`.
    pub(crate) chunks: Mutex<Vec<Vec<u8>>>,
    pub(crate) twins: AtomicUsize,
    pub(crate) domain: Option<Arc<twinfleet_models::DomainModel>>,
    pub(crate) journal: twinfleet_models::JournalRetention,
    pub(crate) history: twinfleet_models::HistoryRetention,
    /// How devices of this type are provisioned (`crate::provisioning`): as declared, and
    /// ready to use.
    pub(crate) provisioning: Option<Arc<twinfleet_models::provisioning::ProvisioningSpec>>,
    pub(crate) claim_rules: Arc<crate::claims::Rules>,
    /// The metrics the type declares (rules on others are refused), if it does.
    pub(crate) metrics: Option<Arc<[String]>>,
    /// Held while a fleet record is rewritten (deleting twins), one edit at a time.
    pub(crate) fleet_edit: tokio::sync::Mutex<()>,
    /// Telemetry of this type's twins waiting to be written together, per arbiter.
    pub(crate) ingest: super::ingest::IngestQueues,
    /// The configuration template applied to the type (`crate::templates`).
    template: RwLock<Option<Arc<twinfleet_models::template::ConfigTemplate>>>,
}

impl TypeContext {
    pub(crate) fn new(spec: &DeviceTypeSpec, infra: Arc<Infra>) -> Arc<Self> {
        let path: Arc<str> = Arc::from(format!("tdta/{}", spec.id));
        Arc::new(TypeContext {
            device_type: spec.id.clone(),
            model: Arc::from(spec.model.as_str()),
            stats: ActorStats::new("tdta", spec.id.as_arc().clone(), Some(Arc::from("platform/supervisor"))),
            path,
            defaults: RwLock::new(Arc::new(spec.defaults.clone())),
            rules_version: std::sync::atomic::AtomicU64::new(1),
            type_rules: Mutex::new(None),
            tdta: RwLock::new(None),
            chunks: Mutex::new(Vec::new()),
            twins: AtomicUsize::new(0),
            domain: spec.domain.clone().map(Arc::new),
            journal: spec.journal,
            history: spec.history,
            provisioning: spec.provisioning.clone().map(Arc::new),
            claim_rules: Arc::new(crate::claims::Rules::of(spec.provisioning.as_ref())),
            metrics: spec.metrics.as_deref().map(Arc::from),
            fleet_edit: tokio::sync::Mutex::new(()),
            ingest: super::ingest::IngestQueues::new(infra.arbiters.len()),
            template: RwLock::new(crate::records::template_active(&*infra.storage, spec.id.as_str())),
            infra,
        })
    }

    pub(crate) fn defaults(&self) -> Arc<Map<String, Value>> {
        self.defaults.read().clone()
    }

    /// The configuration template applied to the type, if any.
    pub(crate) fn template(&self) -> Option<Arc<twinfleet_models::template::ConfigTemplate>> {
        self.template.read().clone()
    }

    pub(crate) fn set_template(&self, t: Option<Arc<twinfleet_models::template::ConfigTemplate>>) {
        *self.template.write() = t;
    }

    /// Drops the TDTA's address; the actor stops once no message is in flight.
    pub(crate) fn stop(&self) {
        self.tdta.write().take();
        self.stats.set_status(ActorStatus::Stopped);
    }

    /// Publishes the ports of the TDTA that now runs this type.
    pub(crate) fn attach(&self, ports: TdtaPorts) {
        *self.tdta.write() = Some(ports);
        self.stats.set_status(ActorStatus::Running);
    }

    pub(crate) fn tdta(&self) -> Option<TdtaPorts> {
        self.tdta.read().clone()
    }

    pub(crate) fn set_defaults(&self, defaults: Map<String, Value>) {
        *self.defaults.write() = Arc::new(defaults);
        self.rules_version.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The type's own rules as of `version` (its `defaults`), resolved once.
    pub(crate) fn type_rules(
        &self,
        version: u64,
        defaults: &Map<String, Value>,
    ) -> (Arc<[twinfleet_models::rules::Rule]>, Vec<twinfleet_models::rules::RuleError>) {
        let mut cached = self.type_rules.lock();
        if let Some(t) = cached.as_ref().filter(|t| t.version == version) {
            return (t.rules.clone(), t.errors.clone());
        }
        let e = twinfleet_models::rules::effective_rules(defaults, [], &Map::new(), self.metrics.as_deref());
        let rules: Arc<[twinfleet_models::rules::Rule]> = e.rules.into_iter().map(|(r, _)| r).collect();
        *cached = Some(TypeRules { version, rules: rules.clone(), errors: e.errors.clone() });
        (rules, e.errors)
    }

    /// Changes with every change of the defaults (and so of the type's rules).
    pub(crate) fn rules_version(&self) -> u64 {
        self.rules_version.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn spec(&self) -> DeviceTypeSpec {
        DeviceTypeSpec {
            id: self.device_type.clone(),
            model: self.model.to_string(),
            defaults: (*self.defaults()).clone(),
            domain: self.domain.as_deref().cloned(),
            journal: self.journal,
            history: self.history,
            provisioning: self.provisioning.as_deref().cloned(),
            metrics: self.metrics.as_deref().map(<[String]>::to_vec),
        }
    }
}

/// A type's own rules, resolved (`TypeContext::type_rules`).
#[derive(Debug)]
struct TypeRules {
    version: u64,
    rules: Arc<[twinfleet_models::rules::Rule]>,
    errors: Vec<twinfleet_models::rules::RuleError>,
}

/// Creates twins of this type. All-or-nothing: an existing or duplicate id, or an
/// unknown DTA, rejects the whole request and creates nothing. The batch is written
/// atomically with the (first) fleet record: what must exist exactly when the twins do
/// (a provisioned device's token and process record).
#[derive(Debug)]
pub struct SpawnFleet(pub Vec<TwinSpec>, pub twinfleet_runtime::WriteBatch, pub(crate) Queued);

/// What a fleet creation did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FleetReport {
    pub created: usize,
    /// Packed records written.
    pub records: usize,
}

impl Message for SpawnFleet {
    type Result = Result<FleetReport, TwinError>;
}

#[derive(Debug)]
pub(crate) struct SetDefaults(pub Map<String, Value>, pub(crate) Queued);

impl Message for SetDefaults {
    type Result = Result<(), TwinError>;
}

/// Sent by a DTI that crashed.
#[derive(Debug)]
pub(crate) struct ChildFailed {
    pub slot: Arc<TwinSlot>,
    pub error: String,
    pub queued: Queued,
}

impl crate::queued::Counted for TypeContext {
    fn stats(&self) -> &ActorStats {
        &self.stats
    }
}

impl Message for ChildFailed {
    type Result = ();
}

/// Where a type's TDTA takes its messages.
#[derive(Clone)]
pub(crate) struct TdtaPorts {
    pub failed: Recipient<ChildFailed>,
    pub spawn: Recipient<SpawnFleet>,
    pub defaults: Recipient<SetDefaults>,
}

impl std::fmt::Debug for TdtaPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TdtaPorts")
    }
}
