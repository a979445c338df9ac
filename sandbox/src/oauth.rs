//! TODO(sandbox): see the issue; filled in by the module owner.

use std::sync::Arc;

use axum::Router;

use crate::state::SandboxState;

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
}
