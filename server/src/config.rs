//! Server configuration: `TALLY_*` environment variables, command-line flags, and an optional
//! TOML file whose keys are the variable names in lower case without the prefix
//! (`database_url = "postgres://…"`).

use clap::Args;
use std::path::PathBuf;

/// Every setting of the server. Each flag can also be given as the `TALLY_*` variable shown.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Postgres connection URL; absent: run an embedded cluster under DATA_DIR/postgres.
    #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Directory for the embedded database and the token-signing keys.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./.tally")]
    pub data_dir: PathBuf,
    /// Shared secret of the identity provider's HS256 tokens.
    #[arg(long, env = "TALLY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// JWKS URL of the identity provider (RS256, ES256, EdDSA tokens).
    #[arg(long, env = "TALLY_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Required `iss` of identity tokens.
    #[arg(long, env = "TALLY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of identity tokens.
    #[arg(long, env = "TALLY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock leeway for `exp`/`nbf` of identity tokens, in seconds.
    #[arg(long, env = "TALLY_JWT_LEEWAY_SECS", default_value_t = 60)]
    pub jwt_leeway_secs: u64,
    /// Comma-separated identity subjects that are admins.
    #[arg(long, env = "TALLY_ADMIN_SUBJECTS", value_delimiter = ',')]
    pub admin_subjects: Vec<String>,
    /// Plan catalog (JSON) imported at start.
    #[arg(long, env = "TALLY_PLANS_FILE")]
    pub plans_file: Option<PathBuf>,
    /// Lifetime of entitlements tokens, in seconds.
    #[arg(long, env = "TALLY_TOKEN_TTL_SECS", default_value_t = 86_400)]
    pub token_ttl_secs: u64,
    /// Most events in one sync request (more: 413).
    #[arg(long, env = "TALLY_MAX_BATCH_EVENTS", default_value_t = 1000)]
    pub max_batch_events: u32,
    /// Largest request body in bytes (more: 413).
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: u64,
    /// How long a past-due subscription keeps its plan, in seconds.
    #[arg(long, env = "TALLY_PAST_DUE_GRACE_SECS", default_value_t = 259_200)]
    pub past_due_grace_secs: u64,
    /// Lowest sync protocol accepted (older clients get 426).
    #[arg(long, env = "TALLY_MIN_PROTOCOL", default_value_t = 1)]
    pub min_protocol: u32,
    /// How long after a device token's `exp` its leases stay the device's (`lease_until`), in
    /// seconds; then the server reclaims what the device had not reported.
    #[arg(long, env = "TALLY_LEASE_ACTIVE_SECS", default_value_t = 259_200)]
    pub lease_active_secs: u64,
    /// Sustained requests per second allowed per user or API key.
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_SEC", default_value_t = 50)]
    pub rate_limit_per_sec: u32,
    /// Burst of requests allowed per user or API key.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST", default_value_t = 200)]
    pub rate_limit_burst: u32,
    /// Database connection pool size.
    #[arg(long, env = "TALLY_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// Longest wait for a pooled database connection, in seconds (then 503 `unavailable`).
    #[arg(long, env = "TALLY_DB_POOL_TIMEOUT_SECS", default_value_t = 5)]
    pub db_pool_timeout_secs: u64,
    /// Longest time to open a database connection, in seconds.
    #[arg(long, env = "TALLY_DB_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub db_connect_timeout_secs: u64,
    /// Postgres `statement_timeout` of request connections, in seconds (0: none). Migrations
    /// and the maintenance commands run without it.
    #[arg(long, env = "TALLY_DB_STATEMENT_TIMEOUT_SECS", default_value_t = 5)]
    pub db_statement_timeout_secs: u64,
    /// Database operations one user (or API key) may run at once; more wait in a queue.
    #[arg(long, env = "TALLY_USER_CONCURRENCY", default_value_t = 4)]
    pub user_concurrency: usize,
    /// Requests of one user (or API key) that may wait for a turn; more answer 503.
    #[arg(long, env = "TALLY_USER_QUEUE", default_value_t = 32)]
    pub user_queue: usize,
    /// Longest time a whole request may take, in seconds (then 503 `unavailable`).
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_SECS", default_value_t = 15)]
    pub request_timeout_secs: u64,
    /// Longest time a client may take to send a request's headers, and to stay idle between
    /// requests on a kept-alive connection, in seconds (then the connection is closed).
    #[arg(long, env = "TALLY_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub http_header_timeout_secs: u64,
    /// Most open client connections (further clients wait to be accepted); also kept below
    /// the process's open-file limit.
    #[arg(long, env = "TALLY_HTTP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub http_max_connections: usize,
    /// Stripe webhook signing secret(s) (`whsec_…`; several comma-separated while rotating).
    #[arg(long, env = "TALLY_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,
    /// How old (or how far ahead) a webhook's signed timestamp may be, in seconds.
    #[arg(long, env = "TALLY_STRIPE_WEBHOOK_TOLERANCE_SECS", default_value_t = 300)]
    pub stripe_webhook_tolerance_secs: u64,
    /// Stripe secret API key (`sk_…`), for Checkout, the Billing Portal and cancellations.
    #[arg(long, env = "TALLY_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<String>,
    /// Pinned Stripe API version, sent as `Stripe-Version` (webhook endpoint must use the same).
    #[arg(long, env = "TALLY_STRIPE_API_VERSION", default_value = crate::billing::DEFAULT_API_VERSION)]
    pub stripe_api_version: Option<String>,
    /// Stripe price id → plan id, e.g. `price_123=pro,price_456=team`.
    #[arg(long, env = "TALLY_STRIPE_PRICES")]
    pub stripe_prices: Option<String>,
    /// Base URL of Stripe's API (tests point it at a local fake).
    #[arg(long, env = "TALLY_STRIPE_API_BASE", default_value = "https://api.stripe.com")]
    pub stripe_api_base: String,
    /// Comma-separated web origins allowed to call the API from a browser
    /// (`https://app.example.com`), or `*` for any; none by default. Credentials (cookies) are
    /// never allowed: the API reads bearer tokens only.
    #[arg(long, env = "TALLY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Apple root certificates (PEM or DER files, comma-separated) App Store signatures chain to.
    #[arg(long, env = "TALLY_APPLE_ROOT_CERTS", value_delimiter = ',')]
    pub apple_root_certs: Vec<PathBuf>,
    /// The app's bundle id (`com.example.app`); App Store purchases of other apps are refused.
    #[arg(long, env = "TALLY_APPLE_BUNDLE_ID")]
    pub apple_bundle_id: Option<String>,
    /// `Production` or `Sandbox`.
    #[arg(long, env = "TALLY_APPLE_ENVIRONMENT", default_value = "Production")]
    pub apple_environment: String,
    /// The app's numeric Apple ID (required in Production).
    #[arg(long, env = "TALLY_APPLE_APP_ID")]
    pub apple_app_id: Option<i64>,
    /// Whether a Production server also accepts Sandbox purchases (App Review buys there).
    #[arg(long, env = "TALLY_APPLE_ALLOW_SANDBOX", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub apple_allow_sandbox: bool,
    /// Google service-account key file (JSON with `client_email`, `private_key`, `token_uri`)
    /// with access to the Play Developer API; its `token_uri` is the token endpoint used.
    #[arg(long, env = "TALLY_GOOGLE_SERVICE_ACCOUNT_FILE")]
    pub google_service_account_file: Option<PathBuf>,
    /// The Android app's package name (`com.example.app`).
    #[arg(long, env = "TALLY_GOOGLE_PACKAGE_NAME")]
    pub google_package_name: Option<String>,
    /// Root of the Play Developer API (`androidpublisher/v3/…` is appended).
    #[arg(long, env = "TALLY_GOOGLE_API_BASE", default_value = crate::billing::google_api::DEFAULT_API_BASE)]
    pub google_api_base: String,
    /// JWKS of the keys signing Pub/Sub push tokens.
    #[arg(long, env = "TALLY_GOOGLE_PUSH_JWKS_URL", default_value = crate::billing::google_api::DEFAULT_PUSH_JWKS_URL)]
    pub google_push_jwks_url: String,
    /// Required `aud` of Pub/Sub push tokens (the audience set on the push subscription).
    #[arg(long, env = "TALLY_GOOGLE_PUSH_AUDIENCE")]
    pub google_push_audience: Option<String>,
    /// The service account (`email` claim) the push subscription authenticates as.
    #[arg(long, env = "TALLY_GOOGLE_PUSH_EMAIL")]
    pub google_push_email: Option<String>,
    /// Email-and-password accounts (`/v1/auth/*`): on with `1`.
    #[arg(long, env = "TALLY_PASSWORD_AUTH", default_value = "0", value_parser = parse_flag, action = clap::ArgAction::Set)]
    pub password_auth: bool,
    /// SMTP server of verification and reset mail, in lettre's URL form (`smtp://host:port`,
    /// `smtps://…`, `smtp://…?tls=required`).
    #[arg(long, env = "TALLY_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Sender of verification and reset mail (`Tally <no-reply@example.com>`).
    #[arg(long, env = "TALLY_MAIL_FROM")]
    pub mail_from: Option<String>,
    /// Public base URL of the server: the issuer of access tokens and the base of mailed links.
    #[arg(long, env = "TALLY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Lifetime of access tokens of password accounts, in seconds.
    #[arg(long, env = "TALLY_ACCESS_TOKEN_TTL_SECS", default_value_t = 900)]
    pub access_token_ttl_secs: u64,
    /// Failed logins allowed per (email, client address) in 15 minutes; also the failed
    /// console sign-ins allowed per client address.
    #[arg(long, env = "TALLY_LOGIN_FAILURES_PER_EMAIL", default_value_t = 10)]
    pub login_failures_per_email: u32,
    /// Failed logins and console sign-ins (and sign-ups, reset requests) allowed per client
    /// address in 15 minutes.
    #[arg(long, env = "TALLY_LOGIN_FAILURES_PER_ADDRESS", default_value_t = 50)]
    pub login_failures_per_address: u32,
    /// Failed logins allowed per email from any address in 15 minutes; past it, only addresses
    /// that signed in to the account within 30 days may try (a password reset clears the count).
    #[arg(long, env = "TALLY_LOGIN_FAILURES_PER_ACCOUNT", default_value_t = 100)]
    pub login_failures_per_account: u32,
    /// Master keys of the secrets vault, `kid:base64,…` (32-byte keys; the first seals).
    #[arg(long, env = "TALLY_SECRET_KEYS", hide_env_values = true)]
    pub secret_keys: Option<String>,
    /// Lifetime of an operator console session (`/console`), in seconds.
    #[arg(long, env = "TALLY_CONSOLE_SESSION_TTL_SECS", default_value_t = 28_800)]
    pub console_session_ttl_secs: u64,
    /// Outbound webhooks may go to private, loopback and link-local addresses (after DNS
    /// resolution, and as address literals): on with `1` (for tests and private networks).
    #[arg(long, env = "TALLY_WEBHOOK_ALLOW_PRIVATE", default_value = "0", value_parser = parse_flag, action = clap::ArgAction::Set)]
    pub webhook_allow_private: bool,
    /// How often the webhook worker of each replica looks for due deliveries when idle, in milliseconds.
    #[arg(long, env = "TALLY_WEBHOOK_POLL_MS", default_value_t = 1000)]
    pub webhook_poll_ms: u64,
    /// Timeout of one webhook delivery request, in milliseconds (a claimed delivery's lease is
    /// twice this plus a second).
    #[arg(long, env = "TALLY_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// First pause before retrying a failed webhook delivery, in milliseconds; doubled at each
    /// attempt (with jitter), at most 12 hours.
    #[arg(long, env = "TALLY_WEBHOOK_BACKOFF_MS", default_value_t = 5000)]
    pub webhook_backoff_ms: u64,
    /// How long a webhook delivery is retried before it is dead-lettered, in seconds.
    #[arg(long, env = "TALLY_WEBHOOK_RETRY_SECS", default_value_t = 259_200)]
    pub webhook_retry_secs: u64,
}

