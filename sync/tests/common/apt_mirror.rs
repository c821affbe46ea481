//! The Debian mirror this machine's apt is configured with, for building a
//! debootstrap tree in tests and benchmarks (no host is hard-coded).

/// `VSHA_DEBIAN_MIRROR`, else the first URI apt uses for bookworm
/// (deb822 `*.sources` files, then the one-line `sources.list`).
pub fn apt_mirror() -> Option<String> {
    if let Ok(m) = std::env::var("VSHA_DEBIAN_MIRROR") {
        return Some(m);
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "sources"))
    {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let suites = field("Suites:").unwrap_or_default();
            if suites.split_whitespace().any(|s| s == "bookworm") {
                if let Some(uri) =
                    field("URIs:").and_then(|u| u.split_whitespace().next().map(String::from))
                {
                    return Some(uri);
                }
            }
        }
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("deb"))
            .then(|| {
                let uri = w.find(|x| !x.starts_with('['))?;
                (w.next() == Some("bookworm")).then(|| uri.to_string())
            })
            .flatten()
    })
}
