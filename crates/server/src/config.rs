//! Configuration: one struct read from flags, `AMPHORA_*` variables and a TOML file,
//! resolved once into [`Settings`]. Precedence, lowest first: built-in defaults, the
//! TOML file, COMET's variables (`COMET_CHECK_TOKEN_STRENGTH`,
//! `COMET_RECORD_EXPIRE_TIME`), `AMPHORA_*` variables, flags.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The options of `amphora serve`, as flags, environment variables or TOML keys
/// (the TOML key is the flag's name without the dashes' prefix: `data-dir`, ...).
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeOptions {
    /// A TOML file with any of these options.
    #[arg(long, env = "AMPHORA_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Where the database and the server key live [default: ./amphora-data].
    #[arg(long, env = "AMPHORA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8111].
    #[arg(long, env = "AMPHORA_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,

    /// Allow plain HTTP on a non-loopback address (tokens then cross the network in clear).
    #[arg(long, env = "AMPHORA_INSECURE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub insecure: Option<bool>,

    /// COMET's idle expiry E: entries nobody reads or writes for 2×E are removed; 0 = never
    /// [default: 0]. Also read from COMET_RECORD_EXPIRE_TIME (milliseconds).
    #[arg(long, env = "AMPHORA_IDLE_EXPIRY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration::opt")]
    pub idle_expiry: Option<Duration>,

    /// Refuse weak tokens (COMET's rule) [default: true]. Also read from COMET_CHECK_TOKEN_STRENGTH.
    #[arg(long, env = "AMPHORA_CHECK_TOKEN_STRENGTH", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub check_token_strength: Option<bool>,

    /// The longest context, family or key name, in bytes [default: 256].
    #[arg(long, env = "AMPHORA_MAX_NAME_BYTES", value_name = "BYTES")]
    pub max_name_bytes: Option<usize>,

    /// The largest value, in bytes [default: 1048576].
    #[arg(long, env = "AMPHORA_MAX_VALUE_BYTES", value_name = "BYTES")]
    pub max_value_bytes: Option<usize>,

    /// How long the history of changes is kept [default: 1h].
    #[arg(long, env = "AMPHORA_HISTORY_RETENTION", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration::opt")]
    pub history_retention: Option<Duration>,

    /// Memory for the store's page cache and write buffer (history, leases and
    /// metadata; entries live in sorted run files), in bytes [default: 8388608].
    #[arg(long, env = "AMPHORA_STORE_CACHE_BYTES", value_name = "BYTES")]
    pub store_cache_bytes: Option<usize>,

    /// Memory for the entry cache, which holds recently read entries and entries
    /// written again, answering their reads and the writer's lookups without the
    /// run files (0 turns it off) [default: 50331648].
    #[arg(long, env = "AMPHORA_ENTRY_CACHE_BYTES", value_name = "BYTES")]
    pub entry_cache_bytes: Option<usize>,

    /// How often the acknowledged writes held in memory are applied to the store
    /// (a run file of entries, the history in the B-tree) [default: 20ms].
    #[arg(long, env = "AMPHORA_CHECKPOINT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration::opt")]
    pub checkpoint_interval: Option<Duration>,

    /// How often the store's run files and B-tree are made durable (fsynced);
    /// until then the write-ahead log holds every acknowledged write [default: 2s].
    #[arg(long, env = "AMPHORA_CHECKPOINT_SYNC_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration::opt")]
    pub checkpoint_sync_interval: Option<Duration>,

    /// The most entries one COMET enumerateScope answers; it reads at most ten times
    /// as many (plus 100), visible to the caller or not [default: 100000].
    #[arg(long, env = "AMPHORA_MAX_ENUMERATE", value_name = "N")]
    pub max_enumerate: Option<usize>,

    /// The most watch streams open at once [default: 65536].
    #[arg(long, env = "AMPHORA_MAX_WATCHERS", value_name = "N")]
    pub max_watchers: Option<usize>,

    /// The most watch streams one client address may hold open [default: 1024].
    #[arg(long, env = "AMPHORA_MAX_WATCHERS_PER_CLIENT", value_name = "N")]
    pub max_watchers_per_client: Option<usize>,

    /// The most client connections open at once; more are answered 503 and closed
    /// [default: 100000].
    #[arg(long, env = "AMPHORA_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Log format: text or json [default: text].
    #[arg(long, env = "AMPHORA_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// The server's certificate chain (PEM). With --tls-key, serves HTTPS.
    #[arg(long, env = "AMPHORA_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The server's private key (PEM).
    #[arg(long, env = "AMPHORA_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// The authority (PEM) that signs trusted client certificates.
    #[arg(long, env = "AMPHORA_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// Creating and deleting need a trusted client certificate [default: true with
    /// --client-ca, false without]. Also read from COMET_CHECK_CLIENT_CERT.
    #[arg(long, env = "AMPHORA_CHECK_CLIENT_CERT", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub check_client_cert: Option<bool>,

    /// Write an audit log (JSON lines) to FILE, or to standard output with `-`.
    #[arg(long, env = "AMPHORA_AUDIT_LOG", value_name = "FILE")]
    pub audit_log: Option<PathBuf>,

    /// A file holding the admin token (sent as `Authorization: Bearer`).
    #[arg(long, env = "AMPHORA_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// A client certificate subject with admin rights, as the audit log shows it
    /// (for example `CN=ops, O=Example`). Repeatable.
    #[arg(long, value_name = "SUBJECT")]
    pub admin_subject: Option<Vec<String>>,

    /// A reverse proxy whose X-Forwarded-For is believed. Repeatable.
    #[arg(long, value_name = "IP")]
    pub trusted_proxy: Option<Vec<IpAddr>>,

    /// Token failures from one address on one context before it is refused for a while [default: 10].
    #[arg(long, env = "AMPHORA_MAX_TOKEN_FAILURES", value_name = "N")]
    pub max_token_failures: Option<u32>,

    /// How long token failures are remembered [default: 60s].
    #[arg(long, env = "AMPHORA_TOKEN_FAILURE_WINDOW", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration::opt")]
    pub token_failure_window: Option<Duration>,

    /// How long a blocked address is refused on that context [default: 60s].
    #[arg(long, env = "AMPHORA_TOKEN_FAILURE_BLOCK", value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "duration::opt")]
    pub token_failure_block: Option<Duration>,
}

