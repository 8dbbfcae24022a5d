//! Telemetry ingest batched across twins (the packed path of the gateways).
//!
//! A gateway hands a device's points to [`TwinHandle::ingest`]. Instead of one mailbox
//! round trip and one write per message, the points wait in a queue of the twin's
//! arbiter; the first point into an empty queue schedules one drain on that arbiter (one
//! cross-thread hop for everything queued meanwhile). The drain hands each twin its
//! points there (a local mailbox message: the twin still sees every point and keeps its
//! latest values), then writes what all of them prepared as **one** sled batch and
//! **one** series-store submission, and answers every caller once both are durable.
//! While a drain runs, the next points queue up for the next one: the batch grows with
//! the load, without a timer.

use crate::context::Infra;
use crate::dti::{Answered, Ask, Prepare, Reload, TwinSlot};
use crate::error::TwinError;
use crate::handle::TwinHandle;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::AcqRel};
use tokio::sync::oneshot;
use twinfleet_models::MetricPoint;
use twinfleet_runtime::WriteBatch;

struct Item {
    slot: Arc<TwinSlot>,
    points: Vec<MetricPoint>,
    done: oneshot::Sender<Result<usize, TwinError>>,
}

/// One queue per arbiter.
#[derive(Default)]
pub(crate) struct IngestQueues {
    queues: Vec<(Mutex<Vec<Item>>, AtomicBool)>,
}

impl std::fmt::Debug for IngestQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestQueues").field("arbiters", &self.queues.len()).finish()
    }
}

impl IngestQueues {
    pub(crate) fn new(arbiters: usize) -> Self {
        IngestQueues { queues: (0..arbiters).map(|_| (Mutex::new(Vec::new()), AtomicBool::new(false))).collect() }
    }
}

/// Takes what is queued for arbiter `i` (on that arbiter) and writes it as one batch.
fn drain(infra: Arc<Infra>, i: usize) {
    let (queue, scheduled) = &infra.ingest.queues[i];
    scheduled.store(false, std::sync::atomic::Ordering::Release);
    let items = std::mem::take(&mut *queue.lock());
    if items.is_empty() {
        return;
    }
    let infra2 = infra.clone();
    actix_rt::spawn(async move {
        // Every message goes into its twin's mailbox first; then their answers.
        let asked: Vec<_> = items
            .into_iter()
            .map(|it| {
                let ask = it.slot.with_addr(|a| a.send(Ask(Prepare(it.points))));
                (it.slot, it.done, ask)
            })
            .collect();
        let mut batch = WriteBatch::new();
        let mut series = Vec::new();
        let mut waiting = Vec::with_capacity(asked.len());
        for (slot, done, ask) in asked {
            let Some(ask) = ask else {
                let _ = done.send(Err(TwinHandle::new(slot).gone()));
                continue;
            };
            match ask.await {
                Ok(Ok(Answered::Ready(p))) => {
                    batch.append(p.batch);
                    series.extend(p.series);
                    waiting.push((slot, done, p.points));
                }
                Ok(Ok(Answered::AfterFlush { .. })) => {
                    let _ = done.send(Err(TwinError::Invalid("a prepared batch is not written by its twin".into())));
                }
                Ok(Err(e)) => {
                    let _ = done.send(Err(e));
                }
                Err(_) => {
                    let _ = done.send(Err(TwinHandle::new(slot).gone()));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        let history = infra2.series.submit(series);
        let stored = infra2.storage.submit(batch).and_series(history).await;
        for (slot, done, n) in waiting {
            match &stored {
                Ok(()) => drop(done.send(Ok(n))),
                Err(e) => {
                    // The twin holds latest values that are not on disk: it restarts
                    // from storage.
                    slot.with_addr(|a| a.do_send(Reload(e.to_string())));
                    let _ = done.send(Err(e.clone().into()));
                }
            }
        }
    });
}

impl TwinHandle {
    /// Stores a telemetry batch like [`TwinHandle::telemetry`], written together with
    /// the batches other twins of the same arbiter receive meanwhile (see the module
    /// documentation). Resolves with the number of points once they are durable.
    pub async fn ingest(&self, points: Vec<MetricPoint>) -> Result<usize, TwinError> {
        let slot = self.slot();
        let infra = slot.ty.infra.clone();
        let i = slot.arbiter as usize % infra.ingest.queues.len().max(1);
        let (done, rx) = oneshot::channel();
        let Some((queue, scheduled)) = infra.ingest.queues.get(i) else {
            return self.telemetry(points).await;
        };
        queue.lock().push(Item { slot: slot.clone(), points, done });
        if !scheduled.swap(true, AcqRel) {
            let infra2 = infra.clone();
            if !infra.arbiters.run_on(i, move || drain(infra2, i)) {
                scheduled.store(false, std::sync::atomic::Ordering::Release);
                return Err(TwinError::Unavailable {
                    kind: "twin",
                    id: self.id().to_string(),
                    status: slot.stats.status(),
                });
            }
        }
        let ms = infra.settings.request_timeout_ms;
        match futures::future::select(rx, infra.clock.sleep(ms)).await {
            futures::future::Either::Left((Ok(r), _)) => r,
            futures::future::Either::Left((Err(_), _)) => Err(self.gone()),
            futures::future::Either::Right(_) => {
                Err(TwinError::Timeout { kind: "twin", id: self.id().to_string(), ms })
            }
        }
    }
}