/// `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`/empty.
fn parse_flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("expected 1 or 0, got {other:?}")),
    }
}

impl Config {
    /// The issuer of access tokens: `TALLY_PUBLIC_URL`, or `tally`.
    pub fn access_token_issuer(&self) -> String {
        self.public_url.clone().filter(|u| !u.is_empty()).unwrap_or_else(|| tally_core::token::TOKEN_ISSUER.to_string())
    }

    /// A configuration with every default, for tests and embedding.
    pub fn for_database(url: &str) -> Config {
        Config {
            database_url: Some(url.to_string()),
            listen: "127.0.0.1:0".into(),
            data_dir: PathBuf::from("./.tally"),
            jwt_secret: None,
            jwks_url: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: 60,
            admin_subjects: Vec::new(),
            plans_file: None,
            token_ttl_secs: 86_400,
            max_batch_events: 1000,
            max_body_bytes: 1_048_576,
            past_due_grace_secs: 259_200,
            min_protocol: 1,
            lease_active_secs: 259_200,
            rate_limit_per_sec: 50,
            rate_limit_burst: 200,
            db_pool_size: 16,
            db_pool_timeout_secs: 5,
            db_connect_timeout_secs: 5,
            db_statement_timeout_secs: 5,
            user_concurrency: 4,
            user_queue: 32,
            request_timeout_secs: 15,
            http_header_timeout_secs: 10,
            http_max_connections: 10_000,
            stripe_webhook_secret: None,
            stripe_webhook_tolerance_secs: 300,
            stripe_secret_key: None,
            stripe_api_version: Some(crate::billing::DEFAULT_API_VERSION.into()),
            stripe_prices: None,
            stripe_api_base: "https://api.stripe.com".into(),
            cors_origins: Vec::new(),
            apple_root_certs: Vec::new(),
            apple_bundle_id: None,
            apple_environment: "Production".into(),
            apple_app_id: None,
            apple_allow_sandbox: true,
            google_service_account_file: None,
            google_package_name: None,
            google_api_base: crate::billing::google_api::DEFAULT_API_BASE.into(),
            google_push_jwks_url: crate::billing::google_api::DEFAULT_PUSH_JWKS_URL.into(),
            google_push_audience: None,
            google_push_email: None,
            password_auth: false,
            smtp_url: None,
            mail_from: None,
            public_url: None,
            access_token_ttl_secs: 900,
            login_failures_per_email: 10,
            login_failures_per_address: 50,
            login_failures_per_account: 100,
            secret_keys: None,
            console_session_ttl_secs: 28_800,
            webhook_allow_private: false,
            webhook_poll_ms: 1000,
            webhook_timeout_ms: 10_000,
            webhook_backoff_ms: 5000,
            webhook_retry_secs: 259_200,
        }
    }
}

