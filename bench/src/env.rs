//! The bench database, created next to `--database-url` and dropped at the
//! end, and what every scenario sets up in it over HTTP (schedules, guest
//! tokens).

use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};

use crate::hold::{COLS, ROWS};
use crate::replicas::Replica;
use crate::{BoxError, Result};

pub(crate) struct BenchEnv {
    pub(crate) admin_url: String,
    pub(crate) db_name: String,
    pub(crate) db_url: String,
    pub(crate) created: bool,
    pub(crate) keep: bool,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) secret: String,
    pub(crate) admin_token: String,
}
impl BenchEnv {
    pub(crate) fn new(admin_url: &str) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Self {
            admin_url: admin_url.to_owned(),
            db_name: format!("seatsync_bench_{}", &tag[..12]),
            db_url: String::new(),
            created: false,
            keep: false,
            replicas: Vec::new(),
            secret: format!("bench-secret-{tag}"),
            admin_token: format!("bench-admin-{tag}"),
        }
    }

    pub(crate) async fn create_database(&mut self) -> Result<()> {
        let mut url = reqwest::Url::parse(&self.admin_url)
            .map_err(|e| format!("--database-url {:?}: {e}", self.admin_url))?;
        url.set_path(&format!("/{}", self.db_name));
        self.db_url = url.to_string();
        let admin = pg_connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", self.db_name))
            .await
            .map_err(|e| format!("cannot create the bench database: {}", pg_error(&e)))?;
        self.created = true;
        Ok(())
    }

    pub(crate) async fn teardown(&mut self) {
        for r in &self.replicas {
            // SIGTERM: the replica ends its streams and exits on its own.
            if let Ok(pid) = i32::try_from(r.pid) {
                // SAFETY: plain kill(2) on a child we started and did not reap.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        for r in &mut self.replicas {
            if tokio::time::timeout(Duration::from_secs(12), r.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "bench: replica {} did not stop on SIGTERM; killing it",
                    r.pid
                );
                let _ = r.child.kill().await;
            }
        }
        self.replicas.clear();
        if self.created && self.keep {
            println!(
                "bench: kept database {} (DROP DATABASE {} WITH (FORCE) when done)",
                self.db_url, self.db_name
            );
        } else if self.created {
            let dropped = async {
                let admin = pg_connect(&self.admin_url).await?;
                admin
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.db_name
                    ))
                    .await?;
                Ok::<_, BoxError>(())
            };
            match tokio::time::timeout(Duration::from_secs(30), dropped).await {
                Ok(Ok(())) => self.created = false,
                Ok(Err(e)) => eprintln!("bench: cannot drop database {}: {e}", self.db_name),
                Err(_) => eprintln!("bench: timed out dropping database {}", self.db_name),
            }
        }
    }
}

pub(crate) async fn pg_connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| format!("timed out connecting to {url}"))?
    .map_err(|e| format!("cannot connect to {url}: {}", pg_error(&e)))?;
    tokio::spawn(conn);
    Ok(client)
}

pub(crate) fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => {
            let mut s = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cause = c.source();
            }
            s
        }
    }
}

/// Creates `count` empty 100x100 schedules, one after the other (so their ids
/// are consecutive in a fresh database).
pub(crate) async fn create_schedules(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    count: usize,
) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let resp = http
            .post(format!("{base}/api/schedules"))
            .bearer_auth(admin_token)
            .json(&json!({
                "title": format!("bench {i}"),
                "startsAt": "2030-01-01T19:30:00Z",
                "rows": ROWS,
                "cols": COLS,
                "blocked": [],
            }))
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        match (status, body["id"].as_i64()) {
            (201, Some(id)) => ids.push(id),
            _ => return Err(format!("POST /api/schedules answered {status}: {body}").into()),
        }
    }
    Ok(ids)
}

pub(crate) async fn guest_tokens(
    http: &reqwest::Client,
    bases: &[String],
    count: usize,
) -> Result<Vec<String>> {
    stream::iter(0..count)
        .map(|i| {
            let url = format!("{}/api/auth/guest", bases[i % bases.len()]);
            async move {
                let resp = http.post(url).send().await?;
                let status = resp.status().as_u16();
                let body: Value = resp.json().await?;
                match (status, body["token"].as_str()) {
                    (201, Some(t)) => Ok::<_, BoxError>(t.to_owned()),
                    _ => Err(format!("POST /api/auth/guest answered {status}: {body}").into()),
                }
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await
}
