//! Debian's nginx in front of a test's replicas, configured by the shipped
//! `deploy/nginx/seatsync.conf` with only the upstream servers, the listen
//! port and the directives a test overrides replaced.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{wait_for, Replica};

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/seatsync.conf");

/// The nginx binary: `SEATSYNC_NGINX`, else Debian's (deploy/test.sh installs
/// it), else whatever `nginx` is on PATH.
fn nginx_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SEATSYNC_NGINX") {
        return p.into();
    }
    let debian = Path::new("/usr/sbin/nginx");
    if debian.exists() {
        return debian.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nginx"))
                .find(|p| p.exists())
        })
        .expect(
            "nginx not found: install Debian's nginx (deploy/test.sh does) or set SEATSYNC_NGINX",
        )
}

/// A replica's `host:port`, as an upstream `server` line wants it.
pub fn upstream_addr(r: &Replica) -> String {
    r.base
        .strip_prefix("http://")
        .expect("an http:// base")
        .to_owned()
}

/// Directives of the shipped config to replace, for a test.
#[derive(Clone, Debug, Default)]
pub struct NginxOpts {
    overrides: Vec<(String, String)>,
}

impl NginxOpts {
    /// Replaces the value of every `directive` in the shipped config (which
    /// must have it): `.set("proxy_read_timeout", "2s")`.
    pub fn set(mut self, directive: &str, value: &str) -> Self {
        self.overrides.push((directive.into(), value.into()));
        self
    }
}

/// The shipped config with `servers` as the upstream, listening on `port`.
pub fn site_config(servers: &[String], port: u16, opts: &NginxOpts) -> String {
    let shipped = std::fs::read_to_string(SHIPPED).expect("read deploy/nginx/seatsync.conf");
    let mut out = Vec::new();
    let (mut in_upstream, mut servers_done) = (false, false);
    let mut upstreams = 0;
    let mut replaced = vec![0usize; opts.overrides.len()];
    for line in shipped.lines() {
        let code = line.split('#').next().unwrap_or("").trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        if code.starts_with("upstream ") {
            in_upstream = true;
            servers_done = false;
            upstreams += 1;
        } else if in_upstream && code == "}" {
            in_upstream = false;
        }
        if in_upstream && code.starts_with("server ") {
            // The shipped parameters (max_fails, ...) for every server.
            if !servers_done {
                let params: Vec<&str> = code.trim_end_matches(';').split_whitespace().collect();
                for s in servers {
                    out.push(format!("{indent}server {s} {};", params[2..].join(" ")));
                }
                servers_done = true;
            }
            continue;
        }
        if code.starts_with("listen ") {
            out.push(format!("{indent}listen 127.0.0.1:{port};"));
            continue;
        }
        let directive = code.split_whitespace().next().unwrap_or("");
        if let Some(i) = opts.overrides.iter().position(|(d, _)| d == directive) {
            replaced[i] += 1;
            out.push(format!("{indent}{directive} {};", opts.overrides[i].1));
            continue;
        }
        out.push(line.to_owned());
    }
    assert!(
        upstreams > 0 && servers_done,
        "no upstream servers in {SHIPPED}"
    );
    for ((d, _), n) in opts.overrides.iter().zip(replaced) {
        assert!(n > 0, "{d} is not in {SHIPPED}; nothing to override");
    }
    out.join("\n") + "\n"
}

/// A free port on 127.0.0.1, as far as anyone can tell before binding it.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// nginx (master and one worker) with its own prefix, pid file and logs;
/// stopped and removed when dropped.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub base: String,
}

impl Nginx {
    /// Starts nginx in front of `replicas` and waits until it proxies
    /// `/healthz`.
    pub async fn start(replicas: &[&Replica], opts: NginxOpts) -> Nginx {
        let servers: Vec<String> = replicas.iter().map(|r| upstream_addr(r)).collect();
        // Another process may take the port between the probe and nginx's
        // bind; a fresh port then.
        for attempt in 1..=3 {
            let port = free_port();
            match Self::try_start(&servers, port, &opts) {
                Ok(nginx) => {
                    let front = nginx.front();
                    wait_for(
                        "nginx to proxy /healthz",
                        Duration::from_secs(10),
                        || async {
                            let r = front.http.get(front.url("/healthz")).send().await.ok()?;
                            (r.status() == 200).then_some(())
                        },
                    )
                    .await;
                    return nginx;
                }
                Err(log) if attempt < 3 && log.contains("Address already in use") => continue,
                Err(log) => panic!("nginx did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn try_start(servers: &[String], port: u16, opts: &NginxOpts) -> Result<Nginx, String> {
        let dir =
            std::env::temp_dir().join(format!("seatsync-nginx-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        // Workers drop to `nobody` when the tests run as root; they need to
        // reach their temp directories under here.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        }
        std::fs::write(dir.join("site.conf"), site_config(servers, port, opts)).expect("site.conf");
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    # Which replicas served each request: more than one is a retry.
    log_format upstreams '$status $request_method $uri upstream=$upstream_addr \
upstream_status=$upstream_status id=$req_id';
    access_log {d}/logs/access.log upstreams;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
"
            ),
        )
        .expect("nginx.conf");
        let mut child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            // In the foreground, so the test owns the master process.
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nginx");
        // nginx binds before it writes its pid file; a failed bind exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("nginx status") {
                let log = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("exit {status}: {log}"));
            }
            if dir.join("nginx.pid").exists() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nginx wrote no pid file within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Nginx {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// A client for the API through nginx.
    pub fn front(&self) -> Replica {
        Replica::behind(&self.base)
    }

    /// The access log so far, one line per request (see `log_format`).
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Requests nginx passed to more than one replica (it retried them).
    pub fn retried(&self) -> Vec<String> {
        self.access_log()
            .into_iter()
            .filter(|l| {
                let upstreams = l.split(" upstream=").nth(1).unwrap_or("");
                upstreams
                    .split(" upstream_status=")
                    .next()
                    .unwrap_or("")
                    .contains(", ")
            })
            .collect()
    }

    /// Why nginx failed requests: the `[error]` lines of its error log
    /// (refused connects, connections a replica closed under a request).
    pub fn errors(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("logs/error.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("[error]"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; SIGKILL would leave
        // them running, listening on the port.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
