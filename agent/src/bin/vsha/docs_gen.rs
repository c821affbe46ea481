//! `vsha completions SHELL` and `vsha manpages DIR`: generated from the
//! command definitions, so they never drift from the binary.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::Cli;

pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = Cli::command();
    // Into a buffer first: the generator panics on a closed stdout.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "vsha", &mut buf);
    match std::io::stdout().write_all(&buf) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// vsha.1 and one page per subcommand (vsha-node-add.1, ...).
pub fn manpages(dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut n = 0;
    write_tree(dir, Cli::command(), "vsha", &mut n)?;
    Ok(n)
}

fn write_tree(dir: &Path, cmd: clap::Command, name: &str, n: &mut usize) -> anyhow::Result<()> {
    let cmd = cmd.name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .with_context(|| format!("rendering {name}.1"))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    *n += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_tree(dir, sub.clone(), &sub_name, n)?;
    }
    Ok(())
}
