//! An embedded PostgreSQL cluster made with the installed binaries (`initdb`, `pg_ctl`).
//!
//! Used by `tally-server serve` when no database URL is configured, and by tests and
//! benchmarks for throwaway clusters. As root, the binaries run as the `postgres` system user
//! (`runuser -u postgres --`) on a data directory that user owns and can reach.

use sha2::{Digest, Sha256};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// What can go wrong with an embedded cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// initdb/pg_ctl were not found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH, via `pg_config --bindir`, or under /usr/lib/postgresql/*/bin; install them with `apt-get install -y postgresql` (or set TALLY_DATABASE_URL to use an existing database)"
    )]
    BinariesNotFound,
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command.
        what: String,
        /// Its output.
        detail: String,
    },
    /// File system error.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Options of [`Cluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Turn off `fsync`, `synchronous_commit` and `full_page_writes` (throwaway test clusters).
    pub fast_unsafe: bool,
    /// Remove the data directory on stop, and stop the cluster when this process exits even if
    /// it never runs `Drop` (a watchdog process is spawned).
    pub ephemeral: bool,
    /// Port to listen on (default: a free loopback port).
    pub port: Option<u16>,
}

/// A running PostgreSQL cluster listening on 127.0.0.1. Stopped on [`Cluster::stop`] or drop.
#[derive(Debug)]
pub struct Cluster {
    bindir: PathBuf,
    data: PathBuf,
    port: u16,
    password: String,
    as_postgres: bool,
    ephemeral: bool,
    stopped: bool,
}

/// Finds the directory holding `initdb` and `pg_ctl`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has(&d) {
                return Ok(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has(&d) {
            return Ok(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|d| has(d)).collect())
        .unwrap_or_default();
    found.sort_by_key(|p| p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0));
    found.pop().ok_or(ClusterError::BinariesNotFound)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether the `postgres` system user can create and enter `dir`'s contents.
fn postgres_can_use(dir: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-w"])
        .arg(dir)
        .arg("-a")
        .arg("-x")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn chown_postgres(dir: &Path) -> Result<(), ClusterError> {
    let user = nix::unistd::User::from_name("postgres").ok().flatten().ok_or_else(|| ClusterError::Command {
        what: "looking up the postgres user".into(),
        detail: "no `postgres` system user (install the postgresql package)".into(),
    })?;
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
        .map_err(|e| ClusterError::Io(format!("chown {}", dir.display()), std::io::Error::from(e)))
}

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ClusterError::Io("finding a free port".into(), e))
}

