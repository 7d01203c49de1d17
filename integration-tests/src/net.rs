//! Loopback ports for servers under test.

use std::net::{Ipv4Addr, TcpListener, TcpStream};

use crate::{Result, io_context};

/// A port that was free a moment ago. Another process may take it before the server binds
/// it, so callers that start servers retry with a new port when the bind fails.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_context("binding port 0"))?;
    let port = listener
        .local_addr()
        .map_err(io_context("reading the bound address"))?
        .port();
    Ok(port)
}

/// True when something accepts TCP connections on `127.0.0.1:port`.
pub fn is_listening(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A network namespace joined to this one by a veth pair, so a daemon inside it reaches
/// servers here at [`Partition::host_ip`] over a link a test can cut: with the host end
/// down, packets are dropped silently both ways, as in a real partition (no reset, no
/// unreachable error for the side inside). Removed on drop. Needs root.
pub struct Partition {
    name: String,
    host_end: String,
    subnet: u8,
}

impl Partition {
    /// A namespace and link unique to this process (`udl<pid>`, 10.231.<n>.0/24).
    pub fn create() -> Result<Partition> {
        let pid = std::process::id();
        let partition = Partition {
            name: format!("udl{pid}"),
            host_end: format!("udlh{pid}"),
            subnet: (pid % 200 + 20) as u8,
        };
        let inner = format!("udli{pid}");
        let host_cidr = format!("{}/24", partition.host_ip());
        let inner_cidr = format!("{}/24", partition.inner_ip());
        let ns = partition.name.as_str();
        for args in [
            vec!["netns", "add", ns],
            vec![
                "link",
                "add",
                &partition.host_end,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
            ],
            vec!["link", "set", &inner, "netns", ns],
            vec!["addr", "add", &host_cidr, "dev", &partition.host_end],
            vec!["-n", ns, "addr", "add", &inner_cidr, "dev", &inner],
            vec!["link", "set", &partition.host_end, "up"],
            vec!["-n", ns, "link", "set", &inner, "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
        ] {
            ip(&args)?;
        }
        Ok(partition)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's address on the link.
    pub fn host_ip(&self) -> String {
        format!("10.231.{}.1", self.subnet)
    }

    /// The inner namespace's address on the link.
    pub fn inner_ip(&self) -> String {
        format!("10.231.{}.2", self.subnet)
    }

    /// Takes the link down: nothing passes either way.
    pub fn cut(&self) -> Result<()> {
        ip(&["link", "set", &self.host_end, "down"])
    }

    /// Brings the link back.
    pub fn heal(&self) -> Result<()> {
        ip(&["link", "set", &self.host_end, "up"])
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair too.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(io_context("running ip"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(crate::HarnessError::SlapdStart(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
