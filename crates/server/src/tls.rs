//! TLS with rustls, and client certificates judged per operation.
//!
//! At the handshake a client certificate is requested but optional, and any
//! certificate is accepted as long as the client proves it holds its private key.
//! Whether it chains to `--client-ca` and is within its validity period is decided
//! right after the handshake and carried with the connection: COMET's policy needs a
//! trusted certificate only to create and delete, and a certificate that is expired,
//! self-signed or from another authority must count as absent, not break the
//! connection.

use anyhow::{Context, bail};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What the server knows of a client's certificate.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The subject, as `CN=...,O=...`.
    pub subject: String,
    /// When it chains to the client CA: the end of its validity, ms since the epoch.
    pub trusted_until_ms: Option<u64>,
}

impl ClientCert {
    /// True when the certificate chains to the client CA and is valid now.
    pub fn trusted_now(&self) -> bool {
        self.trusted_until_ms
            .is_some_and(|until| amphora_store::now_ms() < until)
    }
}

/// Accepts any client certificate whose holder proves possession of its key; trust
/// is decided after the handshake by [`Tls::client_cert`].
#[derive(Debug)]
struct AnyClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients should send whatever certificate they hold, so that a
        // certificate of the wrong authority is seen (and logged) as such.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS side of the listener.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Judges client certificates against the client CA, when one is configured.
    client_ca: Option<Arc<dyn ClientCertVerifier>>,
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

impl Tls {
    /// Loads the server certificate chain and key, and the client CA if given.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the private key in {}", key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?;
        let (builder, verifier) = match client_ca {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in read_certs(path)? {
                    roots.add(ca).with_context(|| {
                        format!("adding a CA certificate from {}", path.display())
                    })?;
                }
                let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .context("building the client certificate verifier")?;
                let any = Arc::new(AnyClientCert {
                    inner: inner.clone(),
                });
                (builder.with_client_cert_verifier(any), Some(inner))
            }
            None => (builder.with_no_client_auth(), None),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .context("the server certificate and key do not go together")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            client_ca: verifier,
        })
    }

    /// Runs the handshake (at most 10 s) and judges the client certificate.
    pub async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> anyhow::Result<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        Option<ClientCert>,
    )> {
        let stream = tokio::time::timeout(Duration::from_secs(10), self.acceptor.accept(tcp))
            .await
            .context("TLS handshake timed out")?
            .context("TLS handshake failed")?;
        let cert = match stream.get_ref().1.peer_certificates() {
            Some([end_entity, intermediates @ ..]) => {
                Some(self.client_cert(end_entity, intermediates))
            }
            _ => None,
        };
        Ok((stream, cert))
    }

    fn client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> ClientCert {
        let parsed = x509_parser::parse_x509_certificate(end_entity)
            .ok()
            .map(|(_, c)| c);
        let subject = parsed
            .as_ref()
            .map(|c| subject_text(c.subject()))
            .unwrap_or_else(|| "(unparsable certificate)".into());
        let not_after_ms = parsed
            .as_ref()
            .map(|c| c.validity().not_after.timestamp().max(0) as u64 * 1000)
            .unwrap_or(0);
        let trusted = self.client_ca.as_ref().is_some_and(|v| {
            match v.verify_client_cert(end_entity, intermediates, UnixTime::now()) {
                Ok(_) => true,
                Err(e) => {
                    tracing::info!(subject = %subject, reason = %e, "client certificate not trusted; treated as absent");
                    false
                }
            }
        });
        ClientCert {
            subject,
            trusted_until_ms: trusted.then_some(not_after_ms),
        }
    }
}

/// A certificate's subject as text: `CN=ops, O=Example`, attributes in the
/// certificate's order (x509-parser's rendering), with the characters that could
/// make a value pass for more of the name escaped as RFC 4514 says (`\,` `\+` `\=`
/// and the like, control characters as `\XX`). So a certificate whose common name is
/// `ops, O=Example` is `CN=ops\, O\=Example`, not the subject `CN=ops, O=Example`
/// an `--admin-subject` may name, and no subject splits a log line.
pub fn subject_text(name: &x509_parser::x509::X509Name<'_>) -> String {
    use std::fmt::Write as _;
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in name.iter_rdn().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push_str(" + ");
            }
            match x509_parser::objects::oid2abbrev(attr.attr_type(), registry) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(value) => {
                    let last = value.chars().count().saturating_sub(1);
                    for (k, c) in value.chars().enumerate() {
                        match c {
                            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                                out.push('\\');
                                out.push(c);
                            }
                            '#' | ' ' if k == 0 => {
                                out.push('\\');
                                out.push(c);
                            }
                            ' ' if k == last => out.push_str("\\ "),
                            c if c.is_control() => {
                                let mut bytes = [0; 4];
                                for b in c.encode_utf8(&mut bytes).bytes() {
                                    let _ = write!(out, "\\{b:02X}");
                                }
                            }
                            c => out.push(c),
                        }
                    }
                }
                // Not a string type: its bytes, as RFC 4514 writes them.
                Err(_) => {
                    out.push('#');
                    for b in attr.as_slice() {
                        let _ = write!(out, "{b:02X}");
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::subject_text;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    /// The subject of a certificate with this name: ours, and x509-parser's.
    fn subject_of(dn: &[(DnType, &str)]) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut name = DistinguishedName::new();
        for (t, v) in dn {
            name.push(t.clone(), *v);
        }
        p.distinguished_name = name;
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        (subject_text(parsed.subject()), parsed.subject().to_string())
    }

    #[test]
    fn plain_subjects_read_as_x509_parser_renders_them() {
        let (ours, theirs) = subject_of(&[
            (DnType::CommonName, "trusted"),
            (DnType::OrganizationName, "Amphora development"),
        ]);
        assert_eq!(ours, "CN=trusted, O=Amphora development");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_value_cannot_pass_for_more_attributes_or_split_a_line() {
        let (forged, unescaped) = subject_of(&[(DnType::CommonName, "ops, O=Example")]);
        assert_eq!(forged, "CN=ops\\, O\\=Example");
        let (real, _) = subject_of(&[
            (DnType::CommonName, "ops"),
            (DnType::OrganizationName, "Example"),
        ]);
        assert_eq!(real, "CN=ops, O=Example");
        // What x509-parser alone would have let through.
        assert_eq!(unescaped, real);
        assert_ne!(forged, real);
        let (odd, _) = subject_of(&[(DnType::CommonName, "a\nb + c ")]);
        assert_eq!(odd, "CN=a\\0Ab \\+ c\\ ");
        let (hash, _) = subject_of(&[(DnType::CommonName, "#x")]);
        assert_eq!(hash, "CN=\\#x");
    }
}
