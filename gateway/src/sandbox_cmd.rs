//! `fleetgate sandbox`: the built-in Coze-compatible upstream plus a gateway wired to it, a
//! demo device and its token: everything needed to try fleetgate or develop firmware with no
//! Coze account.

use std::collections::BTreeMap;
use std::sync::mpsc;

use base64::Engine as _;
use policy::ids::DeviceId;

use crate::config;
use crate::server::{self, Ready};

/// Options of `fleetgate sandbox`.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub port: u16,
    pub admin_port: u16,
    pub upstream_port: u16,
    pub json: bool,
    pub sse_delay_ms: u64,
    /// Serve devices over TLS (`[device_listener.tls]`).
    pub tls: Option<SandboxTls>,
}

/// `--tls-cert`, `--tls-key`, `--client-ca` (PEM file paths).
#[derive(Debug, Clone)]
pub struct SandboxTls {
    pub cert: String,
    pub key: String,
    /// mTLS with certificate-bound tokens.
    pub client_ca: Option<String>,
}

impl SandboxTls {
    fn toml(&self) -> String {
        // TOML basic strings take JSON's escapes: paths with quotes or backslashes survive.
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut t = format!(
            "[device_listener.tls]\ncert_file = {}\nkey_file = {}\n",
            q(&self.cert),
            q(&self.key)
        );
        if let Some(ca) = &self.client_ca {
            t.push_str(&format!("client_ca_file = {}\nbind_device = true\n", q(ca)));
        }
        t
    }
}

pub const DEMO_DEVICE: &str = "demo-device";

fn random_secret(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

pub fn run(opts: SandboxOptions) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel();
    let upstream_port = opts.upstream_port;
    let sse_delay = std::time::Duration::from_millis(opts.sse_delay_ms);
    std::thread::Builder::new()
        .name("sandbox-upstream".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let cfg = sandbox::SandboxConfig {
                    bind: std::net::SocketAddr::from(([127, 0, 0, 1], upstream_port)),
                    sse_event_delay: sse_delay,
                    ..Default::default()
                };
                match sandbox::start(cfg).await {
                    Ok(h) => {
                        let _ = tx.send(Ok(h.base_url()));
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        })?;
    let upstream = rx
        .recv()?
        .map_err(|e| anyhow::anyhow!("sandbox upstream failed to start: {e}"))?;

    let admin_token = random_secret(24);
    let key = base64::engine::general_purpose::STANDARD
        .encode((0..32).map(|_| rand::random::<u8>()).collect::<Vec<u8>>());
    let text = format!(
        r#"
[server]
threads = 2
grace_period = "5s"
[device_listener]
addr = "127.0.0.1:{}"
[admin_listener]
addr = "127.0.0.1:{}"
token_env = "ADMIN"
[upstream]
base_url = "{upstream}"
pat_env = "PAT"
[tokens]
signing_keys = [{{ kid = "sandbox", secret_env = "KEY" }}]
[log]
format = "text"
level = "warn"
[store]
path = ":memory:"
{}"#,
        opts.port,
        opts.admin_port,
        opts.tls.as_ref().map(SandboxTls::toml).unwrap_or_default()
    );
    let admin_for_env = admin_token.clone();
    let env = move |k: &str| match k {
        "ADMIN" => Some(admin_for_env.clone()),
        "PAT" => Some("pat_sandbox".to_owned()),
        "KEY" => Some(key.clone()),
        _ => None,
    };
    let cfg = config::load_str(&text, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::telemetry::init(&cfg.log);
    let json = opts.json;
    let tls = opts.tls.is_some();
    server::run(cfg, move |ready: &Ready, state| {
        let device = match DeviceId::parse(DEMO_DEVICE) {
            Ok(d) => d,
            Err(_) => return,
        };
        state
            .devices
            .register(device.clone(), BTreeMap::new(), crate::state::now_s());
        let token = match crate::tokens::mint_for_device(state, &device, Some(86399), "admin", None)
        {
            Ok(m) => m.access_token,
            Err(e) => {
                eprintln!("cannot mint the demo token: {e}");
                return;
            }
        };
        let scheme = if tls { "https" } else { "http" };
        let gw = format!("{scheme}://{}", ready.device_addr);
        let tls_note = if tls {
            "Device TLS is on: trust your certificate's CA (curl --cacert CA.pem; Python and\n\
             OpenSSL: SSL_CERT_FILE=CA.pem; Node: NODE_EXTRA_CA_CERTS=CA.pem).\n\n"
        } else {
            ""
        };
        let admin = format!("http://{}", ready.admin_addr);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "gateway_url": gw,
                    "admin_url": admin,
                    "admin_token": admin_token,
                    "upstream_url": upstream,
                    "device_id": DEMO_DEVICE,
                    "device_token": token,
                })
            );
        } else {
            println!(
                r#"fleetgate sandbox is running.

  gateway (device API): {gw}
  admin API:            {admin}
  admin token:          {admin_token}
  sandbox upstream:     {upstream}
  demo device:          {DEMO_DEVICE}
  demo device token:    {token}

Try it:

  curl -N {gw}/v3/chat -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \
    -d '{{"bot_id":"demo","user_id":"u1","stream":true,"additional_messages":[{{"role":"user","content":"hello","content_type":"text"}}]}}'

  python3 - <<'PY'
from cozepy import Coze, TokenAuth, Message
coze = Coze(auth=TokenAuth("{token}"), base_url="{gw}")
for event in coze.chat.stream(bot_id="demo", user_id="u1", additional_messages=[Message.build_user_question_text("hello")]):
    print(event.event, event.message.content if event.message else "")
PY

{tls_note}Ctrl-C stops everything."#
            );
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    })
}
