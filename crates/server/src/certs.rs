//! `amphora certs`: a development certificate authority, server and client
//! certificates, so a newcomer has working mutual TLS in two commands.
//!
//! Files in the directory: `ca.pem`, `ca.key`, `server.pem`, `server.key`, and
//! `NAME.pem`, `NAME.key` per client. Private keys are written with mode 0600, and no
//! existing file is ever overwritten.

use crate::keyfile::create_file;
use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, both PEM.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A validity period starting an hour ago (tolerates clock skew) for `days` days.
pub fn valid_for_days(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::hours(1), now + Duration::days(days))
}

fn params(
    common_name: &str,
    sans: Vec<String>,
    validity: (OffsetDateTime, OffsetDateTime),
) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(sans).context("invalid certificate name")?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Amphora development");
    p.distinguished_name = dn;
    (p.not_before, p.not_after) = validity;
    Ok(p)
}

/// A new self-signed certificate authority.
pub fn new_ca(
    common_name: &str,
    validity: (OffsetDateTime, OffsetDateTime),
) -> anyhow::Result<Issued> {
    let mut p = params(common_name, vec![], validity)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate signed by the CA given as PEM. `server` chooses the
/// extended key usage (server or client authentication).
pub fn issue(
    ca: &Issued,
    common_name: &str,
    sans: Vec<String>,
    server: bool,
    validity: (OffsetDateTime, OffsetDateTime),
) -> anyhow::Result<Issued> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("reading the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("reading the CA certificate")?;
    let mut p = params(common_name, sans, validity)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A self-signed client certificate (trusted by nobody), for tests and examples.
pub fn self_signed_client(
    common_name: &str,
    validity: (OffsetDateTime, OffsetDateTime),
) -> anyhow::Result<Issued> {
    let mut p = params(common_name, vec![], validity)?;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn write_pair(dir: &Path, name: &str, issued: &Issued) -> anyhow::Result<()> {
    // Check both first so that a refusal leaves nothing half-written.
    for ext in ["pem", "key"] {
        let path = dir.join(format!("{name}.{ext}"));
        if path.exists() {
            bail!("{} exists already; not overwriting it", path.display());
        }
    }
    create_file(
        &dir.join(format!("{name}.pem")),
        issued.cert_pem.as_bytes(),
        0o644,
    )?;
    create_file(
        &dir.join(format!("{name}.key")),
        issued.key_pem.as_bytes(),
        0o600,
    )?;
    Ok(())
}

fn valid_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        bail!(
            "{name:?}: a client name is 1 to 64 of A-Z a-z 0-9 - _ . (it becomes a file name and the certificate's CN)"
        );
    }
    if ["ca", "server"].contains(&name) {
        bail!("{name:?} is taken by the CA and server files");
    }
    Ok(())
}

/// `amphora certs init DIR --server-name NAME...`.
pub fn init(dir: &Path, server_names: &[String], days: i64) -> anyhow::Result<()> {
    if server_names.is_empty() {
        bail!("give at least one --server-name (a DNS name or an IP address clients connect to)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = new_ca("Amphora development CA", valid_for_days(days))?;
    let server = issue(
        &ca,
        &server_names[0],
        server_names.to_vec(),
        true,
        valid_for_days(days),
    )?;
    write_pair(dir, "ca", &ca)?;
    write_pair(dir, "server", &server)?;
    println!(
        "wrote {d}/ca.pem, {d}/ca.key, {d}/server.pem, {d}/server.key (valid {days} days, names: {})",
        server_names.join(", "),
        d = dir.display()
    );
    Ok(())
}

/// `amphora certs client DIR NAME [--days N]`.
pub fn client(dir: &Path, name: &str, days: i64) -> anyhow::Result<()> {
    valid_name(name)?;
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| {
            format!(
                "reading {}/{f}: run `amphora certs init {}` first",
                dir.display(),
                dir.display()
            )
        })
    };
    let ca = Issued {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca.key")?,
    };
    let issued = issue(&ca, name, vec![], false, valid_for_days(days))?;
    write_pair(dir, name, &issued)?;
    println!(
        "wrote {d}/{name}.pem and {d}/{name}.key (valid {days} days)",
        d = dir.display()
    );
    Ok(())
}
