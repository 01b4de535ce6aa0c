//! The conformance kit on the remote backend: in-process store always,
//! Redis and Redis Cluster when ci/redis.sh (or the developer) names them.
#![cfg(feature = "remote")]

mod remote_common;

use tensorpool::backend::remote::{RedisStore, RemoteBackend, RemoteConfig};
use tensorpool::testkit::{Caps, check};

/// What the remote backend claims: any power-of-two alignment up to 1 GiB
/// (refused above, larger than the kit tries), bytes, and nothing reserved
/// once everything is freed and synchronized.
fn caps(max_size: usize) -> Caps {
    Caps {
        max_align: 1 << 16,
        refuses_above_max_align: false,
        max_size,
        random_ops: 2_000,
        ops_per_thread: 500,
        ..Caps::host()
    }
}

#[test]
fn conformance_memory_store() {
    let b = RemoteBackend::in_memory().unwrap();
    check(&b, caps(64 << 20));
    tensorpool::TensorAllocator::synchronize(&b).unwrap();
    assert!(remote_common::eventually(|| b.store().is_empty()));
}

#[test]
fn conformance_redis_single() {
    let Some(cfg) = remote_common::single("conformance_redis_single") else {
        return;
    };
    let b = RemoteBackend::new(RedisStore::open(cfg).unwrap(), RemoteConfig::default()).unwrap();
    check(&b, caps(16 << 20));
}

#[test]
fn conformance_redis_cluster() {
    let Some(cfg) = remote_common::cluster("conformance_redis_cluster") else {
        return;
    };
    let b = RemoteBackend::new(RedisStore::open(cfg).unwrap(), RemoteConfig::default()).unwrap();
    check(&b, caps(16 << 20));
}
