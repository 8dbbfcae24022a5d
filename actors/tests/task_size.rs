//! A running twin is one tokio task whose future is actix's `ContextFut<Dti, _>` (the
//! actor, its context and mailbox receiver). tokio allocates the task as one cell: a
//! header, the future, a trailer, aligned to 128 bytes on x86_64. mimalloc serves
//! 128-aligned requests from its size class directly only when that class is a power of
//! two (1,024 bytes here); a cell of 1,152 bytes is over-allocated into the 1,280-byte
//! class. A million mostly idle twins pay that class: this test fails when the cell of a
//! running twin outgrows 1,024 bytes (measured: 1,152 bytes took ~256 bytes more RSS per
//! twin and the allocator's slow aligned path; BENCHMARKS.md, seventh session).

#![allow(unsafe_code)] // a global allocator that records what tokio asks for

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// While `WATCHING`, records the largest allocation made (tokio's task cell, when a
/// task is spawned).
struct Tracking;

static WATCHING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.load(Ordering::SeqCst) {
            LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        }
        // Safety: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Safety: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// A future of `N` + 1 eight-byte words, done at once. Like the twin's future it is
/// aligned to 8 and has a niche (the non-zero word), so tokio's `Stage` enum around it
/// needs no tag of its own: its cell is the twin's.
struct Sized<const N: usize>([u64; N], std::num::NonZeroU64);

impl<const N: usize> Future for Sized<N> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        std::hint::black_box((&self.0, self.1));
        Poll::Ready(())
    }
}

/// The size of the cell tokio allocates for a future of `N` + 1 words.
fn cell_bytes<const N: usize>() -> usize {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        LARGEST.store(0, Ordering::SeqCst);
        WATCHING.store(true, Ordering::SeqCst);
        let task = tokio::task::spawn_local(Sized::<N>([0; N], std::num::NonZeroU64::MIN));
        WATCHING.store(false, Ordering::SeqCst);
        let size = LARGEST.load(Ordering::SeqCst);
        task.await.unwrap();
        size
    })
}

const TWIN: usize = twinfleet_actors::dti::RUNNING_TWIN_BYTES;

#[test]
fn a_running_twin_is_a_task_of_1024_bytes() {
    assert_eq!(TWIN % 8, 0);
    assert_eq!(std::mem::size_of::<Sized<{ TWIN / 8 - 1 }>>(), TWIN);
    assert_eq!(std::mem::size_of::<Option<Sized<{ TWIN / 8 - 1 }>>>(), TWIN, "the stand-in has a niche");
    let cell = cell_bytes::<{ TWIN / 8 - 1 }>();
    assert!(cell > TWIN, "the allocation of tokio's task cell was not seen ({cell} bytes)");
    assert!(
        cell <= 1024,
        "a running twin's task takes {cell} bytes (its future {TWIN}), over mimalloc's 1,024-byte class"
    );
}
