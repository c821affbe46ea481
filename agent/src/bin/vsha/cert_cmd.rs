//! `vsha cert`: the cluster CA and the certificates of nodes and clients.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Subcommand;
use vsha_agent::config::DEFAULT_PKI_DIR;
use vsha_agent::pki;
use vsha_agent::tls::Role;

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Create the cluster CA (ca.crt, ca.key) in DIR. Keep ca.key off the
    /// nodes if you can: whoever holds it can join the cluster.
    Init {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PKI_DIR)]
        dir: PathBuf,
    },
    /// Issue an agent's certificate: DIR/nodes/NAME/{ca.crt,node.crt,node.key},
    /// to be copied into /etc/vsha/pki on that node.
    Node {
        name: String,
        /// Also name these addresses (for other tools; agents check the CA).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        /// Also name these DNS names.
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PKI_DIR)]
        dir: PathBuf,
    },
    /// Issue an operator's certificate: DIR/clients/NAME/{ca.crt,client.crt,client.key}.
    /// It may use the Cluster API (the CLI), not the agents' Peer service.
    Client {
        name: String,
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PKI_DIR)]
        dir: PathBuf,
    },
}

pub fn run(cmd: CertCmd) -> anyhow::Result<i32> {
    match cmd {
        CertCmd::Init { dir } => {
            let files = pki::init_ca(&dir)?;
            for f in &files {
                println!("wrote {}", f.display());
            }
            println!(
                "next: `vsha cert node NAME --dir {0}` for each node, `vsha cert client NAME --dir {0}` for operators",
                dir.display()
            );
        }
        CertCmd::Node {
            name,
            ips,
            dns,
            dir,
        } => {
            let bundle = pki::issue(&dir, Role::Node, &name, &ips, &dns)?;
            println!("wrote {}/{{ca.crt,node.crt,node.key}}", bundle.display());
            println!(
                "next: copy them into {DEFAULT_PKI_DIR}/ on node {name} (node.key mode 0600), then start vshad"
            );
        }
        CertCmd::Client { name, dir } => {
            let bundle = pki::issue(&dir, Role::Client, &name, &[], &[])?;
            println!(
                "wrote {}/{{ca.crt,client.crt,client.key}}",
                bundle.display()
            );
            println!(
                "next: copy them into {DEFAULT_PKI_DIR}/ on {name}'s machine, or point --tls-ca/--tls-cert/--tls-key at them"
            );
        }
    }
    Ok(0)
}
