//! Configuration: one struct read from flags, `AMPHORA_*` variables and a TOML file,
//! resolved once into [`Settings`]. Precedence, lowest first: built-in defaults, the
//! TOML file, COMET's variables (`COMET_CHECK_TOKEN_STRENGTH`,
//! `COMET_RECORD_EXPIRE_TIME`), `AMPHORA_*` variables, flags.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::SocketAddr;
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

    /// The most entries one COMET enumerateScope answers [default: 100000].
    #[arg(long, env = "AMPHORA_MAX_ENUMERATE", value_name = "N")]
    pub max_enumerate: Option<usize>,

    /// Log format: text or json [default: text].
    #[arg(long, env = "AMPHORA_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
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
    /// Log format.
    pub log_format: LogFormat,
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
            log_format: self.log_format.or(lower.log_format),
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
            log_format: o.log_format.unwrap_or_default(),
        };
        if settings.max_name_bytes == 0 || settings.max_value_bytes == 0 {
            bail!("max-name-bytes and max-value-bytes must be above zero");
        }
        if settings.max_value_bytes > 64 * 1024 * 1024 {
            bail!("max-value-bytes is at most 64 MiB: larger values belong in the file repository");
        }
        if !settings.listen.ip().is_loopback() && !settings.insecure {
            bail!(
                "refusing to serve plain HTTP on {}: without TLS, tokens would cross the network in clear. \
                 Listen on a loopback address, or pass --insecure if something else encrypts the traffic",
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
            ..open
        };
        assert!(insecure.resolve_with(&env(&[])).is_ok());
    }
}