/// TLS files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Client CA.
    pub client_ca: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Some).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration such as 6s or 1h: {e}"))
        })
    }
}

/// The resolved settings of a server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Plain HTTP allowed off loopback.
    pub insecure: bool,
    /// COMET idle expiry E (zero: off).
    pub idle_expiry: Duration,
    /// Token strength check.
    pub check_token_strength: bool,
    /// Name limit in bytes.
    pub max_name_bytes: usize,
    /// Value limit in bytes.
    pub max_value_bytes: usize,
    /// History retention.
    pub history_retention: Duration,
    /// enumerateScope limit.
    pub max_enumerate: usize,
    /// Watch streams open at once.
    pub max_watchers: usize,
    /// Watch streams per client address.
    pub max_watchers_per_client: usize,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Store page cache, bytes.
    pub store_cache_bytes: usize,
    /// Entry cache, bytes.
    pub entry_cache_bytes: usize,
    /// Checkpoint interval.
    pub checkpoint_interval: Duration,
    /// Durable checkpoint interval.
    pub checkpoint_sync_interval: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// TLS, when configured.
    pub tls: Option<TlsFiles>,
    /// Creating and deleting need a trusted client certificate.
    pub check_client_cert: bool,
    /// Audit log target (`-` for stdout).
    pub audit_log: Option<PathBuf>,
    /// Admin token file.
    pub admin_token_file: Option<PathBuf>,
    /// Admin certificate subjects.
    pub admin_subjects: Vec<String>,
    /// Trusted reverse proxies.
    pub trusted_proxies: Vec<IpAddr>,
    /// Brute-force protection.
    pub throttle: crate::throttle::ThrottleSettings,
}

