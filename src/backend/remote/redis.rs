//! [`RedisStore`]: chunks in one Redis server or a Redis Cluster, through
//! the `redis` crate's synchronous connections (no async runtime).
//!
//! - One connection for the flusher's batches and one for reads, each
//!   behind a lock; a batch is one pipeline (`SET` per chunk, then the
//!   deletes), so a flush is one round trip on a single server.
//! - Deletes: one `DEL` with every key on a single server; on a cluster one
//!   `DEL` per tensor (its chunks share a hash tag, hence a slot), all in
//!   one cluster pipeline. MOVED/ASK redirections are the crate's cluster
//!   client's job.
//! - A connection that fails with an I/O error or a timeout is dropped and
//!   made again on the next call, so the store recovers when the server is
//!   back.
//! - Credentials come in the URL (`redis://user:pass@host:port`) or in
//!   [`RedisConfig::username`]/[`password`](RedisConfig::password). No URL
//!   with credentials is ever logged or formatted: `Debug` and every error
//!   message show [`redact`]ed URLs.
//! - TLS (`rediss://`) is not built in; such a URL is
//!   [`AllocError::Unsupported`].

use super::store::{ChunkKey, RemoteStore};
use crate::error::AllocError;
use parking_lot::Mutex;
use redis::cluster::{ClusterClient, ClusterConnection, cluster_pipe};
use redis::{Client, Connection, RedisError};
use std::time::Duration;

/// How to reach Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`: the server, or for a
    /// cluster one or more seed nodes.
    pub urls: Vec<String>,
    /// Whether `urls` are Redis Cluster seed nodes.
    pub cluster: bool,
    /// ACL user name (overrides one in the URL).
    pub username: Option<String>,
    /// Password (overrides one in the URL).
    pub password: Option<String>,
    /// Connection timeout (default 2 s).
    pub connect_timeout: Duration,
    /// Read and write timeout of each command or pipeline (default 10 s).
    pub io_timeout: Duration,
}

impl core::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact(u)).collect();
        f.debug_struct("RedisConfig")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("io_timeout", &self.io_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// One server at `url`.
    pub fn single(url: impl Into<String>) -> Self {
        RedisConfig {
            urls: vec![url.into()],
            cluster: false,
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(10),
        }
    }
    /// A Redis Cluster reached through these seed nodes.
    pub fn cluster<I: IntoIterator<Item = S>, S: Into<String>>(urls: I) -> Self {
        RedisConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            cluster: true,
            ..Self::single("")
        }
    }
    /// Sets the password (and optionally the ACL user).
    pub fn auth(mut self, username: Option<&str>, password: &str) -> Self {
        self.username = username.map(str::to_owned);
        self.password = Some(password.to_owned());
        self
    }
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), AllocError> {
        let bad = |what| Err(AllocError::Unsupported { what });
        if self.urls.is_empty() || self.urls.iter().any(|u| u.is_empty()) {
            return bad("RedisConfig: at least one non-empty URL is needed");
        }
        if !self.cluster && self.urls.len() != 1 {
            return bad("RedisConfig: a single-server config takes exactly one URL");
        }
        if self.urls.iter().any(|u| u.starts_with("rediss://")) {
            return bad(
                "TLS (rediss://) is not built into tensorpool's Redis store; use a loopback or tunnelled plain connection",
            );
        }
        if self.connect_timeout.is_zero() || self.io_timeout.is_zero() {
            return bad("RedisConfig: timeouts must be above 0");
        }
        Ok(())
    }
}

/// `url` with any `user:password@` part replaced by `***@`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        (None, Some(at)) => format!("***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

// One per store, built once and never moved on a hot path.
#[allow(clippy::large_enum_variant)]
enum Conns {
    Single {
        client: Client,
        write: Mutex<Option<Connection>>,
        read: Mutex<Option<Connection>>,
    },
    Cluster {
        client: ClusterClient,
        write: Mutex<Option<ClusterConnection>>,
        read: Mutex<Option<ClusterConnection>>,
    },
}

/// A [`RemoteStore`] on Redis or Redis Cluster.
pub struct RedisStore {
    conns: Conns,
    cfg: RedisConfig,
}

