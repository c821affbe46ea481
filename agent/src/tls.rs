//! Mutual TLS for every gRPC link (agent↔agent, CLI↔agent, replication):
//! loading and checking the PEM files, and the tonic configurations built
//! from them. Certificates are made by [`crate::pki`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// The name every node certificate carries (as a DNS SAN) and every client
/// checks on the server it connects to. Node addresses change (and are often
/// bare IPs), so a server proves "a node of this cluster", not "the node at
/// this address": the cluster CA is the trust boundary.
pub const NODE_NAME: &str = "vsha-node";

/// Where an agent's or a CLI's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Which file of [`TlsPaths`] (named as the operator configures it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Ca,
    Cert,
    Key,
}

impl TlsFile {
    pub fn field(self) -> &'static str {
        match self {
            TlsFile::Ca => "tls_ca",
            TlsFile::Cert => "tls_cert",
            TlsFile::Key => "tls_key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{} {}: {source}", .file.field(), .path.display())]
    Read {
        file: TlsFile,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} {}: {reason}", .file.field(), .path.display())]
    Invalid {
        file: TlsFile,
        path: PathBuf,
        reason: String,
    },
    #[error("tls_cert {} was not signed by tls_ca {}: {reason}", .cert.display(), .ca.display())]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("tls_cert {}: {reason}", .path.display())]
    WrongRole { path: PathBuf, reason: String },
    #[error("address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
}

/// What a certificate is for; checked when it is loaded so a client
/// certificate given to an agent fails at start, not at the first peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: serves, and is a client of other agents.
    Node,
    /// An operator's CLI: client only.
    Client,
}

/// The transport security of every channel and server of one process.
#[derive(Clone)]
pub enum Security {
    /// Plaintext, only with an explicit `--insecure`.
    Insecure,
    Mtls(Arc<TlsMaterial>),
}

/// Loaded and checked PEM material.
pub struct TlsMaterial {
    pub paths: TlsPaths,
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Insecure => f.write_str("insecure"),
            Security::Mtls(m) => write!(f, "mtls({})", m.paths.cert.display()),
        }
    }
}

impl Security {
    pub fn load(paths: &TlsPaths, role: Role) -> Result<Security, TlsError> {
        Ok(Security::Mtls(Arc::new(TlsMaterial::load(paths, role)?)))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Mtls(_))
    }

    /// An endpoint for `addr` (HOST:PORT) with this security.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, TlsError> {
        let bad = |e: &dyn std::fmt::Display| TlsError::Address {
            addr: addr.to_string(),
            reason: format!("not HOST:PORT ({e})"),
        };
        match self {
            Security::Insecure => {
                Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad(&e))
            }
            Security::Mtls(m) => Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| bad(&e))?
                .tls_config(m.client_config())
                .map_err(|e| bad(&e)),
        }
    }

    /// The server configuration, or `None` for plaintext.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        match self {
            Security::Insecure => None,
            Security::Mtls(m) => Some(
                ServerTlsConfig::new()
                    .identity(m.identity.clone())
                    .client_ca_root(m.ca.clone())
                    // A peer that opens TCP and never finishes the
                    // handshake must not hold a connection slot forever.
                    .timeout(Duration::from_secs(10)),
            ),
        }
    }
}

impl TlsMaterial {
    pub fn load(paths: &TlsPaths, role: Role) -> Result<TlsMaterial, TlsError> {
        let ca_pem = read(TlsFile::Ca, &paths.ca)?;
        let cert_pem = read(TlsFile::Cert, &paths.cert)?;
        let key_pem = read(TlsFile::Key, &paths.key)?;
        let ca_der = one_certificate(TlsFile::Ca, &paths.ca, &ca_pem)?;
        let cert_der = one_certificate(TlsFile::Cert, &paths.cert, &cert_pem)?;
        let (_, ca) =
            x509_parser::parse_x509_certificate(&ca_der).map_err(|e| TlsError::Invalid {
                file: TlsFile::Ca,
                path: paths.ca.clone(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| TlsError::Invalid {
                file: TlsFile::Cert,
                path: paths.cert.clone(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if !ca.is_ca() {
            return Err(TlsError::Invalid {
                file: TlsFile::Ca,
                path: paths.ca.clone(),
                reason: "is not a CA certificate (no CA basic constraint); use the ca.crt that `vsha cert init` wrote".into(),
            });
        }
        expiry(TlsFile::Ca, &paths.ca, &ca)?;
        expiry(TlsFile::Cert, &paths.cert, &cert)?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|e| TlsError::NotSignedByCa {
                cert: paths.cert.clone(),
                ca: paths.ca.clone(),
                reason: e.to_string(),
            })?;
        check_role(&paths.cert, &cert, role)?;
        if !key_pem.contains("PRIVATE KEY-----") {
            return Err(TlsError::Invalid {
                file: TlsFile::Key,
                path: paths.key.clone(),
                reason: "holds no PEM private key".into(),
            });
        }
        Ok(TlsMaterial {
            paths: paths.clone(),
            ca: Certificate::from_pem(&ca_pem),
            identity: Identity::from_pem(&cert_pem, &key_pem),
        })
    }

    fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(NODE_NAME)
            .timeout(Duration::from_secs(5))
    }
}

fn read(file: TlsFile, path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        file,
        path: path.to_path_buf(),
        source,
    })
}

fn one_certificate(file: TlsFile, path: &Path, pem: &str) -> Result<Vec<u8>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        file,
        path: path.to_path_buf(),
        reason,
    };
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| invalid(format!("bad PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            return Ok(block.contents);
        }
    }
    Err(invalid("holds no PEM CERTIFICATE block".into()))
}

fn expiry(file: TlsFile, path: &Path, cert: &X509Certificate<'_>) -> Result<(), TlsError> {
    if cert.validity().is_valid() {
        return Ok(());
    }
    Err(TlsError::Invalid {
        file,
        path: path.to_path_buf(),
        reason: format!(
            "not valid now (valid from {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        ),
    })
}

fn check_role(path: &Path, cert: &X509Certificate<'_>, role: Role) -> Result<(), TlsError> {
    let wrong = |reason: &str| TlsError::WrongRole {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let eku = cert
        .extended_key_usage()
        .map_err(|e| wrong(&format!("unreadable extended key usage: {e}")))?
        .map(|e| e.value.clone());
    let client_auth = eku.as_ref().is_none_or(|e| e.any || e.client_auth);
    let server_auth = eku.as_ref().is_none_or(|e| e.any || e.server_auth);
    if !client_auth {
        return Err(wrong("cannot authenticate a client (no clientAuth usage)"));
    }
    if role == Role::Node {
        if !server_auth {
            return Err(wrong(
                "is a client certificate; an agent needs a node certificate (`vsha cert node NAME`)",
            ));
        }
        if !is_node_certificate(cert) {
            return Err(wrong(&format!(
                "does not name {NODE_NAME:?}; an agent needs a node certificate (`vsha cert node NAME`)"
            )));
        }
    }
    Ok(())
}

/// True when the certificate carries the DNS name every node certificate has.
pub fn is_node_certificate(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.subject_alternative_name(), Ok(Some(san))
        if san.value.general_names.iter().any(|n| matches!(n, GeneralName::DNSName(d) if *d == NODE_NAME)))
}

/// True when the DER certificate a peer presented is a node certificate.
/// (The TLS layer already checked that the cluster CA signed it.)
pub fn der_is_node_certificate(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| is_node_certificate(&c))
        .unwrap_or(false)
}
