//! The remote backend on real Redis. Servers come from the environment
//! (`TENSORPOOL_REDIS_URL`, `TENSORPOOL_REDIS_CLUSTER_URLS`; ci/redis.sh
//! starts them) or, for the tests that count commands, kill or reconfigure
//! a server, from a private `redis-server` each test starts on a free
//! loopback port and kills by PID. Without a server every test prints SKIP
//! and passes; none waits longer than its timeout.
#![cfg(feature = "remote")]

mod remote_common;

use remote_common::{Server, alter, command_calls, data_commands, dbsize, eventually, pattern};
use std::sync::Arc;
use std::time::Duration;
use tensorpool::backend::remote::{CHUNK, RedisConfig, RedisStore, RemoteBackend, RemoteConfig};
use tensorpool::{AllocError, AllocRequest, Allocation, TensorAllocator, TensorBuf};

type Redis = RemoteBackend<RedisStore>;

fn open(cfg: RedisConfig, rc: RemoteConfig) -> Redis {
    RemoteBackend::new(RedisStore::open(cfg).unwrap(), rc).unwrap()
}

/// 4 KiB … 64 MiB, across chunk boundaries, at odd offsets.
fn round_trips(b: &Redis) {
    for (i, size) in [4096, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5, 64 * CHUNK]
        .into_iter()
        .enumerate()
    {
        let a = b.allocate(&AllocRequest::bytes(size)).unwrap();
        let mut model = pattern(size, 11 + i as u64);
        b.write(&a, 0, &model).unwrap();
        let off = if size > CHUNK {
            CHUNK - 3
        } else {
            (size / 3) | 1
        };
        let win = pattern((size - off).min(2 * CHUNK + 7), 5);
        b.write(&a, off, &win).unwrap();
        model[off..off + win.len()].copy_from_slice(&win);
        b.synchronize().unwrap();
        b.trim();
        let mut got = vec![0u8; size];
        b.read(&a, 0, &mut got).unwrap();
        assert!(got == model, "{size} B round trip");
        let (ro, rl) = (off | 1, (size - (off | 1)).min(CHUNK + 9));
        let mut part = vec![0u8; rl];
        b.read(&a, ro, &mut part).unwrap();
        assert!(
            part == model[ro..ro + rl],
            "{size} B: read at odd offset {ro}"
        );
        // SAFETY: allocated above, freed once.
        unsafe { b.deallocate(&a).unwrap() };
    }
    b.synchronize().unwrap();
}

#[test]
fn round_trips_single() {
    let Some(cfg) = remote_common::single("round_trips_single") else {
        return;
    };
    round_trips(&open(cfg, RemoteConfig::default()));
}

#[test]
fn round_trips_cluster() {
    let Some(cfg) = remote_common::cluster("round_trips_cluster") else {
        return;
    };
    round_trips(&open(cfg, RemoteConfig::default()));
}

#[test]
fn f32_50x50_round_trip_cluster() {
    let Some(cfg) = remote_common::cluster("f32_50x50_round_trip_cluster") else {
        return;
    };
    let b: Arc<dyn TensorAllocator> = Arc::new(open(cfg, RemoteConfig::default()));
    let req = AllocRequest::tensor(&[50, 50], tensorpool::DType::F32).unwrap();
    // Many tensors, so their hash tags land on every node.
    let ts: Vec<TensorBuf> = (0..30).map(|_| TensorBuf::new(&b, &req).unwrap()).collect();
    for (k, t) in ts.iter().enumerate() {
        let src: Vec<f32> = (0..2500).map(|i| (i * (k + 1)) as f32 * 0.25).collect();
        t.write_from(&src).unwrap();
    }
    b.synchronize().unwrap();
    for (k, t) in ts.iter().enumerate() {
        let mut out = vec![0f32; 2500];
        t.read_into(&mut out).unwrap();
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, x)| *x == (i * (k + 1)) as f32 * 0.25)
        );
    }
}

