//! Access policies at work (`[access]`, DESIGN §8's 403 / 4101): the device's labels and the
//! path at admission, the bot in a WebSocket query at admission, and the bot in a REST body
//! before the upstream gets the body. The decisions are `policy::access`; this module reads
//! the labels, holds the body back and answers with the denial.
//!
//! The body check. pingora sends the request head upstream before it reads the body, so a
//! body cannot be judged before the upstream connection exists. For a bot-restricted device
//! on a route whose body names a bot ([`BodyBot`]), [`BodyBotCheck`] therefore holds every
//! chunk back (replacing it with an empty chunk, which pingora does not forward) up to
//! [`MAX_CHECKED_BODY`], and at the end of the body either releases the whole body in one
//! chunk or fails the request with [`FORBIDDEN`]: the upstream then has the head and none of
//! the body, and the connection is dropped, so it never runs the call. `fail_to_proxy`
//! answers 403 / 4101 (nothing was written to the device yet), and the admission's quota hold
//! is refunded in `logging` like every answer that is not a success. Devices with no bot
//! restriction (and every device when `[access]` is absent) pay nothing: no labels read, no
//! copy.

use bytes::{Bytes, BytesMut};
use pingora::prelude::*;
use policy::access::{BodyBot, BotRule, MAX_CHECKED_BODY, is_query_bot_path};
use policy::decision::Denial;
use policy::ids::DeviceId;

use crate::state::GatewayState;

/// The pingora error a body refusal travels as, from `request_body_filter` to
/// `fail_to_proxy`.
pub const FORBIDDEN: ErrorType = ErrorType::HTTPStatus(403);

/// The path check at admission: the bot rule the request stays under, or the 403.
pub fn check_path(state: &GatewayState, device: &DeviceId, path: &str) -> Result<BotRule, Denial> {
    let policies = state.access();
    if policies.is_unrestricted() {
        return Ok(BotRule::Any);
    }
    match state.devices.get(device) {
        Some(d) => {
            let labels = d.labels.read().unwrap_or_else(|p| p.into_inner());
            policies.check_path(&labels, path)
        }
        // Deleted since its token was checked: no labels.
        None => policies.check_path(&Default::default(), path),
    }
}

/// The WebSocket check at admission: `/v1/chat` names its bot in the query.
pub fn check_ws_query(bots: &BotRule, path: &str, query: &str) -> Result<(), Denial> {
    if is_query_bot_path(path) {
        bots.check_query(query)
    } else {
        Ok(())
    }
}

/// A REST body being held back until its `bot_id` is checked.
#[derive(Debug)]
pub struct BodyBotCheck {
    bots: BotRule,
    field: BodyBot,
    held: BytesMut,
    /// The denial to answer with, once the body was refused.
    pub refused: Option<Denial>,
}

impl BodyBotCheck {
    /// A check for this request, when its device is bot-restricted and its route's body
    /// names a bot.
    pub fn for_request(bots: &BotRule, path: &str) -> Option<Box<BodyBotCheck>> {
        let field = BodyBot::of(path)?;
        bots.is_restricted().then(|| {
            Box::new(BodyBotCheck {
                bots: bots.clone(),
                field,
                held: BytesMut::new(),
                refused: None,
            })
        })
    }

    /// Holds `body` back; at the end of the body, puts the whole body in its place or
    /// refuses the request with [`FORBIDDEN`] (also as soon as it outgrows
    /// [`MAX_CHECKED_BODY`]).
    pub fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Result<()> {
        if let Some(b) = body.as_mut() {
            if self.held.len() + b.len() > MAX_CHECKED_BODY {
                return self.refuse(false);
            }
            self.held.extend_from_slice(b);
            // Empty, not `None`: `None` would tell the upstream the body ended.
            *b = Bytes::new();
        }
        if !end_of_stream {
            return Ok(());
        }
        if let Err(d) = self.bots.check_body(self.field, &self.held, true) {
            self.refused = Some(d);
            return Error::e_explain(FORBIDDEN, "request body names a bot the device may not use");
        }
        *body = Some(std::mem::take(&mut self.held).freeze());
        Ok(())
    }

    fn refuse(&mut self, complete: bool) -> Result<()> {
        let d = match self.bots.check_body(self.field, &[], complete) {
            Err(d) => d,
            Ok(()) => return Ok(()),
        };
        self.refused = Some(d);
        self.held = BytesMut::new();
        Error::e_explain(FORBIDDEN, "request body too large to check its bot")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use policy::access::BotSet;

    use super::*;

    fn only_b1() -> BotRule {
        BotRule::Only(Arc::new(BotSet::new(["b1".to_owned()])))
    }

    /// Chunks are held back (empty, not `None`), and the end of the body releases them all.
    #[test]
    fn an_allowed_body_is_released_whole_at_its_end() {
        let mut c = BodyBotCheck::for_request(&only_b1(), "/v3/chat").unwrap();
        let mut a = Some(Bytes::from_static(br#"{"bot_id":"#));
        c.filter(&mut a, false).unwrap();
        assert_eq!(a.as_deref(), Some(&b""[..]));
        let mut b = Some(Bytes::from_static(br#""b1"}"#));
        c.filter(&mut b, false).unwrap();
        assert_eq!(b.as_deref(), Some(&b""[..]));
        let mut end = None;
        c.filter(&mut end, true).unwrap();
        assert_eq!(end.as_deref(), Some(&br#"{"bot_id":"b1"}"#[..]));
        assert!(c.refused.is_none());
    }

    #[test]
    fn a_refused_body_never_leaves_and_carries_the_denial() {
        let mut c = BodyBotCheck::for_request(&only_b1(), "/v3/chat").unwrap();
        let mut last = Some(Bytes::from_static(br#"{"bot_id":"b2"}"#));
        let e = c.filter(&mut last, true).unwrap_err();
        assert_eq!(e.etype(), &FORBIDDEN);
        assert_eq!(
            c.refused.as_ref().map(|d| d.reason.status_and_code()),
            Some((403, 4101))
        );
        // Too large: refused at the chunk that crosses the bound.
        let mut c = BodyBotCheck::for_request(&only_b1(), "/v1/workflow/run").unwrap();
        let mut chunk = Some(Bytes::from(vec![b' '; MAX_CHECKED_BODY]));
        c.filter(&mut chunk, false).unwrap();
        let mut more = Some(Bytes::from_static(b" "));
        assert!(c.filter(&mut more, false).is_err());
        assert!(c.refused.is_some());
    }

    #[test]
    fn only_restricted_devices_on_bot_routes_are_checked() {
        assert!(BodyBotCheck::for_request(&BotRule::Any, "/v3/chat").is_none());
        assert!(BodyBotCheck::for_request(&only_b1(), "/v1/audio/speech").is_none());
        assert!(check_ws_query(&only_b1(), "/v1/chat", "bot_id=b2").is_err());
        assert!(check_ws_query(&only_b1(), "/v1/chat", "bot_id=b1").is_ok());
        assert!(check_ws_query(&only_b1(), "/v1/audio/speech", "").is_ok());
    }
}
