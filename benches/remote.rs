//! The remote backend against its floors and ceiling, peers interleaved in
//! each repetition, medians of `REPS`.
//!
//! - allocation: `allocate` + `deallocate` of a lazy tensor (no round trip);
//! - write / read throughput at 4 KiB, 1 MiB and 64 MiB tensors (64 MiB in
//!   all per case) through `RemoteBackend<RedisStore>`, against the raw
//!   `redis` crate doing one pipeline of SET / GET of the same 1 MiB chunks
//!   (the client floor) — reads both one call per tensor and all at once
//!   with `read_many` — `redis-benchmark` at the same value size, one
//!   client, pipeline 16 (the server ceiling), and memcpy + loopback TCP
//!   (the physical floor);
//! - small writes (256 B): batched by the flusher vs one command per write.
//!
//! Redis: a private `redis-server` on a free loopback port (killed by PID at
//! the end), or `TENSORPOOL_REDIS_URL`; without either only the local parts
//! run. `cargo bench --features remote --bench remote`
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tensorpool::backend::remote::{
    CHUNK, MemoryStore, RedisConfig, RedisStore, RemoteBackend, RemoteConfig, encode,
};
use tensorpool::{AllocRequest, TensorAllocator};

const REPS: usize = 5;
const TOTAL: usize = 64 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbs(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

struct Server(Child, u16);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn private_server() -> Option<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let s = Server(child, port);
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..200 {
        if let Ok(mut c) = redis::Client::open(url.as_str()).and_then(|c| c.get_connection())
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Allocation cost: many short runs (10,000 ops each), so the minimum
/// shows a run that had a core to itself on a loaded machine.
fn alloc_cost() {
    let b = RemoteBackend::new(MemoryStore::new(), RemoteConfig::default()).unwrap();
    let req = AllocRequest::bytes(1 << 20);
    let (n, runs) = (10_000, 100);
    let mut pair = Vec::new();
    let mut alloc = Vec::new();
    let mut v = Vec::with_capacity(n);
    for _ in 0..runs {
        let t = Instant::now();
        for _ in 0..n {
            let a = b.allocate(&req).unwrap();
            // SAFETY: allocated just above, freed once.
            unsafe { b.deallocate(&a).unwrap() };
        }
        pair.push(t.elapsed().as_nanos() as f64 / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            v.push(b.allocate(&req).unwrap());
        }
        alloc.push(t.elapsed().as_nanos() as f64 / n as f64);
        for a in v.drain(..) {
            // SAFETY: allocated above, freed once.
            unsafe { b.deallocate(&a).unwrap() };
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "allocation (lazy, no round trip), ns per op over {runs} runs of {n}: allocate median {:.0} min {:.0}; allocate+free pair median {:.0} min {:.0}",
        median(alloc.clone()),
        min(&alloc),
        median(pair.clone()),
        min(&pair)
    );
}

fn memcpy_and_tcp() -> (f64, f64) {
    let src = vec![7u8; TOTAL];
    let mut dst = vec![0u8; TOTAL];
    let mut mc = Vec::new();
    let mut tcp = Vec::new();
    for _ in 0..REPS {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        mc.push(gbs(TOTAL, t.elapsed()));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < TOTAL {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        });
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        for part in src.chunks(1 << 20) {
            c.write_all(part).unwrap();
        }
        drop(c);
        assert_eq!(h.join().unwrap(), TOTAL);
        tcp.push(gbs(TOTAL, t.elapsed()));
    }
    std::hint::black_box(&dst);
    (median(mc), median(tcp))
}

/// `redis-benchmark` SET and GET throughput (GB/s) at value size `d`.
fn redis_benchmark(port: u16, d: usize) -> Option<(f64, f64)> {
    let n = (TOTAL / d).clamp(16, 20_000);
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-q",
            "-c",
            "1",
            "-P",
            "16",
        ])
        .args(["-d", &d.to_string(), "-n", &n.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let rps = |cmd: &str| {
        text.lines()
            .filter(|l| {
                l.trim_start().starts_with(&format!("{cmd}: ")) && l.contains("requests per second")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .next_back()
    };
    Some((rps("SET")? * d as f64 / 1e9, rps("GET")? * d as f64 / 1e9))
}

fn throughput(url: &str, port: Option<u16>) {
    let store = RedisStore::open(RedisConfig::single(url)).unwrap();
    let b = RemoteBackend::new(store, RemoteConfig::default()).unwrap();
    let mut raw = redis::Client::open(url).unwrap().get_connection().unwrap();
    let src = vec![0x3Cu8; TOTAL];
    println!(
        "| tensor size | backend write GB/s | raw pipelined SET GB/s | backend read GB/s | backend read_many GB/s | raw pipelined GET GB/s | write / raw | read / raw | read_many / raw | redis-benchmark SET / GET GB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for size in [4 << 10, 1 << 20, 64 << 20] {
        let count = TOTAL / size;
        let (mut bw, mut br, mut bm, mut rw, mut rr) = (vec![], vec![], vec![], vec![], vec![]);
        for rep in 0..REPS {
            // The backend: allocate, write all, synchronize; read all.
            let ts: Vec<_> = (0..count)
                .map(|_| b.allocate(&AllocRequest::bytes(size)).unwrap())
                .collect();
            let t = Instant::now();
            for (a, part) in ts.iter().zip(src.chunks(size)) {
                b.write(a, 0, part).unwrap();
            }
            b.synchronize().unwrap();
            bw.push(gbs(TOTAL, t.elapsed()));
            b.trim();
            let mut dst = vec![0u8; size];
            let t = Instant::now();
            for a in &ts {
                b.read(a, 0, &mut dst).unwrap();
            }
            br.push(gbs(TOTAL, t.elapsed()));
            b.trim();
            let mut all = vec![0u8; TOTAL];
            let t = Instant::now();
            let mut reads: Vec<_> = ts
                .iter()
                .zip(all.chunks_mut(size))
                .map(|(a, d)| (*a, 0, d))
                .collect();
            b.read_many(&mut reads).unwrap();
            bm.push(gbs(TOTAL, t.elapsed()));
            assert!(all == src);
            for a in &ts {
                // SAFETY: allocated above, freed once.
                unsafe { b.deallocate(a).unwrap() };
            }
            b.synchronize().unwrap();
            // The raw client: the same chunk values (header + payload), one
            // pipeline of SETs, one of GETs.
            let vals: Vec<(String, Vec<u8>)> = src
                .chunks(size)
                .enumerate()
                .flat_map(|(i, t)| {
                    t.chunks(CHUNK)
                        .enumerate()
                        .map(move |(c, p)| (format!("raw:{{{rep}:{i}}}:{c}"), encode(p)))
                })
                .collect();
            let t = Instant::now();
            let mut p = redis::pipe();
            for (k, v) in &vals {
                p.cmd("SET").arg(k).arg(v).ignore();
            }
            p.exec(&mut raw).unwrap();
            rw.push(gbs(TOTAL, t.elapsed()));
            let t = Instant::now();
            let mut p = redis::pipe();
            for (k, _) in &vals {
                p.cmd("GET").arg(k);
            }
            let got: Vec<Vec<u8>> = p.query(&mut raw).unwrap();
            rr.push(gbs(TOTAL, t.elapsed()));
            assert_eq!(got.len(), vals.len());
            let mut p = redis::pipe();
            for (k, _) in &vals {
                p.cmd("DEL").arg(k).ignore();
            }
            p.exec(&mut raw).unwrap();
        }
        let (bw, br, bm) = (median(bw), median(br), median(bm));
        let (rw, rr) = (median(rw), median(rr));
        let rb = port
            .and_then(|p| redis_benchmark(p, size))
            .map_or("-".to_string(), |(s, g)| format!("{s:.2} / {g:.2}"));
        println!(
            "| {} | {bw:.2} | {rw:.2} | {br:.2} | {bm:.2} | {rr:.2} | {:.2} | {:.2} | {:.2} | {rb} |",
            human(size),
            bw / rw,
            br / rr,
            bm / rr
        );
    }
    // Small writes: batched by the flusher vs one SET per write.
    let n = 5_000;
    let small = [0x11u8; 256];
    let ts: Vec<_> = (0..n)
        .map(|_| b.allocate(&AllocRequest::bytes(256)).unwrap())
        .collect();
    let (mut batched, mut single, mut raw_single) = (vec![], vec![], vec![]);
    let unbatched = RemoteBackend::new(
        RedisStore::open(RedisConfig::single(url)).unwrap(),
        RemoteConfig {
            flush_ops: 1,
            ..RemoteConfig::default()
        },
    )
    .unwrap();
    let us: Vec<_> = (0..n)
        .map(|_| unbatched.allocate(&AllocRequest::bytes(256)).unwrap())
        .collect();
    for _ in 0..REPS {
        let t = Instant::now();
        for a in &ts {
            b.write(a, 0, &small).unwrap();
        }
        b.synchronize().unwrap();
        batched.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for a in &us {
            unbatched.write(a, 0, &small).unwrap();
            unbatched.synchronize().unwrap();
        }
        single.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..n {
            let _: () = redis::cmd("SET")
                .arg(format!("raw:small:{i}"))
                .arg(&small[..])
                .query(&mut raw)
                .unwrap();
        }
        raw_single.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let (bt, st, rs) = (median(batched), median(single), median(raw_single));
    println!(
        "small writes (256 B, {n}): batched {bt:.0}/s; one flush per write {st:.0}/s; raw one SET per write {rs:.0}/s; batched / one-per-write {:.1}×",
        bt / st
    );
    let _: () = redis::cmd("FLUSHDB").query(&mut raw).unwrap();
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n => format!("{} KiB", n >> 10),
    }
}

fn main() {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());
    alloc_cost();
    let (mc, tcp) = memcpy_and_tcp();
    println!(
        "physical floor: memcpy {mc:.2} GB/s, loopback TCP {tcp:.2} GB/s (64 MiB, median of {REPS})"
    );
    let server = private_server();
    let (url, port) = match (&server, std::env::var("TENSORPOOL_REDIS_URL")) {
        (Some(s), _) => (format!("redis://127.0.0.1:{}/", s.1), Some(s.1)),
        (None, Ok(u)) => (u, None),
        (None, Err(_)) => {
            println!("SKIP Redis parts: no redis-server installed and TENSORPOOL_REDIS_URL unset");
            return;
        }
    };
    throughput(&url, port);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at end: {}", load.trim());
}
