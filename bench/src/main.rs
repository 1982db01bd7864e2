//! `tally-loadgen`: the server side of the Tally benchmarks, and the report builder.
//!
//! ```text
//! tally-loadgen run --server-bin target/release/tally-server --out target/bench-server.jsonl [--quick]
//! tally-loadgen report --core target/bench-core.jsonl --server target/bench-server.jsonl \
//!     --json bench/results.json --svg bench/latency.svg --md bench/results.md
//! ```
//!
//! `run` starts a throwaway Postgres cluster (fsync off) and a release `tally-server` on
//! loopback, then measures every `server.*` and `sync.*` figure beside its baseline from the
//! same run. `report` merges the core's and the server's figures into `results.json`, a
//! Markdown table and an SVG chart of latency percentiles.

mod report;
mod run;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rest = args.get(2..).unwrap_or_default();
    let code = match args.get(1).map(String::as_str) {
        Some("run") => run::main(rest),
        Some("report") => report::main(rest),
        _ => {
            eprintln!(
                "usage: tally-loadgen run --server-bin PATH --out FILE [--quick]\n       tally-loadgen report --core FILE --server FILE --json FILE --svg FILE --md FILE"
            );
            2
        }
    };
    std::process::exit(code);
}
