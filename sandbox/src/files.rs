//! TODO(sandbox): see the issue; filled in by the module owner.

use std::sync::Arc;

use axum::Router;

use crate::state::SandboxState;

/// In-memory state of this module.
#[derive(Debug, Default)]
pub struct Store {}

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
}
