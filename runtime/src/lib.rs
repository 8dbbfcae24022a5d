//! Actor plumbing of twinfleet, with no domain types: the clock (real or virtual), the
//! storage trait and its sled engine with group commit, record encoding with checksums,
//! the per-actor statistics the inspection tree shows, the measurements /metrics shows, the arbiter pool the twins are
//! spread over, the alert sink and the data-directory lock.
//!
//! Decision guide: a twin's logic lives in `twinfleet-models`; the actor that runs it
//! lives in `twinfleet-actors`; anything here is reusable by any actor and knows nothing
//! about twins.

pub mod alerts;
pub mod arbiters;
pub mod clock;
pub mod codec;
pub mod lock;
pub mod metrics;
pub mod panic;
pub mod rejections;
pub mod series;
pub mod stats;
pub mod storage;

pub use alerts::AlertSink;
pub use arbiters::ArbiterPool;
pub use clock::{Clock, SharedClock, SystemClock, VirtualClock};
pub use codec::{CodecError, decode_record, encode_record};
pub use lock::{DataDirLock, LockError};
pub use metrics::{Edge, Exposition, Histogram, HistogramView, RequestMetrics};
pub use rejections::Rejections;
pub use stats::{ActorStats, ActorStatus, ActorView};
pub use storage::{
    PAGE_PART_BYTES, SledOptions, SledStorage, Space, Storage, StorageError, StorageStats, Ticket, WriteBatch, page_id,
    page_items, page_key,
};
