//! Merges the core's and the server's figures into `results.json`, a Markdown table and an SVG
//! chart of latency percentiles per operation.

use crate::arg;
use serde_json::{Value, json};
use std::fmt::Write as _;

fn read_lines(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| (kb / 1024.0 / 1024.0).round());
    let pg = std::process::Command::new("pg_config")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "memory_gb": mem_gb,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "postgres": pg,
    })
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn main(args: &[String]) -> i32 {
    let core = arg(args, "--core").map(|p| read_lines(&p)).unwrap_or_default();
    let server = arg(args, "--server").map(|p| read_lines(&p)).unwrap_or_default();
    let quick = args.iter().any(|a| a == "--quick");
    let all: Vec<Value> = core.into_iter().chain(server).collect();
    let find = |name: &str| all.iter().find(|v| v["name"] == name).cloned();
    let mut results = Vec::new();
    let mut baselines = Vec::new();
    for v in &all {
        match v["kind"].as_str() {
            Some("result") => {
                let mut r = v.clone();
                if let Some(src) = v["baseline_from_core"].as_str()
                    && let Some(b) = find(src).and_then(|b| b["value"].as_f64()).filter(|b| *b > 0.0)
                {
                    let dps = 1e6 / b;
                    let value = v["value"].as_f64().unwrap_or(f64::NAN);
                    r["baseline_name"] = json!(format!("{src} as decisions/s (1 thread)"));
                    r["baseline_value"] = json!(dps);
                    r["ratio"] = json!(value / dps);
                    r["speedup_on_device"] = json!(dps / value);
                }
                if let Some(o) = r.as_object_mut() {
                    o.remove("kind");
                    o.remove("baseline_from_core");
                }
                results.push(r);
            }
            Some("measurement") => {
                let mut m = v.clone();
                if let Some(o) = m.as_object_mut() {
                    o.remove("kind");
                }
                baselines.push(m);
            }
            _ => {}
        }
    }
    let mach = machine();
    let doc = json!({
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "mode": if quick { "quick" } else { "full" },
        "cores": mach["cores"],
        "machine": mach,
        "results": results,
        "baselines_and_fixtures": baselines,
    });
    if let Some(p) = arg(args, "--json")
        && let Err(e) = std::fs::write(&p, serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n")
    {
        eprintln!("writing {p}: {e}");
        return 1;
    }
    let md = markdown(&doc);
    println!("{md}");
    if let Some(p) = arg(args, "--md") {
        let _ = std::fs::write(&p, &md);
    }
    if let Some(p) = arg(args, "--svg") {
        let rows: Vec<Value> = doc["results"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(doc["baselines_and_fixtures"].as_array().into_iter().flatten())
            .cloned()
            .collect();
        let _ = std::fs::write(&p, svg(&rows, &doc));
    }
    0
}

fn markdown(doc: &Value) -> String {
    let m = &doc["machine"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run of {} ({} mode) on {} core(s), {}, {} GB RAM, {}; Postgres, the server and the load generator share those cores.\n",
        doc["date"].as_str().unwrap_or(""),
        doc["mode"].as_str().unwrap_or(""),
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gb"],
        m["postgres"].as_str().unwrap_or("PostgreSQL ?"),
    );
    let _ = writeln!(s, "| name | value | unit | p99 | n | server CPU-s / 1000 | baseline | baseline value | ratio | target | met |");
    let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---|---:|---:|---|---|");
    for r in doc["results"].as_array().into_iter().flatten() {
        let p99 = r["percentiles"]["p99_us"]
            .as_f64()
            .map(|v| if v >= 1000.0 { format!("{} ms", fmt_num(v / 1000.0)) } else { format!("{} µs", fmt_num(v)) })
            .unwrap_or_else(|| "—".into());
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["name"].as_str().unwrap_or(""),
            fmt_num(r["value"].as_f64().unwrap_or(f64::NAN)),
            r["unit"].as_str().unwrap_or(""),
            p99,
            r["percentiles"]["count"].as_f64().map(fmt_num).unwrap_or_else(|| "—".into()),
            r["server_cpu_s_per_1000"].as_f64().map(|c| format!("{c:.3}")).unwrap_or_else(|| "—".into()),
            r["baseline_name"].as_str().map(|b| format!("`{b}`")).unwrap_or_else(|| "—".into()),
            r["baseline_value"].as_f64().map(fmt_num).unwrap_or_else(|| "—".into()),
            r["ratio"].as_f64().map(|v| if v < 0.01 { format!("{v:.5}") } else { format!("{v:.2}") }).unwrap_or_else(|| "—".into()),
            r["target"].as_str().unwrap_or(""),
            match r["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        );
    }
    let per_core: Vec<String> = doc["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            r["per_core"]
                .as_f64()
                .map(|p| format!("`{}` {} {}/core", r["name"].as_str().unwrap_or(""), fmt_num(p), r["unit"].as_str().unwrap_or("")))
        })
        .collect();
    if !per_core.is_empty() {
        let _ = writeln!(s, "\nPer core: {}.", per_core.join("; "));
    }
    let fixtures: Vec<String> = doc["baselines_and_fixtures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["name"].as_str().is_some_and(|n| n.starts_with("fixture.") || n.ends_with("_wal_pages")))
        .map(|b| {
            format!(
                "`{}` {} {}",
                b["name"].as_str().unwrap_or(""),
                fmt_num(b["value"].as_f64().unwrap_or(f64::NAN)),
                b["unit"].as_str().unwrap_or("")
            )
        })
        .collect();
    if !fixtures.is_empty() {
        let _ = writeln!(s, "Fixtures and pages written per commit: {}.", fixtures.join("; "));
    }
    let cpu: Vec<String> = doc["baselines_and_fixtures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["server_cpu_s_per_1000"].as_f64().map(|c| format!("`{}` {c:.3}", b["name"].as_str().unwrap_or(""))))
        .collect();
    if !cpu.is_empty() {
        let _ = writeln!(s, "Server CPU-s per 1,000 requests of the baselines: {}.", cpu.join("; "));
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A log-scale dot plot: one row per operation, p50 / p90 / p99 / p99.9 markers.
fn svg(rows: &[Value], doc: &Value) -> String {
    let rows: Vec<&Value> = rows.iter().filter(|r| r["percentiles"]["p50_us"].as_f64().is_some()).collect();
    let (left, right, top, row_h) = (300.0, 40.0, 70.0, 26.0);
    let width = 1000.0;
    let plot_w = width - left - right;
    let height = top + row_h * rows.len() as f64 + 60.0;
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|r| ["p50_us", "p999_us"].into_iter().filter_map(move |k| r["percentiles"][k].as_f64()))
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.01).log10().floor();
    let hi = all.iter().copied().fold(0.0, f64::max).max(1.0).log10().ceil().max(lo + 1.0);
    let x = |us: f64| left + (us.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * plot_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" font-weight="bold">Tally latency percentiles per operation (log scale)</text>"#,
        10
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="40" fill="#555">{} · {} core(s) · {} mode · HDR histograms of individual operations</text>"##,
        esc(doc["date"].as_str().unwrap_or("")),
        doc["machine"]["cores"],
        esc(doc["mode"].as_str().unwrap_or(""))
    );
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let xx = x(v);
        let label = if v >= 1e6 {
            format!("{} s", v / 1e6)
        } else if v >= 1e3 {
            format!("{} ms", v / 1e3)
        } else {
            format!("{v} µs")
        };
        let _ =
            writeln!(s, r##"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{}" stroke="#ddd"/>"##, top - 8.0, top + row_h * rows.len() as f64);
        let _ = writeln!(
            s,
            r##"<text x="{xx:.1}" y="{}" text-anchor="middle" fill="#555">{label}</text>"##,
            top + row_h * rows.len() as f64 + 16.0
        );
        d += 1.0;
    }
    let colors =
        [("p50_us", "#1f77b4", "p50"), ("p90_us", "#2ca02c", "p90"), ("p99_us", "#ff7f0e", "p99"), ("p999_us", "#d62728", "p99.9")];
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * i as f64 + row_h / 2.0;
        let p = &r["percentiles"];
        if i % 2 == 0 {
            let _ = writeln!(s, r##"<rect x="0" y="{:.1}" width="{width}" height="{row_h}" fill="#f6f8fa"/>"##, y - row_h / 2.0);
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 10.0,
            y + 4.0,
            esc(r["name"].as_str().unwrap_or(""))
        );
        if let (Some(a), Some(b)) = (p["p50_us"].as_f64(), p["p999_us"].as_f64()) {
            let _ = writeln!(s, r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#999" stroke-width="2"/>"##, x(a), x(b));
        }
        for (k, c, _) in colors {
            if let Some(v) = p[k].as_f64() {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{y:.1}" r="5" fill="{c}"><title>{} {k}: {v:.1} µs</title></circle>"#,
                    x(v),
                    esc(r["name"].as_str().unwrap_or(""))
                );
            }
        }
    }
    let ly = height - 18.0;
    for (j, (_, c, label)) in colors.iter().enumerate() {
        let lx = left + j as f64 * 90.0;
        let _ = writeln!(s, r#"<circle cx="{lx}" cy="{}" r="5" fill="{c}"/><text x="{}" y="{}">{label}</text>"#, ly - 4.0, lx + 10.0, ly);
    }
    s.push_str("</svg>\n");
    s
}
