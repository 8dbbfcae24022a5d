//! The typed handle of a twin (`TwinHandle`; the DTA's and the device type's handles live
//! with their actors, in `dta` and `tdta`): the only way embedders and the protocol edges
//! talk to twins. Handles wrap actix addresses so that the actor crate could be
//! swapped, survive restarts of the actor behind them (they point at the twin's slot,
//! not its mailbox), and put a deadline on the platform clock on every request.

use crate::access::{AccessControl, AuditEntry};
use crate::context::Infra;
use crate::dti::{Ask, Command, Events, Get, InjectPanic, Request, Retire, Telemetry, ToDevice, TwinSlot, TwinView};
use crate::error::TwinError;
use crate::telemetry::{TelemetryPage, TelemetryQuery};
use actix::MailboxError;
use futures::future::{Either, select};
use serde_json::{Map, Value};
use std::future::Future;
use std::sync::Arc;
use twinfleet_models::{CommandId, DeviceCommand, DeviceTypeId, MetricPoint, TwinCommand, TwinEvent, TwinId};
use twinfleet_runtime::{ActorStats, ActorStatus, ActorView, WriteBatch};

/// Awaits an actor's answer with the platform's request deadline.
pub(crate) async fn deliver<T>(
    request: impl Future<Output = Result<Result<T, TwinError>, MailboxError>>,
    stats: &ActorStats,
    infra: &Infra,
) -> Result<T, TwinError> {
    let ms = infra.settings.request_timeout_ms;
    let deadline = infra.clock.sleep(ms);
    match select(std::pin::pin!(request), deadline).await {
        Either::Left((Ok(r), _)) => r,
        Either::Left((Err(_), _)) => {
            stats.unqueued();
            Err(TwinError::Unavailable { kind: stats.kind, id: stats.id.to_string(), status: stats.status() })
        }
        Either::Right(_) => Err(TwinError::Timeout { kind: stats.kind, id: stats.id.to_string(), ms }),
    }
}

/// A handle to one DTI.
#[derive(Debug, Clone)]
pub struct TwinHandle {
    slot: Arc<TwinSlot>,
}

impl TwinHandle {
    pub(crate) fn new(slot: Arc<TwinSlot>) -> Self {
        TwinHandle { slot }
    }

    pub fn id(&self) -> &TwinId {
        &self.slot.id
    }

    pub fn device_type(&self) -> &DeviceTypeId {
        &self.slot.ty.device_type
    }

    /// The actor's statistics, read without sending it a message.
    pub fn actor(&self) -> ActorView {
        self.slot.stats.view()
    }

    /// Puts `req` in the mailbox now (or parks it while the mailbox is full) and
    /// returns the future of the answer.
    fn post<Q: Request>(
        &self,
        req: Q,
    ) -> Result<impl Future<Output = Result<Q::Reply, TwinError>> + use<Q>, TwinError> {
        let stats = &self.slot.stats;
        let Some(request) = self.slot.with_addr(|a| a.send(Ask(req))) else {
            return Err(self.gone());
        };
        stats.enqueued();
        let slot = self.slot.clone();
        Ok(async move {
            let answered = async {
                match request.await {
                    Ok(Ok(answered)) => match answered.finish(&slot) {
                        Ok(reply) => Ok(Ok(reply)),
                        Err(flushed) => Ok(flushed.await),
                    },
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(e) => Err(e),
                }
            };
            match deliver(answered, &slot.stats, &slot.ty.infra).await {
                Err(TwinError::Unavailable { .. }) => Err(TwinHandle { slot }.gone()),
                r => r,
            }
        })
    }

    /// Why the twin cannot take a request: a retired (deleted) twin is gone for good
    /// (404), any other state is transient (503).
    fn gone(&self) -> TwinError {
        match self.slot.stats.status() {
            ActorStatus::Stopped => TwinError::NotFound(self.slot.id.to_string()),
            status => TwinError::Unavailable { kind: "twin", id: self.slot.id.to_string(), status },
        }
    }

    pub(crate) async fn request<Q: Request>(&self, req: Q) -> Result<Q::Reply, TwinError> {
        self.post(req)?.await
    }

