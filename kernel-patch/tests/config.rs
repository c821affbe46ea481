//! The TOML spec, validation errors and the legacy `.conf` import (no root).

use std::path::Path;

use vsha_kernel::config::{import_legacy, Flag, NetworkModeKind, VserverSpec};

const LEGACY: &str = r#"# /etc/vservers/web.conf
IPROOT="eth0:192.168.1.130/24"
IPROOTDEV=eth1
#IPROOTMASK=
IPROOTBCAST=192.168.1.255
ONBOOT=yes
S_HOSTNAME=web
S_DOMAINNAME="example.org"
S_CAPS="CAP_NET_RAW"
S_CONTEXT=42
S_FLAGS="lock nproc fakeinit"
S_NICE=5
ULIMIT="-HS -u 1000"
"#;

const TOML: &str = r#"
name = "web"
tree = "/vservers/web"
ip = "192.168.1.130/24"
dev = "eth0"
broadcast = "192.168.1.255"
hostname = "web"
domainname = "example.org"
caps = ["CAP_NET_RAW"]
flags = ["lock", "nproc", "fakeinit"]
context = 42
nice = 5
onboot = true
network = "shared"

[limits]
nproc = 1000
"#;

#[test]
fn legacy_conf_imports_to_the_same_spec_as_the_toml() {
    let legacy = import_legacy(
        LEGACY,
        Path::new("/etc/vservers/web.conf"),
        Path::new("/vservers"),
    )
    .unwrap();
    let toml = VserverSpec::from_toml(TOML, Path::new("/etc/vsha/vservers/web.toml")).unwrap();
    assert_eq!(legacy, toml);
    // and the imported spec round-trips through TOML
    let again = VserverSpec::from_toml(&legacy.to_toml().unwrap(), Path::new("x.toml")).unwrap();
    assert_eq!(again, legacy);
    assert!(legacy.has_flag(Flag::Fakeinit));
    assert_eq!(legacy.network, NetworkModeKind::Shared);
}

#[test]
fn legacy_mask_forms() {
    let s = import_legacy(
        "IPROOT=10.1.2.3\nIPROOTMASK=255.255.255.192\nIPROOTDEV=eth0\n",
        Path::new("/etc/vservers/a.conf"),
        Path::new("/vservers"),
    )
    .unwrap();
    assert_eq!(s.ip.as_deref(), Some("10.1.2.3/26"));
    assert_eq!(s.dev.as_deref(), Some("eth0"));
    let s = import_legacy(
        "IPROOT=0.0.0.0\n",
        Path::new("/etc/vservers/b.conf"),
        Path::new("/vservers"),
    )
    .unwrap();
    assert_eq!(s.ip, None);
    let s = import_legacy(
        "IPROOT=\"eth1:10.0.0.9/255.255.255.0\"\n",
        Path::new("/etc/vservers/c.conf"),
        Path::new("/v"),
    )
    .unwrap();
    assert_eq!(
        (s.ip.as_deref(), s.dev.as_deref()),
        (Some("10.0.0.9/24"), Some("eth1"))
    );
    assert_eq!(s.tree, Path::new("/v/c"));
}

fn err(text: &str) -> String {
    VserverSpec::from_toml(text, Path::new("/etc/vsha/vservers/bad.toml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_configs_name_file_field_and_reason() {
    let e = err("name = \"bad\"\ntree = \"/v\"\nip = \"10.0.0.300/24\"\n");
    assert!(
        e.contains("bad.toml") && e.contains("`ip`") && e.contains("not an IPv4 address"),
        "{e}"
    );
    let e = err("name = \"bad\"\ntree = \"relative\"\n");
    assert!(e.contains("`tree`") && e.contains("absolute"), "{e}");
    let e = err("name = \"bad\"\ntree = \"/v\"\ncaps = [\"CAP_FLY\"]\n");
    assert!(e.contains("`caps`") && e.contains("CAP_FLY"), "{e}");
    let e = err("name = \"bad\"\ntree = \"/v\"\nnice = 40\n");
    assert!(e.contains("`nice`") && e.contains("-20..19"), "{e}");
    let e = err("name = \"bad\"\ntree = \"/v\"\ncolour = \"red\"\n");
    assert!(e.contains("bad.toml") && e.contains("colour"), "{e}");
    let e = err("name = \"b a d\"\ntree = \"/v\"\n");
    assert!(e.contains("`name`"), "{e}");
    let e = err("name = \"bad\"\ntree = \"/v\"\ndev = \"eth0\"\n");
    assert!(e.contains("`dev`") && e.contains("without an ip"), "{e}");
    let e = err("name = \"bad\"\ntree = \"/v\"\nflags = [\"fly\"]\n");
    assert!(e.contains("bad.toml") && e.contains("fly"), "{e}");
    let e = err("name = \"bad\"\ntree = \"/v\"\n[limits]\nnproc = 0\n");
    assert!(e.contains("limits.nproc"), "{e}");
    let e = import_legacy(
        "S_FLAGS=\"lock warp\"\n",
        Path::new("/etc/vservers/x.conf"),
        Path::new("/v"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("x.conf") && e.contains("S_FLAGS") && e.contains("warp"),
        "{e}"
    );
    let e = import_legacy(
        "IPROOT=\"1.2.3.4 5.6.7.8\"\n",
        Path::new("/etc/vservers/x.conf"),
        Path::new("/v"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("IPROOT") && e.contains("one per vserver"), "{e}");
}