fn parse_bool(name: &str, raw: &str) -> anyhow::Result<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => bail!("{name}={raw:?} is not a boolean (true or false)"),
    }
}

/// COMET's own variables, so a COMET deployment can switch by changing the binary.
fn comet_env(get: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<ServeOptions> {
    let mut o = ServeOptions::default();
    if let Some(v) = get("COMET_CHECK_TOKEN_STRENGTH") {
        o.check_token_strength = Some(parse_bool("COMET_CHECK_TOKEN_STRENGTH", &v)?);
    }
    if let Some(v) = get("COMET_CHECK_CLIENT_CERT") {
        o.check_client_cert = Some(parse_bool("COMET_CHECK_CLIENT_CERT", &v)?);
    }
    if let Some(v) = get("COMET_RECORD_EXPIRE_TIME") {
        let ms: u64 = v.trim().parse().with_context(|| {
            format!("COMET_RECORD_EXPIRE_TIME={v:?} is not a number of milliseconds")
        })?;
        o.idle_expiry = Some(Duration::from_millis(ms));
    }
    Ok(o)
}

impl ServeOptions {
    /// Fills every option this one leaves unset from `lower`.
    fn or(self, lower: ServeOptions) -> ServeOptions {
        ServeOptions {
            config: self.config.or(lower.config),
            data_dir: self.data_dir.or(lower.data_dir),
            listen: self.listen.or(lower.listen),
            insecure: self.insecure.or(lower.insecure),
            idle_expiry: self.idle_expiry.or(lower.idle_expiry),
            check_token_strength: self.check_token_strength.or(lower.check_token_strength),
            max_name_bytes: self.max_name_bytes.or(lower.max_name_bytes),
            max_value_bytes: self.max_value_bytes.or(lower.max_value_bytes),
            history_retention: self.history_retention.or(lower.history_retention),
            max_enumerate: self.max_enumerate.or(lower.max_enumerate),
            max_watchers: self.max_watchers.or(lower.max_watchers),
            max_watchers_per_client: self
                .max_watchers_per_client
                .or(lower.max_watchers_per_client),
            max_connections: self.max_connections.or(lower.max_connections),
            store_cache_bytes: self.store_cache_bytes.or(lower.store_cache_bytes),
            entry_cache_bytes: self.entry_cache_bytes.or(lower.entry_cache_bytes),
            checkpoint_interval: self.checkpoint_interval.or(lower.checkpoint_interval),
            checkpoint_sync_interval: self
                .checkpoint_sync_interval
                .or(lower.checkpoint_sync_interval),
            log_format: self.log_format.or(lower.log_format),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            client_ca: self.client_ca.or(lower.client_ca),
            check_client_cert: self.check_client_cert.or(lower.check_client_cert),
            audit_log: self.audit_log.or(lower.audit_log),
            admin_token_file: self.admin_token_file.or(lower.admin_token_file),
            admin_subject: self.admin_subject.or(lower.admin_subject),
            trusted_proxy: self.trusted_proxy.or(lower.trusted_proxy),
            max_token_failures: self.max_token_failures.or(lower.max_token_failures),
            token_failure_window: self.token_failure_window.or(lower.token_failure_window),
            token_failure_block: self.token_failure_block.or(lower.token_failure_block),
        }
    }

    /// Resolves flags and `AMPHORA_*` variables (already in `self`, by clap) over
    /// COMET's variables, the TOML file and the defaults.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    fn resolve_with(self, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<ServeOptions>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => ServeOptions::default(),
        };
        let o = self.or(comet_env(env)?).or(file);
        let tls = match (o.tls_cert.clone(), o.tls_key.clone()) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: o.client_ca.clone(),
            }),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together: give both, or neither"),
        };
        if tls.is_none() && o.client_ca.is_some() {
            bail!("--client-ca needs TLS: give --tls-cert and --tls-key too");
        }
        let check_client_cert = o.check_client_cert.unwrap_or(o.client_ca.is_some());
        if check_client_cert && o.client_ca.is_none() {
            bail!("checking client certificates needs --client-ca (the authority that signs them)");
        }
        let defaults = crate::throttle::ThrottleSettings::default();
        let store = amphora_store::redb::RedbOptions::default();
        let settings = Settings {
            data_dir: o.data_dir.unwrap_or_else(|| PathBuf::from("amphora-data")),
            listen: o
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8111))),
            insecure: o.insecure.unwrap_or(false),
            idle_expiry: o.idle_expiry.unwrap_or(Duration::ZERO),
            check_token_strength: o.check_token_strength.unwrap_or(true),
            max_name_bytes: o.max_name_bytes.unwrap_or(256),
            max_value_bytes: o.max_value_bytes.unwrap_or(1024 * 1024),
            history_retention: o.history_retention.unwrap_or(Duration::from_secs(3600)),
            max_enumerate: o.max_enumerate.unwrap_or(100_000),
            max_watchers: o.max_watchers.unwrap_or(65_536).max(1),
            max_watchers_per_client: o.max_watchers_per_client.unwrap_or(1024).max(1),
            max_connections: o.max_connections.unwrap_or(100_000).max(1),
            store_cache_bytes: o.store_cache_bytes.unwrap_or(store.cache_bytes),
            entry_cache_bytes: o.entry_cache_bytes.unwrap_or(store.entry_cache_bytes),
            checkpoint_interval: o.checkpoint_interval.unwrap_or(store.checkpoint_interval),
            checkpoint_sync_interval: o.checkpoint_sync_interval.unwrap_or(store.sync_interval),
            log_format: o.log_format.unwrap_or_default(),
            tls,
            check_client_cert,
            audit_log: o.audit_log,
            admin_token_file: o.admin_token_file,
            admin_subjects: o.admin_subject.unwrap_or_default(),
            trusted_proxies: o.trusted_proxy.unwrap_or_default(),
            throttle: crate::throttle::ThrottleSettings {
                max_failures: o.max_token_failures.unwrap_or(defaults.max_failures).max(1),
                window: o.token_failure_window.unwrap_or(defaults.window),
                block: o.token_failure_block.unwrap_or(defaults.block),
            },
        };
        if settings.max_name_bytes == 0 || settings.max_value_bytes == 0 {
            bail!("max-name-bytes and max-value-bytes must be above zero");
        }
        if settings.max_value_bytes > 64 * 1024 * 1024 {
            bail!("max-value-bytes is at most 64 MiB: larger values belong in the file repository");
        }
        if !settings.listen.ip().is_loopback() && !settings.insecure && settings.tls.is_none() {
            bail!(
                "refusing to serve plain HTTP on {}: without TLS, tokens would cross the network in clear. \
                 Give --tls-cert and --tls-key, listen on a loopback address, or pass --insecure if something \
                 else encrypts the traffic",
                settings.listen
            );
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn defaults() {
        let s = ServeOptions::default().resolve_with(&env(&[])).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8111".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("amphora-data"));
        assert!(s.check_token_strength);
        assert_eq!(s.idle_expiry, Duration::ZERO);
        assert_eq!(s.max_value_bytes, 1 << 20);
        assert_eq!(
            (s.store_cache_bytes, s.entry_cache_bytes),
            (8 << 20, 48 << 20)
        );
        assert_eq!(s.checkpoint_interval, Duration::from_millis(20));
        assert_eq!(s.checkpoint_sync_interval, Duration::from_secs(2));
        assert_eq!(s.max_connections, 100_000);
    }

    #[test]
    fn help_states_the_store_defaults() {
        let s = ServeOptions::default().resolve_with(&env(&[])).unwrap();
        let command = <ServeOptions as clap::Args>::augment_args(clap::Command::new("serve"));
        let help = |id: &str| {
            let arg = command.get_arguments().find(|a| a.get_id() == id);
            arg.and_then(|a| a.get_help()).unwrap().to_string()
        };
        for (id, default) in [
            ("store_cache_bytes", s.store_cache_bytes.to_string()),
            ("entry_cache_bytes", s.entry_cache_bytes.to_string()),
            (
                "checkpoint_interval",
                humantime::format_duration(s.checkpoint_interval).to_string(),
            ),
            (
                "checkpoint_sync_interval",
                humantime::format_duration(s.checkpoint_sync_interval).to_string(),
            ),
        ] {
            let text = help(id);
            assert!(
                text.contains(&format!("[default: {default}]")),
                "{id}: {text}"
            );
        }
    }

    #[test]
    fn precedence_file_then_comet_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("amphora.toml");
        std::fs::write(
            &path,
            "idle-expiry = \"9s\"\ncheck-token-strength = false\nmax-name-bytes = 10\n",
        )
        .unwrap();
        let opts = ServeOptions {
            config: Some(path.clone()),
            ..Default::default()
        };
        let s = opts.clone().resolve_with(&env(&[])).unwrap();
        assert_eq!(
            (s.idle_expiry, s.check_token_strength, s.max_name_bytes),
            (Duration::from_secs(9), false, 10)
        );
        let comet = env(&[
            ("COMET_RECORD_EXPIRE_TIME", "6000"),
            ("COMET_CHECK_TOKEN_STRENGTH", "True"),
        ]);
        let s = opts.clone().resolve_with(&comet).unwrap();
        assert_eq!(
            (s.idle_expiry, s.check_token_strength),
            (Duration::from_secs(6), true)
        );
        let flags = ServeOptions {
            idle_expiry: Some(Duration::from_secs(1)),
            ..opts
        };
        assert_eq!(
            flags.resolve_with(&comet).unwrap().idle_expiry,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn refuses_unknown_keys_bad_values_and_open_plain_http() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "no-such-option = 1\n").unwrap();
        let err = ServeOptions {
            config: Some(path),
            ..Default::default()
        }
        .resolve_with(&env(&[]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("no-such-option"), "{err:#}");
        assert!(
            ServeOptions::default()
                .resolve_with(&env(&[("COMET_RECORD_EXPIRE_TIME", "6s")]))
                .is_err()
        );
        let open = ServeOptions {
            listen: Some("0.0.0.0:8111".parse().unwrap()),
            ..Default::default()
        };
        assert!(open.clone().resolve_with(&env(&[])).is_err());
        let insecure = ServeOptions {
            insecure: Some(true),
            ..open.clone()
        };
        assert!(insecure.resolve_with(&env(&[])).is_ok());
        let tls = ServeOptions {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..open
        };
        assert!(tls.resolve_with(&env(&[])).is_ok());
    }

    #[test]
    fn client_certificate_check_follows_the_client_ca() {
        let tls = ServeOptions {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..Default::default()
        };
        assert!(
            !tls.clone()
                .resolve_with(&env(&[]))
                .unwrap()
                .check_client_cert
        );
        let with_ca = ServeOptions {
            client_ca: Some("ca.pem".into()),
            ..tls.clone()
        };
        assert!(
            with_ca
                .clone()
                .resolve_with(&env(&[]))
                .unwrap()
                .check_client_cert
        );
        let off = env(&[("COMET_CHECK_CLIENT_CERT", "false")]);
        assert!(
            !with_ca
                .clone()
                .resolve_with(&off)
                .unwrap()
                .check_client_cert
        );
        let forced = ServeOptions {
            check_client_cert: Some(true),
            ..tls.clone()
        };
        assert!(
            forced.resolve_with(&env(&[])).is_err(),
            "checking needs a CA"
        );
        let half = ServeOptions {
            tls_key: None,
            ..tls
        };
        assert!(half.resolve_with(&env(&[])).is_err());
        let ca_no_tls = ServeOptions {
            client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(ca_no_tls.resolve_with(&env(&[])).is_err());
    }
}
