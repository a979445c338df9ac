//! Access policies: which paths and bots a device may use, chosen by the device's labels.
//!
//! Policies live in configuration (`[access]`), not per device, so a fleet of any size needs
//! no per-device storage: a device's labels pick the first [`AccessPolicy`] whose
//! `match_labels` all equal the device's, and that policy decides. A device no policy matches
//! gets the [`DefaultAccess`]. With no policies and `Allow` ([`AccessPolicies::allow_all`])
//! every device may use every allowed route (the gateway then skips the check entirely).
//!
//! The check runs in two steps, both pure:
//! 1. [`AccessPolicies::check_path`] at admission: the path against the policy's
//!    `allow_paths` prefixes; the answer is the [`BotRule`] the request is still subject to.
//! 2. The bot, where a request names one: [`BotRule::check_query`] for the WebSocket
//!    `/v1/chat?bot_id=` and [`BotRule::check_body`] for the JSON bodies of [`BodyBot`] routes.
//!
//! Fail-closed choices, for a device whose policy lists `allow_bots`:
//! - `/v3/chat` and the WebSocket `/v1/chat` must name an allowed bot; a missing `bot_id`,
//!   a body that is not a JSON object, a `bot_id` that is not a string, a `bot_id` given twice,
//!   or a body over [`MAX_CHECKED_BODY`] is refused.
//! - Workflow bodies (`/v1/workflow/run`, `/v1/workflow/stream_run`, `/v1/workflows/chat`)
//!   may omit `bot_id` (Coze makes it optional there: such a run uses no bot); one that is
//!   given must be allowed, and the body must still be readable JSON.
//! - A path with a percent sign is refused: the gateway could not tell which route the
//!   upstream decodes it to, so a bot check could be skipped.
//!
//! What it does not do: bots named in other places (query strings of REST calls,
//! conversation or bot-management routes) are not inspected; restrict those routes with
//! `allow_paths`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;

use crate::decision::{Denial, DenyReason};
use crate::route::matches_prefix;

/// Largest request body read to find its `bot_id`, in bytes. Larger bodies of a
/// bot-restricted device on a [`BodyBot`] route are refused (chat requests are far smaller).
pub const MAX_CHECKED_BODY: usize = 64 * 1024;

/// What devices that match no policy may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultAccess {
    /// Every allowed route, any bot.
    #[default]
    Allow,
    /// Nothing: every request is refused with 403.
    Deny,
}

/// A set of bot ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BotSet(BTreeSet<String>);

impl BotSet {
    pub fn new(bots: impl IntoIterator<Item = String>) -> BotSet {
        BotSet(bots.into_iter().collect())
    }

    pub fn contains(&self, bot: &str) -> bool {
        self.0.contains(bot)
    }
}

/// One policy: the devices it applies to and what they may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Every label listed must be present on the device with this value; empty matches all.
    pub match_labels: BTreeMap<String, String>,
    /// Path prefixes (the `[routes]` prefix rules); `None`: every allowed route.
    pub allow_paths: Option<Vec<String>>,
    /// `None`: any bot.
    pub allow_bots: Option<Arc<BotSet>>,
}

impl AccessPolicy {
    /// Whether a device with these labels is one this policy applies to.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

/// The validated `[access]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicies {
    default: DefaultAccess,
    policies: Vec<AccessPolicy>,
}

/// The bot restriction a request that passed the path check is still subject to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BotRule {
    /// Any bot.
    #[default]
    Any,
    /// Only these bots.
    Only(Arc<BotSet>),
}

/// Where a route's JSON body names a bot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyBot {
    /// `bot_id` is required (`/v3/chat`).
    Required,
    /// `bot_id` is optional (workflow runs and workflow chat).
    Optional,
}

impl BodyBot {
    /// The body field of `path`, if its body names a bot. Compared without a trailing `/`
    /// and ignoring ASCII case, in case the upstream routes such spellings the same.
    pub fn of(path: &str) -> Option<BodyBot> {
        let p = path.trim_end_matches('/');
        let is = |route: &str| p.eq_ignore_ascii_case(route);
        if is("/v3/chat") {
            Some(BodyBot::Required)
        } else if is("/v1/workflow/run")
            || is("/v1/workflow/stream_run")
            || is("/v1/workflows/chat")
        {
            Some(BodyBot::Optional)
        } else {
            None
        }
    }
}

