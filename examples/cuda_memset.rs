//! Pool memory used by cudarc: allocate a block from the caching pool, fill
//! it from the host, zero it on the GPU with cudarc's `memset_zeros` through
//! a `PoolView`, read it back.
//!
//! `cargo run --example cuda_memset --features cuda`. Without a CUDA driver
//! it prints the `BackendUnavailable` error and exits with status 1.

use std::process::ExitCode;
use tensorpool::backend::cuda::{CudaBackend, CudaDriver};
use tensorpool::{AllocRequest, TensorAllocator};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cuda_memset: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let backend = CudaBackend::new(0)?;
    let info = backend.driver().info().clone();
    let stream = backend.driver().context().default_stream();
    const N: usize = 1 << 20;
    let a = backend.allocate(&AllocRequest::bytes(N))?;
    backend.write(&a, 0, &vec![0xAB; N])?;
    {
        let mut view = backend.view::<u8>(&a, &stream)?;
        stream.memset_zeros(&mut view)?;
    }
    stream.synchronize()?;
    let mut back = vec![1u8; N];
    backend.read(&a, 0, &mut back)?;
    let zero = back.iter().all(|&x| x == 0);
    println!(
        "memset {N} B of pool memory at {:#x} on {} ({} B total): {}",
        backend.device_ptr(&a)?.unwrap_or(0),
        info.name,
        info.total_memory,
        if zero { "all zero" } else { "NOT ZERO" }
    );
    // SAFETY: the stream was synchronized; nothing uses the block now.
    unsafe { backend.deallocate(&a)? };
    if zero {
        Ok(())
    } else {
        Err("memset did not zero the block".into())
    }
}
