//! The WebSocket APIs: `/v1/chat`, `/v1/audio/speech`, `/v1/audio/transcriptions`.
//! TODO(sandbox-ws): filled in by the module owner.

use std::sync::Arc;

use axum::Router;

use crate::state::SandboxState;

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
}
