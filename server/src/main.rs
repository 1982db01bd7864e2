//! `tally-server`: see `tally-server --help`.

use clap::Parser;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = tally_server::config::apply_config_file(&args) {
        eprintln!("tally-server: {e}");
        return ExitCode::from(2);
    }
    let cli = tally_server::cli::Cli::parse();
    // `serve` logs what it does; one-shot commands print only their answer and warnings.
    let default = if cli.verbose || matches!(cli.command, tally_server::cli::Command::Serve(..)) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    if std::env::var("TALLY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        // Colour only for a person at a terminal: plain text in files, pipes and journald.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tally-server: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(tally_server::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally-server: {e}");
            ExitCode::FAILURE
        }
    }
}
