//! Poison-tolerant lock helpers. A panic while a lock was held must not take the gateway down
//! with it: every holder here leaves the data consistent between statements, so the next user
//! simply takes the lock's contents as they are.

use std::sync::{Mutex, MutexGuard, RwLock};

/// Locks `m`, ignoring poisoning.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A clone of what `l` holds (for `Arc`s: a cheap snapshot), ignoring poisoning.
pub fn snapshot<T: Clone>(l: &RwLock<T>) -> T {
    l.read()
        .map(|v| v.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
}

/// Replaces what `l` holds, ignoring poisoning.
pub fn replace<T>(l: &RwLock<T>, value: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = value;
}
