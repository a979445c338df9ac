//! Which device paths are proxied, how, and with what body limit.
//!
//! A [`RouteTable`] is an allow-list of path prefixes. [`RouteTable::resolve`] classifies a
//! request path into a [`Route`] or refuses it. Paths that could mean different things to the
//! gateway and to the upstream (dot segments, empty segments, encoded slashes or dots,
//! backslashes, absolute-form URIs) are refused outright rather than normalised: a device has
//! no reason to send them.

use crate::decision::{Denial, DenyReason};

/// Bounded route classes: metric labels and per-route limits use these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteClass {
    Chat,
    Workflow,
    Conversation,
    File,
    Audio,
    Voice,
    Commerce,
    Other,
}

impl RouteClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Chat => "chat",
            RouteClass::Workflow => "workflow",
            RouteClass::Conversation => "conversation",
            RouteClass::File => "file",
            RouteClass::Audio => "audio",
            RouteClass::Voice => "voice",
            RouteClass::Commerce => "commerce",
            RouteClass::Other => "other",
        }
    }

    pub const ALL: [RouteClass; 8] = [
        RouteClass::Chat,
        RouteClass::Workflow,
        RouteClass::Conversation,
        RouteClass::File,
        RouteClass::Audio,
        RouteClass::Voice,
        RouteClass::Commerce,
        RouteClass::Other,
    ];

    /// Classifies a path by its well-known Coze prefix.
    pub fn of(path: &str) -> RouteClass {
        if path.starts_with("/v3/chat") || path.starts_with("/v1/bot") {
            RouteClass::Chat
        } else if path.starts_with("/v1/workflow") {
            RouteClass::Workflow
        } else if path.starts_with("/v1/conversation") {
            RouteClass::Conversation
        } else if path.starts_with("/v1/files") {
            RouteClass::File
        } else if path == "/v1/chat" {
            RouteClass::Voice
        } else if path.starts_with("/v1/audio") {
            RouteClass::Audio
        } else if path.starts_with("/v1/commerce") {
            RouteClass::Commerce
        } else {
            RouteClass::Other
        }
    }
}

/// A resolved route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub class: RouteClass,
    /// Largest request body accepted, in bytes.
    pub body_limit: u64,
    /// Calls that consume credits upstream (carry device attribution).
    pub credit_consuming: bool,
}

/// The validated allow-list.
#[derive(Clone, Debug)]
pub struct RouteTable {
    prefixes: Vec<String>,
    body_limit: u64,
    workflow_body_limit: u64,
}

impl RouteTable {
    /// `prefixes` must each start with `/`. Limits are in bytes.
    pub fn new(prefixes: Vec<String>, body_limit: u64, workflow_body_limit: u64) -> RouteTable {
        RouteTable {
            prefixes,
            body_limit,
            workflow_body_limit,
        }
    }

