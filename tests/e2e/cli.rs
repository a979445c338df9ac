//! The CLI's offline subcommands.

use std::process::Command;

use gateway_tests::*;

/// `check-config` reports every problem with its key path and exits non-zero; a good file
/// passes. `keygen` prints a key that a config accepts.
#[test]
fn check_config_lists_every_error_and_keygen_output_is_usable() {
    let dir = TempDir::new();
    let bad = dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[server]\nthreads = 0\n[device_listener.tls]\ncert_file = \"/nonexistent/device.pem\"\nkey_file = \"{}\"\nbind_device = true\n[upstream]\nbase_url = \"ftp://x\"\npat_env = \"FG_MISSING\"\n",
            fixture_path("upstream.key").display()
        ),
    )
    .unwrap();
    let out = Command::new(fleetgate_bin())
        .args(["check-config", "-c"])
        .arg(&bad)
        .env_remove("FG_MISSING")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "server.threads",
        "upstream.base_url",
        "upstream.pat_env",
        "tokens.signing_keys",
        "admin_listener.token_env",
        "device_listener.tls.cert_file",
        "device_listener.tls.bind_device",
    ] {
        assert!(err.contains(path), "{path} missing in:\n{err}");
    }
    // A bad TLS file is named, never printed.
    assert!(err.contains("/nonexistent/device.pem"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");

    let out = Command::new(fleetgate_bin())
        .args(["keygen", "--kid", "k9"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("FLEETGATE_SIGNING_KEY_K9="))
        .expect("key line");
    let key = line.split_once('=').unwrap().1.to_owned();
    let good = dir.0.join("good.toml");
    std::fs::write(
        &good,
        "[tokens]\nsigning_keys = [{ kid = \"k9\", secret_env = \"FG_KEY\" }]\n",
    )
    .unwrap();
    succeeded(
        Command::new(fleetgate_bin())
            .args(["check-config", "-c"])
            .arg(&good)
            .env("FG_KEY", key)
            .env("FLEETGATE_ADMIN_TOKEN", "admin-token-0123456789")
            .env("COZE_API_TOKEN", "pat_x")
            .output()
            .unwrap(),
    );
}
