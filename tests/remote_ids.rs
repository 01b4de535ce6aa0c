//! Ids of the remote backend are the process-wide issuer's: sequential and
//! never reused. Its own test binary (one test), so no other test draws ids
//! in between and the sequence must be exact.
#![cfg(feature = "remote")]

use tensorpool::backend::remote::RemoteBackend;
use tensorpool::{AllocRequest, TensorAllocator};

#[test]
fn ids_are_sequential_and_never_reused() {
    let b = RemoteBackend::in_memory().unwrap();
    let mut ids = Vec::new();
    for i in 0..1_000 {
        let a = b.allocate(&AllocRequest::bytes(i)).unwrap();
        ids.push(a.id().get());
        if i % 2 == 0 {
            // SAFETY: allocated just above, freed once; a freed id is not reused.
            unsafe { b.deallocate(&a).unwrap() };
        }
    }
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive: {:?}",
        &ids[..5]
    );
    assert!(ids[0] >= 1, "0 is never an id");
}
