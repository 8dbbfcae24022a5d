//! The process's memory settings that the `twinfleet` binary applies at its start.
//!
//! **Transparent huge pages are off for the process.** mimalloc asks the kernel for
//! transparent huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), so the first touch of
//! a fresh or purged region zeroes a whole 2 MiB page, and mimalloc's purges of freed
//! memory split them again. Measured on the 2-core benchmark machine (BENCHMARKS.md,
//! "Transparent huge pages off in the binary"): with them off, spawning 1M twins is ~40%
//! faster, MQTT ingest spends 8–17% less CPU per message, and a restart of 1M twins in
//! a new process is steadier and no slower (the huge-page faults there cost 0.4–5.8 s of
//! system time by run, against ~1.4 s for small pages). The price: requests spread at
//! random over a million resident twins lose 10–30% to TLB misses. Setting
//! `MIMALLOC_ALLOW_THP` in the environment (to any value) leaves the kernel's and
//! mimalloc's choice in place.

/// Turns transparent huge pages off for this process and the processes it starts
/// (`prctl(PR_SET_THP_DISABLE)`), unless `MIMALLOC_ALLOW_THP` is set. Returns whether it
/// did; an error if the kernel refused (the process then runs as before).
pub fn disable_transparent_huge_pages() -> std::io::Result<bool> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    {
        #[allow(unsafe_code)]
        // Safety: PR_SET_THP_DISABLE takes integer arguments only and changes a flag of
        // this process's memory map; no pointer is passed.
        let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(false)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_runs_without_transparent_huge_pages_afterwards() {
        // The test binary is a process of its own: the flag stays set for its other tests,
        // which do not depend on page sizes.
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            eprintln!("skipped: MIMALLOC_ALLOW_THP is set, so the setting is left alone by design");
            return;
        }
        assert!(super::disable_transparent_huge_pages().unwrap());
        #[allow(unsafe_code)]
        // Safety: PR_GET_THP_DISABLE takes no pointer and only reads the flag.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1);
    }
}
