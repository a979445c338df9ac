//! Minting gateway access tokens (the admin API, and later the device token endpoint).

use policy::ids::DeviceId;
use policy::token::{Claims, ISSUER};

use crate::devices::CredentialRef;
use crate::state::{GatewayState, now_s};

/// A minted token, as the OAuth-style answer needs it.
#[derive(Debug, Clone)]
pub struct Minted {
    pub access_token: String,
    /// Absolute unix seconds.
    pub expires_in: u64,
}

impl Minted {
    /// The OAuth-style answer: `{"access_token","expires_in","token_type":"Bearer"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "access_token": self.access_token,
            "expires_in": self.expires_in,
            "token_type": "Bearer",
        })
    }
}

/// Why no token was minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("device not found")]
    UnknownDevice,
    #[error("device is disabled")]
    Disabled,
    #[error("the credential was removed")]
    CredentialGone,
}

/// Mints a token for `device`, valid for `requested_ttl_s` (default and maximum from config).
pub fn mint_for_device(
    state: &GatewayState,
    device: &DeviceId,
    requested_ttl_s: Option<u64>,
    grant: &'static str,
    cred: Option<CredentialRef>,
) -> Result<Minted, MintError> {
    let d = state.devices.get(device).ok_or(MintError::UnknownDevice)?;
    let status = d.status_for(cred.as_ref());
    if !status.enabled {
        return Err(MintError::Disabled);
    }
    if !status.credential_present {
        return Err(MintError::CredentialGone);
    }
    let t = &state.config.tokens;
    let ttl = requested_ttl_s
        .unwrap_or(t.default_ttl.as_secs())
        .clamp(1, t.max_ttl.as_secs());
    let now = now_s();
    let claims = Claims {
        iss: ISSUER.to_owned(),
        sub: device.clone(),
        iat: now,
        exp: now + ttl,
        generation: status.generation,
        cred_serial: cred.as_ref().map_or(0, |c| c.serial),
        cred: cred.map(|c| c.kid.to_string()),
        jti: format!("{:032x}", rand::random::<u128>()),
    };
    state
        .metrics
        .tokens_issued
        .with_label_values(&[grant])
        .inc();
    Ok(Minted {
        access_token: state.verifier().keyring().mint(&claims),
        expires_in: claims.exp,
    })
}
