//! Properties of the metadata table (`tensorpool::meta`):
//!
//! 1. Every batch backend this build and CPU can run (scalar, AVX2, NEON)
//!    returns exactly the scalar reference's `lru`, `touched_before`,
//!    `usage_by_category_scan`, `usage_by_device_scan` and `decay` results,
//!    on random tables: empty, one entry, lengths that are not a multiple
//!    of the vector width, pinned and dead entries, tables spanning two
//!    chunks.
//! 2. The scalar reference, and the usage counters (`usage_by_category`,
//!    `usage_by_device`), agree with a plain model of the same table.
//! 3. A weighted sequence of insert / remove / get / touch / decay /
//!    stale-key operations agrees with a `HashMap` oracle: stale keys are
//!    errors and change nothing; touch counts every duplicate; freed slots
//!    are reused (the high-water mark never exceeds the peak live count);
//!    after every operation the usage counters equal the oracle's totals
//!    per category and per device, also with more devices live than the
//!    counters have device entries (about a third of the cases).
//!
//! Case counts default to 64 per property (`PROPTEST_CASES` overrides).

use proptest::prelude::*;
use std::collections::HashMap;
use tensorpool::host::size_class::Category;
use tensorpool::meta::{BatchBackend, IdIssuer, MetaTable, NewTensor, TensorKey, TensorMeta};
use tensorpool::stats::CategoryUsage;
use tensorpool::{Device, TensorFlags};

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c
}

#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    device: Device,
    flags: u8,
    touches: usize,
    at: u64,
    dead: bool,
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..=4096,
        prop::sample::select(vec![
            4096u64,
            4097,
            65536,
            65537,
            1 << 20,
            (1 << 20) + 1,
            16 << 20,
            (16 << 20) + 1
        ]),
        4097u64..=(16 << 20),
        (16u64 << 20)..=(1 << 40),
    ]
}

fn device() -> impl Strategy<Value = Device> {
    prop::sample::select(vec![
        Device::Host,
        Device::Cuda(0),
        Device::Cuda(3),
        Device::Meta,
        Device::Remote(1),
    ])
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        size(),
        device(),
        0u8..8,
        prop_oneof![3 => 0usize..4, 1 => 0usize..300],
        0u64..50,
        prop::bool::weighted(0.25),
    )
        .prop_map(|(size, device, flags, touches, at, dead)| Entry {
            size,
            device,
            flags,
            touches,
            at,
            dead,
        })
}

fn entries() -> impl Strategy<Value = Vec<Entry>> {
    prop_oneof![
        4 => prop::collection::vec(entry(), 0..40),
        2 => prop::collection::vec(entry(), 40..300),
        1 => prop::collection::vec(entry(), 4090..4110),
    ]
}

fn new_tensor(size: u64, device: Device, flags: u8) -> NewTensor {
    NewTensor {
        size,
        align: 64,
        device,
        shape: None,
        dtype: None,
        flags: TensorFlags(flags),
        ..NewTensor::bytes(size, device)
    }
}

/// Builds the table: insert all, touch each `touches` times at `at`, remove the dead.
fn build(es: &[Entry], backend: BatchBackend) -> (MetaTable, Vec<TensorKey>) {
    let t = MetaTable::new();
    t.set_backend(backend).unwrap();
    let ids = IdIssuer::new();
    let keys: Vec<TensorKey> = es
        .iter()
        .map(|e| {
            t.insert(ids.issue().unwrap(), &new_tensor(e.size, e.device, e.flags))
                .unwrap()
        })
        .collect();
    for (k, e) in keys.iter().zip(es) {
        if e.touches > 0 {
            t.touch(&vec![*k; e.touches], e.at);
        }
    }
    for (k, e) in keys.iter().zip(es) {
        if e.dead {
            t.remove(*k).unwrap();
        }
    }
    (t, keys)
}

/// The detected backend is the SIMD one where there is one, so the tests
/// below (which run every supported backend) really ran NEON on aarch64.
#[test]
fn detection_picks_simd_where_available() {
    let d = BatchBackend::detected();
    assert!(d.is_supported());
    if std::env::var_os("TENSORPOOL_SIMD").is_some_and(|v| v == "scalar") {
        assert_eq!(d, BatchBackend::Scalar);
    } else if cfg!(all(target_arch = "aarch64", not(miri))) {
        assert_eq!(d, BatchBackend::Neon);
    } else if BatchBackend::Avx2.is_supported() {
        assert_eq!(d, BatchBackend::Avx2);
    }
    assert_eq!(MetaTable::new().backend(), d);
    assert!(MetaTable::new().set_backend(BatchBackend::Scalar).is_ok());
    let other = if cfg!(target_arch = "aarch64") {
        BatchBackend::Avx2
    } else {
        BatchBackend::Neon
    };
    assert!(MetaTable::new().set_backend(other).is_err());
}

