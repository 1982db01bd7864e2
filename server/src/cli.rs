//! The `tally-server` command line: `serve | migrate | keygen | token | grant | plans import |
//! report | api-key`.

use crate::pg_cluster::{Cluster, ClusterOptions};
use crate::{AppState, Config, api_keys, db, plans, signing};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// Tally sync server: reconciles device usage ledgers on Postgres and signs entitlements.
///
/// Every option can be given as a flag, as the TALLY_* environment variable shown, or as the
/// same key in lower case (without TALLY_) in the TOML file named by --config. The reference
/// is in docs/: configuration.md (every option), api.md (every route and error code),
/// catalog.md (the plan catalog) and sync.md (the sync protocol).
#[derive(Debug, Parser)]
#[command(name = "tally-server", version)]
pub struct Cli {
    /// TOML configuration file (keys: database_url, listen, jwt_secret, …).
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log progress (`info`) in commands other than `serve`, which always does; `TALLY_LOG`
    /// overrides both.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (with an embedded Postgres when no database URL is set).
    Serve(Box<Config>),
    /// Apply the database migrations and exit.
    Migrate(Box<Config>),
    /// Write a new Ed25519 token-signing key into DATA_DIR/keys (it becomes the signing key;
    /// older keys stay published for verification).
    Keygen {
        /// Data directory.
        #[arg(long, env = "TALLY_DATA_DIR", default_value = "./.tally")]
        data_dir: PathBuf,
    },
    /// The token-signing keys apps ship with.
    Keys {
        /// What to do with the keys.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Mint a development identity token (HS256) to try the API with curl.
    Token {
        /// Subject (the user's identity).
        #[arg(long)]
        sub: String,
        /// HS256 secret (the server's TALLY_JWT_SECRET).
        #[arg(long, env = "TALLY_JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// Email claim (marked verified).
        #[arg(long)]
        email: Option<String>,
        /// Issuer claim.
        #[arg(long, env = "TALLY_JWT_ISSUER")]
        issuer: Option<String>,
        /// Audience claim.
        #[arg(long, env = "TALLY_JWT_AUDIENCE")]
        audience: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
    /// Grant a plan to a user until a date.
    Grant {
        /// The user's identity subject.
        #[arg(long)]
        subject: String,
        /// Plan id.
        #[arg(long)]
        plan: String,
        /// End of the grant (RFC 3339); absent: no end.
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        /// Why (access_reason becomes granted:<reason>).
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Who grants it.
        #[arg(long, default_value = "cli")]
        granted_by: String,
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Manage the plan catalog.
    Plans {
        /// What to do with the plans.
        #[command(subcommand)]
        command: PlansCommand,
    },
    /// Print usage per user and feature (voided uses left out), as `GET /v1/usage` counts it.
    Report {
        /// Only this user (identity subject).
        #[arg(long)]
        subject: Option<String>,
        /// Start (RFC 3339, inclusive); absent: the first use.
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        /// End (RFC 3339, exclusive); absent: the last use.
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Manage API keys for backends.
    ApiKey {
        /// What to do with API keys.
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Manage the secrets vault.
    Secrets {
        /// What to do with the vault.
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

/// `secrets` subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Re-seal every secret under the current (first) key of TALLY_SECRET_KEYS; safe while
    /// the server runs, and run again after an interruption to finish.
    Rotate {
        /// Rows per batch.
        #[arg(long, default_value_t = 100)]
        batch: i64,
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Print a new random master key as a `kid:base64` entry of TALLY_SECRET_KEYS.
    Keygen {
        /// Id of the new key.
        #[arg(long)]
        kid: String,
    },
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the public token-signing keys as the JWKS JSON that the device library's
    /// `Config.server_keys` takes (ship it with the app; never fetch it at run time).
    Export {
        /// Data directory.
        #[arg(long, env = "TALLY_DATA_DIR", default_value = "./.tally")]
        data_dir: PathBuf,
    },
}

/// `plans` subcommands.
#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Validate a catalog file (the plan catalog format of docs/catalog.md) and store it.
    Import {
        /// The JSON catalog.
        file: PathBuf,
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
}

/// `api-key` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print its secret (shown once).
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// Scopes: usage:write, usage:read, admin (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "usage:write")]
        scopes: Vec<String>,
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Revoke a key by id.
    Revoke {
        /// Key id.
        id: uuid::Uuid,
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
    /// List keys.
    List {
        /// Server configuration.
        #[command(flatten)]
        config: Box<Config>,
    },
}

/// File in the data dir holding the URL of a running embedded cluster.
const EMBEDDED_URL_FILE: &str = "embedded-database-url";

/// File in the data dir locked (`flock`) by the process owning the embedded cluster; it holds
/// that process's pid. The lock dies with the process, so a crash never leaves it behind.
const LOCK_FILE: &str = "tally-server.lock";

/// The exclusive ownership of a data directory's embedded cluster, held while it lives.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the ownership of `data_dir`'s embedded cluster; a live owner makes it fail at once
/// with "already running (pid N)".
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, String> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(lock, "{}", std::process::id());
            let _ = lock.flush();
            Ok(DataDirLock { _lock: lock })
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(format!(
                "tally-server is already running on the data directory {} (pid {}); stop it first, or give this one another TALLY_DATA_DIR",
                data_dir.display(),
                pid.trim()
            ))
        }
        Err((_, e)) => Err(format!("locking {}: {e}", path.display())),
    }
}

/// Starts the embedded cluster of `data_dir` and returns it with the URL of its `tally` database.
pub async fn start_embedded(data_dir: &Path) -> Result<(Cluster, String), String> {
    let dir = data_dir.join("postgres");
    eprintln!("tally-server: no TALLY_DATABASE_URL; starting the embedded PostgreSQL under {}", dir.display());
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&dir, ClusterOptions::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let url = cluster.create_database("tally").await.map_err(|e| e.to_string())?;
    Ok((cluster, url))
}

/// The database of a command other than `serve`: the configured URL, the running embedded
/// cluster's, or a temporarily started embedded cluster.
async fn database(config: &mut Config) -> Result<Option<(Cluster, DataDirLock)>, String> {
    if config.database_url.is_some() {
        return Ok(None);
    }
    if let Ok(url) = std::fs::read_to_string(config.data_dir.join(EMBEDDED_URL_FILE)) {
        let url = url.trim().to_string();
        if tokio_postgres::connect(&url, tokio_postgres::NoTls).await.is_ok() {
            config.database_url = Some(url);
            return Ok(None);
        }
    }
    let lock = lock_data_dir(&config.data_dir)?;
    let (cluster, url) = start_embedded(&config.data_dir).await?;
    config.database_url = Some(url);
    Ok(Some((cluster, lock)))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

async fn serve(mut config: Config) -> Result<(), String> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| format!("creating {}: {e}", config.data_dir.display()))?;
    let mut cluster = None;
    let mut lock = None;
    if config.database_url.is_none() {
        // One owner per embedded cluster; a crashed owner's cluster is recovered on start.
        lock = Some(lock_data_dir(&config.data_dir)?);
        let (c, url) = start_embedded(&config.data_dir).await?;
        config.database_url = Some(url.clone());
        let _ = std::fs::write(config.data_dir.join(EMBEDDED_URL_FILE), url);
        cluster = Some(c);
    }
    let listen = config.listen.clone();
    let data_dir = config.data_dir.clone();
    let result = async {
        let state = AppState::new(config).await.map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| format!("listening on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("tally-server listening on http://{addr}");
        tracing::info!(%addr, "listening");
        let limits = crate::http::HttpLimits::from_config(&state.config);
        let drain = std::time::Duration::from_secs(state.config.request_timeout_secs.max(1));
        crate::http::serve(listener, crate::app(state), limits, shutdown_signal(), drain).await;
        Ok::<(), String>(())
    }
    .await;
    if let Some(mut c) = cluster {
        let _ = std::fs::remove_file(data_dir.join(EMBEDDED_URL_FILE));
        let _ = tokio::task::spawn_blocking(move || c.stop()).await;
    }
    drop(lock);
    result
}

async fn with_db<F, Fut>(mut config: Config, f: F) -> Result<(), String>
where
    F: FnOnce(deadpool_postgres::Object) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let cluster = database(&mut config).await?;
    let url = config.database_url.clone().unwrap_or_default();
    let result = async {
        db::migrate(&url).await.map_err(|e| e.to_string())?;
        let pool = db::pool(&url, 2).map_err(|e| e.to_string())?;
        let client = pool.get().await.map_err(|e| e.to_string())?;
        // Maintenance is never cut short by a request timeout set in the URL or the server.
        client.batch_execute("SET statement_timeout = 0").await.map_err(|e| e.to_string())?;
        f(client).await
    }
    .await;
    if let Some((mut c, lock)) = cluster {
        let _ = tokio::task::spawn_blocking(move || c.stop()).await;
        drop(lock);
    }
    result
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(config) => serve(*config).await,
        Command::Migrate(config) => {
            with_db(*config, |_| async {
                println!("database at schema version {}", db::latest_version());
                Ok(())
            })
            .await
        }
        Command::Keygen { data_dir } => {
            let kid = signing::keygen(&data_dir.join("keys"))?;
            println!("wrote signing key {kid} to {}", data_dir.join("keys").join(format!("{kid}.pem")).display());
            Ok(())
        }
        Command::Keys { command: KeysCommand::Export { data_dir } } => {
            let dir = data_dir.join("keys");
            let signer = signing::Signer::load(&dir)?;
            if signer.kid().is_none() {
                return Err(format!("no token-signing key under {}; run `tally-server keygen` or `serve` first", dir.display()));
            }
            println!("{}", serde_json::to_string_pretty(&signer.jwks()).map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::Token { sub, secret, email, issuer, audience, ttl_secs } => {
            let now = Utc::now().timestamp();
            let mut claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + ttl_secs});
            if let Some(e) = email {
                claims["email"] = e.into();
                claims["email_verified"] = true.into();
            }
            if let Some(i) = issuer {
                claims["iss"] = i.into();
            }
            if let Some(a) = audience {
                claims["aud"] = a.into();
            }
            let t =
                jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()))
                    .map_err(|e| e.to_string())?;
            println!("{t}");
            Ok(())
        }
        Command::Grant { subject, plan, until, reason, granted_by, config } => {
            with_db(*config, |mut client| async move {
                let (_, catalog) = plans::load(&client).await.map_err(|e| e.to_string())?;
                let req =
                    crate::grants::AccessGrantRequest { subject: &subject, plan: &plan, until, granted_by: &granted_by, reason: &reason };
                let tx = client.transaction().await.map_err(|e| e.to_string())?;
                // Running servers hear of the new version from Postgres (no cache of their own here).
                crate::grants::grant_access(&tx, &crate::user_cache::UserCache::default(), &catalog, &req, Utc::now())
                    .await
                    .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                println!("granted {plan} to {subject}{}", until.map(|u| format!(" until {u}")).unwrap_or_default());
                Ok(())
            })
            .await
        }
        Command::Plans { command: PlansCommand::Import { file, config } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let catalog = tally_core::Catalog::from_json(&text).map_err(|e| e.to_string())?;
            with_db(*config, |client| async move {
                let v = plans::import_if_changed(&client, &catalog).await.map_err(|e| e.to_string())?;
                println!("imported {} plans (catalog version {v})", catalog.plans.len());
                Ok(())
            })
            .await
        }
        Command::Report { subject, from, to, config } => {
            with_db(*config, |client| async move {
                let user_id = match subject {
                    None => None,
                    Some(s) => Some(
                        client
                            .query_opt("SELECT user_id FROM users WHERE external_id = $1", &[&s])
                            .await
                            .map_err(|e| e.to_string())?
                            .map(|r| r.get::<_, uuid::Uuid>(0))
                            .ok_or_else(|| format!("no user has the subject {s:?}"))?,
                    ),
                };
                let scope = crate::usage::Scope { user_id, from, to };
                let rows = crate::usage::grouped(&client, scope, &[crate::usage::Group::User, crate::usage::Group::Feature])
                    .await
                    .map_err(|e| e.to_string())?;
                println!("{:<40} {:<24} {:>10} {:>14} {:>14} {:>14}", "user", "feature", "events", "amount", "cost_micros", "credits");
                for r in rows {
                    let key = |i: usize| r.keys.get(i).map_or("", String::as_str);
                    println!("{:<40} {:<24} {:>10} {:>14} {:>14} {:>14}", key(0), key(1), r.events, r.amount, r.cost_micros, r.credits);
                }
                Ok(())
            })
            .await
        }
        Command::Secrets { command: SecretsCommand::Keygen { kid } } => {
            let entry = crate::vault::MasterKeys::generate(&kid);
            crate::vault::MasterKeys::parse(&entry)?;
            println!("{entry}");
            Ok(())
        }
        Command::Secrets { command: SecretsCommand::Rotate { batch, config } } => {
            let spec = config.secret_keys.clone().ok_or("secrets rotate needs TALLY_SECRET_KEYS (the new key first)")?;
            let keys = crate::vault::MasterKeys::parse(&spec)?;
            with_db(*config, |client| async move {
                let done = crate::secrets::rotate(&client, &keys, batch).await.map_err(|e| e.to_string())?;
                println!(
                    "re-sealed {} secrets under {} ({} changed meanwhile, {} under a key that is not configured)",
                    done.resealed,
                    keys.current(),
                    done.skipped,
                    done.missing_key
                );
                if done.missing_key > 0 {
                    Err(format!("{} secrets could not be opened; add their key to TALLY_SECRET_KEYS", done.missing_key))
                } else {
                    Ok(())
                }
            })
            .await
        }
        Command::ApiKey { command } => match command {
            ApiKeyCommand::Create { name, scopes, config } => {
                with_db(*config, |client| async move {
                    let (key, secret) =
                        api_keys::create(&client, api_keys::Issuer::Operator, &name, &scopes, None).await.map_err(|e| e.to_string())?;
                    println!("{secret}");
                    eprintln!(
                        "created API key {} ({}) with scopes {}; the secret above is shown only once",
                        key.key_id,
                        key.name,
                        key.scopes.join(",")
                    );
                    Ok(())
                })
                .await
            }
            ApiKeyCommand::Revoke { id, config } => {
                with_db(*config, |client| async move {
                    api_keys::revoke(&client, id).await.map_err(|e| e.to_string())?;
                    println!("revoked {id}");
                    Ok(())
                })
                .await
            }
            ApiKeyCommand::List { config } => {
                with_db(*config, |client| async move {
                    for k in api_keys::list(&client).await.map_err(|e| e.to_string())? {
                        println!(
                            "{}  {:<24} {:<20} {}",
                            k.key_id,
                            k.name,
                            k.scopes.join(","),
                            if k.revoked_at.is_some() { "revoked" } else { "active" }
                        );
                    }
                    Ok(())
                })
                .await
            }
        },
    }
}
