//! Conversations and messages (coze-api.md §4).
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /v1/conversation/create` `{bot_id?, name?, messages?, meta_data?, connector_id?}` | `data`: Conversation |
//! | `GET /v1/conversations?bot_id=&page_num=&page_size=&sort_order=` | `data: {has_more, conversations}` |
//! | `GET /v1/conversation/retrieve?conversation_id=` | `data`: Conversation |
//! | `PUT /v1/conversations/{id}` `{name}` | `data`: Conversation |
//! | `DELETE /v1/conversations/{id}` | `data: {}` |
//! | `POST /v1/conversations/{id}/clear` | `data`: Section `{id, conversation_id}` |
//! | `POST /v1/conversation/message/create?conversation_id=` | `data`: Message |
//! | `POST /v1/conversation/message/list?conversation_id=` `{order, chat_id?, before_id?, after_id?, limit}` | top-level `data`, `first_id`, `last_id`, `has_more` |
//! | `GET /v1/conversation/message/retrieve?conversation_id=&message_id=` | `data`: Message |
//! | `POST /v1/conversation/message/modify?conversation_id=&message_id=` | **`message`**: Message |
//! | `POST /v1/conversation/message/delete?conversation_id=&message_id=` | `data`: Message |
//!
//! Sandbox conventions: message-list cursors are relative to the requested `order`
//! (`after_id` = the items that follow that id in this order, which is what cozepy's
//! `LastIDPaged` sends for the next page); an unknown `conversation_id` passed to `/v3/chat`
//! creates that conversation instead of failing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::auth::now_unix;
use crate::envelope::{self, ApiError, ApiResult};
use crate::state::{SandboxState, lock};

/// A conversation.
#[derive(Clone, Debug, Serialize)]
pub struct Conversation {
    pub id: String,
    pub name: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub meta_data: Map<String, Value>,
    pub last_section_id: String,
    pub creator_id: String,
    pub connector_id: String,
    #[serde(skip)]
    pub bot_id: String,
}

/// A chat/conversation message (shared with `chat`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub id: String,
    pub conversation_id: String,
    pub bot_id: String,
    pub chat_id: String,
    pub section_id: String,
    pub role: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
    pub content_type: String,
    pub meta_data: Map<String, Value>,
    pub created_at: u64,
    pub updated_at: u64,
    pub reasoning_content: String,
}

/// Conversations kept in memory; the oldest are forgotten beyond this (load benchmarks
/// create one per chat).
pub const MAX_CONVERSATIONS: usize = 50_000;

/// In-memory state of this module.
#[derive(Debug, Default)]
pub struct Store {
    pub conversations: HashMap<String, Conversation>,
    /// Creation order of conversation ids.
    pub order: VecDeque<String>,
    /// Messages per conversation, oldest first.
    pub messages: HashMap<String, Vec<Message>>,
}

impl Store {
    /// Creates (or returns) a conversation with a given id.
    pub fn ensure(&mut self, st: &SandboxState, id: &str, bot_id: &str) -> Conversation {
        if let Some(c) = self.conversations.get(id) {
            return c.clone();
        }
        let now = now_unix();
        let c = Conversation {
            id: id.to_owned(),
            name: String::new(),
            created_at: now,
            updated_at: now,
            meta_data: Map::new(),
            last_section_id: st.next_id(),
            creator_id: "sandbox".to_owned(),
            connector_id: "1024".to_owned(),
            bot_id: bot_id.to_owned(),
        };
        self.conversations.insert(id.to_owned(), c.clone());
        self.order.push_back(id.to_owned());
        while self.order.len() > MAX_CONVERSATIONS {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.conversations.remove(&old);
            self.messages.remove(&old);
        }
        c
    }

    /// Appends messages to their conversations (missing conversations are skipped).
    pub fn append(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if self.conversations.contains_key(&m.conversation_id) {
                self.messages
                    .entry(m.conversation_id.clone())
                    .or_default()
                    .push(m);
            }
        }
    }
}

pub fn routes() -> Router<Arc<SandboxState>> {
    Router::new()
        .route("/v1/conversation/create", post(create))
        .route("/v1/conversations", get(list))
        .route("/v1/conversation/retrieve", get(retrieve))
        .route(
            "/v1/conversations/{conversation_id}",
            axum::routing::put(update).delete(delete),
        )
        .route("/v1/conversations/{conversation_id}/clear", post(clear))
        .route("/v1/conversation/message/create", post(msg_create))
        .route("/v1/conversation/message/list", post(msg_list))
        .route("/v1/conversation/message/retrieve", get(msg_retrieve))
        .route("/v1/conversation/message/modify", post(msg_modify))
        .route("/v1/conversation/message/delete", post(msg_delete))
}

/// Parses an optional JSON body (empty → `{}`).
pub(crate) fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("JSON body must be an object"));
    }
    Ok(v)
}

pub(crate) fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

pub(crate) fn meta(v: &Value) -> Map<String, Value> {
    v.get("meta_data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn conv_not_found(id: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::OK,
        4002,
        format!("invalid conversation id {id}"),
    )
}

fn msg_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("message {id} not found"))
}

fn to_value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// Builds a stored user/assistant message from an EnterMessage-shaped JSON object.
pub(crate) fn enter_message(
    st: &SandboxState,
    m: &Value,
    conversation_id: &str,
    bot_id: &str,
    chat_id: &str,
    section_id: &str,
) -> Result<Message, ApiError> {
    let role = str_field(m, "role").unwrap_or("user");
    if role != "user" && role != "assistant" {
        return Err(ApiError::bad_request(format!("invalid role {role:?}")));
    }
    let content = m
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("message content is required"))?;
    let default_kind = if role == "user" { "question" } else { "answer" };
    let now = now_unix();
    Ok(Message {
        id: st.next_id(),
        conversation_id: conversation_id.to_owned(),
        bot_id: bot_id.to_owned(),
        chat_id: chat_id.to_owned(),
        section_id: section_id.to_owned(),
        role: role.to_owned(),
        kind: str_field(m, "type").unwrap_or(default_kind).to_owned(),
        content: content.to_owned(),
        content_type: str_field(m, "content_type").unwrap_or("text").to_owned(),
        meta_data: meta(m),
        created_at: now,
        updated_at: now,
        reasoning_content: String::new(),
    })
}

pub(crate) async fn prelude(
    st: &Arc<SandboxState>,
    headers: &HeaderMap,
    q: Option<&str>,
) -> Result<crate::auth::Caller, ApiError> {
    let caller = crate::auth::authenticate(st, headers, q, now_unix())?;
    crate::faults::Fault::from_request(headers, q)
        .before_answer()
        .await?;
    Ok(caller)
}

async fn create(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let name = str_field(&b, "name").unwrap_or("");
    if name.chars().count() > 100 {
        return Err(ApiError::bad_request("name longer than 100 characters"));
    }
    let id = st.next_id();
    let bot_id = str_field(&b, "bot_id").unwrap_or("");
    let mut store = lock(&st.conversations);
    let mut c = store.ensure(&st, &id, bot_id);
    c.name = name.to_owned();
    c.meta_data = meta(&b);
    if let Some(conn) = str_field(&b, "connector_id") {
        c.connector_id = conn.to_owned();
    }
    let mut msgs = Vec::new();
    if let Some(list) = b.get("messages").and_then(Value::as_array) {
        for m in list {
            msgs.push(enter_message(&st, m, &id, bot_id, "", &c.last_section_id)?);
        }
    }
    store.conversations.insert(id.clone(), c.clone());
    store.append(msgs);
    Ok(envelope::ok(to_value(&c)))
}

#[derive(Deserialize)]
struct ListQuery {
    bot_id: Option<String>,
    page_num: Option<usize>,
    page_size: Option<usize>,
    sort_order: Option<String>,
}

async fn list(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(lq): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let bot_id = lq
        .bot_id
        .filter(|b| !b.is_empty())
        .ok_or_else(|| ApiError::bad_request("bot_id is required"))?;
    let page_num = lq.page_num.unwrap_or(1).max(1);
    let page_size = lq.page_size.unwrap_or(50).clamp(1, 50);
    let store = lock(&st.conversations);
    let mut all: Vec<&Conversation> = store
        .order
        .iter()
        .filter_map(|id| store.conversations.get(id))
        .filter(|c| c.bot_id == bot_id)
        .collect();
    if !lq.sort_order.is_some_and(|s| s.eq_ignore_ascii_case("asc")) {
        all.reverse();
    }
    let start = (page_num - 1) * page_size;
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(page_size)
        .map(to_value)
        .collect();
    let has_more = all.len() > start + page_size;
    Ok(envelope::ok(
        json!({"has_more": has_more, "conversations": page}),
    ))
}

#[derive(Deserialize)]
struct ConvQuery {
    conversation_id: Option<String>,
    message_id: Option<String>,
}

impl ConvQuery {
    fn conv(&self) -> Result<&str, ApiError> {
        self.conversation_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::bad_request("conversation_id is required"))
    }
    fn msg(&self) -> Result<&str, ApiError> {
        self.message_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::bad_request("message_id is required"))
    }
}

async fn retrieve(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ConvQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let id = cq.conv()?;
    let store = lock(&st.conversations);
    let c = store
        .conversations
        .get(id)
        .ok_or_else(|| conv_not_found(id))?;
    Ok(envelope::ok(to_value(c)))
}

async fn update(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let mut store = lock(&st.conversations);
    let c = store
        .conversations
        .get_mut(&id)
        .ok_or_else(|| conv_not_found(&id))?;
    if let Some(name) = b.get("name").and_then(Value::as_str) {
        if name.chars().count() > 100 {
            return Err(ApiError::bad_request("name longer than 100 characters"));
        }
        c.name = name.to_owned();
    }
    c.updated_at = now_unix();
    Ok(envelope::ok(to_value(c)))
}

async fn delete(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let mut store = lock(&st.conversations);
    store
        .conversations
        .remove(&id)
        .ok_or_else(|| conv_not_found(&id))?;
    store.order.retain(|c| c != &id);
    store.messages.remove(&id);
    Ok(envelope::ok(json!({})))
}

async fn clear(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let section = st.next_id();
    let mut store = lock(&st.conversations);
    let c = store
        .conversations
        .get_mut(&id)
        .ok_or_else(|| conv_not_found(&id))?;
    c.last_section_id = section.clone();
    c.updated_at = now_unix();
    Ok(envelope::ok(json!({"id": section, "conversation_id": id})))
}

async fn msg_create(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ConvQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let id = cq.conv()?;
    let b = json_body(&body)?;
    if str_field(&b, "role").is_none() || str_field(&b, "content_type").is_none() {
        return Err(ApiError::bad_request("role and content_type are required"));
    }
    let mut store = lock(&st.conversations);
    let c = store
        .conversations
        .get(id)
        .ok_or_else(|| conv_not_found(id))?
        .clone();
    let m = enter_message(&st, &b, id, &c.bot_id, "", &c.last_section_id)?;
    store.append(vec![m.clone()]);
    Ok(envelope::ok(to_value(&m)))
}

async fn msg_list(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ConvQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let id = cq.conv()?;
    let b = json_body(&body)?;
    let asc = str_field(&b, "order").is_some_and(|o| o.eq_ignore_ascii_case("asc"));
    let limit = b
        .get("limit")
        .and_then(Value::as_u64)
        .unwrap_or(50)
        .clamp(1, 50) as usize;
    let chat_id = str_field(&b, "chat_id");
    let store = lock(&st.conversations);
    if !store.conversations.contains_key(id) {
        return Err(conv_not_found(id));
    }
    let mut all: Vec<&Message> = store
        .messages
        .get(id)
        .map(|v| {
            v.iter()
                .filter(|m| chat_id.is_none_or(|c| m.chat_id == c))
                .collect()
        })
        .unwrap_or_default();
    if !asc {
        all.reverse();
    }
    let pos = |cursor: &str| all.iter().position(|m| m.id == cursor);
    let (start, end) = if let Some(after) = str_field(&b, "after_id") {
        let s = pos(after).map_or(all.len(), |p| p + 1);
        (s, (s + limit).min(all.len()))
    } else if let Some(before) = str_field(&b, "before_id") {
        let e = pos(before).unwrap_or(0);
        (e.saturating_sub(limit), e)
    } else {
        (0, limit.min(all.len()))
    };
    let page = &all[start..end];
    let mut fields = Map::new();
    fields.insert(
        "data".into(),
        Value::Array(page.iter().map(to_value).collect()),
    );
    fields.insert(
        "first_id".into(),
        json!(page.first().map(|m| m.id.as_str()).unwrap_or("")),
    );
    fields.insert(
        "last_id".into(),
        json!(page.last().map(|m| m.id.as_str()).unwrap_or("")),
    );
    fields.insert("has_more".into(), json!(end < all.len()));
    Ok(envelope::ok_flat(fields))
}

fn find_msg<'a>(store: &'a mut Store, conv: &str, msg: &str) -> Result<&'a mut Message, ApiError> {
    if !store.conversations.contains_key(conv) {
        return Err(conv_not_found(conv));
    }
    store
        .messages
        .get_mut(conv)
        .and_then(|v| v.iter_mut().find(|m| m.id == msg))
        .ok_or_else(|| msg_not_found(msg))
}

async fn msg_retrieve(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ConvQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let mut store = lock(&st.conversations);
    let m = find_msg(&mut store, cq.conv()?, cq.msg()?)?;
    Ok(envelope::ok(to_value(m)))
}

async fn msg_modify(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ConvQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let b = json_body(&body)?;
    let mut store = lock(&st.conversations);
    let m = find_msg(&mut store, cq.conv()?, cq.msg()?)?;
    if let Some(c) = b.get("content").and_then(Value::as_str) {
        m.content = c.to_owned();
    }
    if let Some(c) = str_field(&b, "content_type") {
        m.content_type = c.to_owned();
    }
    if let Some(md) = b.get("meta_data").and_then(Value::as_object) {
        m.meta_data = md.clone();
    }
    m.updated_at = now_unix();
    let mut fields = Map::new();
    fields.insert("message".into(), to_value(m));
    Ok(envelope::ok_flat(fields))
}

async fn msg_delete(
    State(st): State<Arc<SandboxState>>,
    RawQuery(q): RawQuery,
    Query(cq): Query<ConvQuery>,
    headers: HeaderMap,
) -> ApiResult {
    prelude(&st, &headers, q.as_deref()).await?;
    let (conv, msg) = (cq.conv()?, cq.msg()?);
    let mut store = lock(&st.conversations);
    let m = find_msg(&mut store, conv, msg)?.clone();
    if let Some(v) = store.messages.get_mut(conv) {
        v.retain(|x| x.id != msg);
    }
    Ok(envelope::ok(to_value(&m)))
}
