//! The conformance kit (`tensorpool::testkit::check`) on the backends of
//! this crate: host, meta, and `Limited` around each (with a limit that
//! never binds, near `usize::MAX`, so its checked arithmetic runs). The
//! kit's `forged` check (other alignment, address shifted by 64 B, other
//! device, other size, other id: errors, stats unchanged) is issue 7's
//! item 1 for every backend.

use tensorpool::Limited;
use tensorpool::backend::{HostBackend, MetaBackend};
use tensorpool::testkit::{Caps, check};

#[test]
fn host_backend_passes_the_kit() {
    check(&HostBackend::new(), Caps::host());
}

#[test]
fn meta_backend_passes_the_kit() {
    check(&MetaBackend::new(), Caps::meta());
}

#[test]
fn limited_backends_pass_the_kit() {
    // Fewer random and threaded ops than the full kit: the backends
    // underneath ran it above.
    let quick = |c: Caps| Caps {
        random_ops: 2_000,
        ops_per_thread: 500,
        ..c
    };
    check(
        &Limited::new(HostBackend::new(), usize::MAX),
        quick(Caps::host()),
    );
    check(
        &Limited::new(MetaBackend::new(), usize::MAX - 1),
        quick(Caps::meta()),
    );
}
