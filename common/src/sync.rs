//! Locking shared in-memory state.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poisoning. For the maps, counters and snapshots
/// chatq keeps under a std mutex: each update is a single insert, remove or
/// assignment, so a holder that panicked cannot have left them half-written.
/// Never await while holding the guard.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
