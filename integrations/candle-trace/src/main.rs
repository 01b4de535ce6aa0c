//! A candle 0.11 CPU workload on tensorpool's global allocator, run with
//! `TENSORPOOL_TRACE=path` to record every allocation and free (see README).
//!
//! 1. One training step of a small MLP (64 → 128 → 10, batch 32): forward,
//!    cross-entropy loss, backward, SGD update.
//! 2. The forward pass of one pre-norm transformer block (d_model 64, 4 heads,
//!    sequence 32, batch 2): layer norm, QKV projections, scaled dot-product
//!    attention with softmax, output projection, residual, layer norm, GELU MLP.
//!
//! The values are random; the shapes, and so the sequence of allocation
//! sizes, are the same on every run.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};

#[global_allocator]
static A: tensorpool::TensorGlobalAlloc = tensorpool::TensorGlobalAlloc::new();

fn mlp_training_step(dev: &Device) -> Result<f32> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let l1 = candle_nn::linear(64, 128, vb.pp("l1"))?;
    let l2 = candle_nn::linear(128, 10, vb.pp("l2"))?;
    let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.05)?;
    let x = Tensor::randn(0f32, 1.0, (32, 64), dev)?;
    let labels: Vec<u32> = (0..32u32).map(|i| (i * 7) % 10).collect();
    let y = Tensor::new(labels.as_slice(), dev)?;
    let logits = l2.forward(&l1.forward(&x)?.relu()?)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
    opt.backward_step(&loss)?;
    loss.to_scalar::<f32>()
}

fn transformer_block_forward(dev: &Device) -> Result<f32> {
    let (batch, seq, d_model, heads) = (2usize, 32usize, 64usize, 4usize);
    let head_dim = d_model / heads;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let ln1 = candle_nn::layer_norm(d_model, 1e-5, vb.pp("ln1"))?;
    let ln2 = candle_nn::layer_norm(d_model, 1e-5, vb.pp("ln2"))?;
    let q = candle_nn::linear(d_model, d_model, vb.pp("q"))?;
    let k = candle_nn::linear(d_model, d_model, vb.pp("k"))?;
    let v = candle_nn::linear(d_model, d_model, vb.pp("v"))?;
    let o = candle_nn::linear(d_model, d_model, vb.pp("o"))?;
    let up = candle_nn::linear(d_model, 4 * d_model, vb.pp("up"))?;
    let down = candle_nn::linear(4 * d_model, d_model, vb.pp("down"))?;

    let x = Tensor::randn(0f32, 1.0, (batch, seq, d_model), dev)?;
    let h = ln1.forward(&x)?;
    let split = |t: Tensor| -> Result<Tensor> {
        t.reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qh, kh, vh) = (
        split(q.forward(&h)?)?,
        split(k.forward(&h)?)?,
        split(v.forward(&h)?)?,
    );
    let scores = (qh.matmul(&kh.t()?.contiguous()?)? / (head_dim as f64).sqrt())?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let ctx = probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, seq, d_model))?;
    let x = (x + o.forward(&ctx)?)?;
    let h = ln2.forward(&x)?;
    let x = (&x + down.forward(&up.forward(&h)?.gelu()?)?)?;
    x.sqr()?.mean_all()?.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let loss = mlp_training_step(&dev)?;
    let y = transformer_block_forward(&dev)?;
    let s = A.stats();
    eprintln!(
        "mlp loss {loss:.4}, block output mean square {:.4}, pool reserved {} B",
        y, s.reserved_bytes
    );
    Ok(())
}