    pub async fn get(&self) -> Result<TwinView, TwinError> {
        self.request(Get).await
    }

    /// Its current (or last) app install, without the rest of its view.
    pub async fn install(&self) -> Result<Option<twinfleet_models::install::InstallJob>, TwinError> {
        self.request(crate::dti::InstallOf).await
    }

    /// Its effective monitoring rules: each with the layer that set it last and its
    /// phase, and the rules that do not resolve.
    pub async fn rules(&self) -> Result<crate::dti::monitor::RulesView, TwinError> {
        self.request(crate::dti::Rules).await
    }

    /// Applies a command; resolves with the journal sequence number once it is durable.
    pub async fn command(&self, cmd: TwinCommand) -> Result<u64, TwinError> {
        self.request(Command(cmd, WriteBatch::new())).await
    }

    /// Like `command`, and stores `audit` (its id set) in the same atomic batch as the
    /// change, only if the twin accepts the command: the change and the entry that
    /// describes it are durable together, after one flush.
    pub async fn command_audited(&self, cmd: TwinCommand, audit: &AuditEntry) -> Result<u64, TwinError> {
        self.request(Command(cmd, AccessControl::audit_batch(audit))).await
    }

    /// Like `command`, but fails at once with `MailboxFull` instead of waiting for room.
    /// The command is in the mailbox when this returns `Ok`.
    pub fn try_command(
        &self,
        cmd: TwinCommand,
    ) -> Result<impl Future<Output = Result<u64, TwinError>> + use<>, TwinError> {
        if self.slot.stats.mailbox_depth() as usize >= self.slot.ty.infra.settings.dti_mailbox {
            return Err(TwinError::MailboxFull(self.slot.id.to_string()));
        }
        self.post(Command(cmd, WriteBatch::new()))
    }

    pub async fn report(&self, patch: Map<String, Value>) -> Result<u64, TwinError> {
        self.command(TwinCommand::Report(patch)).await
    }

    pub async fn set_desired(&self, patch: Map<String, Value>) -> Result<u64, TwinError> {
        self.command(TwinCommand::SetDesired(patch)).await
    }

    /// Records the device's answer to command `command_id` (its decimal form, as on the
    /// wire). An id the twin never minted, or no longer awaits, is refused with
    /// `Rejected(UnmatchedAck)` and changes nothing.
    pub async fn ack(&self, command_id: String, success: bool, message: String) -> Result<u64, TwinError> {
        self.command(TwinCommand::Ack { command_id, success, message }).await
    }

    /// The last `limit` journal events, oldest first.
    pub async fn events(&self, limit: usize) -> Result<Vec<TwinEvent>, TwinError> {
        self.request(Events(limit)).await
    }

    /// Stores a telemetry batch like [`TwinHandle::telemetry`], written together with
    /// the batches other twins of its type and arbiter receive meanwhile (one mailbox
    /// message per twin on its own arbiter, one sled batch and one series submission
    /// per drain; `dti::ingest`). Resolves with the number of points once durable.
    pub async fn ingest(&self, points: Vec<MetricPoint>) -> Result<usize, TwinError> {
        crate::dti::ingest::ingest(&self.slot, points).await
    }

    /// Stores a telemetry batch (accepted or rejected whole); resolves with the number
    /// of points once they are durable.
    pub async fn telemetry(&self, points: Vec<MetricPoint>) -> Result<usize, TwinError> {
        self.request(Telemetry(points)).await
    }

    /// Stores app log lines (accepted or rejected whole, through the twin, so an
    /// archived or deleted twin takes none); resolves with their number once durable.
    pub async fn append_logs(&self, lines: Vec<twinfleet_models::LogLine>) -> Result<usize, TwinError> {
        self.request(crate::dti::AppendLogs(lines)).await
    }