/// Whether `path` is the WebSocket chat, whose query names the bot.
pub fn is_query_bot_path(path: &str) -> bool {
    path.trim_end_matches('/').eq_ignore_ascii_case("/v1/chat")
}

fn forbidden(message: &'static str) -> Denial {
    Denial::new(DenyReason::Forbidden, message)
}

const PATH_DENIED: &str = "device not allowed on this path";
const BOT_DENIED: &str = "device not allowed to use this bot";
const BOT_UNCHECKABLE: &str = "bot_id could not be checked; send one JSON bot_id";

impl AccessPolicies {
    /// No restriction at all (no `[access]` section).
    pub fn allow_all() -> AccessPolicies {
        AccessPolicies::default()
    }

    pub fn new(default: DefaultAccess, policies: Vec<AccessPolicy>) -> AccessPolicies {
        AccessPolicies { default, policies }
    }

    /// True when every device may do everything: callers skip reading labels.
    pub fn is_unrestricted(&self) -> bool {
        self.default == DefaultAccess::Allow && self.policies.is_empty()
    }

    /// The first policy that applies to a device with these labels.
    pub fn policy_for(&self, labels: &BTreeMap<String, String>) -> Option<&AccessPolicy> {
        self.policies.iter().find(|p| p.matches(labels))
    }

    /// Whether a device with `labels` may call `path` (already resolved by the route
    /// table), and which bots it may then name.
    pub fn check_path(
        &self,
        labels: &BTreeMap<String, String>,
        path: &str,
    ) -> Result<BotRule, Denial> {
        let Some(policy) = self.policy_for(labels) else {
            return match self.default {
                DefaultAccess::Allow => Ok(BotRule::Any),
                DefaultAccess::Deny => Err(forbidden(PATH_DENIED)),
            };
        };
        if let Some(prefixes) = &policy.allow_paths
            && !prefixes.iter().any(|p| matches_prefix(path, p))
        {
            return Err(forbidden(PATH_DENIED));
        }
        match &policy.allow_bots {
            None => Ok(BotRule::Any),
            Some(_) if path.contains('%') => Err(forbidden(PATH_DENIED)),
            Some(bots) => Ok(BotRule::Only(bots.clone())),
        }
    }
}

/// The part of a request body this module reads.
#[derive(Deserialize)]
struct BodyFields {
    /// Duplicate keys are a parse error (serde's derive), so a body cannot name two bots.
    #[serde(default)]
    bot_id: Option<String>,
}

impl BotRule {
    pub fn is_restricted(&self) -> bool {
        matches!(self, BotRule::Only(_))
    }

    /// Checks a named bot (`None`: the request names none).
    pub fn check_bot(&self, bot: Option<&str>) -> Result<(), Denial> {
        match (self, bot) {
            (BotRule::Any, _) => Ok(()),
            (BotRule::Only(bots), Some(b)) if bots.contains(b) => Ok(()),
            (BotRule::Only(_), _) => Err(forbidden(BOT_DENIED)),
        }
    }

    /// Checks the `bot_id` of a WebSocket `/v1/chat` query string (percent-decoded; given
    /// exactly once).
    pub fn check_query(&self, query: &str) -> Result<(), Denial> {
        if !self.is_restricted() {
            return Ok(());
        }
        let mut found = None;
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k).as_deref() != Some("bot_id") {
                continue;
            }
            if found.is_some() {
                return Err(forbidden(BOT_UNCHECKABLE));
            }
            found = Some(percent_decode(v).ok_or(forbidden(BOT_UNCHECKABLE))?);
        }
        self.check_bot(found.as_deref())
    }

    /// Checks the `bot_id` of a whole request body on a [`BodyBot`] route. `complete` is false
    /// when the body was larger than [`MAX_CHECKED_BODY`] and could not be read whole.
    pub fn check_body(&self, field: BodyBot, body: &[u8], complete: bool) -> Result<(), Denial> {
        if !self.is_restricted() {
            return Ok(());
        }
        if !complete || body.len() > MAX_CHECKED_BODY {
            return Err(forbidden(BOT_UNCHECKABLE));
        }
        // An object only: serde would also read a struct from an array (`["b1"]`).
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(forbidden(BOT_UNCHECKABLE));
        }
        let fields: BodyFields =
            serde_json::from_slice(body).map_err(|_| forbidden(BOT_UNCHECKABLE))?;
        match (fields.bot_id.as_deref(), field) {
            (None, BodyBot::Optional) => Ok(()),
            (bot, _) => self.check_bot(bot),
        }
    }
}

