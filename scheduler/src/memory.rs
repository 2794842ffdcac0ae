//! The process's memory as glibc's allocator keeps it: how many arenas, and when freed pages go
//! back to the system.

/// Bounds glibc's malloc to two arenas (unless `MALLOC_ARENA_MAX` says otherwise). glibc gives
/// each thread that allocates an arena of its own, up to eight per core, and the scheduler runs
/// some forty threads, most of them librdkafka's, which allocate buffers that other threads
/// free: every arena kept its own peak. Call it first in `main`, before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; called before other threads run.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Hands the pages of freed memory back to the system (glibc's `malloc_trim`). glibc keeps what a
/// burst of work freed mapped for the next one: after filing a million records at full speed the
/// process stayed at about 60 MiB resident with nothing held, against 20 MiB before. The engine
/// calls it once the process has gone quiet (the committer's `Trimmer` decides when).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}
