//! Files (coze-api.md §5).
//!
//! - `POST /v1/files/upload`: `multipart/form-data` with exactly one part named `file`
//!   (none → 4300, more than one → 4301) → `data: {id, bytes, file_name, created_at}`.
//! - `GET /v1/files/retrieve?file_id=` → the same File object (4200 if unknown).
//!
//! Only metadata is kept; contents are discarded after counting (there is no download API).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::auth::now_unix;
use crate::conversations::prelude;
use crate::envelope::{self, ApiError, ApiResult};
use crate::state::{SandboxState, lock};

/// Request body limit of multipart uploads (files and ASR).
pub const UPLOAD_LIMIT: usize = 64 * 1024 * 1024;

/// An uploaded file's metadata.
#[derive(Clone, Debug, Serialize)]
pub struct FileInfo {
    pub id: String,
    pub bytes: u64,
    pub file_name: String,
    pub created_at: u64,
}

/// In-memory state of this module.
#[derive(Debug, Default)]
pub struct Store {
    pub files: HashMap<String, FileInfo>,
}

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route(
            "/v1/files/upload",
            post(upload).layer(axum::extract::DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/v1/files/retrieve", get(retrieve))
}

/// Reads the parts named `file` of a multipart body: (file name, contents) each.
pub(crate) async fn file_parts(
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Vec<(String, axum::body::Bytes)>, ApiError> {
    let mut mp =
        mp.map_err(|e| ApiError::bad_request(format!("expected multipart/form-data: {e}")))?;
    let mut out = Vec::new();
    loop {
        let field = mp.next_field().await.map_err(|e| {
            ApiError::new(StatusCode::OK, 4304, format!("invalid multipart body: {e}"))
        })?;
        let Some(field) = field else { break };
        if field.name() != Some("file") {
            continue;
        }
        let name = field.file_name().unwrap_or("file").to_owned();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::new(StatusCode::OK, 4304, format!("invalid file part: {e}")))?;
        out.push((name, data));
    }
    Ok(out)
}

/// Exactly one `file` part, else 4300 / 4301.
pub(crate) fn exactly_one(
    mut parts: Vec<(String, axum::body::Bytes)>,
) -> Result<(String, axum::body::Bytes), ApiError> {
    match parts.len() {
        0 => Err(ApiError::new(StatusCode::OK, 4300, "no file uploaded")),
        1 => parts.pop().ok_or_else(|| ApiError::internal("unreachable")),
        _ => Err(ApiError::new(
            StatusCode::OK,
            4301,
            "only one file may be uploaded",
        )),
    }
}

async fn upload(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let (name, data) = exactly_one(file_parts(mp).await?)?;
    let info = FileInfo {
        id: st.next_id(),
        bytes: data.len() as u64,
        file_name: name,
        created_at: now_unix(),
    };
    lock(&st.files).files.insert(info.id.clone(), info.clone());
    Ok(envelope::ok(
        serde_json::to_value(&info).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
struct FileQuery {
    file_id: Option<String>,
}

async fn retrieve(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(fq): Query<FileQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let id = fq
        .file_id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("file_id is required"))?;
    let info = lock(&st.files)
        .files
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("file {id} not found")))?;
    Ok(envelope::ok(
        serde_json::to_value(&info).unwrap_or_default(),
    ))
}
