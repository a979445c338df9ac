//! Figures (one value per target per repeat), medians, ratios, and the JSON/Markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Percentile (nearest rank) of unsorted samples; 0 when empty.
pub fn pct(samples: &mut [u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples
        .get(rank.clamp(1, samples.len()) - 1)
        .copied()
        .unwrap_or(0)
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One figure of one scenario: its repeats per target.
#[derive(Serialize, Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub unit: String,
    /// `higher` or `lower` is better.
    pub better: &'static str,
    /// target → one value per repeat.
    pub runs: BTreeMap<String, Vec<f64>>,
}

#[derive(Serialize, Default, Debug)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub started_unix_s: u64,
    pub notes: Vec<String>,
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn record(&mut self, name: &str, unit: &str, better: &'static str, target: &str, v: f64) {
        let f = match self.figures.iter_mut().position(|f| f.name == name) {
            Some(i) => &mut self.figures[i],
            None => {
                self.figures.push(Figure {
                    name: name.to_owned(),
                    unit: unit.to_owned(),
                    better,
                    runs: BTreeMap::new(),
                });
                let last = self.figures.len() - 1;
                &mut self.figures[last]
            }
        };
        f.runs.entry(target.to_owned()).or_default().push(v);
    }

    pub fn json(&self) -> serde_json::Value {
        let figs: Vec<_> = self
            .figures
            .iter()
            .map(|f| {
                let med: BTreeMap<_, _> =
                    f.runs.iter().map(|(t, v)| (t.clone(), median(v))).collect();
                serde_json::json!({
                    "name": f.name, "unit": f.unit, "better": f.better,
                    "runs": f.runs, "median": med,
                    "gateway_over_direct": ratio(&med, "gateway", "direct"),
                    "gateway_over_nginx": ratio(&med, "gateway", "nginx"),
                    "gateway_over_pingora": ratio(&med, "gateway", "pingora"),
                    "pingora_over_nginx": ratio(&med, "pingora", "nginx"),
                    "gateway_minus_direct": diff(&med, "gateway", "direct"),
                    "nginx_minus_direct": diff(&med, "nginx", "direct"),
                    "pingora_minus_direct": diff(&med, "pingora", "direct"),
                })
            })
            .collect();
        serde_json::json!({
            "command": self.command, "machine": self.machine,
            "started_unix_s": self.started_unix_s, "notes": self.notes, "figures": figs,
        })
    }

    /// The Markdown table. The `pingora` columns (value, gateway/pingora, pingora/nginx,
    /// pingora − direct, runs) appear only when some figure has a pingora value, so reports
    /// without that target keep their old shape.
    pub fn markdown(&self) -> String {
        let pingora = self.figures.iter().any(|f| f.runs.contains_key("pingora"));
        let targets: &[&str] = if pingora {
            &["direct", "gateway", "nginx", "pingora"]
        } else {
            &["direct", "gateway", "nginx"]
        };
        let ratios: &[(&str, &str)] = if pingora {
            &[
                ("gateway", "direct"),
                ("gateway", "nginx"),
                ("gateway", "pingora"),
                ("pingora", "nginx"),
            ]
        } else {
            &[("gateway", "direct"), ("gateway", "nginx")]
        };
        let added_over_direct = &targets[1..];
        let mut head: Vec<String> = vec!["figure".to_owned(), "unit".to_owned()];
        head.extend(targets.iter().map(|t| (*t).to_owned()));
        head.extend(ratios.iter().map(|(a, b)| format!("{a}/{b}")));
        head.extend(added_over_direct.iter().map(|t| format!("{t} − direct")));
        head.push(format!("runs ({})", targets.join("; ")));

        let mut s = String::new();
        let _ = writeln!(s, "Command: `{}`  ", self.command);
        let _ = writeln!(s, "Machine: {}\n", self.machine);
        let _ = writeln!(s, "| {} |", head.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
        for f in &self.figures {
            let med: BTreeMap<_, _> = f.runs.iter().map(|(t, v)| (t.clone(), median(v))).collect();
            let mut row: Vec<String> = vec![f.name.clone(), f.unit.clone()];
            row.extend(
                targets
                    .iter()
                    .map(|t| med.get(*t).copied().flatten().map_or("–".to_owned(), fmt)),
            );
            row.extend(
                ratios.iter().map(|(a, b)| {
                    ratio(&med, a, b).map_or("–".to_owned(), |x| format!("{x:.2}×"))
                }),
            );
            row.extend(added_over_direct.iter().map(|a| {
                if f.unit != "µs" {
                    return "".to_owned();
                }
                diff(&med, a, "direct").map_or("–".to_owned(), fmt)
            }));
            row.push(
                targets
                    .iter()
                    .map(|t| {
                        f.runs.get(*t).map_or("–".to_owned(), |v| {
                            v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(" / ")
                        })
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n- {n}");
        }
        s
    }
}

fn ratio(med: &BTreeMap<String, Option<f64>>, a: &str, b: &str) -> Option<f64> {
    let x = med.get(a).copied().flatten()?;
    let y = med.get(b).copied().flatten()?;
    (y != 0.0).then(|| x / y)
}

fn diff(med: &BTreeMap<String, Option<f64>>, a: &str, b: &str) -> Option<f64> {
    Some(med.get(a).copied().flatten()? - med.get(b).copied().flatten()?)
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `nproc`, CPU model and memory, from /proc.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_owned(), |m| m.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}