impl core::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Maps a redis error to the crate's: authentication failures and refused
/// connections are `BackendUnavailable`, timeouts `Timeout`, the rest
/// `Backend`. The crate's messages carry no credentials.
fn map_err(op: &'static str, e: &RedisError, waited: Duration) -> AllocError {
    let msg = e.to_string();
    let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || [
            "WRONGPASS",
            "NOAUTH",
            "invalid password",
            "invalid username-password",
        ]
        .iter()
        .any(|p| msg.contains(p));
    if auth {
        AllocError::BackendUnavailable {
            backend: "redis",
            reason: format!("authentication failed during {op}: {msg}"),
        }
    } else if e.is_timeout() {
        AllocError::Timeout {
            what: op,
            waited_ms: waited.as_millis() as u64,
        }
    } else if e.is_connection_refusal() {
        AllocError::BackendUnavailable {
            backend: "redis",
            reason: format!("connection refused during {op}: {msg}"),
        }
    } else {
        AllocError::Backend {
            backend: "redis",
            op,
            message: msg,
        }
    }
}

/// Whether the connection is unusable after `e` (drop it, reconnect later).
fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

impl RedisStore {
    /// Connects (lazily: the first command connects; [`RemoteStore::health`]
    /// forces it).
    pub fn open(cfg: RedisConfig) -> Result<Self, AllocError> {
        cfg.validate()?;
        let build_err = |e: RedisError| AllocError::BackendUnavailable {
            backend: "redis",
            reason: format!(
                "bad Redis configuration for {:?}: {e}",
                cfg.urls.iter().map(|u| redact(u)).collect::<Vec<_>>()
            ),
        };
        let infos = cfg
            .urls
            .iter()
            .map(|u| {
                let mut info = redis::IntoConnectionInfo::into_connection_info(u.as_str())
                    .map_err(build_err)?;
                let mut rs = info.redis_settings().clone();
                if let Some(p) = &cfg.password {
                    rs = rs.set_password(p);
                }
                if let Some(n) = &cfg.username {
                    rs = rs.set_username(n);
                }
                info = info.set_redis_settings(rs);
                Ok(info)
            })
            .collect::<Result<Vec<_>, AllocError>>()?;
        let conns = if cfg.cluster {
            let mut b = ClusterClient::builder(infos)
                .connection_timeout(cfg.connect_timeout)
                .response_timeout(cfg.io_timeout)
                .retries(2);
            if let Some(p) = &cfg.password {
                b = b.password(p);
            }
            if let Some(n) = &cfg.username {
                b = b.username(n);
            }
            Conns::Cluster {
                client: b.build().map_err(build_err)?,
                write: Mutex::new(None),
                read: Mutex::new(None),
            }
        } else {
            let info = infos.into_iter().next().ok_or(AllocError::Unsupported {
                what: "RedisConfig: no URL",
            })?;
            Conns::Single {
                client: Client::open(info).map_err(build_err)?,
                write: Mutex::new(None),
                read: Mutex::new(None),
            }
        };
        Ok(RedisStore { conns, cfg })
    }

