//! [`CudarcDriver`]: the real CUDA driver through cudarc 0.19, loaded at
//! run time, and [`PoolView`], a pool block as cudarc device memory.
//!
//! cudarc panics when libcuda cannot be loaded (its `culib()` calls
//! `panic_no_lib_found`), so [`libcuda_present`] probes for the library
//! first with `libloading`, trying `libcuda.so.1` and then every name
//! cudarc itself would try; only when one loads is cudarc touched, and that
//! call is still wrapped in `catch_unwind`. Without a driver,
//! [`CudarcDriver::new`] (and so `CudaBackend::new`) returns
//! `AllocError::BackendUnavailable`.
//!
//! Stream handles are `CUstream` pointers as `u64` (0 is the legacy default
//! stream); event handles are `CUevent` pointers as `u64`.

use super::backend::CudaBackend;
use super::config::CudaConfig;
use super::driver::{CudaDriver, DevPtr, DeviceInfo, DriverError, EventId, StreamId};
use crate::allocator::Allocation;
use crate::error::AllocError;
use cudarc::driver::result as cr;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::marker::PhantomData;
use std::sync::Arc;

/// Whether the CUDA driver library can be loaded here: `Ok` with the name
/// that loaded, or `Err` saying why `libcuda.so.1` did not load.
pub fn libcuda_present() -> Result<String, String> {
    let mut names = vec!["libcuda.so.1".to_string()];
    names.extend(cudarc::get_lib_name_candidates("cuda"));
    let mut first = None;
    let tried = names.len();
    for n in names {
        // SAFETY: loading the NVIDIA driver library runs only its own
        // initialisers, which are made to be dlopen'ed (cudarc loads it the
        // same way); the handle is dropped at once, nothing from it is used.
        match unsafe { libloading::Library::new(&n) } {
            Ok(_) => return Ok(n),
            Err(e) => {
                first.get_or_insert(format!("{n}: {e}"));
            }
        }
    }
    Err(format!(
        "{} (and the {} other names cudarc tries)",
        first.unwrap_or_default(),
        tried - 1
    ))
}

/// The real driver for one device. See the module docs.
#[derive(Debug)]
pub struct CudarcDriver {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
}

fn unavailable(reason: String) -> AllocError {
    AllocError::BackendUnavailable {
        backend: "cuda",
        reason,
    }
}

fn conv(op: &'static str, e: cr::DriverError) -> DriverError {
    match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => DriverError::OutOfMemory { requested: 0 },
        sys::CUresult::CUDA_ERROR_NOT_READY => DriverError::NotReady,
        code => DriverError::Driver {
            op,
            code: code as i32,
            name: e
                .error_name()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("{code:?}")),
        },
    }
}

impl CudarcDriver {
    /// Opens device `ordinal` (its primary context). No driver library, no
    /// device, or a driver error: `BackendUnavailable` naming why.
    pub fn new(ordinal: u32) -> Result<Self, AllocError> {
        libcuda_present().map_err(|why| unavailable(format!("no CUDA driver library: {why}")))?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal as usize))
            .map_err(|_| unavailable("cudarc panicked while loading the CUDA driver".into()))?
            .map_err(|e| {
                unavailable(format!(
                    "cannot open CUDA device {ordinal}: {}",
                    conv("cuDevicePrimaryCtxRetain", e)
                ))
            })?;
        let attr = |a| ctx.attribute(a).unwrap_or(0);
        let mut version = 0;
        // SAFETY: a valid out-pointer to an i32.
        let _ = unsafe { sys::cuDriverGetVersion(&mut version) };
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            total_memory: ctx.total_mem().map_err(|e| {
                unavailable(format!("cuDeviceTotalMem: {}", conv("cuDeviceTotalMem", e)))
            })?,
            memory_pools: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
                != 0,
            virtual_memory: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            ) != 0,
            driver_version: version,
        };
        Ok(CudarcDriver { ctx, info })
    }

    /// The cudarc context (for streams, kernels, cuBLAS).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn bind(&self) -> Result<(), DriverError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| conv("cuCtxSetCurrent", e))
    }
}

fn stream(s: StreamId) -> sys::CUstream {
    s as usize as sys::CUstream
}
fn event(e: EventId) -> sys::CUevent {
    e.0 as usize as sys::CUevent
}

