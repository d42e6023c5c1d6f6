//! Switches for the GPU training path's choices, so that one build can measure each against
//! the way it replaced, side by side on the same GPU (`bench/gpu_ablate.sh`). Every choice
//! is on unless `ORCHESTRATE_GPU_PATH` lists it, comma-separated, to turn it off:
//!
//! - `copies`: token lookups gather through side-by-side copies of the table
//!   (`model::token_lookup`); off: burn's `Embedding` lookup.
//! - `broadcast`: positions are the position table's first rows added by broadcasting;
//!   off: a lookup by position ids, as the CPU does.
//! - `master`: `FlatAdamW` updates the flat vector of parameters it wrote the step before;
//!   off: it lays the parameters end to end again every step.
//!
//! Either way a step computes the same values (to the rounding of sums taken in another
//! order). The CPU path ignores the switches. Read once per process.

use std::sync::OnceLock;

/// Which of the GPU path's choices are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuPath {
    pub copies: bool,
    pub broadcast: bool,
    pub master: bool,
}

impl GpuPath {
    /// Every choice on: the default.
    pub const ALL: GpuPath = GpuPath {
        copies: true,
        broadcast: true,
        master: true,
    };

    /// Every choice on but those `off` names; an unknown name is an error naming it.
    pub fn parse(off: &str) -> Result<GpuPath, String> {
        let mut path = GpuPath::ALL;
        for name in off.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "copies" => path.copies = false,
                "broadcast" => path.broadcast = false,
                "master" => path.master = false,
                other => {
                    return Err(format!(
                        "ORCHESTRATE_GPU_PATH: unknown choice `{other}` \
                         (known: copies, broadcast, master)"
                    ))
                }
            }
        }
        Ok(path)
    }

    /// The names of the choices turned off, comma-separated, as `parse` reads them.
    pub fn off(&self) -> String {
        let all = [
            ("copies", self.copies),
            ("broadcast", self.broadcast),
            ("master", self.master),
        ];
        let off: Vec<&str> = all.iter().filter(|(_, on)| !on).map(|(n, _)| *n).collect();
        off.join(",")
    }
}

/// The process's switches, from `ORCHESTRATE_GPU_PATH`. An unknown name there is reported
/// on stderr once and ignored (every choice stays on), rather than stopping a training run
/// over a benchmarking switch.
pub fn gpu_path() -> GpuPath {
    static PATH: OnceLock<GpuPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let off = std::env::var("ORCHESTRATE_GPU_PATH").unwrap_or_default();
        GpuPath::parse(&off).unwrap_or_else(|e| {
            eprintln!("{e}; ignored");
            GpuPath::ALL
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_turn_choices_off_and_unknown_ones_are_named() {
        assert_eq!(GpuPath::parse("").unwrap(), GpuPath::ALL);
        let some = GpuPath::parse(" copies,master ").unwrap();
        assert_eq!(
            some,
            GpuPath {
                copies: false,
                broadcast: true,
                master: false
            }
        );
        assert_eq!(GpuPath::parse(&some.off()).unwrap(), some);
        let err = GpuPath::parse("copies,fast").unwrap_err();
        assert!(err.contains("`fast`"), "{err}");
    }
}