/// Reads the TOML file named by `--config FILE` / `--config=FILE` in `args` (or `TALLY_CONFIG`)
/// and exports each key as `TALLY_<KEY>` unless that variable is already set, so that flags
/// beat the environment, which beats the file. Must run before any thread is started.
pub fn apply_config_file(args: &[String]) -> Result<(), String> {
    let mut path = std::env::var("TALLY_CONFIG").ok();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            path = it.next().cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        }
    }
    let Some(path) = path else { return Ok(()) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading config file {path}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("config file {path}: {e}"))?;
    for (k, v) in table {
        let var = format!("TALLY_{}", k.to_ascii_uppercase());
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        if std::env::var_os(&var).is_none() {
            // SAFETY: called from `main` before the runtime or any other thread exists.
            unsafe { std::env::set_var(&var, value) };
        }
    }
    Ok(())
}

/// Variables read outside [`Config`]: by `main` (logging) and the CLI (the TOML file).
const OTHER_VARIABLES: [(&str, &str, &str); 3] = [
    ("TALLY_CONFIG", "", "A TOML file of settings (keys: the variable names in lower case without `TALLY_`)."),
    ("TALLY_LOG", "info", "Log filter, in `tracing-subscriber`'s `EnvFilter` syntax (`tally_server=debug,info`)."),
    ("TALLY_LOG_FORMAT", "", "`json` for one JSON object per log line; anything else: human-readable lines."),
];

