//! Where the tensors live. Stages are written once, generic over burn's `Backend`; this
//! module turns a stage's device (`cpu`, `cuda`, `cuda:N`, from `resources.device`) into a
//! concrete backend: burn's flex CPU backend, or burn's CUDA backend in builds with the
//! `cuda` feature. Before the first CUDA call it checks what that backend needs at run time
//! (the driver, NVRTC, the CUDA headers it compiles kernels against), because the libraries
//! underneath panic, or hang on a missing header, where a user deserves a sentence.

use burn::backend::Flex;
use burn::prelude::Backend;
use orchestrate_stage::StageError;

/// A device a stage was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    Cpu,
    /// An NVIDIA GPU by its CUDA ordinal.
    Cuda(usize),
}

impl Compute {
    /// `cpu`, `cuda` (GPU 0), `cuda:N`; `auto` has been resolved by the engine already,
    /// but is accepted for callers outside it (it means CUDA where this build and machine
    /// can use it).
    pub fn parse(device: &str) -> Result<Self, StageError> {
        match device {
            "cpu" | "" => Ok(Compute::Cpu),
            "cuda" => Ok(Compute::Cuda(0)),
            "auto" => Ok(if cfg!(feature = "cuda") && cuda_preflight(0).is_ok() {
                Compute::Cuda(0)
            } else {
                Compute::Cpu
            }),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Compute::Cuda)
                .ok_or_else(|| {
                    StageError::Failed(format!(
                        "unknown device `{other}`: expected cpu, cuda, cuda:N or auto"
                    ))
                }),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Compute::Cuda(_))
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compute::Cpu => f.write_str("cpu"),
            Compute::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Work written once for any backend; [`run_on`] picks the backend.
pub trait OnDevice {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// The CPU backend: burn's flex (pure Rust, threads through rayon, SIMD, AVX-512 matmul
/// kernels picked at run time), the fastest of burn 0.21's CPU backends that builds on a
/// plain Debian machine (see the README).
pub type Cpu = Flex;

/// Runs `job` on `compute`'s backend, after checking that the device can be used.
pub fn run_on<J: OnDevice>(compute: Compute, job: J) -> Result<J::Output, StageError> {
    match compute {
        Compute::Cpu => Ok(job.run::<Cpu>(Default::default())),
        Compute::Cuda(n) => {
            cuda_preflight(n).map_err(StageError::Failed)?;
            run_cuda(n, job)
        }
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<J: OnDevice>(n: usize, job: J) -> Result<J::Output, StageError> {
    kernel_cache_once();
    Ok(job.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(n)))
}

/// [`run_on`] for a GPU with burn-fusion off: every tensor operation its own kernel launch,
/// and none of burn-fusion's host work (recording each operation, searching the stream for
/// runs to fuse). A measurement for `train_bench --no-fusion`, which tells whether that
/// host work or the launches it saves weigh more in a step; training keeps burn's default.
pub fn run_on_unfused<J: OnDevice>(compute: Compute, job: J) -> Result<J::Output, StageError> {
    let Compute::Cuda(n) = compute else {
        return Err(StageError::Failed(
            "burn-fusion is a GPU backends' layer: the CPU has none to turn off".into(),
        ));
    };
    cuda_preflight(n).map_err(StageError::Failed)?;
    run_cuda_unfused(n, job)
}

/// Expands `$step!(B)` for each GPU backend of this build, in one list: CUDA and wgpu,
/// each with burn-fusion and without. The code that takes its own path on GPU backends
/// (`fused::gpu`, `end_to_end`) recognises them by type through it.
macro_rules! for_each_gpu_backend {
    ($step:ident) => {
        #[cfg(feature = "cuda")]
        {
            $step!(burn::backend::Cuda);
            $step!($crate::compute::UnfusedCuda);
        }
        #[cfg(feature = "wgpu")]
        {
            $step!(burn::backend::Wgpu);
            $step!(burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>);
        }
    };
}
pub(crate) use for_each_gpu_backend;

/// burn's CUDA backend without burn-fusion (burn re-exports the fused type alone).
#[cfg(feature = "cuda")]
pub(crate) type UnfusedCuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

#[cfg(feature = "cuda")]
fn run_cuda_unfused<J: OnDevice>(n: usize, job: J) -> Result<J::Output, StageError> {
    kernel_cache_once();
    Ok(job.run::<UnfusedCuda>(burn::backend::cuda::CudaDevice::new(n)))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_unfused<J: OnDevice>(_n: usize, _job: J) -> Result<J::Output, StageError> {
    unreachable!("cuda_preflight refuses every GPU in a build without the cuda feature")
}

/// Whether NCCL's library loads: burn 0.21 copies tensors between CUDA devices with it,
/// loading it at its first use and panicking where it is missing. Always false without the
/// cuda feature.
pub fn nccl_loads() -> bool {
    #[cfg(feature = "cuda")]
    {
        cudarc::get_lib_name_candidates("nccl").iter().any(|name| {
            // SAFETY: NVIDIA's own library; loading it runs only its initialisers.
            unsafe { libloading::Library::new(name) }.is_ok()
        })
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Where compiled GPU kernels (PTX) and autotune results are kept between runs:
/// `ORCHESTRATE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/orchestrate/kernels`, else
/// `~/.cache/orchestrate/kernels`. `off` keeps them in memory only.
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os("ORCHESTRATE_KERNEL_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(v.into()),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
            .map(|c| c.join("orchestrate").join("kernels")),
    }
}

/// [`persistent_kernel_cache`], once per process (CubeCL's configuration is set once).
#[cfg(feature = "cuda")]
fn kernel_cache_once() {
    static CACHE: std::sync::Once = std::sync::Once::new();
    CACHE.call_once(persistent_kernel_cache);
}

/// CubeCL compiles every kernel with NVRTC and autotunes matmuls the first time it meets
/// them, which cost minutes per run; by default it keeps the compiled kernels in memory
/// only and the autotune results under a `target/` it looks for above the working
/// directory. Both go to [`kernel_cache_dir`] instead, so a second run starts warm. A
/// `cubecl.toml` or `burn.toml` in the working directory is the user's choice and wins.
#[cfg(feature = "cuda")]
fn persistent_kernel_cache() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    let own_config = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"]
        .iter()
        .any(|f| std::path::Path::new(f).exists());
    let Some(dir) = kernel_cache_dir() else {
        return;
    };
    if own_config || CubeClRuntimeConfig::storage().lock().is_some() {
        return;
    }
    if std::fs::create_dir_all(&dir).is_err() {
        return; // An unwritable cache directory costs speed, not correctness.
    }
    // CubeCL's own environment variables (CUBECL_DEBUG_LOG, CUBECL_DEBUG_OPTION=profile,
    // CUBECL_AUTOTUNE_LEVEL) apply only to the configuration it builds itself; a config set
    // here must take them explicitly, or profiling and autotune levels silently do nothing.
    let mut config = CubeClRuntimeConfig::default().override_from_env();
    config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    config.autotune.cache = CacheConfig::File(dir);
    CubeClRuntimeConfig::set(config);
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: OnDevice>(_n: usize, _job: J) -> Result<J::Output, StageError> {
    unreachable!("cuda_preflight refuses every GPU in a build without the cuda feature")
}

/// Why device `n` cannot run burn's CUDA backend, or `Ok`. Checks, in order: that this
/// build has the backend, the NVIDIA driver library, that GPU `n` exists, NVRTC (cubecl
/// compiles every kernel with it at run time) and the CUDA headers those kernels include
/// (`CUDA_PATH`, else /usr/local/cuda).
pub fn cuda_preflight(n: usize) -> Result<(), String> {
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "device cuda:{n} asked for, but this build has no CUDA backend: build with `cargo build --release --features cuda`, or set resources.device: cpu"
        ));
    }
    preflight_libraries(n)
}

/// The toolkit directory whose headers NVRTC compiles kernels against.
pub fn cuda_root() -> std::path::PathBuf {
    std::env::var_os("CUDA_PATH")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/local/cuda".into())
}

/// The headers cubecl's kernels include; missing ones fail at the first kernel compile.
fn check_headers() -> Result<(), String> {
    let from = if std::env::var_os("CUDA_PATH").is_some() {
        "CUDA_PATH"
    } else {
        "the default, CUDA_PATH being unset"
    };
    check_headers_in(&cuda_root(), from)
}

/// The headers NVRTC compiles against, under `root` (found by `from`, for the message).
fn check_headers_in(root: &std::path::Path, from: &str) -> Result<(), String> {
    let include = root.join("include");
    let missing: Vec<&str> = ["cuda.h", "cuda_fp16.h", "cuda_bf16.h"]
        .into_iter()
        .filter(|h| !include.join(h).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "CUDA headers missing: {} not in {} ({from}); install the CUDA toolkit headers (Debian: nvidia-cuda-toolkit, or NVIDIA's cuda-nvrtc-dev and cuda-cudart-dev) and set CUDA_PATH to the toolkit directory",
        missing.join(", "),
        include.display()
    ))
}

#[cfg(feature = "cuda")]
fn preflight_libraries(n: usize) -> Result<(), String> {
    // Loading a library we only probe is cheap, and keeps cudarc from panicking on it later.
    let load = |names: Vec<String>, what: &str, hint: &str| -> Result<(), String> {
        for name in &names {
            // SAFETY: these are NVIDIA's own libraries; loading one runs only its initialisers.
            if unsafe { libloading::Library::new(name) }.is_ok() {
                return Ok(());
            }
        }
        Err(format!(
            "{what} not found (tried {}); {hint}",
            names.join(", ")
        ))
    };
    load(
        cudarc::get_lib_name_candidates("cuda"),
        "the NVIDIA driver library (libcuda)",
        "is the NVIDIA driver installed, and (in a container) is the GPU passed through?",
    )?;
    let count = cudarc::driver::result::init()
        .and_then(|_| cudarc::driver::result::device::get_count())
        .map_err(|e| format!("the NVIDIA driver cannot start: {e}"))?;
    if n >= count as usize {
        return Err(format!(
            "device cuda:{n} asked for, but this machine has {count} GPU(s) (cuda:0..cuda:{})",
            count.max(1) - 1
        ));
    }
    load(
        cudarc::get_lib_name_candidates("nvrtc"),
        "NVRTC (libnvrtc), which compiles the GPU kernels at run time,",
        "install it (NVIDIA's cuda-nvrtc package) and add its directory to LD_LIBRARY_PATH",
    )?;
    check_headers()
}

#[cfg(not(feature = "cuda"))]
fn preflight_libraries(_n: usize) -> Result<(), String> {
    check_headers()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(Compute::parse("cpu").unwrap(), Compute::Cpu);
        assert_eq!(Compute::parse("cuda").unwrap(), Compute::Cuda(0));
        assert_eq!(Compute::parse("cuda:3").unwrap(), Compute::Cuda(3));
        assert_eq!(Compute::Cuda(3).to_string(), "cuda:3");
        let e = Compute::parse("gpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `gpu`"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_a_gpu_with_the_fix() {
        let e = cuda_preflight(0).unwrap_err();
        assert!(e.contains("--features cuda"), "{e}");
        assert_eq!(Compute::parse("auto").unwrap(), Compute::Cpu);
    }

    #[test]
    fn missing_headers_are_named_with_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("include")).unwrap();
        std::fs::write(dir.path().join("include/cuda.h"), "").unwrap();
        // (The environment is left alone: tests beside this one, and the C libraries they
        // load, read it from other threads.)
        let e = check_headers_in(dir.path(), "CUDA_PATH").unwrap_err();
        assert!(e.contains("cuda_fp16.h, cuda_bf16.h not in"), "{e}");
        assert!(e.contains("(CUDA_PATH)"), "{e}");
    }
}