impl Cluster {
    /// Creates (with `initdb`, when `dir` holds no cluster yet) and starts a cluster whose data
    /// lives in `dir`. As root, when the `postgres` user cannot reach `dir`, the data lives
    /// under `/var/lib/tally/<hash of dir>/postgres` instead.
    pub fn start(dir: &Path, opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        std::fs::create_dir_all(dir).map_err(|e| ClusterError::Io(format!("creating {}", dir.display()), e))?;
        let mut data = std::fs::canonicalize(dir).map_err(|e| ClusterError::Io(format!("resolving {}", dir.display()), e))?;
        if as_postgres {
            chown_postgres(&data)?;
            if !postgres_can_use(&data) {
                let hash = hex::encode(&Sha256::digest(data.to_string_lossy().as_bytes())[..8]);
                let fallback = PathBuf::from("/var/lib/tally").join(hash).join("postgres");
                std::fs::create_dir_all(&fallback).map_err(|e| ClusterError::Io(format!("creating {}", fallback.display()), e))?;
                for d in [fallback.parent().unwrap_or(&fallback), fallback.as_path()] {
                    chown_postgres(d)?;
                }
                tracing::info!(requested = %data.display(), used = %fallback.display(), "the postgres user cannot reach the data directory; using a fallback");
                data = fallback;
            }
        }
        let pwfile = data.join("tally-password");
        let mut cluster =
            Cluster { bindir, data: data.clone(), port: 0, password: String::new(), as_postgres, ephemeral: opts.ephemeral, stopped: true };
        if !data.join("PG_VERSION").exists() {
            let password = hex::encode(rand::random::<[u8; 16]>());
            let tmp_pw = std::env::temp_dir().join(format!("tally-pw-{}", hex::encode(rand::random::<[u8; 8]>())));
            std::fs::write(&tmp_pw, &password).map_err(|e| ClusterError::Io("writing the password file".into(), e))?;
            if as_postgres {
                chown_postgres(&tmp_pw)?;
            }
            let r = cluster.run(
                "initdb",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    // As production clusters are: case mapping (`lower()`) follows Unicode.
                    "--locale=C.UTF-8",
                    "--pwfile",
                    &tmp_pw.to_string_lossy(),
                ],
            );
            let _ = std::fs::remove_file(&tmp_pw);
            r?;
            // Kept next to the cluster (readable by its owner only) so a restart can connect.
            std::fs::write(&pwfile, &password).map_err(|e| ClusterError::Io("writing the password file".into(), e))?;
        }
        cluster.recover_stale()?;
        cluster.password =
            std::fs::read_to_string(&pwfile).map_err(|e| ClusterError::Io(format!("reading {}", pwfile.display()), e))?.trim().to_string();
        let mut last_err = None;
        for _ in 0..3 {
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            let mut o = format!("-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200");
            if opts.fast_unsafe {
                o.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
            }
            let log = data.join("server.log");
            match cluster.run("pg_ctl", &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &o, "-w", "-t", "60", "start"])
            {
                Ok(()) => {
                    cluster.port = port;
                    cluster.stopped = false;
                    last_err = None;
                    break;
                }
                Err(e) => {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                    last_err = Some(ClusterError::Command { what: "pg_ctl start".into(), detail: format!("{e}\n{tail}") });
                    if opts.port.is_some() {
                        break;
                    }
                    // The processes of a crashed cluster may take a moment to go.
                    std::thread::sleep(Duration::from_millis(500));
                    cluster.recover_stale()?;
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        if opts.ephemeral {
            cluster.spawn_watchdog();
        }
        Ok(cluster)
    }

    /// Makes a cluster left behind by a crashed owner startable again: a `postmaster.pid`
    /// whose process is gone (or is no PostgreSQL) is removed, and a postmaster still running
    /// on this data directory is stopped cleanly (the caller owns the directory: see
    /// `tally-server serve`'s lock), so the next `pg_ctl start` succeeds.
    fn recover_stale(&self) -> Result<(), ClusterError> {
        let pidfile = self.data.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pidfile) else { return Ok(()) };
        let mut lines = text.lines();
        let pid = lines.next().and_then(|l| l.trim().parse::<i32>().ok()).unwrap_or(0);
        let dir = lines.next().map(str::trim).unwrap_or("");
        let alive = pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        let is_postgres = alive
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim().starts_with("postgres") || c.trim() == "postmaster");
        if alive && is_postgres && Path::new(dir) == self.data {
            tracing::warn!(pid, data = %self.data.display(), "a PostgreSQL of a previous run is still running on this data directory; stopping it");
            eprintln!(
                "tally-server: stopping the PostgreSQL (pid {pid}) left running by a previous tally-server on {}",
                self.data.display()
            );
            let d = self.data.to_string_lossy().to_string();
            if self.run("pg_ctl", &["-D", &d, "stop", "-m", "fast", "-w", "-t", "30"]).is_err() {
                self.run("pg_ctl", &["-D", &d, "stop", "-m", "immediate", "-w", "-t", "30"])?;
            }
        } else {
            tracing::warn!(pid, "removing the stale postmaster.pid of a cluster that is not running");
            std::fs::remove_file(&pidfile).map_err(|e| ClusterError::Io(format!("removing {}", pidfile.display()), e))?;
        }
        Ok(())
    }

    fn command(&self, bin: &str) -> Command {
        let exe = self.bindir.join(bin);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, bin: &str, args: &[&str]) -> Result<(), ClusterError> {
        let out = self
            .command(bin)
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ClusterError::Io(format!("running {bin}"), e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command {
                what: bin.into(),
                detail: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    /// A process that stops the cluster (and removes it) once this process is gone.
    fn spawn_watchdog(&self) {
        let pid = std::process::id();
        let data = self.data.to_string_lossy().replace('\'', "");
        let ctl = self.bindir.join("pg_ctl").to_string_lossy().replace('\'', "");
        let prefix = if self.as_postgres { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {prefix}'{ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{data}'"
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        if let Err(e) = cmd.spawn() {
            tracing::warn!(error = %e, "could not start the cluster watchdog");
        }
    }

    /// Connection URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Connection URL of database `db` in this cluster.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/{}", self.password, self.port, db)
    }

    /// The port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory actually used.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Creates database `name` (no-op when it exists) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        let cmd_err = |e: tokio_postgres::Error| ClusterError::Command { what: format!("CREATE DATABASE {name}"), detail: e.to_string() };
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.map_err(cmd_err)?;
        let task = tokio::spawn(conn);
        let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await.map_err(cmd_err)?.is_some();
        if !exists {
            let quoted = name.replace('"', "\"\"");
            client.batch_execute(&format!("CREATE DATABASE \"{quoted}\"")).await.map_err(cmd_err)?;
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        Ok(self.url_for(name))
    }

    /// The postmaster's pid, from `postmaster.pid` (None when the cluster is not running).
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The postmaster and every process it started (backends, checkpointer, …), for fault
    /// tests that stall the whole server with SIGSTOP.
    pub fn processes(&self) -> Vec<i32> {
        let Some(master) = self.postmaster_pid() else { return Vec::new() };
        let mut pids = vec![master];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.filter_map(Result::ok) {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
                // Field 4 of /proc/PID/stat is the parent pid (after the parenthesised name).
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<i32>().ok());
                if ppid == Some(master) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Restarts the cluster on the same port and options (`immediate`: like a crash, then
    /// recovery from the WAL; otherwise a fast shutdown).
    pub fn restart(&self, immediate: bool) -> Result<(), ClusterError> {
        let mode = if immediate { "immediate" } else { "fast" };
        let log = self.data.join("server.log");
        self.run("pg_ctl", &["-D", &self.data.to_string_lossy(), "-l", &log.to_string_lossy(), "restart", "-m", mode, "-w", "-t", "60"])
    }

    /// Stops the cluster (fast shutdown); removes its data when ephemeral.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mode = if self.ephemeral { "immediate" } else { "fast" };
        let r = self.run("pg_ctl", &["-D", &self.data.to_string_lossy(), "stop", "-m", mode, "-w"]);
        if self.ephemeral {
            let _ = std::fs::remove_dir_all(&self.data);
        }
        r
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the embedded PostgreSQL cluster failed");
        }
    }
}