/// `%XX` and `+` decoding of one query component; `None` for a bad escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn policy(
        match_labels: &[(&str, &str)],
        paths: Option<&[&str]>,
        bots: Option<&[&str]>,
    ) -> AccessPolicy {
        AccessPolicy {
            match_labels: labels(match_labels),
            allow_paths: paths.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
            allow_bots: bots.map(|b| Arc::new(BotSet::new(b.iter().map(|s| (*s).to_owned())))),
        }
    }

    fn toy() -> AccessPolicies {
        AccessPolicies::new(
            DefaultAccess::Allow,
            vec![
                policy(
                    &[("product", "toy")],
                    Some(&["/v3/chat", "/v1/audio/speech", "/v1/chat"]),
                    Some(&["b1", "b2"]),
                ),
                // Never reached for toys: the first match decides.
                policy(&[("product", "toy"), ("tier", "pro")], None, None),
                policy(&[("product", "speaker")], Some(&["/v1/workflow/"]), None),
            ],
        )
    }

    #[test]
    fn no_policies_allow_everything() {
        let p = AccessPolicies::allow_all();
        assert!(p.is_unrestricted());
        assert_eq!(p.check_path(&labels(&[]), "/v3/chat"), Ok(BotRule::Any));
        assert!(!toy().is_unrestricted());
    }

    #[test]
    fn the_first_policy_whose_labels_all_match_decides() {
        let p = toy();
        let toy_pro = labels(&[("product", "toy"), ("tier", "pro")]);
        assert!(matches!(
            p.check_path(&toy_pro, "/v3/chat"),
            Ok(BotRule::Only(_))
        ));
        assert_eq!(
            p.check_path(&toy_pro, "/v1/workflow/run").unwrap_err(),
            forbidden(PATH_DENIED)
        );
        // A label with another value, or missing, does not match.
        let speaker = labels(&[("product", "speaker"), ("color", "red")]);
        assert_eq!(p.check_path(&speaker, "/v1/workflow/run"), Ok(BotRule::Any));
        assert!(p.check_path(&speaker, "/v3/chat").is_err());
        assert_eq!(
            p.check_path(&labels(&[("product", "lamp")]), "/v3/chat"),
            Ok(BotRule::Any)
        );
        // An empty match_labels matches every device.
        let all = AccessPolicies::new(DefaultAccess::Allow, vec![policy(&[], Some(&[]), None)]);
        assert!(all.check_path(&labels(&[]), "/v3/chat").is_err());
    }

    #[test]
    fn paths_use_the_route_prefix_rules() {
        let p = toy();
        let t = labels(&[("product", "toy")]);
        for ok in [
            "/v3/chat",
            "/v3/chat/retrieve",
            "/v1/audio/speech",
            "/v1/chat",
        ] {
            assert!(p.check_path(&t, ok).is_ok(), "{ok}");
        }
        for no in [
            "/v3/chatx",
            "/v1/audio/transcriptions",
            "/v1/conversation/create",
        ] {
            let d = p.check_path(&t, no).unwrap_err();
            assert_eq!(d.reason, DenyReason::Forbidden, "{no}");
            assert_eq!(d.reason.status_and_code(), (403, 4101));
        }
        // Percent-encoded paths could hide /v3/chat from the bot check.
        assert!(p.check_path(&t, "/v3/%63hat").is_err());
    }

    #[test]
    fn default_deny_refuses_devices_that_match_no_policy() {
        let p = AccessPolicies::new(
            DefaultAccess::Deny,
            vec![policy(&[("fleet", "a")], None, None)],
        );
        assert!(!p.is_unrestricted());
        assert_eq!(
            p.check_path(&labels(&[("fleet", "b")]), "/v3/chat")
                .unwrap_err()
                .reason,
            DenyReason::Forbidden
        );
        assert_eq!(
            p.check_path(&labels(&[("fleet", "a")]), "/v3/chat"),
            Ok(BotRule::Any)
        );
        assert!(!AccessPolicies::new(DefaultAccess::Deny, vec![]).is_unrestricted());
    }

    fn only(bots: &[&str]) -> BotRule {
        BotRule::Only(Arc::new(BotSet::new(bots.iter().map(|s| (*s).to_owned()))))
    }

    #[test]
    fn query_bots() {
        let r = only(&["7350000000000000001"]);
        assert!(r.check_query("bot_id=7350000000000000001").is_ok());
        assert!(
            r.check_query("authorization=Bearer%20x&bot_id=735%30000000000000001&device_id=2")
                .is_ok()
        );
        for bad in [
            "bot_id=7350000000000000002",
            "",
            "device_id=1",
            "bot_id=",
            "bot_id=7350000000000000001&bot_id=7350000000000000002",
            "bot_id=7350000000000000001&bot%5Fid=x",
            "bot_id=%zz",
        ] {
            assert_eq!(
                r.check_query(bad),
                Err(Denial::new(
                    DenyReason::Forbidden,
                    if bad.contains("&bot") || bad.contains("%zz") {
                        BOT_UNCHECKABLE
                    } else {
                        BOT_DENIED
                    }
                )),
                "{bad}"
            );
        }
        assert!(BotRule::Any.check_query("bot_id=anything").is_ok());
        assert!(BotRule::Any.check_query("").is_ok());
    }

    #[test]
    fn body_bots() {
        let r = only(&["b1"]);
        let req = BodyBot::Required;
        let opt = BodyBot::Optional;
        assert!(
            r.check_body(req, br#"{"bot_id":"b1","user_id":"u"}"#, true)
                .is_ok()
        );
        assert!(
            r.check_body(opt, br#"{"workflow_id":"w","bot_id":"b1"}"#, true)
                .is_ok()
        );
        assert!(r.check_body(opt, br#"{"workflow_id":"w"}"#, true).is_ok());
        assert!(
            r.check_body(opt, br#"{"workflow_id":"w","bot_id":null}"#, true)
                .is_ok()
        );
        let denied =
            |field, body: &[u8], complete| r.check_body(field, body, complete).unwrap_err().message;
        assert_eq!(denied(req, br#"{"bot_id":"b2"}"#, true), BOT_DENIED);
        assert_eq!(denied(opt, br#"{"bot_id":"b2"}"#, true), BOT_DENIED);
        assert_eq!(denied(req, br#"{"user_id":"u"}"#, true), BOT_DENIED);
        for (body, complete) in [
            (&br#"{"bot_id":"b1","bot_id":"b2"}"#[..], true),
            (br#"{"bot_id":"b2","bot\u005fid":"b1"}"#, true),
            (br#"{"bot_id":7}"#, true),
            (b"bot_id=b1", true),
            (b"", true),
            (b"[]", true),
            (br#"["b1"]"#, true),
            (br#"{"bot_id":"b1"}"#, false),
        ] {
            assert_eq!(
                denied(req, body, complete),
                BOT_UNCHECKABLE,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let big = format!(
            r#"{{"bot_id":"b1","pad":"{}"}}"#,
            "x".repeat(MAX_CHECKED_BODY)
        );
        assert_eq!(denied(req, big.as_bytes(), true), BOT_UNCHECKABLE);
        // Unrestricted: the body is not even parsed.
        assert!(BotRule::Any.check_body(req, b"not json", true).is_ok());
    }

    #[test]
    fn body_bot_routes() {
        assert_eq!(BodyBot::of("/v3/chat"), Some(BodyBot::Required));
        assert_eq!(BodyBot::of("/v3/chat/"), Some(BodyBot::Required));
        assert_eq!(BodyBot::of("/V3/Chat"), Some(BodyBot::Required));
        assert_eq!(BodyBot::of("/v1/workflow/run"), Some(BodyBot::Optional));
        assert_eq!(
            BodyBot::of("/v1/workflow/stream_run"),
            Some(BodyBot::Optional)
        );
        assert_eq!(BodyBot::of("/v1/workflows/chat"), Some(BodyBot::Optional));
        assert_eq!(BodyBot::of("/v3/chat/retrieve"), None);
        assert_eq!(BodyBot::of("/v1/conversation/create"), None);
        assert!(is_query_bot_path("/v1/chat"));
        assert!(!is_query_bot_path("/v1/audio/speech"));
    }
}
