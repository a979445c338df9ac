//! REST load: fixed concurrency with `wrk` (closed loop, keep-alive, one connection per
//! concurrent client) and fixed rate with our own open-loop client.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::Target;
use crate::procs::cpu_seconds;
use crate::report::pct;

/// The small JSON call every REST scenario makes (~1 KB answer).
pub const PATH: &str = "/v1/audio/voices";

pub struct WrkResult {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
    /// CPU of the serving process (gateway, nginx; the sandbox for `direct`) per request.
    pub cpu_us_per_req: f64,
}

pub fn wrk_available() -> bool {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok()
}

/// Writes a wrk Lua script: one Authorization header, or (with `tokens_file`) a different
/// device token per request; `done` prints one JSON line.
pub fn wrk_script(
    dir: &Path,
    auth: &str,
    tokens_file: Option<&Path>,
) -> Result<std::path::PathBuf> {
    let mut lua = String::new();
    match tokens_file {
        None => lua.push_str(&format!("wrk.headers[\"Authorization\"] = \"{auth}\"\n")),
        Some(f) => lua.push_str(&format!(
            r#"local tokens = {{}}
for line in io.lines("{}") do tokens[#tokens + 1] = "Bearer " .. line end
local i = 0
init = function(args) i = math.random(#tokens) end
request = function()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format(nil, nil, {{ Authorization = tokens[i] }})
end
"#,
            f.display()
        )),
    }
    lua.push_str(
        r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#,
    );
    let p = dir.join(if tokens_file.is_some() {
        "wrk-many.lua"
    } else {
        "wrk.lua"
    });
    std::fs::write(&p, lua)?;
    Ok(p)
}

/// `wrk -t<threads> -c<conns> -d<secs>` against `target`.
pub async fn wrk(
    target: &Target,
    script: &Path,
    threads: usize,
    conns: usize,
    secs: f64,
) -> Result<WrkResult> {
    let cpu0 = cpu_seconds(target.pid);
    let out = tokio::time::timeout(
        Duration::from_secs_f64(secs + 30.0),
        tokio::process::Command::new("wrk")
            .arg(format!("-t{threads}"))
            .arg(format!("-c{conns}"))
            .arg(format!("-d{}s", secs.ceil() as u64))
            .arg("--latency")
            .arg("-s")
            .arg(script)
            .arg(format!("{}://{}{PATH}", target.scheme, target.addr))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("wrk did not finish"))?
    .context("running wrk")?;
    let cpu = cpu_seconds(target.pid) - cpu0;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRKJSON "))
        .ok_or_else(|| {
            anyhow!(
                "wrk output without result: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let g = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let requests = g("requests");
    Ok(WrkResult {
        rps: requests / (g("duration_us") / 1e6).max(1e-9),
        p50_us: g("p50"),
        p99_us: g("p99"),
        p999_us: g("p999"),
        errors: (g("errors") + g("non2xx")) as u64,
        cpu_us_per_req: cpu * 1e6 / requests.max(1.0),
    })
}

pub struct RateResult {
    pub sent: u64,
    pub ok: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub cpu_us_per_req: f64,
}

/// Open loop at `rps` for `secs`: request `i` is due at `start + i/rps` and its latency is
/// measured from that due time (no coordinated omission). A dedicated thread schedules with
/// `thread::sleep` (sub-100 µs wake-ups on Linux, unlike tokio's 1 ms timer); requests run on
/// the tokio runtime over a keep-alive pool that grows as needed.
///
/// One unrecorded second at the same rate comes first, so the pool has grown to what the
/// rate needs before anything is measured: otherwise the measured run pays for opening those
/// connections, which over TLS (`--tls`) is a full handshake each (~1 ms of server CPU on
/// this box), and a handshake burst that slows the proxy makes the pool grow further.
pub async fn open_loop(target: &Target, rps: f64, secs: f64) -> Result<RateResult> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(5))
        // `--tls` runs serve the test fixture certificate; the load client does not verify it
        // (as wrk does not): the figure is the proxy's cost, not the client's.
        .danger_accept_invalid_certs(target.scheme == "https")
        .build()?;
    drive(client.clone(), target, rps, 1.0_f64.min(secs)).await?;
    drive(client, target, rps, secs).await
}

async fn drive(
    client: reqwest::Client,
    target: &Target,
    rps: f64,
    secs: f64,
) -> Result<RateResult> {
    let url = format!("{}://{}{PATH}", target.scheme, target.addr);
    for _ in 0..8 {
        let _ = client
            .get(&url)
            .header("Authorization", &target.auth)
            .send()
            .await?
            .bytes()
            .await;
    }
    let lat: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = (rps * secs) as u64;
    let handle = tokio::runtime::Handle::current();
    let cpu0 = cpu_seconds(target.pid);
    let (auth, lat2, ok2) = (target.auth.clone(), lat.clone(), ok.clone());
    let scheduler = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rps);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (client, url, auth, lat, ok) = (
                client.clone(),
                url.clone(),
                auth.clone(),
                lat2.clone(),
                ok2.clone(),
            );
            tasks.push(handle.spawn(async move {
                let r = client.get(&url).header("Authorization", auth).send().await;
                let good = match r {
                    Ok(resp) => {
                        let s = resp.status().is_success();
                        resp.bytes().await.is_ok() && s
                    }
                    Err(_) => false,
                };
                if good {
                    let us = due.elapsed().as_micros() as u64;
                    if let Ok(mut v) = lat.lock() {
                        v.push(us);
                    }
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || scheduler.join())
        .await?
        .map_err(|_| anyhow!("scheduler thread panicked"))?;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let cpu = cpu_seconds(target.pid) - cpu0;
    let mut v = match lat.lock() {
        Ok(v) => v.clone(),
        Err(_) => bail!("latency lock poisoned"),
    };
    let okn = ok.load(std::sync::atomic::Ordering::Relaxed);
    Ok(RateResult {
        sent: total,
        ok: okn,
        p50_us: pct(&mut v, 50.0),
        p99_us: pct(&mut v, 99.0),
        p999_us: pct(&mut v, 99.9),
        cpu_us_per_req: cpu * 1e6 / (okn.max(1) as f64),
    })
}
