//! What Linux's /proc says about a replica process: its sockets' local
//! ports (to tie its backends in pg_stat_activity to it), its resident
//! memory and its open file descriptors.

use std::collections::HashSet;

/// The inodes of a process's sockets, as /proc/net/tcp names them.
fn socket_inodes(pid: u32) -> HashSet<String> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                let link = link.to_string_lossy().into_owned();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    inodes
}

/// Local TCP ports of a process's sockets: how a backend in
/// pg_stat_activity (by client_port) is tied to a replica.
pub fn local_ports(pid: u32) -> HashSet<u16> {
    let inodes = socket_inodes(pid);
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && inodes.contains(cols[9]) {
                if let Some(port) = cols[1].rsplit(':').next() {
                    if let Ok(p) = u16::from_str_radix(port, 16) {
                        ports.insert(p);
                    }
                }
            }
        }
    }
    ports
}

/// Resident set size in KiB (`VmRSS`), None once the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Open file descriptors, None once the process is gone.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A process's open descriptors by kind: TCP sockets by state and by
/// their local or remote port (`port` names the replica's HTTP port, so
/// accepted connections show apart from outgoing ones), other sockets,
/// and the rest by what they link to (`anon_inode:[eventpoll]`, pipes...).
/// For telling what a leak is made of.
pub fn fd_kinds(pid: u32, port: u16) -> std::collections::BTreeMap<String, usize> {
    let mut tcp = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 {
                let port_of = |addr: &str| {
                    addr.rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        .unwrap_or(0)
                };
                let (local, remote) = (port_of(cols[1]), port_of(cols[2]));
                let kind = match cols[3] {
                    "0A" => format!("tcp listen :{local}"),
                    state if local == port => format!("tcp accepted (state {state})"),
                    state => format!("tcp to :{remote} (state {state})"),
                };
                tcp.insert(cols[9].to_owned(), kind);
            }
        }
    }
    let mut kinds = std::collections::BTreeMap::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy().into_owned();
            let kind = match link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                Some(inode) => tcp
                    .get(inode)
                    .cloned()
                    .unwrap_or_else(|| "other socket".into()),
                None if link.starts_with("pipe:") => "pipe".into(),
                None => link,
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    kinds
}

/// Connections that process `pid` accepted on `port` and whose other end
/// process `client` still holds open: a client's idle keep-alive
/// connections, as opposed to ones the server failed to close after their
/// client went away.
pub fn accepted_from(pid: u32, port: u16, client: u32) -> usize {
    let client_ports = local_ports(client);
    let inodes = socket_inodes(pid);
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9
                && inodes.contains(cols[9])
                && cols[3] != "0A"
                && port_of(cols[1]) == Some(port)
                && port_of(cols[2]).is_some_and(|p| client_ports.contains(&p))
            {
                n += 1;
            }
        }
    }
    n
}
