//! Helpers of the Redis tests: finding the servers named in the environment
//! (skipping with a message when there are none), starting a private
//! `redis-server` on a free loopback port, and reading its counters.
#![allow(dead_code)]

use redis::Commands;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorpool::backend::remote::{RedisConfig, RedisStore};
use tensorpool::{AllocError, Allocation, TensorAllocator};

/// The single server of `TENSORPOOL_REDIS_URL`, if set and answering;
/// otherwise prints why the test is skipped.
pub fn single(test: &str) -> Option<RedisConfig> {
    let Ok(url) = std::env::var("TENSORPOOL_REDIS_URL") else {
        eprintln!("SKIP {test}: TENSORPOOL_REDIS_URL is not set (ci/redis.sh sets it)");
        return None;
    };
    let cfg = RedisConfig::single(url);
    reachable(test, cfg)
}

/// The cluster of `TENSORPOOL_REDIS_CLUSTER_URLS` (comma-separated seed
/// nodes), if set and answering.
pub fn cluster(test: &str) -> Option<RedisConfig> {
    let Ok(urls) = std::env::var("TENSORPOOL_REDIS_CLUSTER_URLS") else {
        eprintln!("SKIP {test}: TENSORPOOL_REDIS_CLUSTER_URLS is not set (ci/redis.sh sets it)");
        return None;
    };
    let cfg = RedisConfig::cluster(urls.split(',').filter(|s| !s.is_empty()));
    reachable(test, cfg)
}

fn reachable(test: &str, mut cfg: RedisConfig) -> Option<RedisConfig> {
    cfg.connect_timeout = Duration::from_secs(2);
    let ok = RedisStore::open(cfg.clone()).and_then(|s| {
        use tensorpool::backend::remote::RemoteStore;
        s.health()
    });
    match ok {
        Ok(()) => Some(cfg),
        Err(e) => {
            eprintln!("SKIP {test}: Redis at {cfg:?} does not answer: {e}");
            None
        }
    }
}

/// A private `redis-server` child on a free loopback port, killed by PID on
/// drop.
pub struct Server {
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
    dir: std::path::PathBuf,
}

impl Server {
    /// Starts one, or prints why the test is skipped (no `redis-server`).
    pub fn start(test: &str, extra: &[&str]) -> Option<Server> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("SKIP {test}: redis-server is not installed (ci/redis.sh installs it)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("tp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut s = Server {
            port,
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        s.spawn();
        Some(s)
    }

    /// (Re)starts the process on the same port and waits until it answers.
    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let pass = self.password();
        while Instant::now() < deadline {
            if let Ok(mut c) = redis::Client::open(self.url_with(pass.as_deref()))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis-server on port {} did not start", self.port);
    }

    fn password(&self) -> Option<String> {
        let i = self.args.iter().position(|a| a == "--requirepass")?;
        self.args.get(i + 1).cloned()
    }

    /// `redis://127.0.0.1:port/`, with a password if given.
    pub fn url_with(&self, pass: Option<&str>) -> String {
        match pass {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The server's config for a store.
    pub fn config(&self) -> RedisConfig {
        RedisConfig::single(self.url_with(self.password().as_deref()))
    }

    /// An admin connection.
    pub fn admin(&self) -> redis::Connection {
        let c = redis::Client::open(self.url_with(self.password().as_deref())).unwrap();
        c.get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Kills the process (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `calls` of one command in `INFO commandstats` (0 if never called).
pub fn command_calls(c: &mut redis::Connection, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    let tag = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&tag))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Sum of `calls` over every command but `info` and `config`.
pub fn data_commands(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter(|l| !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_config"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// `DBSIZE`.
pub fn dbsize(c: &mut redis::Connection) -> u64 {
    redis::cmd("DBSIZE").query(c).unwrap()
}

/// Overwrites byte `at` of a stored value directly in Redis.
pub fn alter(c: &mut redis::Connection, key: &str, at: usize) {
    let v: Vec<u8> = c.get(key).unwrap();
    let b = v[at] ^ 0x40;
    let _: () = redis::cmd("SETRANGE")
        .arg(key)
        .arg(at)
        .arg(&[b][..])
        .query(c)
        .unwrap();
}

/// Waits (polling, at most 20 s) for `cond`.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// A deterministic byte pattern.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Three waiters of one batch: reads of `len` bytes at `off` of `a` and of
/// `b2`, and a `synchronize`. Join them with [`join_all`].
pub fn waiters<B: TensorAllocator + 'static>(
    b: &Arc<B>,
    a: Allocation,
    b2: Allocation,
    off: usize,
    len: usize,
) -> Vec<std::thread::JoinHandle<Result<(), AllocError>>> {
    [Some(a), Some(b2), None]
        .into_iter()
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || match t {
                Some(a) => b.read(&a, off, &mut vec![0u8; len]),
                None => b.synchronize(),
            })
        })
        .collect()
}

/// The waiters' results.
pub fn join_all(
    ws: Vec<std::thread::JoinHandle<Result<(), AllocError>>>,
) -> Vec<Result<(), AllocError>> {
    ws.into_iter().map(|w| w.join().unwrap()).collect()
}

/// The longest flush timer (1 s), so that writes made back to back share a
/// batch even on a loaded machine; tests then trigger flushes themselves.
pub fn slow_timer() -> tensorpool::backend::remote::RemoteConfig {
    tensorpool::backend::remote::RemoteConfig {
        flush_interval: std::time::Duration::from_secs(1),
        ..Default::default()
    }
}
