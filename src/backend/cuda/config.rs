//! [`CudaConfig`]: the knobs of `PYTORCH_CUDA_ALLOC_CONF` the pool honours,
//! as a plain struct with `Default` and [`CudaConfig::validate`].

use super::block::LARGE_BUFFER;

/// Pool configuration. `Default` is PyTorch's default.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaConfig {
    /// Blocks of this size or more are never split (`max_split_size_mb`);
    /// `usize::MAX` (the default) turns the rule off. Must exceed 20 MiB.
    pub max_split_size: usize,
    /// Round sizes up to one of this many steps between powers of two
    /// (`roundup_power2_divisions`); 0 or 1 is off; else a power of two.
    pub roundup_power2_divisions: usize,
    /// Reclaim old cached blocks when reserved memory passes this fraction of
    /// the limit (`garbage_collection_threshold`); 0 is off; else in (0, 1).
    /// Active only with a memory fraction or byte limit, as in PyTorch.
    pub garbage_collection_threshold: f64,
    /// Cap reserved memory at this fraction of the device's total
    /// (`set_per_process_memory_fraction`), in [0, 1].
    pub memory_fraction: Option<f64>,
    /// Cap reserved memory at this many bytes (the smaller cap wins).
    pub byte_limit: Option<usize>,
    /// Entries kept in the history ring (0 keeps none).
    pub history_capacity: usize,
    /// RMM-style reuse across streams (off by default, PyTorch's behaviour):
    /// when a request finds no free block on its own stream, it takes the
    /// best-fitting unsplit cached segment of another stream before asking
    /// the driver for memory, ordering it on the GPU — an event recorded on
    /// the old stream, `stream_wait_event` on the new one, no host wait.
    pub reuse_other_streams: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            max_split_size: usize::MAX,
            roundup_power2_divisions: 0,
            garbage_collection_threshold: 0.0,
            memory_fraction: None,
            byte_limit: None,
            history_capacity: 0,
            reuse_other_streams: false,
        }
    }
}

/// A configuration value outside its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid CUDA pool configuration: {field} = {value}: {rule}")]
pub struct CudaConfigError {
    /// The field.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What it must satisfy.
    pub rule: &'static str,
}

impl CudaConfig {
    /// Checks every field against PyTorch's rules.
    pub fn validate(&self) -> Result<(), CudaConfigError> {
        if self.max_split_size != usize::MAX && self.max_split_size <= LARGE_BUFFER {
            return Err(CudaConfigError {
                field: "max_split_size",
                value: self.max_split_size.to_string(),
                rule: "must be above 20 MiB (or usize::MAX for off)",
            });
        }
        let d = self.roundup_power2_divisions;
        if d > 1 && !d.is_power_of_two() {
            return Err(CudaConfigError {
                field: "roundup_power2_divisions",
                value: d.to_string(),
                rule: "must be 0, 1 or a power of two",
            });
        }
        let g = self.garbage_collection_threshold;
        if !(g == 0.0 || (g > 0.0 && g < 1.0)) {
            return Err(CudaConfigError {
                field: "garbage_collection_threshold",
                value: g.to_string(),
                rule: "must be 0 (off) or in (0, 1)",
            });
        }
        if let Some(f) = self.memory_fraction
            && !(0.0..=1.0).contains(&f)
        {
            return Err(CudaConfigError {
                field: "memory_fraction",
                value: f.to_string(),
                rule: "must be in [0, 1]",
            });
        }
        Ok(())
    }

    /// The byte cap on reserved memory for a device of `total` bytes.
    pub fn allowed_maximum(&self, total: usize) -> Option<usize> {
        let frac = self.memory_fraction.map(|f| (f * total as f64) as usize);
        match (frac, self.byte_limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