// SAFETY: segments come from `cuMemAlloc`, which returns disjoint ranges
// aligned to at least 256 bytes — in practice 512 or more: CUDA allocates in
// 2 MiB granules for these sizes and the pool only asks for multiples of
// 2 MiB; copies and memsets pass the caller's range through unchanged.
unsafe impl CudaDriver for CudarcDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn mem_get_info(&self) -> Result<(usize, usize), DriverError> {
        self.bind()?;
        cr::mem_get_info().map_err(|e| conv("cuMemGetInfo", e))
    }
    fn malloc(&self, size: usize) -> Result<DevPtr, DriverError> {
        self.bind()?;
        // SAFETY: a plain allocation; the pointer is owned by the pool.
        unsafe { cr::malloc_sync(size) }.map_err(|e| match conv("cuMemAlloc", e) {
            DriverError::OutOfMemory { .. } => DriverError::OutOfMemory { requested: size },
            e => e,
        })
    }
    unsafe fn free(&self, ptr: DevPtr) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: the caller passes a live segment no queued work uses.
        unsafe { cr::free_sync(ptr) }.map_err(|e| conv("cuMemFree", e))
    }
    fn event_create(&self) -> Result<EventId, DriverError> {
        self.bind()?;
        cr::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(|e| EventId(e as usize as u64))
            .map_err(|e| conv("cuEventCreate", e))
    }
    fn event_destroy(&self, e: EventId) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: `e` came from `event_create` and the pool destroys it once.
        unsafe { cr::event::destroy(event(e)) }.map_err(|e| conv("cuEventDestroy", e))
    }
    fn event_record(&self, e: EventId, s: StreamId) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: a live event; the stream handle is the caller's.
        unsafe { cr::event::record(event(e), stream(s)) }.map_err(|e| conv("cuEventRecord", e))
    }
    fn event_query(&self, e: EventId) -> Result<bool, DriverError> {
        self.bind()?;
        // SAFETY: a live event.
        match unsafe { cr::event::query(event(e)) } {
            Ok(()) => Ok(true),
            Err(err) if err.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(err) => Err(conv("cuEventQuery", err)),
        }
    }
    fn event_synchronize(&self, e: EventId) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: a live event.
        unsafe { cr::event::synchronize(event(e)) }.map_err(|e| conv("cuEventSynchronize", e))
    }
    fn stream_wait_event(&self, s: StreamId, e: EventId) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: a live event; the stream handle is the caller's.
        unsafe {
            cr::stream::wait_event(
                stream(s),
                event(e),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| conv("cuStreamWaitEvent", e))
    }
    fn stream_synchronize(&self, s: StreamId) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: the stream handle is the caller's.
        unsafe { cr::stream::synchronize(stream(s)) }.map_err(|e| conv("cuStreamSynchronize", e))
    }
    fn device_synchronize(&self) -> Result<(), DriverError> {
        self.bind()?;
        cr::ctx::synchronize().map_err(|e| conv("cuCtxSynchronize", e))
    }
    unsafe fn copy_htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: the caller guarantees the device range is live.
        unsafe { cr::memcpy_htod_sync(dst, src) }.map_err(|e| conv("cuMemcpyHtoD", e))
    }
    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: the caller guarantees the device range is live.
        unsafe { cr::memcpy_dtoh_sync(dst, src) }.map_err(|e| conv("cuMemcpyDtoH", e))
    }
    unsafe fn memset(&self, dst: DevPtr, value: u8, len: usize) -> Result<(), DriverError> {
        self.bind()?;
        // SAFETY: the caller guarantees the device range is live.
        unsafe { cr::memset_d8_sync(dst, value, len) }.map_err(|e| conv("cuMemsetD8", e))
    }
}

impl CudaBackend<CudarcDriver> {
    /// The caching pool on CUDA device `ordinal` with PyTorch's defaults.
    /// Without a CUDA driver or device: `BackendUnavailable`, never a panic.
    pub fn new(ordinal: u32) -> Result<Self, AllocError> {
        Self::open(ordinal, CudaConfig::default())
    }

    /// As [`new`](Self::new), with `cfg`.
    pub fn open(ordinal: u32, cfg: CudaConfig) -> Result<Self, AllocError> {
        let d = CudarcDriver::new(ordinal)?;
        CudaBackend::with_driver(d, cfg).map_err(|e| AllocError::Backend {
            backend: "cuda",
            op: "configure",
            message: e.to_string(),
        })
    }

    /// A view of `a` as `len = size / size_of::<T>()` elements of cudarc
    /// device memory on `stream`, for kernels, memsets and cuBLAS.
    ///
    /// The view does no stream synchronization of its own (its
    /// `SyncOnDrop` is a no-op): order work across streams yourself, or
    /// call [`record_stream`](CudaBackend::record_stream) before freeing `a`.
    /// Freeing `a` while a view is in use breaks `deallocate`'s contract.
    pub fn view<T>(
        &self,
        a: &Allocation,
        stream: &Arc<CudaStream>,
    ) -> Result<PoolView<'_, T>, AllocError> {
        let ptr = self.device_ptr(a)?.unwrap_or(0);
        Ok(PoolView {
            ptr,
            len: a.size() / size_of::<T>().max(1),
            stream: stream.clone(),
            _pool: PhantomData,
        })
    }
}

/// A pool block seen as cudarc device memory of `T`. Implements cudarc's
/// [`DevicePtr`] and [`DevicePtrMut`], so `stream.memset_zeros(&mut view)`,
/// `memcpy_htod`, kernel launches and cuBLAS take it.
#[derive(Debug)]
pub struct PoolView<'a, T> {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
    _pool: PhantomData<(&'a (), *const T)>,
}

impl<T> PoolView<'_, T> {
    /// The raw device address.
    pub fn raw(&self) -> u64 {
        self.ptr
    }
}

impl<T> DeviceSlice<T> for PoolView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for PoolView<'_, T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for PoolView<'_, T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}
