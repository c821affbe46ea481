//! The cluster's certificate authority behind `vsha cert init|node|client`.
//!
//! Layout under the CA directory (default /etc/vsha/pki):
//! `ca.crt`, `ca.key`; `nodes/NAME/{ca.crt,node.crt,node.key}` and
//! `clients/NAME/{ca.crt,client.crt,client.key}`, each bundle ready to be
//! copied as it is into /etc/vsha/pki on the machine that uses it.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::tls::{Role, NODE_NAME};

const CA_YEARS: i32 = 20;
const LEAF_YEARS: i32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("--dns {name:?}: {reason}")]
    Dns { name: String, reason: String },
    #[error("{}: {reason} (create the cluster CA with `vsha cert init`)", .path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Creates the cluster CA in `dir`. Refuses to replace an existing one:
/// a new CA would lock every node and client out.
pub fn init_ca(dir: &Path) -> Result<Vec<PathBuf>, PkiError> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    mkdir(dir)?;
    let key_pair = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "vsha cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_YEARS);
    let cert = params.self_signed(&key_pair)?;
    write_new(&key, &key_pair.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok(vec![crt, key])
}

/// Issues a node or client certificate signed by the CA in `dir` and writes
/// its bundle; returns the bundle's directory.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    ips: &[IpAddr],
    dns: &[String],
) -> Result<PathBuf, PkiError> {
    check_name(name)?;
    for d in dns {
        check_dns(d)?;
    }
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca_pem = read_ca(&ca_crt)?;
    let key_pem = read_ca(&ca_key)?;
    let ca_key_pair = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Ca {
        path: ca_key.clone(),
        reason: format!("not a private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key_pair).map_err(|e| PkiError::Ca {
        path: ca_crt.clone(),
        reason: format!("not a CA certificate: {e}"),
    })?;

    let (sub, stem) = match role {
        Role::Node => ("nodes", "node"),
        Role::Client => ("clients", "client"),
    };
    let bundle = dir.join(sub).join(name);
    if bundle.exists() {
        return Err(PkiError::Exists(bundle));
    }

    let key_pair = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let mut names: Vec<String> = vec![name.to_string()];
    match role {
        Role::Node => {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            names.push(NODE_NAME.to_string());
        }
        Role::Client => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    names.extend(dns.iter().cloned());
    names.dedup();
    for n in names {
        let n = n.try_into().map_err(|e: rcgen::Error| PkiError::Dns {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        params.subject_alt_names.push(SanType::DnsName(n));
    }
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    set_validity(&mut params, LEAF_YEARS);
    let cert = params.signed_by(&key_pair, &issuer)?;

    // Written to a temporary sibling and renamed, so a failure leaves no
    // half bundle that would block a retry.
    let tmp = dir.join(sub).join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|source| PkiError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    mkdir(&tmp)?;
    write_new(&tmp.join("ca.crt"), &ca_pem, 0o644)?;
    write_new(&tmp.join(format!("{stem}.crt")), &cert.pem(), 0o644)?;
    write_new(
        &tmp.join(format!("{stem}.key")),
        &key_pair.serialize_pem(),
        0o600,
    )?;
    std::fs::rename(&tmp, &bundle).map_err(|source| PkiError::Io {
        path: bundle.clone(),
        source,
    })?;
    Ok(bundle)
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| PkiError::Name {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad("may hold only letters, digits, '-' and '.'"));
    }
    if name.starts_with(['-', '.']) || name == NODE_NAME {
        return Err(bad(&format!(
            "must not start with '-' or '.', nor be {NODE_NAME:?}"
        )));
    }
    Ok(())
}

fn check_dns(name: &str) -> Result<(), PkiError> {
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(PkiError::Dns {
            name: name.to_string(),
            reason: "not a DNS name (letters, digits, '-' and '.', at most 253)".into(),
        });
    }
    Ok(())
}

fn set_validity(params: &mut CertificateParams, years: i32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Start of the previous calendar year: tolerant of clocks that lag,
    // without date arithmetic.
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn read_ca(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::Ca {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn mkdir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_path_buf())
            } else {
                io(e)
            }
        })?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Security, TlsError, TlsPaths};

    fn paths(bundle: &Path, stem: &str) -> TlsPaths {
        TlsPaths {
            ca: bundle.join("ca.crt"),
            cert: bundle.join(format!("{stem}.crt")),
            key: bundle.join(format!("{stem}.key")),
        }
    }

    #[test]
    fn issued_bundles_load_for_their_role_only() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        let node = issue(
            d.path(),
            Role::Node,
            "n1",
            &["10.0.0.1".parse().unwrap()],
            &[],
        )
        .unwrap();
        let client = issue(d.path(), Role::Client, "alice", &[], &[]).unwrap();
        assert!(Security::load(&paths(&node, "node"), Role::Node)
            .unwrap()
            .is_tls());
        assert!(Security::load(&paths(&client, "client"), Role::Client).is_ok());
        // A node certificate also works for the CLI (root on a node).
        assert!(Security::load(&paths(&node, "node"), Role::Client).is_ok());
        let err = Security::load(&paths(&client, "client"), Role::Node).unwrap_err();
        assert!(matches!(err, TlsError::WrongRole { .. }), "{err}");
        assert!(err.to_string().contains("vsha cert node"), "{err}");
        let mode = std::fs::metadata(node.join("node.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_at_load() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_ca(a.path()).unwrap();
        init_ca(b.path()).unwrap();
        let node_b = issue(b.path(), Role::Node, "n1", &[], &[]).unwrap();
        let mixed = TlsPaths {
            ca: a.path().join("ca.crt"),
            ..paths(&node_b, "node")
        };
        let err = Security::load(&mixed, Role::Node).unwrap_err();
        assert!(matches!(err, TlsError::NotSignedByCa { .. }), "{err}");
    }

    #[test]
    fn refuses_to_overwrite_and_names_bad_input() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        assert!(matches!(init_ca(d.path()), Err(PkiError::Exists(_))));
        issue(d.path(), Role::Node, "n1", &[], &[]).unwrap();
        assert!(matches!(
            issue(d.path(), Role::Node, "n1", &[], &[]),
            Err(PkiError::Exists(_))
        ));
        for bad in ["", "../x", "a/b", "-x", NODE_NAME, &"x".repeat(64)] {
            let e = issue(d.path(), Role::Client, bad, &[], &[]).unwrap_err();
            assert!(matches!(e, PkiError::Name { .. }), "{bad:?}: {e}");
        }
        let e = issue(d.path(), Role::Node, "n2", &[], &["a b".into()]).unwrap_err();
        assert!(e.to_string().starts_with("--dns"), "{e}");
        let none = tempfile::tempdir().unwrap();
        let e = issue(none.path(), Role::Node, "n1", &[], &[]).unwrap_err();
        assert!(e.to_string().contains("vsha cert init"), "{e}");
    }

    #[test]
    fn missing_and_garbage_files_name_the_field() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        let node = issue(d.path(), Role::Node, "n1", &[], &[]).unwrap();
        let mut p = paths(&node, "node");
        p.key = node.join("absent.key");
        let e = Security::load(&p, Role::Node).unwrap_err();
        assert!(e.to_string().starts_with("tls_key "), "{e}");
        std::fs::write(node.join("garbage.crt"), "hello").unwrap();
        let mut p = paths(&node, "node");
        p.cert = node.join("garbage.crt");
        let e = Security::load(&p, Role::Node).unwrap_err();
        assert!(e.to_string().starts_with("tls_cert "), "{e}");
        let mut p = paths(&node, "node");
        p.ca = node.join("node.crt");
        let e = Security::load(&p, Role::Node).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
    }
}
