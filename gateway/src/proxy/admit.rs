//! Admission: route, device token, access policy (path), body limit. Used by the REST/SSE proxy and by the
//! WebSocket path alike, so both refuse exactly the same requests.

use policy::decision::{Denial, DenyReason};
use policy::ids::DeviceId;
use policy::route::Route;
use policy::token::{self, TokenError};

use crate::device_tls::CertDevice;
use crate::state::GatewayState;

/// Proof that a request passed admission.
#[derive(Clone, Debug)]
pub struct Admission {
    pub device: DeviceId,
    pub route: Route,
    /// The token's device generation and credential, to re-check long sessions against
    /// revocations.
    pub token: TokenPermit,
}

/// What a verified token says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPermit {
    pub generation: u64,
    pub cred: Option<crate::devices::CredentialRef>,
}

/// Clock skew tolerated on token `iat`, seconds.
const IAT_LEEWAY_S: u64 = 60;

/// The token from `Authorization: Bearer <token>`.
pub fn bearer(header: Option<&[u8]>) -> Option<&str> {
    let v = std::str::from_utf8(header?).ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// The token from an `authorization=Bearer <token>` query parameter (WebSocket clients that
/// cannot set headers), tolerating a raw space, `%20` or `+`.
pub fn bearer_from_query(query: &str) -> Option<String> {
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("authorization=") {
            let v = v.replace("%20", " ").replace('+', " ");
            let (scheme, rest) = v.trim().split_once(' ')?;
            return scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
                .filter(|t| !t.is_empty() && !t.contains('%'));
        }
    }
    None
}

/// Removes the `authorization` parameter from a query string (it must not reach upstream).
pub fn strip_authorization_param(query: &str) -> String {
    query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("authorization="))
        .collect::<Vec<_>>()
        .join("&")
}

fn token_denial(e: TokenError) -> Denial {
    let msg = match e {
        TokenError::Expired => "access token expired",
        TokenError::Revoked => "access token revoked",
        TokenError::DeviceDisabled => "device disabled",
        _ => "access token invalid",
    };
    Denial::new(DenyReason::InvalidToken, msg)
}

/// Verifies a device token with no I/O: signature and lifetime (remembered per token, see
/// `verifier`), the device named by the connection's client certificate when the listener
/// binds tokens to certificates (`cert`), then the device's current status in the in-memory
/// registry (every time).
pub fn verify_token(
    state: &GatewayState,
    token: &str,
    now_s: u64,
    cert: Option<&CertDevice>,
) -> Result<(DeviceId, TokenPermit), Denial> {
    let v = state
        .verifier()
        .verify(token, now_s, IAT_LEEWAY_S)
        .map_err(token_denial)?;
    if let Some(cert) = cert
        && !cert.allows(v.device.as_str())
    {
        return Err(Denial::new(
            DenyReason::InvalidToken,
            "access token not issued to this client certificate's device",
        ));
    }
    let status = state
        .devices
        .get(&v.device)
        .map(|d| d.status_for(v.cred.as_ref()));
    token::check_device(v.generation, status).map_err(token_denial)?;
    let permit = TokenPermit {
        generation: v.generation,
        cred: v.cred,
    };
    Ok((v.device, permit))
}

/// Whether an admitted session's token still holds (not revoked, device not disabled or
/// deleted). Called by long-lived sessions when the registry's revocation epoch changes.
pub fn still_valid(state: &GatewayState, admission: &Admission) -> bool {
    let status = state
        .devices
        .get(&admission.device)
        .map(|d| d.status_for(admission.token.cred.as_ref()));
    let Some(status) = status else { return false };
    status.enabled && status.generation == admission.token.generation && status.credential_present
}

/// The whole admission chain for a proxied request: the admission, and the bots the device
/// may name on it (`[access]`; checked where the request names one). The bot rule is not part
/// of [`Admission`], which long-lived WebSocket sessions keep (their future's size is
/// budgeted) and which need it only at admission.
pub fn admit(
    state: &GatewayState,
    path: &str,
    token: Option<&str>,
    cert: Option<&CertDevice>,
    content_length: Option<u64>,
    now_s: u64,
) -> Result<(Admission, policy::access::BotRule), Denial> {
    let route = state.routes().resolve(path)?;
    let token = token.ok_or(Denial::new(
        DenyReason::MissingToken,
        "missing access token",
    ))?;
    let (device, token) = verify_token(state, token, now_s, cert)?;
    let bots = super::access::check_path(state, &device, path)?;
    if content_length.is_some_and(|n| n > route.body_limit) {
        return Err(Denial::new(
            DenyReason::BodyTooLarge,
            "request body too large",
        ));
    }
    Ok((
        Admission {
            device,
            route,
            token,
        },
        bots,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some(b"Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some(b"bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some(b"Basic abc")), None);
        assert_eq!(bearer(Some(b"Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn query_token_parsing_and_stripping() {
        for q in [
            "bot_id=1&authorization=Bearer%20t.k",
            "authorization=Bearer+t.k",
            "authorization=Bearer t.k&x=1",
        ] {
            assert_eq!(bearer_from_query(q).as_deref(), Some("t.k"), "{q}");
        }
        assert_eq!(
            strip_authorization_param("bot_id=1&authorization=Bearer%20x&device_id=2"),
            "bot_id=1&device_id=2"
        );
        assert_eq!(strip_authorization_param("authorization=Bearer%20x"), "");
    }
}