    /// One page of the twin's app log lines, newest first, read from storage on the
    /// blocking pool (not through the twin), like [`TwinHandle::telemetry_page`].
    pub async fn logs_page(&self, q: crate::logs::LogQuery) -> Result<crate::logs::LogPage, TwinError> {
        if let Some(c) = &q.cursor
            && crate::logs::parse_cursor(c).is_none()
        {
            return Err(TwinError::Invalid(format!("cursor {c:?} is not a page's next")));
        }
        let storage = self.slot.ty.infra.storage.clone();
        let id = self.slot.id.clone();
        tokio::task::spawn_blocking(move || crate::logs::read_page(&*storage, &id, &q))
            .await
            .map_err(|e| TwinError::Invalid(format!("log read failed: {e}")))?
            .map_err(TwinError::from)
    }

    /// Stored points, newest first: the first page of [`TwinHandle::telemetry_page`].
    pub async fn telemetry_query(&self, q: TelemetryQuery) -> Result<Vec<MetricPoint>, TwinError> {
        Ok(self.telemetry_page(q).await?.points)
    }

    /// One page of stored points, newest first, read from storage on the blocking pool:
    /// the twin's mailbox and arbiter are not involved, so a long read holds up no
    /// twin. It sees every point this twin acknowledged before (a point is in the
    /// series store's heads before its write is acknowledged).
    pub async fn telemetry_page(&self, q: TelemetryQuery) -> Result<TelemetryPage, TwinError> {
        let infra = &self.slot.ty.infra;
        let (storage, series) = (infra.storage.clone(), infra.series.clone());
        let ns = self.slot.ty.device_type.to_string();
        let id = self.slot.id.clone();
        tokio::task::spawn_blocking(move || crate::telemetry::read_page(&series, &*storage, &ns, &id, &q))
            .await
            .map_err(|e| TwinError::Invalid(format!("telemetry read failed: {e}")))?
            .map_err(TwinError::from)
    }

    /// The query's metrics downsampled into buckets of `width_ms` (min, max, avg, last,
    /// count), oldest first, read from storage on the blocking pool like
    /// [`TwinHandle::telemetry_page`]. At most [`crate::telemetry::MAX_BUCKETS`] buckets
    /// per metric (`(to - from) / width_ms`); more is an `Invalid` error.
    pub async fn telemetry_buckets(
        &self,
        q: TelemetryQuery,
        width_ms: i64,
    ) -> Result<Vec<crate::telemetry::MetricBuckets>, TwinError> {
        use crate::telemetry::MAX_BUCKETS;
        if width_ms < 1 {
            return Err(TwinError::Invalid(format!("a bucket is at least 1 ms wide, not {width_ms}")));
        }
        if q.to.0.saturating_sub(q.from.0) / width_ms >= MAX_BUCKETS {
            return Err(TwinError::Invalid(format!(
                "{} ms in buckets of {width_ms} ms is more than {MAX_BUCKETS} buckets; ask for wider buckets or a shorter range",
                q.to.0.saturating_sub(q.from.0)
            )));
        }
        let infra = &self.slot.ty.infra;
        let (storage, series) = (infra.storage.clone(), infra.series.clone());
        let ns = self.slot.ty.device_type.to_string();
        let id = self.slot.id.clone();
        tokio::task::spawn_blocking(move || crate::telemetry::read_buckets(&series, &*storage, &ns, &id, &q, width_ms))
            .await
            .map_err(|e| TwinError::Invalid(format!("telemetry read failed: {e}")))?
            .map_err(TwinError::from)
    }

    /// Sends a command to the device through whichever transport reaches it (MQTT
    /// publish, gRPC command stream or a call to its DeviceControl server). The twin
    /// mints the command's id and journals it (`command_sent`) before the transport gets
    /// it; resolves with that id once the transport has it. The device's answer arrives
    /// as a `command_acked` event, over any transport, after a restart too.
    pub async fn send_to_device(&self, cmd: DeviceCommand) -> Result<CommandId, TwinError> {
        self.request(ToDevice(cmd)).await
    }

    pub(crate) fn slot(&self) -> &Arc<TwinSlot> {
        &self.slot
    }

    /// Stops the twin for good, after everything queued before (see `delete_twin`).
    pub(crate) async fn retire(&self) -> Result<(), TwinError> {
        self.request(Retire).await
    }

    /// Makes the twin panic (only where the platform allows fault injection).
    pub async fn inject_panic(&self) -> Result<(), TwinError> {
        self.request(InjectPanic).await
    }
}