#[test]
fn allocations_send_no_command() {
    let Some(srv) = Server::start("allocations_send_no_command", &[]) else {
        return;
    };
    let b = Arc::new(open(srv.config(), RemoteConfig::default()));
    let mut admin = srv.admin();
    let before = data_commands(&mut admin);
    let hs: Vec<_> = (0..8)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                let v: Vec<Allocation> = (0..10_000)
                    .map(|_| b.allocate(&AllocRequest::bytes(1 << 20)).unwrap())
                    .collect();
                let ids: Vec<u64> = v.iter().map(|a| a.id().get()).collect();
                for a in &v {
                    // SAFETY: allocated above, freed once.
                    unsafe { b.deallocate(a).unwrap() };
                }
                ids
            })
        })
        .collect();
    let mut ids: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 80_000);
    b.synchronize().unwrap();
    assert_eq!(data_commands(&mut admin), before, "zero store commands");
    assert_eq!(dbsize(&mut admin), 0);
}

#[test]
fn n_drops_are_one_batched_delete_and_dbsize_returns_to_zero() {
    let Some(srv) = Server::start("n_drops_are_one_batched_delete", &[]) else {
        return;
    };
    let b: Arc<dyn TensorAllocator> = Arc::new(open(srv.config(), remote_common::slow_timer()));
    let mut admin = srv.admin();
    let ts: Vec<TensorBuf> = (0..50)
        .map(|i| {
            let t = TensorBuf::new(&b, &AllocRequest::bytes(1000 + 3 * CHUNK * (i % 2))).unwrap();
            t.write_from(&pattern(t.len_bytes(), i as u64)).unwrap();
            t
        })
        .collect();
    b.synchronize().unwrap();
    assert_eq!(dbsize(&mut admin), 25 + 25 * 4);
    let dels = command_calls(&mut admin, "del");
    drop(ts);
    // Nothing else is called: the flusher's timer sends the frees.
    assert!(eventually(|| dbsize(&mut admin) == 0), "keys left");
    assert_eq!(command_calls(&mut admin, "del") - dels, 1, "one DEL");
}

#[test]
fn out_of_memory_fails_every_waiter_and_the_backend_recovers() {
    let Some(srv) = Server::start("out_of_memory_fails_every_waiter", &[]) else {
        return;
    };
    let mut admin = srv.admin();
    let b = Arc::new(open(srv.config(), remote_common::slow_timer()));
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut admin)
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query(&mut admin)
        .unwrap();
    // Data made first, so the three writes go out back to back, in one batch.
    let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(2 * CHUNK, i)).collect();
    let ts: Vec<Allocation> = data
        .iter()
        .map(|d| {
            let a = b.allocate(&AllocRequest::bytes(2 * CHUNK)).unwrap();
            b.write(&a, 0, d).unwrap();
            a
        })
        .collect();
    let waiters = remote_common::waiters(&b, ts[0], ts[1], CHUNK - 1, 2);
    let rs = remote_common::join_all(waiters);
    let e = rs[0].clone().unwrap_err();
    assert!(e.to_string().contains("OOM"), "{e}");
    assert!(rs.iter().all(|r| r == &Err(e.clone())), "{rs:?}");
    assert_eq!(
        b.read(&ts[2], 0, &mut [0u8; 1]),
        Err(e),
        "reported on next use"
    );
    // Recovery once the server has room.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut admin)
        .unwrap();
    for (i, a) in ts.iter().enumerate() {
        let p = pattern(2 * CHUNK, 70 + i as u64);
        if b.write(a, 0, &p).is_err() {
            b.write(a, 0, &p).unwrap();
        }
        b.synchronize().unwrap();
        let mut got = vec![0u8; 2 * CHUNK];
        b.read(a, 0, &mut got).unwrap();
        assert!(got == p);
    }
}

