//! TLS for `amqps://` connections (`[broker.tls]`): which CAs are trusted
//! (the system's, `ca_file`, or both), the client certificate for mutual TLS
//! (`cert_file`, `key_file`), the name the broker's certificate must carry
//! (`server_name`) and the lowest protocol version. The files are read on
//! every connect, so a rotated certificate is picked up at the next
//! reconnect. Errors say what is wrong and what to set, and never print a
//! key.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{TlsSettings, TlsVersion};

/// Why a TLS set-up failed, in words an operator can act on: `broker.tls.KEY
/// message` (validation shows the key and the message apart).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", key.map(|k| format!("broker.tls.{k}: ")).unwrap_or_default())]
pub(crate) struct TlsError {
    /// The setting to look at (`broker.tls.cert_file`), when one is at fault.
    pub(crate) key: Option<&'static str>,
    /// What is wrong and what to do.
    pub(crate) message: String,
}

impl TlsError {
    fn at(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key: Some(key),
            message: message.into(),
        }
    }
}

/// A `[broker.tls]` ready to connect with: the rustls configuration and
/// the name to verify, plus where the broker's certificate goes when it is
/// refused (for the error).
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) config: Arc<ClientConfig>,
    /// The server's end-entity certificate when the last verification of
    /// it failed.
    refused: Arc<Mutex<Option<Vec<u8>>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError::at(key, format!("{}: cannot read it ({e})", path.display())))
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            TlsError::at(
                key,
                format!("{}: not PEM certificates ({e})", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(TlsError::at(
            key,
            format!(
                "{}: no certificate in it (expected PEM, -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key_file", path)?;
    // The parser's error could quote part of the file: not shown.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        TlsError::at(
            "key_file",
            format!(
                "{}: no private key in it (expected PEM: PKCS#8 -----BEGIN PRIVATE KEY-----, RSA or EC)",
                path.display()
            ),
        )
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Tls {
    /// Reads the files `settings` names and builds the client configuration.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the key: a file that cannot be read or holds no
    /// certificate or key, a key that does not belong to the certificate,
    /// no trusted CA at all.
    pub(crate) fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        if settings.system_roots {
            // Certificates the system store holds that cannot be parsed are
            // skipped, as every TLS client does.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
        if let Some(ca) = &settings.ca_file {
            let certs = certificates("ca_file", ca)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::at(
                    "ca_file",
                    format!(
                        "{}: none of its certificates can be used as a CA",
                        ca.display()
                    ),
                ));
            }
        }
        if roots.is_empty() {
            return Err(TlsError::at(
                "ca_file",
                "no CA to trust: set it, or system_roots = true on a system with CA certificates",
            ));
        }
        let refused = Arc::new(Mutex::new(None));
        let verifier = Arc::new(Recording {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::at("ca_file", format!("cannot use the CAs: {e}")))?,
            refused: refused.clone(),
        });
        let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
            _ => rustls::DEFAULT_VERSIONS,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::at("min_version", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&settings.cert_file, &settings.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("cert_file", cert)?;
                let key_der = private_key(key)?;
                let mismatch = || {
                    TlsError::at(
                        "key_file",
                        format!(
                            "{} is not the key of broker.tls.cert_file {} ({}): use the key the certificate was made for",
                            key.display(),
                            cert.display(),
                            describe_certificate(&chain[0])
                        ),
                    )
                };
                let certified = rustls::sign::CertifiedKey::from_der(
                    chain.clone(),
                    key_der.clone_key(),
                    &provider,
                )
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => mismatch(),
                    e => TlsError::at("key_file", format!("{}: {e}", key.display())),
                })?;
                if certified.keys_match().is_err() {
                    return Err(mismatch());
                }
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError::at("cert_file", e.to_string()))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(TlsError::at(
                    "key_file",
                    "is needed with broker.tls.cert_file (its private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::at(
                    "cert_file",
                    "is needed with broker.tls.key_file (its certificate)",
                ));
            }
        };
        Ok(Self {
            config: Arc::new(config),
            refused,
        })
    }

    /// A handshake error in words: which check failed, on what, and what to
    /// set. `name` is the name the broker's certificate was checked for.
    pub(crate) fn explain(&self, error: &std::io::Error, name: &str) -> String {
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let theirs = || {
            refused
                .as_deref()
                .map(|der| describe_certificate(&CertificateDer::from(der.to_vec())))
                .unwrap_or_else(|| "its certificate".to_owned())
        };
        let Some(tls) = rustls_error(error) else {
            return format!("TLS handshake failed: {error}");
        };
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        match tls {
            E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
                "the broker's certificate ({}) is not signed by a CA this worker trusts: set broker.tls.ca_file to the CA that signed it",
                theirs()
            ),
            E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => format!(
                "the broker's certificate ({}) has expired: the broker needs a new one",
                theirs()
            ),
            E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => format!(
                "the broker's certificate ({}) is not valid yet: check the clocks",
                theirs()
            ),
            E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
                "the broker's certificate ({}) is not valid for the name {name:?}: connect by a name it carries, or set broker.tls.server_name to one",
                theirs()
            ),
            E::InvalidCertificate(other) => {
                format!("the broker's certificate ({}) was refused: {other:?}", theirs())
            }
            E::AlertReceived(A::CertificateRequired | A::HandshakeFailure)
                if self.config.client_auth_cert_resolver.has_certs() =>
            {
                "the broker refused the TLS handshake: it may not accept this client certificate (check broker.tls.cert_file and the CA the broker trusts)".to_owned()
            }
            E::AlertReceived(A::CertificateRequired | A::HandshakeFailure) => {
                "the broker asks for a client certificate: set broker.tls.cert_file and broker.tls.key_file".to_owned()
            }
            E::AlertReceived(
                A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::AccessDenied,
            ) => format!(
                "the broker refused this worker's client certificate ({tls}): it must be signed by a CA the broker trusts (broker.tls.cert_file)"
            ),
            E::AlertReceived(A::CertificateExpired) => {
                "the broker refused this worker's client certificate: it has expired (renew broker.tls.cert_file)".to_owned()
            }
            E::AlertReceived(A::ProtocolVersion) => format!(
                "the broker does not speak the TLS versions allowed here ({tls}): lower broker.tls.min_version"
            ),
            other => format!("TLS handshake failed: {other}"),
        }
    }
}

/// True when `e` carries a TLS error (a refused certificate, an alert).
pub(crate) fn is_tls_error(e: &std::io::Error) -> bool {
    rustls_error(e).is_some()
}

/// The rustls error inside an I/O error, if there is one.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> =
        e.get_ref().map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = s.source();
    }
    None
}

/// `subject CN=…, issued by CN=…, valid until …, names …` of a certificate,
/// printable and bounded.
pub(crate) fn describe_certificate(der: &CertificateDer<'_>) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return "a certificate that cannot be parsed".to_owned();
    };
    let mut out = format!(
        "subject {}, issued by {}, valid until {}",
        cert.subject(),
        cert.issuer(),
        cert.validity().not_after
    );
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .take(8)
            .map(ToString::to_string)
            .collect();
        if !names.is_empty() {
            out.push_str(&format!(", names {}", names.join(" ")));
        }
    }
    crate::text::truncate(&crate::text::printable(&out), 400)
}

/// The broker's certificate checked as webpki does, kept when refused so the
/// error can name it.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    refused: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|_| {
                *self.refused.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(end_entity.as_ref().to_vec());
            })
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