/// The configuration reference in Markdown (`docs/configuration.md` holds it; a test keeps the
/// two equal): every variable, its flag, its default and what it does, from the flags' own help.
pub fn reference_markdown() -> String {
    use clap::{Args, Command};
    let cmd = Config::augment_args(Command::new("serve"));
    let mut out = String::from(
        "# Configuration\n\n\
         Every setting of `tally-server serve` is a `TALLY_*` environment variable, a command-line flag\n\
         (the variable's name in lower case, without `TALLY_`, dashes for underscores) or a key of the\n\
         TOML file named by `--config FILE` / `TALLY_CONFIG` (the variable's name in lower case without\n\
         `TALLY_`: `database_url = \"postgres://…\"`). A flag beats the environment, which beats the file.\n\
         This page is generated from the server's own flag definitions (`tally-server serve --help`\n\
         prints the same), so it cannot drift from the code.\n\n\
         | variable | flag | default | what it does |\n|---|---|---|---|\n",
    );
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    for a in cmd.get_arguments() {
        let Some(env) = a.get_env() else { continue };
        let flag = a.get_long().map(|l| format!("`--{l}`")).unwrap_or_default();
        let default: Vec<String> = a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let default = if default.is_empty() { String::new() } else { format!("`{}`", default.join(",")) };
        let help = a.get_long_help().or(a.get_help()).map(|h| h.to_string()).unwrap_or_default();
        out += &format!("| `{}` | {flag} | {default} | {} |\n", env.to_string_lossy(), cell(&help));
    }
    for (name, default, help) in OTHER_VARIABLES {
        let default = if default.is_empty() { String::new() } else { format!("`{default}`") };
        out += &format!("| `{name}` | | {default} | {help} |\n");
    }
    out
}

#[cfg(test)]
mod tests {
    /// `docs/configuration.md` is the generated reference; `TALLY_UPDATE_DOCS=1` rewrites it.
    #[test]
    fn the_configuration_reference_is_current_and_names_every_variable() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let want = super::reference_markdown();
        if std::env::var("TALLY_UPDATE_DOCS").is_ok_and(|v| v == "1") {
            std::fs::write(&path, &want).expect("write docs/configuration.md");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "docs/configuration.md is stale: run `TALLY_UPDATE_DOCS=1 cargo test -p tally-server --lib configuration`");
        // Every variable the server's code reads is on the page.
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut missing = Vec::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read src") {
                let p = entry.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                for (i, _) in text.match_indices("\"TALLY_") {
                    let name: String =
                        text[i + 1..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
                    if name != "TALLY_UPDATE_DOCS" && !want.contains(&format!("`{name}`")) && !missing.contains(&name) {
                        missing.push(name);
                    }
                }
            }
        }
        assert!(missing.is_empty(), "variables read by the server but missing from docs/configuration.md: {missing:?}");
    }
}
