//! Telemetry ingest batched across twins (the packed path of the gateways).
//!
//! A gateway hands a device's points to `TwinHandle::ingest`. Instead of one mailbox
//! round trip and one write per message, the points wait in a queue of the twin's
//! device type and arbiter; the first point into an empty queue schedules one drain on that arbiter (one
//! cross-thread hop for everything queued meanwhile). The drain hands each twin its
//! points there (a local mailbox message: the twin still sees every point and keeps its
//! latest values), then writes what all of them prepared as **one** sled batch and
//! **one** series-store submission, and answers every caller once both are durable.
//! While a drain runs, the next points queue up for the next one: the batch grows with
//! the load, without a timer.

use super::{Answered, Ask, Prepare, Reload, TwinSlot, TypeContext};
use crate::error::TwinError;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::AcqRel};
use tokio::sync::oneshot;
use twinfleet_models::MetricPoint;
use twinfleet_runtime::WriteBatch;
use twinfleet_runtime::series::SeriesBatch;

struct Item {
    slot: Arc<TwinSlot>,
    points: Vec<MetricPoint>,
    done: Done,
}

/// Where a caller waits for its answer: its oneshot, and the answer hub of the caller's
/// thread where it has one.
struct Done {
    tx: oneshot::Sender<Result<usize, TwinError>>,
    hub: Option<Hub>,
}

impl Done {
    /// Answers now (errors, and callers without a hub).
    fn send(self, r: Result<usize, TwinError>) {
        let _ = self.tx.send(r);
    }
}

/// Answers for the callers on one thread, handed over together.
type Answers = Vec<(oneshot::Sender<Result<usize, TwinError>>, Result<usize, TwinError>)>;
type Hub = tokio::sync::mpsc::UnboundedSender<Answers>;

thread_local! {
    static HUB: std::cell::RefCell<Option<Hub>> = const { std::cell::RefCell::new(None) };
}

/// The calling thread's answer hub, where the thread runs a single-threaded runtime (an
/// actix arbiter: the gateways' connections run on one): a task there that completes, on its own thread, the
/// answers a drain sends it in one message. Answering each caller straight from the
/// drain's thread woke the caller's thread once per message (an `eventfd` write and an
/// `epoll` return each, ~40,000 a second in the gRPC bench); this wakes it once per
/// drain, and the callers it completes are woken as local tasks. `None` elsewhere (a
/// caller on a multi-threaded runtime is answered directly).
fn local_hub() -> Option<Hub> {
    HUB.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(hub) = h.as_ref().filter(|hub| !hub.is_closed()) {
            return Some(hub.clone());
        }
        // A thread that runs its own tasks: an actix arbiter's (a connection task of a
        // gateway may be outside the arbiter's `LocalSet`, so it is a plain spawn).
        let rt = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answers>();
        rt.spawn(async move {
            while let Some(answers) = rx.recv().await {
                for (done, r) in answers {
                    let _ = done.send(r);
                }
            }
        });
        *h = Some(tx.clone());
        Some(tx)
    })
}

/// Answers many callers: those of each hub in one message to it, the rest directly.
fn answer_all(answers: impl IntoIterator<Item = (Done, Result<usize, TwinError>)>) {
    let mut hubs: Vec<(Hub, Answers)> = Vec::new();
    for (done, r) in answers {
        match done.hub {
            Some(hub) => match hubs.iter_mut().find(|(h, _)| h.same_channel(&hub)) {
                Some((_, list)) => list.push((done.tx, r)),
                None => hubs.push((hub, vec![(done.tx, r)])),
            },
            None => {
                let _ = done.tx.send(r);
            }
        }
    }
    for (hub, list) in hubs {
        // A hub whose thread has stopped: its callers are answered from here.
        if let Err(tokio::sync::mpsc::error::SendError(list)) = hub.send(list) {
            for (tx, r) in list {
                let _ = tx.send(r);
            }
        }
    }
}

/// One queue per arbiter (of one device type: `TypeContext::ingest`).
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

/// Why a twin cannot take its points now: a retired (deleted) twin is gone for good,
/// any other state is transient.
fn gone(slot: &TwinSlot) -> TwinError {
    match slot.stats.status() {
        twinfleet_runtime::ActorStatus::Stopped => TwinError::NotFound(slot.id.to_string()),
        status => TwinError::Unavailable { kind: "twin", id: slot.id.to_string(), status },
    }
}