    /// The settings (credentials redacted in `Debug`).
    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// Runs `f` on the write (`write == true`) or read connection,
    /// connecting first if needed; drops the connection on an I/O error.
    fn with<T>(
        &self,
        op: &'static str,
        write: bool,
        mut f: impl FnMut(ConnRef<'_>) -> redis::RedisResult<T>,
    ) -> Result<T, AllocError> {
        let start = std::time::Instant::now();
        let io = Some(self.cfg.io_timeout);
        let fail = |e: RedisError| map_err(op, &e, start.elapsed());
        match &self.conns {
            Conns::Single {
                client,
                write: w,
                read: r,
            } => on_slot(
                if write { w } else { r },
                || {
                    let c = client.get_connection_with_timeout(self.cfg.connect_timeout)?;
                    c.set_read_timeout(io)?;
                    c.set_write_timeout(io)?;
                    Ok(c)
                },
                |c| f(ConnRef::Single(c)),
                fail,
            ),
            Conns::Cluster {
                client,
                write: w,
                read: r,
            } => on_slot(
                if write { w } else { r },
                || {
                    let c = client.get_connection()?;
                    c.set_read_timeout(io)?;
                    c.set_write_timeout(io)?;
                    Ok(c)
                },
                |c| f(ConnRef::Cluster(c)),
                fail,
            ),
        }
    }
}

/// Runs `f` on the connection in `slot`, connecting first if it is empty;
/// empties the slot when `f` leaves the connection unusable. A connection
/// kept from earlier may have died in between (server restarted): then `f`
/// runs once more on a fresh one — every command the store sends (`SET`,
/// `GET`, `DEL`, `PING`) is idempotent, so a repeat is harmless.
fn on_slot<C, T>(
    slot: &Mutex<Option<C>>,
    mut connect: impl FnMut() -> redis::RedisResult<C>,
    mut f: impl FnMut(&mut C) -> redis::RedisResult<T>,
    fail: impl Fn(RedisError) -> AllocError,
) -> Result<T, AllocError> {
    let mut slot = slot.lock();
    let reused = slot.is_some();
    for attempt in 0..2 {
        let c = match &mut *slot {
            Some(c) => c,
            none => none.insert(connect().map_err(&fail)?),
        };
        match f(c) {
            Ok(v) => return Ok(v),
            Err(e) if broken(&e) => {
                *slot = None;
                if !(reused && attempt == 0 && !e.is_timeout()) {
                    return Err(fail(e));
                }
            }
            Err(e) => return Err(fail(e)),
        }
    }
    Err(AllocError::Backend {
        backend: "redis",
        op: "reconnect",
        message: "connection lost twice".into(),
    })
}

/// One connection of either kind.
enum ConnRef<'a> {
    Single(&'a mut Connection),
    Cluster(&'a mut ClusterConnection),
}

/// Builds the same commands into a plain or a cluster pipeline.
macro_rules! build {
    ($p:expr, $puts:expr, $deletes:expr, $cluster:expr) => {{
        let p = $p;
        for (k, v) in $puts {
            p.cmd("SET").arg(k.to_string()).arg(*v).ignore();
        }
        let deletes: &[ChunkKey] = $deletes;
        if $cluster {
            // One DEL per tensor: its keys share a hash tag, hence a slot.
            for group in deletes.chunk_by(|a, b| (a.ns, a.id) == (b.ns, b.id)) {
                p.cmd("DEL");
                for k in group {
                    p.arg(k.to_string());
                }
                p.ignore();
            }
        } else if !deletes.is_empty() {
            p.cmd("DEL");
            for k in deletes {
                p.arg(k.to_string());
            }
            p.ignore();
        }
        p
    }};
}

impl RemoteStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn put(&self, items: &[(ChunkKey, &[u8])]) -> Result<(), AllocError> {
        self.apply(items, &[])
    }

    fn get(&self, keys: &[ChunkKey]) -> Result<Vec<Option<Vec<u8>>>, AllocError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.with("redis get", false, |c| match c {
            ConnRef::Single(c) => {
                let mut p = redis::pipe();
                for k in keys {
                    p.cmd("GET").arg(k.to_string());
                }
                p.query(c)
            }
            ConnRef::Cluster(c) => {
                let mut p = cluster_pipe();
                for k in keys {
                    p.cmd("GET").arg(k.to_string());
                }
                p.query(c)
            }
        })
    }

    fn delete(&self, keys: &[ChunkKey]) -> Result<(), AllocError> {
        self.apply(&[], keys)
    }

    fn health(&self) -> Result<(), AllocError> {
        self.with("redis ping", true, |c| match c {
            ConnRef::Single(c) => redis::cmd("PING").query::<String>(c).map(drop),
            ConnRef::Cluster(c) => redis::cmd("PING").query::<String>(c).map(drop),
        })?;
        self.with("redis ping", false, |c| match c {
            ConnRef::Single(c) => redis::cmd("PING").query::<String>(c).map(drop),
            ConnRef::Cluster(c) => redis::cmd("PING").query::<String>(c).map(drop),
        })
    }

    /// One pipeline: every `SET`, then the deletes.
    fn apply(&self, puts: &[(ChunkKey, &[u8])], deletes: &[ChunkKey]) -> Result<(), AllocError> {
        if puts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let mut sorted;
        let deletes = if deletes.is_sorted() {
            deletes
        } else {
            sorted = deletes.to_vec();
            sorted.sort_unstable();
            &sorted[..]
        };
        self.with("redis batch", true, |c| match c {
            ConnRef::Single(c) => {
                let mut p = redis::pipe();
                build!(&mut p, puts, deletes, false).exec(c)
            }
            ConnRef::Cluster(c) => {
                let mut p = cluster_pipe();
                build!(&mut p, puts, deletes, true).exec(c)
            }
        })
    }
}
