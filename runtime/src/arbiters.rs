//! The worker threads the twins live on: one actix arbiter per core. Which arbiter a
//! twin lives on is the caller's choice (the TDTA deals fleet records round-robin and
//! remembers each twin's arbiter, so a restarted twin comes back on the same thread).

use std::fmt;

pub struct ArbiterPool {
    handles: Vec<actix::ArbiterHandle>,
    arbiters: parking_lot::Mutex<Vec<actix::Arbiter>>,
}

impl fmt::Debug for ArbiterPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArbiterPool").field("arbiters", &self.handles.len()).finish()
    }
}

impl ArbiterPool {
    /// Starts `n` arbiters (at least one). Must be called inside an actix system.
    pub fn new(n: usize) -> Self {
        let arbiters: Vec<actix::Arbiter> = (0..n.max(1)).map(|_| actix::Arbiter::new()).collect();
        ArbiterPool {
            handles: arbiters.iter().map(|a| a.handle()).collect(),
            arbiters: parking_lot::Mutex::new(arbiters),
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `f` on arbiter `i`. Batch work into one call per arbiter: a cross-thread hop
    /// costs tens of microseconds.
    pub fn run_on(&self, i: usize, f: impl FnOnce() + Send + 'static) -> bool {
        self.handles[i].spawn_fn(f)
    }

    /// Stops every arbiter and waits for its thread.
    pub fn stop(&self) {
        let arbiters = std::mem::take(&mut *self.arbiters.lock());
        for a in &arbiters {
            a.stop();
        }
        for a in arbiters {
            let _ = a.join();
        }
    }
}

/// Lowers the calling thread's scheduling priority to nice `nice` (Linux: per thread;
/// raising it back needs privileges). For threads whose work must yield to the twins
/// and the operational gateways under load, such as the provisioning listener during a
/// claim flood.
#[allow(unsafe_code)]
pub fn lower_thread_priority(nice: i32) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take and return plain integers.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error().to_string()) }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        Err("thread priorities are set on Linux only".into())
    }
}