/// Takes what is queued for arbiter `i` (on that arbiter) and writes it as one batch.
fn drain(ty: Arc<TypeContext>, i: usize) {
    let (queue, scheduled) = &ty.ingest.queues[i];
    scheduled.store(false, std::sync::atomic::Ordering::Release);
    // The next queue starts with room for as many as this one holds (not grown from
    // nothing, one reallocation after another, under the lock).
    let items = {
        let mut q = queue.lock();
        let room = q.len();
        std::mem::replace(&mut *q, Vec::with_capacity(room))
    };
    if items.is_empty() {
        return;
    }
    let infra2 = ty.infra.clone();
    actix_rt::spawn(async move {
        // Every message goes into its twin's mailbox first; then their answers.
        let asked: Vec<_> = items
            .into_iter()
            .map(|it| {
                let ask = it.slot.with_addr(|a| a.send(Ask::new(Prepare(it.points), &it.slot)));
                (it.slot, it.done, ask)
            })
            .collect();
        let mut batch = WriteBatch::new();
        let mut series = SeriesBatch::new();
        let count = asked.len();
        let mut waiting = Vec::with_capacity(asked.len());
        for (slot, done, ask) in asked {
            let Some(ask) = ask else {
                done.send(Err(gone(&slot)));
                continue;
            };
            match ask.await {
                Ok(Ok(Answered::Ready(p))) => {
                    batch.append(p.batch);
                    if series.is_empty() {
                        // Room for every twin's batch, guessed from the first one's size.
                        series = infra2.series.batch(p.series.bytes_len() * count + 1024);
                    }
                    series.append(&p.series);
                    waiting.push((slot, done, p.points, p.snapshot));
                }
                Ok(Ok(Answered::AfterFlush { .. })) => {
                    done.send(Err(TwinError::Invalid("a prepared batch is not written by its twin".into())));
                }
                Ok(Err(e)) => {
                    done.send(Err(e));
                }
                Err(_) => {
                    done.send(Err(gone(&slot)));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        let history = infra2.series.submit_batch(series);
        let stored = super::submit_unless_empty(&*infra2.storage, batch).and_series(history).await;
        answer_all(waiting.into_iter().map(|(slot, done, n, snapshot)| match &stored {
            Ok(()) => {
                if let Some(seq) = snapshot {
                    slot.snapshot_stored(seq);
                }
                (done, Ok(n))
            }
            Err(e) => {
                // The twin holds latest values that are not on disk: it restarts from
                // storage.
                slot.with_addr(|a| a.do_send(Reload(e.to_string())));
                (done, Err(e.clone().into()))
            }
        }));
    });
}

/// Queues a twin's points for the next drain of its arbiter and waits for the answer
/// (see the module documentation): the number of points, once they are durable.
pub(crate) async fn ingest(slot: &Arc<TwinSlot>, points: Vec<MetricPoint>) -> Result<usize, TwinError> {
    let ty = slot.ty.clone();
    let infra = ty.infra.clone();
    let n = ty.ingest.queues.len().max(1);
    let i = slot.arbiter as usize % n;
    let (tx, rx) = oneshot::channel();
    let Some((queue, scheduled)) = ty.ingest.queues.get(i) else {
        return Err(gone(slot));
    };
    let done = Done { tx, hub: local_hub() };
    queue.lock().push(Item { slot: slot.clone(), points, done });
    if !scheduled.swap(true, AcqRel) {
        let ty2 = ty.clone();
        if !infra.arbiters.run_on(i, move || drain(ty2, i)) {
            scheduled.store(false, std::sync::atomic::Ordering::Release);
            return Err(gone(slot));
        }
    }
    let ms = infra.settings.request_timeout_ms;
    match futures::future::select(rx, infra.clock.sleep(ms)).await {
        futures::future::Either::Left((Ok(r), _)) => r,
        futures::future::Either::Left((Err(_), _)) => Err(gone(slot)),
        futures::future::Either::Right(_) => Err(TwinError::Timeout { kind: "twin", id: slot.id.to_string(), ms }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(hub: Option<&Hub>) -> (Done, oneshot::Receiver<Result<usize, TwinError>>) {
        let (tx, rx) = oneshot::channel();
        (Done { tx, hub: hub.cloned() }, rx)
    }

    #[test]
    fn a_hub_gets_its_callers_answers_in_one_message_and_a_stopped_hub_s_callers_are_answered_directly() {
        let (live, mut live_rx) = tokio::sync::mpsc::unbounded_channel::<Answers>();
        let (stopped, stopped_rx) = tokio::sync::mpsc::unbounded_channel::<Answers>();
        drop(stopped_rx);
        let (a, mut a_rx) = caller(Some(&live));
        let (b, mut b_rx) = caller(Some(&live));
        let (c, mut c_rx) = caller(Some(&stopped));
        let (d, mut d_rx) = caller(None);
        answer_all([(a, Ok(1)), (b, Ok(2)), (c, Ok(3)), (d, Ok(4))]);
        // The live hub's two callers: one message, not answered yet (the hub does that).
        let list = live_rx.try_recv().expect("one message for the live hub");
        assert_eq!(list.len(), 2);
        assert!(live_rx.try_recv().is_err(), "only one");
        assert!(a_rx.try_recv().is_err() && b_rx.try_recv().is_err());
        for (tx, r) in list {
            let _ = tx.send(r);
        }
        assert_eq!((a_rx.try_recv().unwrap().unwrap(), b_rx.try_recv().unwrap().unwrap()), (1, 2));
        // The stopped hub's caller and the caller without a hub: answered at once.
        assert_eq!(c_rx.try_recv().unwrap().unwrap(), 3);
        assert_eq!(d_rx.try_recv().unwrap().unwrap(), 4);
    }
}
