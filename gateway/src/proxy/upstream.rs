//! Upstream peer selection and request rewriting (credentials, attribution, `Host`).

use pingora::http::RequestHeader;
use pingora::prelude::*;

use super::admit::Admission;
use crate::config::UpstreamSettings;
use crate::upstream::ResolvedUpstream;
use crate::upstream_auth::Authorization;

/// Routes whose answers may be SSE streams get the stream idle timeout instead of the REST one.
fn may_stream(path: &str) -> bool {
    path.starts_with("/v3/chat")
        || path.starts_with("/v1/workflow/stream_")
        || path.starts_with("/v1/workflows/chat")
}

/// The peer for a proxied request, with per-route timeouts.
pub fn peer(up: &ResolvedUpstream, settings: &UpstreamSettings, path: &str) -> Box<HttpPeer> {
    let t = &up.target;
    // The SNI only matters for TLS; plain upstreams skip the copy of the host name.
    let sni = if t.tls { t.host.clone() } else { String::new() };
    let mut peer = HttpPeer::new(up.addr(), t.tls, sni);
    peer.options.connection_timeout = Some(settings.connect_timeout);
    peer.options.total_connection_timeout = Some(settings.connect_timeout);
    peer.options.read_timeout = Some(if may_stream(path) {
        settings.stream_idle_timeout
    } else {
        settings.read_timeout
    });
    peer.options.write_timeout = Some(settings.read_timeout);
    peer.options.idle_timeout = Some(std::time::Duration::from_secs(60));
    Box::new(peer)
}

/// `{"device_id":"<id>"}` for `X-Coze-DeviceInfo`. Device ids are validated to contain no
/// characters that need JSON escaping, but serialise properly anyway.
pub fn device_info_header(device: &str) -> String {
    const HEAD: &str = "{\"device_id\":\"";
    // On every proxied call: ids with nothing to escape (all valid ones) are copied as they
    // are; anything else goes through serde's string escaping.
    if device
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        let mut s = String::with_capacity(HEAD.len() + device.len() + 2);
        s.push_str(HEAD);
        s.push_str(device);
        s.push_str("\"}");
        return s;
    }
    format!("{{\"device_id\":{}}}", serde_json::Value::from(device))
}

/// Replaces the device's credentials with the upstream's and attributes the call (PAT mode:
/// `X-Coze-DeviceInfo` on every call, Coze ignores it where it doesn't apply; jwt mode: the
/// per-device token carries the device).
pub fn rewrite(
    req: &mut RequestHeader,
    up: &ResolvedUpstream,
    auth: &Authorization,
    admission: &Admission,
) -> Result<()> {
    // `insert_header` replaces every value of the name: the device's own credentials and
    // attribution never reach the upstream.
    req.insert_header(http::header::AUTHORIZATION, auth.header.clone())?;
    if auth.device_info_header {
        req.insert_header(
            "x-coze-deviceinfo",
            device_info_header(admission.device.as_str()),
        )?;
    } else {
        req.remove_header("x-coze-deviceinfo");
    }
    req.insert_header(http::header::HOST, up.host_header.clone())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::device_info_header;

    #[test]
    fn device_info_is_the_json_object_serde_would_write() {
        for id in [
            "speaker-001",
            "a:b.c_d~1",
            "x\"y",
            "back\\slash",
            "caf\u{e9}",
        ] {
            let expected = serde_json::json!({ "device_id": id }).to_string();
            assert_eq!(device_info_header(id), expected, "{id}");
        }
    }
}