    /// The Coze API surface devices normally use.
    pub fn default_prefixes() -> Vec<String> {
        [
            "/v3/chat",
            "/v1/workflow/",
            "/v1/workflows/",
            "/v1/conversation/",
            "/v1/conversations",
            "/v1/files/",
            "/v1/audio/",
            "/v1/chat",
            "/v1/bots/",
            "/v1/bot/get_online_info",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Resolves a request path (no query string) or refuses it.
    pub fn resolve(&self, path: &str) -> Result<Route, Denial> {
        if !is_canonical(path) {
            return Err(Denial::new(
                DenyReason::BadRequest,
                "malformed request path",
            ));
        }
        if !self.prefixes.iter().any(|p| matches_prefix(path, p)) {
            return Err(Denial::new(
                DenyReason::RouteNotAllowed,
                "resource not found",
            ));
        }
        let class = RouteClass::of(path);
        let body_limit = if class == RouteClass::Workflow {
            self.workflow_body_limit
        } else {
            self.body_limit
        };
        let credit_consuming = matches!(
            class,
            RouteClass::Chat | RouteClass::Workflow | RouteClass::Audio | RouteClass::Voice
        );
        Ok(Route {
            class,
            body_limit,
            credit_consuming,
        })
    }
}

/// A prefix ending in `/` matches anything under it; otherwise the path must equal the prefix
/// or continue with `/`.
pub(crate) fn matches_prefix(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// True for origin-form paths with no dot segments, empty segments, backslashes, or encoded
/// separators/dots/percent signs.
pub fn is_canonical(path: &str) -> bool {
    // One pass, no allocation: this runs on every request.
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.len() > 2048 {
        return false;
    }
    let mut seg_start = 1;
    for i in 1..=b.len() {
        let Some(&c) = b.get(i) else {
            // The last segment may be empty ("/v1/files/"), not a dot segment.
            return !matches!(&b[seg_start..], b"." | b"..");
        };
        if c == b'\\' || !c.is_ascii_graphic() {
            return false;
        }
        if c == b'%' {
            let code = [b.get(i + 1), b.get(i + 2)].map(|x| x.map(u8::to_ascii_lowercase));
            if matches!(
                code,
                [Some(b'2'), Some(b'f' | b'e' | b'5')] | [Some(b'5'), Some(b'c')]
            ) {
                return false;
            }
        }
        if c == b'/' {
            if matches!(&b[seg_start..i], b"" | b"." | b"..") {
                return false;
            }
            seg_start = i + 1;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward statement of [`is_canonical`] (lowercase copy, substring search,
    /// split on `/`) that the one-pass version must agree with.
    fn canonical_reference(path: &str) -> bool {
        if !path.starts_with('/') || path.len() > 2048 {
            return false;
        }
        if path.bytes().any(|b| b == b'\\' || !b.is_ascii_graphic()) {
            return false;
        }
        let lower = path.to_ascii_lowercase();
        if ["%2f", "%5c", "%2e", "%25"]
            .iter()
            .any(|e| lower.contains(e))
        {
            return false;
        }
        let mut segments = path.split('/').skip(1).peekable();
        while let Some(seg) = segments.next() {
            if seg == "." || seg == ".." || (seg.is_empty() && segments.peek().is_some()) {
                return false;
            }
        }
        true
    }

    #[test]
    fn canonical_paths_by_example() {
        for ok in [
            "/",
            "/v3/chat",
            "/v1/files/",
            "/v1/a.b/..c/c..",
            "/x%20y",
            "/%41",
        ] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in [
            "",
            "v3/chat",
            "//v3",
            "/v3//chat",
            "/v3/./chat",
            "/v3/../x",
            "/v3/..",
            "/.",
            "/a%2fb",
            "/a%2Fb",
            "/a%5Cb",
            "/%2e%2e/x",
            "/a%25",
            "/a\\b",
            "/a b",
            "/a\u{e9}",
        ] {
            assert!(!is_canonical(bad), "{bad}");
        }
        assert!(!is_canonical(&format!("/{}", "a".repeat(2048))));
    }

    proptest::proptest! {
        #[test]
        fn canonical_agrees_with_the_reference(
            path in "(/|/?[a-zA-Z0-9._%/\\\\ ~-]{0,24})(%[0-9a-fA-F]{0,2}|[./]{0,3})[a-z/.]{0,6}"
        ) {
            proptest::prop_assert_eq!(is_canonical(&path), canonical_reference(&path), "{:?}", path);
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(RouteTable::default_prefixes(), 15 << 20, 20 << 20)
    }

    #[test]
    fn allows_coze_paths_and_classifies_them() {
        let t = table();
        assert_eq!(t.resolve("/v3/chat").unwrap().class, RouteClass::Chat);
        assert_eq!(
            t.resolve("/v3/chat/retrieve").unwrap().class,
            RouteClass::Chat
        );
        let w = t.resolve("/v1/workflow/stream_run").unwrap();
        assert_eq!((w.class, w.body_limit), (RouteClass::Workflow, 20 << 20));
        assert_eq!(t.resolve("/v1/chat").unwrap().class, RouteClass::Voice);
        assert_eq!(
            t.resolve("/v1/audio/speech").unwrap().class,
            RouteClass::Audio
        );
        assert!(!t.resolve("/v1/conversations/1").unwrap().credit_consuming);
    }

    #[test]
    fn refuses_unknown_and_prefix_lookalikes() {
        let t = table();
        for p in [
            "/admin/v1/devices",
            "/v3/chatty",
            "/v1/chatroom",
            "/",
            "/v1/commerce/benefit/limitations",
        ] {
            assert_eq!(
                t.resolve(p).unwrap_err().reason,
                DenyReason::RouteNotAllowed,
                "{p}"
            );
        }
    }

    #[test]
    fn refuses_ambiguous_paths() {
        let t = table();
        for p in [
            "/v3/chat/../../admin",
            "/v1/audio/./speech",
            "//v3/chat",
            "/v3//chat",
            "/v1/files%2f..%2fadmin",
            "/v1/files/%2e%2e/x",
            "/v1/files\\..\\x",
            "http://evil/v3/chat",
            "v3/chat",
        ] {
            assert_eq!(
                t.resolve(p).unwrap_err().reason,
                DenyReason::BadRequest,
                "{p}"
            );
        }
    }
}
