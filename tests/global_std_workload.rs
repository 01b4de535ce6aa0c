//! A heavy std workload under `TensorGlobalAlloc`: collections, strings,
//! sorting, hash maps, boxed trees, growth and shrinking through `realloc`.
//! Every result is checked against a value computed independently, so a
//! block handed out twice or a broken copy in `realloc` shows as a mismatch.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use tensorpool::TensorGlobalAlloc;

mod common;
use common::Rng;

#[global_allocator]
static A: TensorGlobalAlloc = TensorGlobalAlloc::new();

#[test]
fn sorting_and_dedup() {
    let mut r = Rng(7);
    let v: Vec<u64> = (0..1_000_000).map(|_| r.next() % 100_000).collect();
    let mut sorted = v.clone();
    sorted.sort_unstable();
    assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
    let mut counts = vec![0u32; 100_000];
    for &x in &v {
        counts[x as usize] += 1;
    }
    let mut dedup = sorted.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), counts.iter().filter(|&&c| c > 0).count());
    let mut stable: Vec<(u64, usize)> = v.iter().copied().zip(0..).collect();
    stable.sort_by_key(|&(x, _)| x);
    assert!(
        stable
            .windows(2)
            .all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1))
    );
}

#[test]
fn strings_and_hash_maps() {
    let mut words: HashMap<String, usize> = HashMap::new();
    let mut text = String::new();
    let mut r = Rng(11);
    for i in 0..200_000 {
        let w = format!("w{}", r.next() % 5_000);
        text.push_str(&w);
        text.push(' ');
        *words.entry(w).or_default() += 1;
        if i % 10_000 == 0 {
            text.shrink_to_fit();
        }
    }
    let total: usize = words.values().sum();
    assert_eq!(total, 200_000);
    let recount = text
        .split_whitespace()
        .fold(HashMap::<&str, usize>::new(), |mut m, w| {
            *m.entry(w).or_default() += 1;
            m
        });
    assert_eq!(recount.len(), words.len());
    for (w, n) in &recount {
        assert_eq!(words[*w], *n, "{w}");
    }
    let upper: Vec<String> = words.keys().map(|w| w.to_uppercase()).collect();
    let set: HashSet<&str> = upper.iter().map(String::as_str).collect();
    assert_eq!(set.len(), words.len());
}

#[test]
fn btree_heap_deque() {
    let mut r = Rng(3);
    let mut tree = BTreeMap::new();
    let mut heap = BinaryHeap::new();
    let mut dq = VecDeque::new();
    for i in 0..300_000u64 {
        let k = r.next() % 50_000;
        tree.insert(k, vec![i; (k % 17) as usize]);
        heap.push(k);
        dq.push_back(Box::new(i));
        if dq.len() > 1000 {
            let front = dq.pop_front().unwrap();
            assert_eq!(*front + 1000, i);
        }
        if i % 3 == 0 {
            tree.remove(&(r.next() % 50_000));
        }
    }
    for (k, v) in &tree {
        assert_eq!(v.len(), (*k % 17) as usize);
    }
    let mut last = u64::MAX;
    while let Some(x) = heap.pop() {
        assert!(x <= last);
        last = x;
    }
}

#[test]
fn growth_through_every_size_class_and_huge() {
    // A Vec grown one element at a time walks every class up to 64 MiB and
    // into huge blocks, through `realloc` (in place within a class).
    let mut v: Vec<u32> = Vec::new();
    for i in 0..(20 << 20) {
        v.push(i);
    }
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    v.truncate(1000);
    v.shrink_to_fit();
    assert_eq!(v.capacity(), 1000);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    let zeros = vec![0u64; 10 << 20];
    assert!(zeros.iter().all(|&x| x == 0));
}

#[test]
fn boxed_trees() {
    enum Tree {
        Leaf(u64),
        Node(Box<Tree>, Box<Tree>),
    }
    fn build(d: u32, x: u64) -> Tree {
        if d == 0 {
            Tree::Leaf(x)
        } else {
            Tree::Node(
                Box::new(build(d - 1, 2 * x)),
                Box::new(build(d - 1, 2 * x + 1)),
            )
        }
    }
    fn sum(t: &Tree) -> u64 {
        match t {
            Tree::Leaf(x) => *x,
            Tree::Node(a, b) => sum(a) + sum(b),
        }
    }
    for _ in 0..5 {
        let t = build(18, 0);
        let n = 1u64 << 18;
        assert_eq!(sum(&t), n * (n - 1) / 2);
    }
}

#[test]
fn the_pool_served_it() {
    let v = vec![1u8; 1 << 20];
    assert!(A.owns(v.as_ptr()));
    assert!(A.usable_size(v.as_ptr()).unwrap() >= 1 << 20);
    let s = A.stats();
    assert!(s.reserved_bytes >= 1 << 20 && s.segments > 0);
}
