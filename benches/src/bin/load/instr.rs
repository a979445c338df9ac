//! Instructions and allocations per request, counted by valgrind's callgrind.
//!
//! Timed figures on a shared 2-core box drift by ±15 % between runs, which hides changes of a
//! few µs per request. Instruction counts do not drift: the proxy runs under
//! `valgrind --tool=callgrind`, the counters are zeroed after a warm-up
//! (`callgrind_control --zero`), a fixed number of requests is sent, and the counters are
//! dumped (`callgrind_control --dump`). Ir per request and allocator calls per request come
//! from the dump; the dump itself is kept for `callgrind_annotate`.
//!
//! What it does not see: cache misses, the kernel, waiting. It answers "how much work does
//! the proxy's own code do per request", not "how fast is it".

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};

use crate::Target;
use crate::rest::PATH;

/// Requests sent before the counters are zeroed (connections, upstream pool, lazy state).
pub const WARMUP: u64 = 1000;

/// The wrapper command for `name`'s process: callgrind, dumps under `<out_dir>/callgrind/`.
pub fn valgrind(out_dir: &Path, name: &str) -> Vec<String> {
    vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        "--dump-instr=no".to_owned(),
        format!(
            "--callgrind-out-file={}",
            out_dir.join("callgrind").join(name).display()
        ),
    ]
}

/// valgrind and callgrind_control must be installed (`apt-get install -y valgrind`).
pub fn check_tools() -> Result<()> {
    for tool in ["valgrind", "callgrind_control"] {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok();
        if !ok {
            bail!("{tool} not found: apt-get install -y valgrind");
        }
    }
    Ok(())
}

pub struct Counted {
    pub ir_per_request: f64,
    pub allocs_per_request: f64,
}

/// Warm-up, zero, `requests` at `concurrency`, dump; reads the new dump. The dump directory
/// (`<out_dir>/callgrind`) exists already: valgrind needed it to start.
pub async fn run(
    target: &Target,
    out_dir: &Path,
    requests: u64,
    concurrency: usize,
) -> Result<Counted> {
    let dir = out_dir.join("callgrind");
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    send(&client, target, WARMUP, concurrency).await?;
    control(target.pid, "--zero").await?;
    send(&client, target, requests, concurrency).await?;
    let before = dumps(&dir, target.name)?;
    control(target.pid, "--dump").await?;
    let after = dumps(&dir, target.name)?;
    let dump = after
        .into_iter()
        .find(|p| !before.contains(p))
        .ok_or_else(|| anyhow!("callgrind wrote no new dump for {}", target.name))?;
    let (ir, allocs) = read_dump(&dump)?;
    Ok(Counted {
        ir_per_request: ir as f64 / requests as f64,
        allocs_per_request: allocs as f64 / requests as f64,
    })
}

/// `requests` GETs of [`PATH`] over `concurrency` keep-alive connections; every answer must
/// be a 200 (a failed request would make the per-request division wrong).
async fn send(
    client: &reqwest::Client,
    target: &Target,
    requests: u64,
    concurrency: usize,
) -> Result<()> {
    let url = format!("http://{}{PATH}", target.addr);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, auth, next) = (
            client.clone(),
            url.clone(),
            target.auth.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let resp = client
                    .get(&url)
                    .header("Authorization", &auth)
                    .send()
                    .await?;
                let status = resp.status();
                resp.bytes().await?;
                if !status.is_success() {
                    bail!("{url}: status {status}");
                }
            }
            Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(())
}

async fn control(pid: u32, what: &str) -> Result<()> {
    let out = tokio::process::Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .output()
        .await
        .context("running callgrind_control")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {what} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The dump files of `name` (`<name>.<n>`) now in `dir`.
fn dumps(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!("{name}.");
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with(&prefix))
        {
            v.push(p);
        }
    }
    Ok(v)
}

/// The allocator's entry points as Rust's global allocator (the `mimalloc` crate) calls them.
const ALLOC_FNS: [&str; 3] = [
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
];

/// (total Ir, calls into [`ALLOC_FNS`] from outside the allocator) of a callgrind dump.
fn read_dump(path: &Path) -> Result<(u64, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    parse_dump(BufReader::new(f)).with_context(|| format!("reading {}", path.display()))
}

/// Parses the callgrind format: `summary:` for the total, and each `calls=` line after a
/// `cfn=` for call counts. Function names are compressed (`fn=(7) name` once, `fn=(7)`
/// after), so the `(id) → name` table is kept.
fn parse_dump(r: impl std::io::BufRead) -> Result<(u64, u64)> {
    let mut names = std::collections::HashMap::<String, String>::new();
    let mut name_of = |spec: &str| -> String {
        // "(7) name" or "(7)" or "name"
        let spec = spec.trim();
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) => {
                let rest = rest.trim();
                if rest.is_empty() {
                    names.get(id).cloned().unwrap_or_default()
                } else {
                    names.insert(id.to_owned(), rest.to_owned());
                    rest.to_owned()
                }
            }
            None => spec.to_owned(),
        }
    };
    let (mut total, mut allocs) = (None, 0u64);
    let (mut caller, mut callee) = (String::new(), String::new());
    for line in r.lines() {
        let line = line?;
        if let Some(v) = line.strip_prefix("summary:") {
            total = Some(v.trim().parse::<u64>().context("summary")?);
        } else if let Some(v) = line.strip_prefix("fn=") {
            caller = name_of(v);
        } else if let Some(v) = line.strip_prefix("cfn=") {
            callee = name_of(v);
        } else if let Some(v) = line.strip_prefix("calls=") {
            let base = callee.split('\'').next().unwrap_or_default();
            if ALLOC_FNS.contains(&base) && !caller.starts_with("mi_") {
                let n = v.split_whitespace().next().unwrap_or("0");
                allocs += n.parse::<u64>().context("calls=")?;
            }
        }
    }
    let total = total.ok_or_else(|| anyhow!("no summary: line"))?;
    Ok((total, allocs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_totals_and_allocator_calls_with_compressed_names() {
        let dump = "\
events: Ir
fn=(1) handler
0 100
cfn=(2) mi_malloc_aligned
calls=3 0
0 30
cfn=(3) helper
calls=1 0
0 5
fn=(2)
0 40
cfn=(4) mi_malloc_aligned'2
calls=7 0
0 1
fn=(5) mi_realloc_aligned
cfn=(2)
calls=9 0
0 1
fn=(3)
cfn=(2)
calls=2 0
0 2
summary: 1234
totals: 1234
";
        let (ir, allocs) = parse_dump(dump.as_bytes()).unwrap();
        assert_eq!(ir, 1234);
        // handler → malloc (3), mi_malloc_aligned → itself (allocator-internal, 7: not counted),
        // mi_realloc_aligned → malloc (internal, 9: not counted), helper → malloc (2).
        assert_eq!(allocs, 5);
    }

    #[test]
    fn a_dump_without_summary_is_an_error() {
        assert!(parse_dump("events: Ir\nfn=(1) a\n0 5\n".as_bytes()).is_err());
    }
}