#[test]
fn killing_the_server_mid_flush_fails_every_waiter_and_a_restart_recovers() {
    let Some(mut srv) = Server::start("killing_the_server_mid_flush", &[]) else {
        return;
    };
    let mut admin = srv.admin();
    let b = Arc::new(open(srv.config(), remote_common::slow_timer()));
    // Hold write commands in the server so the flush is in flight.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(20_000)
        .arg("WRITE")
        .query(&mut admin)
        .unwrap();
    let data: Vec<Vec<u8>> = (0..2).map(|i| pattern(CHUNK + 1, i)).collect();
    let ts: Vec<Allocation> = data
        .iter()
        .map(|d| {
            let a = b.allocate(&AllocRequest::bytes(CHUNK + 1)).unwrap();
            b.write(&a, 0, d).unwrap();
            a
        })
        .collect();
    let waiters = remote_common::waiters(&b, ts[0], ts[1], 0, 8);
    assert!(
        eventually(|| b.remote_stats().batches >= 1),
        "flush started"
    );
    std::thread::sleep(Duration::from_millis(50)); // let the pipeline reach the server
    srv.kill();
    let rs = remote_common::join_all(waiters);
    let e = rs[0].clone().unwrap_err();
    assert!(rs.iter().all(|r| r == &Err(e.clone())), "{rs:?}");
    // Restart on the same port: the store reconnects.
    srv.spawn();
    let a = b.allocate(&AllocRequest::bytes(3000)).unwrap();
    let p = pattern(3000, 9);
    b.write(&a, 0, &p).unwrap();
    assert!(eventually(|| b.synchronize().is_ok()), "recovers");
    let mut got = vec![0u8; 3000];
    b.read(&a, 0, &mut got).unwrap();
    assert_eq!(got, p);
}

#[test]
fn a_wrong_password_is_an_authentication_error() {
    let Some(srv) = Server::start("a_wrong_password", &["--requirepass", "s3cret-pw"]) else {
        return;
    };
    let wrong = RedisConfig::single(srv.url_with(Some("nope")));
    let e = RemoteBackend::new(
        RedisStore::open(wrong.clone()).unwrap(),
        RemoteConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, AllocError::BackendUnavailable { reason, .. } if reason.contains("authentication")),
        "{e}"
    );
    assert!(
        !format!("{wrong:?}").contains("nope"),
        "credentials never shown"
    );
    assert!(!e.to_string().contains("nope"));
    // No password at all against a protected server.
    let none = RedisConfig::single(srv.url_with(None));
    let e =
        RemoteBackend::new(RedisStore::open(none).unwrap(), RemoteConfig::default()).unwrap_err();
    assert!(matches!(e, AllocError::BackendUnavailable { .. }), "{e}");
    // The right one, given apart from the URL.
    let right = RedisConfig::single(srv.url_with(None)).auth(None, "s3cret-pw");
    let b = open(right, RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(10)).unwrap();
    b.write(&a, 0, &[4; 10]).unwrap();
    let mut got = [0u8; 10];
    b.read(&a, 0, &mut got).unwrap();
    assert_eq!(got, [4; 10]);
}

#[test]
fn bytes_altered_in_redis_are_an_integrity_error() {
    let Some(cfg) = remote_common::single("bytes_altered_in_redis") else {
        return;
    };
    let url = cfg.urls[0].clone();
    let b = open(cfg, RemoteConfig::default());
    let a = b.allocate(&AllocRequest::bytes(CHUNK + 100)).unwrap();
    b.write(&a, 0, &pattern(CHUNK + 100, 3)).unwrap();
    b.synchronize().unwrap();
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    alter(&mut c, &b.chunk_key(&a, 1).to_string(), 8 + 50);
    let mut buf = vec![0u8; 10];
    b.read(&a, 0, &mut buf).unwrap(); // chunk 0 untouched
    let e = b.read(&a, CHUNK + 40, &mut buf).unwrap_err();
    assert!(matches!(e, AllocError::Integrity { .. }), "{e}");
}

#[test]
fn tls_urls_are_unsupported() {
    let e = RedisStore::open(RedisConfig::single("rediss://127.0.0.1:1/")).unwrap_err();
    assert!(matches!(e, AllocError::Unsupported { .. }), "{e}");
}