fn supported() -> Vec<BatchBackend> {
    BatchBackend::ALL
        .into_iter()
        .filter(|b| b.is_supported())
        .collect()
}

struct Scans {
    lru: Vec<TensorKey>,
    before: Vec<TensorKey>,
    by_cat: [CategoryUsage; Category::COUNT],
    by_dev: Vec<(Device, CategoryUsage)>,
}

fn scans(t: &MetaTable, k: usize, before: u64) -> Scans {
    let (mut lru, mut tb) = (Vec::new(), Vec::new());
    t.lru(k, &mut lru);
    t.touched_before(before, &mut tb);
    Scans {
        lru,
        before: tb,
        by_cat: t.usage_by_category_scan(),
        by_dev: t.usage_by_device_scan(),
    }
}

fn counts(t: &MetaTable, keys: &[TensorKey]) -> Vec<Option<u64>> {
    keys.iter()
        .map(|&k| t.get(k).map(|m| m.access_count()))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_backend_equals_scalar_and_scalar_equals_model(es in entries(), k in 0usize..40, before in 0u64..60, shift in 0u32..70) {
        let (t, keys) = build(&es, BatchBackend::Scalar);
        let reference = scans(&t, k, before);

        // The model: live entries, in slot order (slots are handed out in order here).
        let live: Vec<(TensorKey, &Entry)> = keys.iter().copied().zip(&es).filter(|(_, e)| !e.dead).collect();
        let last = |e: &Entry| if e.touches > 0 { e.at } else { 0 };
        let mut lru_model: Vec<(u64, u32, TensorKey)> =
            live.iter().filter(|(_, e)| e.flags & TensorFlags::PINNED == 0).map(|(key, e)| (last(e), key.slot, *key)).collect();
        lru_model.sort_unstable_by_key(|x| (x.0, x.1));
        let lru_model: Vec<TensorKey> = lru_model.into_iter().take(k).map(|x| x.2).collect();
        prop_assert_eq!(&reference.lru, &lru_model);
        let before_model: Vec<TensorKey> = live.iter().filter(|(_, e)| last(e) < before).map(|x| x.0).collect();
        prop_assert_eq!(&reference.before, &before_model);
        let mut cat_model = [CategoryUsage::default(); Category::COUNT];
        let mut dev_model: std::collections::BTreeMap<u16, CategoryUsage> = Default::default();
        for (_, e) in &live {
            let c = &mut cat_model[Category::of_size(e.size as usize).index()];
            c.count += 1;
            c.bytes += e.size;
            let d = dev_model.entry(e.device.code()).or_default();
            d.count += 1;
            d.bytes += e.size;
        }
        prop_assert_eq!(reference.by_cat, cat_model);
        prop_assert_eq!(t.usage_by_category(), cat_model, "counters");
        let dev_model: Vec<(Device, CategoryUsage)> = dev_model.into_iter().map(|(c, u)| (Device::from_code(c), u)).collect();
        prop_assert_eq!(&reference.by_dev, &dev_model);
        prop_assert_eq!(&t.usage_by_device(), &dev_model, "counters");

        for b in supported() {
            t.set_backend(b).unwrap();
            let got = scans(&t, k, before);
            prop_assert_eq!(&got.lru, &reference.lru, "lru on {:?}", b);
            prop_assert_eq!(&got.before, &reference.before, "touched_before on {:?}", b);
            prop_assert_eq!(got.by_cat, reference.by_cat, "usage_by_category_scan on {:?}", b);
            prop_assert_eq!(&got.by_dev, &reference.by_dev, "usage_by_device_scan on {:?}", b);
        }

        // Decay mutates: one fresh, identical table per backend.
        let decayed: Vec<Option<u64>> = {
            let (t, keys) = build(&es, BatchBackend::Scalar);
            t.decay(shift);
            counts(&t, &keys)
        };
        let model: Vec<Option<u64>> =
            es.iter().map(|e| (!e.dead).then(|| (e.touches as u64).checked_shr(shift).unwrap_or(0))).collect();
        prop_assert_eq!(&decayed, &model);
        for b in supported() {
            let (t, keys) = build(&es, b);
            t.decay(shift);
            prop_assert_eq!(&counts(&t, &keys), &decayed, "decay({}) on {:?}", shift, b);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        size: u64,
        device: Device,
        flags: u8,
    },
    Remove(usize),
    Get(usize),
    Touch(Vec<usize>, u64),
    Decay(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (size(), many_devices(), 0u8..8).prop_map(|(size, device, flags)| Op::Insert { size, device, flags }),
        2 => any::<usize>().prop_map(Op::Remove),
        2 => any::<usize>().prop_map(Op::Get),
        3 => (prop::collection::vec(any::<usize>(), 0..150), 0u64..1000).prop_map(|(v, now)| Op::Touch(v, now)),
        1 => (0u32..4).prop_map(Op::Decay),
    ]
}

/// The usual devices, and often one of 24 more: some runs have more
/// devices live than the counters' `DEVICE_SLOTS` entries.
fn many_devices() -> impl Strategy<Value = Device> {
    prop_oneof![
        1 => device(),
        1 => (0u32..24).prop_map(Device::Remote),
    ]
}

/// The oracle's live count and bytes per category and per device (sorted by code).
fn oracle_usage(
    oracle: &HashMap<TensorKey, Model>,
) -> (
    [CategoryUsage; Category::COUNT],
    Vec<(Device, CategoryUsage)>,
) {
    let mut cat = [CategoryUsage::default(); Category::COUNT];
    let mut dev: std::collections::BTreeMap<u16, CategoryUsage> = Default::default();
    for o in oracle.values() {
        for u in [
            &mut cat[Category::of_size(o.size as usize).index()],
            dev.entry(o.device.code()).or_default(),
        ] {
            u.count += 1;
            u.bytes += o.size;
        }
    }
    let dev = dev
        .into_iter()
        .map(|(c, u)| (Device::from_code(c), u))
        .collect();
    (cat, dev)
}

#[derive(Debug, Clone, Copy)]
struct Model {
    size: u64,
    device: Device,
    flags: u8,
    count: u64,
    last: u64,
}

fn same(m: &TensorMeta, key: TensorKey, o: &Model) -> bool {
    m.id() == key.id
        && m.size() == o.size
        && m.device() == o.device
        && m.flags() == TensorFlags(o.flags)
        && m.access_count() == o.count
        && m.last_access() == o.last
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn table_matches_hashmap_oracle(ops in prop::collection::vec(op(), 1..200)) {
        let t = MetaTable::new();
        let ids = IdIssuer::new();
        let mut oracle: HashMap<TensorKey, Model> = HashMap::new();
        let mut issued: Vec<TensorKey> = Vec::new();
        let mut peak = 0usize;
        for op in ops {
            let op_name = format!("{op:?}");
            match op {
                Op::Insert { size, device, flags } => {
                    let key = t.insert(ids.issue().unwrap(), &new_tensor(size, device, flags)).unwrap();
                    prop_assert!(!oracle.contains_key(&key));
                    oracle.insert(key, Model { size, device, flags, count: 0, last: 0 });
                    issued.push(key);
                }
                Op::Remove(i) if !issued.is_empty() => {
                    let key = issued[i % issued.len()];
                    match (t.remove(key), oracle.remove(&key)) {
                        (Some(m), Some(o)) => prop_assert!(same(&m, key, &o), "{:?} vs {:?}", m, o),
                        (None, None) => {}
                        (got, want) => prop_assert!(false, "remove {:?}: table {:?}, oracle {:?}", key, got, want),
                    }
                }
                Op::Get(i) if !issued.is_empty() => {
                    let key = issued[i % issued.len()];
                    match (t.get(key), oracle.get(&key)) {
                        (Some(m), Some(o)) => prop_assert!(same(&m, key, o), "{:?} vs {:?}", m, o),
                        (None, None) => {}
                        (got, want) => prop_assert!(false, "get {:?}: table {:?}, oracle {:?}", key, got, want),
                    }
                }
                Op::Touch(v, now) if !issued.is_empty() => {
                    let keys: Vec<TensorKey> = v.iter().map(|i| issued[i % issued.len()]).collect();
                    t.touch(&keys, now);
                    for k in &keys {
                        if let Some(o) = oracle.get_mut(k) {
                            o.count += 1;
                            o.last = o.last.max(now);
                        }
                    }
                }
                Op::Decay(s) => {
                    t.decay(s);
                    for o in oracle.values_mut() {
                        o.count >>= s;
                    }
                }
                _ => {}
            }
            peak = peak.max(oracle.len());
            prop_assert_eq!(t.live(), oracle.len());
            let (cat, dev) = oracle_usage(&oracle);
            prop_assert_eq!(t.usage_by_category(), cat, "category counters after {}", op_name);
            prop_assert_eq!(t.usage_by_device(), dev, "device counters after {}", op_name);
            prop_assert!(t.high_water() <= peak, "freed slots are reused: hw {} > peak {}", t.high_water(), peak);
        }
        t.check_invariants();
        for (k, o) in &oracle {
            let m = t.get(*k).unwrap();
            prop_assert!(same(&m, *k, o));
        }
    }
}
