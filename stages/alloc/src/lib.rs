//! A global allocator for programs that train or run tensors on the CPU.
//!
//! A training step allocates and frees the same large buffers every step: activations,
//! logits (32 x 128 x 8,000 floats is 131 MB), their gradients. glibc serves blocks that
//! large with a fresh `mmap` each time, so every step the kernel faults in and zeroes every
//! page again: 900,000 minor faults in six `mini` steps. [`TensorAlloc`] serves blocks of
//! 2 MiB and more itself:
//!
//! - it maps them aligned to 2 MiB and asks for transparent huge pages (`MADV_HUGEPAGE`), so
//!   a fresh block faults once per 2 MiB instead of once per 4 KiB;
//! - it keeps freed blocks in a cache and hands them back for a request of the same size
//!   (else it splits the smallest larger one), so the next step's buffers are already
//!   mapped: no fault, no zeroing.
//!
//! The cache never makes the process larger than it has been: cached and live large
//! blocks together stay within the peak of live ones (a request the cache cannot serve
//! first returns its oldest blocks to the kernel). `ORCHESTRATE_ALLOC_CACHE_MB` caps the
//! cache further (0: keep nothing), and [`release_cache`] empties it, as `orchestrate` does
//! after each stage. Smaller blocks go to the system allocator unchanged. A binary opts in:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: orchestrate_alloc::Global = orchestrate_alloc::Global;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// The size of a transparent huge page on x86-64 and aarch64 (4 KiB base pages): blocks this
/// large and larger are served here.
pub const HUGE_PAGE: usize = 2 << 20;

/// Block lengths are multiples of this: the same request size always gets the same length,
/// and a 4 MiB tensor does not take a 6 MiB block.
const GRANULE: usize = 64 << 10;

/// The largest alignment served here: burn's CPU backend aligns its buffers to 64 bytes.
const ALIGN: usize = 64;

/// Cached blocks at most (a fixed array: the allocator cannot allocate for itself). A
/// `spec512` step frees about 150 large blocks.
const SLOTS: usize = 512;

/// The caller's bytes start at one of `COLORS` offsets into a block, `COLOR_STEP` apart
/// (a cache line past a page), so that buffers used together (a product's operands and
/// output) do not all map to the same cache sets: with every buffer at a 2 MiB boundary a
/// `spec512` step was ~5% slower than glibc's, with offsets on par (0.96x-1.06x). The
/// word before the caller's bytes holds the block's start.
const COLOR_STEP: usize = 4096 + 64;
const COLORS: usize = 16;

/// `cache_cap` before its first use.
const UNSET: usize = usize::MAX;

/// The allocator behind [`Global`].
pub static TENSOR_ALLOC: TensorAlloc = TensorAlloc::new();

/// [`TENSOR_ALLOC`] as a `#[global_allocator]`, so that library code can reach its cache
/// through [`release_cache`] without knowing the binary.
pub struct Global;

/// Returns every block the global allocator keeps to the kernel: for the end of a phase
/// whose buffers will not come back (a stage), so an idle process does not hold them.
/// Does nothing where [`Global`] is not the global allocator.
pub fn release_cache() {
    TENSOR_ALLOC.release_cache()
}

/// Who serves large blocks: decided once, by the first large request or by
/// [`TensorAlloc::system_only`], and never changed (a block must be freed by whoever
/// allocated it).
const UNDECIDED: u8 = 0;
const OURS: u8 = 1;
const SYSTEM: u8 = 2;

/// Spins on a held lock before yielding the core to its holder.
const SPINS_BEFORE_YIELD: u32 = 100;

/// Blocks unmapped per hold of the lock (their list lives on the stack).
const EVICT_BATCH: usize = 16;

/// See the crate's documentation.
pub struct TensorAlloc {
    /// A spin lock around `cache`: held for a scan of at most [`SLOTS`] entries, and the
    /// allocator may not use anything that allocates.
    locked: AtomicBool,
    cache: UnsafeCell<Cache>,
    /// Bytes of freed blocks kept at most beyond the peak rule; [`UNSET`] until first used.
    cache_cap: AtomicUsize,
    /// [`UNDECIDED`], [`OURS`] or [`SYSTEM`].
    mode: AtomicU8,
    /// Large blocks mapped from the kernel so far.
    mapped: AtomicUsize,
    /// Blocks handed out so far, for choosing their offsets.
    handed_out: AtomicUsize,
}

// SAFETY: `cache` is only touched while `locked` is held (see `with_cache`).
unsafe impl Sync for TensorAlloc {}

/// Freed blocks, oldest first: `(address, length)`, length a multiple of [`GRANULE`]; and
/// the bytes in large blocks handed out, now and at most.
struct Cache {
    blocks: [(usize, usize); SLOTS],
    len: usize,
    bytes: usize,
    live: usize,
    peak: usize,
}

impl Cache {
    /// Removes the `i`th oldest block.
    fn remove(&mut self, i: usize) -> (usize, usize) {
        let block = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= block.1;
        block
    }

    /// Puts a block `i`th oldest; the caller makes room first.
    fn insert(&mut self, i: usize, block: (usize, usize)) {
        self.blocks.copy_within(i..self.len, i + 1);
        self.blocks[i] = block;
        self.len += 1;
        self.bytes += block.1;
    }

    /// Moves up to [`EVICT_BATCH`] of the oldest blocks to `out` while `over` says the
    /// cache is too large; whether it no longer is.
    fn evict(&mut self, out: &mut Evicted, over: impl Fn(&Cache) -> bool) -> bool {
        while self.len > 0 && over(self) {
            if out.len == EVICT_BATCH {
                return false;
            }
            out.push(self.remove(0));
        }
        true
    }

    /// Whether cached and live bytes together are past the peak of live ones.
    fn past_peak(&self) -> bool {
        self.bytes + self.live > self.peak
    }
}

/// Blocks taken out of the cache under its lock, to unmap after releasing it.
struct Evicted {
    blocks: [(usize, usize); EVICT_BATCH],
    len: usize,
}

impl Evicted {
    fn new() -> Self {
        Self {
            blocks: [(0, 0); EVICT_BATCH],
            len: 0,
        }
    }

    /// Adds a block; the caller knows there is room.
    fn push(&mut self, block: (usize, usize)) {
        self.blocks[self.len] = block;
        self.len += 1;
    }

    /// Unmaps the blocks and empties the list.
    fn unmap(&mut self) {
        for &(addr, len) in &self.blocks[..self.len] {
            unmap(addr as *mut u8, len);
        }
        self.len = 0;
    }
}

impl Default for TensorAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl TensorAlloc {
    /// An allocator whose cache is bounded by the peak rule and `ORCHESTRATE_ALLOC_CACHE_MB`.
    pub const fn new() -> Self {
        Self::with_cache_cap(UNSET)
    }

    /// An allocator whose cache keeps at most `bytes` of freed blocks (and no more than the
    /// peak rule allows).
    pub const fn with_cache_cap(bytes: usize) -> Self {
        Self {
            locked: AtomicBool::new(false),
            cache: UnsafeCell::new(Cache {
                blocks: [(0, 0); SLOTS],
                len: 0,
                bytes: 0,
                live: 0,
                peak: 0,
            }),
            cache_cap: AtomicUsize::new(bytes),
            mode: AtomicU8::new(UNDECIDED),
            mapped: AtomicUsize::new(0),
            handed_out: AtomicUsize::new(0),
        }
    }

    /// Sends every request to the system allocator, for measuring what this one saves.
    /// Only possible before the first large request (a block must be freed by whoever
    /// allocated it): returns whether it switched.
    pub fn system_only(&self) -> bool {
        self.mode
            .compare_exchange(UNDECIDED, SYSTEM, Ordering::SeqCst, Ordering::SeqCst)
            .map_or_else(|now| now == SYSTEM, |_| true)
    }

    /// Whether [`TensorAlloc::system_only`] switched.
    pub fn is_system_only(&self) -> bool {
        self.mode.load(Ordering::Relaxed) == SYSTEM
    }

    /// Large blocks mapped from the kernel so far (a cache miss each).
    pub fn mapped_blocks(&self) -> usize {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Bytes in freed blocks kept for reuse.
    pub fn cached_bytes(&self) -> usize {
        self.with_cache(|c| c.bytes)
    }

    /// The length this allocator maps for `layout`, or `None` for the system allocator.
    /// The first large request decides that this allocator serves them.
    fn block_len(&self, layout: Layout) -> Option<usize> {
        if layout.size() < HUGE_PAGE || layout.align() > ALIGN {
            return None;
        }
        let mode = match self.mode.load(Ordering::Relaxed) {
            UNDECIDED => self
                .mode
                .compare_exchange(UNDECIDED, OURS, Ordering::SeqCst, Ordering::SeqCst)
                .map_or_else(|now| now, |_| OURS),
            decided => decided,
        };
        if mode != OURS {
            return None;
        }
        layout
            .size()
            .checked_add(COLORS * COLOR_STEP)?
            .checked_next_multiple_of(GRANULE)
    }

    /// The caller's bytes in the block at `base` (see [`COLOR_STEP`]), the block's start
    /// written before them.
    fn colored(&self, base: *mut u8) -> *mut u8 {
        if base.is_null() {
            return base;
        }
        let color = 1 + self.handed_out.fetch_add(1, Ordering::Relaxed) % COLORS;
        // SAFETY: the block is `COLORS * COLOR_STEP` bytes longer than asked for, and the
        // word before the caller's bytes is inside it.
        unsafe {
            let p = base.add(color * COLOR_STEP);
            p.cast::<usize>().sub(1).write(base as usize);
            p
        }
    }

    fn with_cache<T>(&self, f: impl FnOnce(&mut Cache) -> T) -> T {
        let mut spins = 0;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Wait on a plain read; past a few spins the holder may have been preempted
            // (more threads than cores): give it the core.
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < SPINS_BEFORE_YIELD {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        // SAFETY: the lock is held, so this is the only reference to the cache.
        let out = f(unsafe { &mut *self.cache.get() });
        self.locked.store(false, Ordering::Release);
        out
    }

    /// The cap on cached bytes, read from the environment on the first call.
    fn cache_cap(&self) -> usize {
        let cap = self.cache_cap.load(Ordering::Relaxed);
        if cap != UNSET {
            return cap;
        }
        let cap = configured_cache_bytes().unwrap_or(usize::MAX - 1);
        self.cache_cap.store(cap, Ordering::Relaxed);
        cap
    }

    /// A block of `len` bytes: cached (`true`: its contents are old) or freshly mapped
    /// (`false`: zeroed by the kernel). Null when the kernel refuses even after the cache
    /// is released.
    fn obtain(&self, len: usize) -> (*mut u8, bool) {
        // A split's tail shorter than this can serve no request: not worth keeping.
        let smallest = (HUGE_PAGE + COLORS * COLOR_STEP).next_multiple_of(GRANULE);
        let mut evicted = Evicted::new();
        let cached = self.with_cache(|c| {
            c.live += len;
            c.peak = c.peak.max(c.live);
            // Newest first: the block freed last is the likeliest still in the CPU's caches.
            if let Some(i) = c.blocks[..c.len].iter().rposition(|&(_, l)| l == len) {
                return Some(c.remove(i).0 as *mut u8);
            }
            // Else the smallest larger block, split: its tail stays cached, as old as the
            // block was. Shapes that differ from step to step (bucketed lengths) reuse each
            // other's blocks.
            let i = (0..c.len)
                .filter(|&i| c.blocks[i].1 > len)
                .min_by_key(|&i| c.blocks[i].1)?;
            let (addr, l) = c.remove(i);
            let tail = (addr + len, l - len);
            if tail.1 >= smallest {
                c.insert(i, tail);
            } else {
                evicted.push(tail);
            }
            Some(addr as *mut u8)
        });
        evicted.unmap();
        if let Some(p) = cached {
            return (p, true);
        }
        // A miss grows the process unless cached blocks go: keep cached and live bytes
        // within the peak of live ones.
        self.drain(|c, evicted| c.evict(evicted, Cache::past_peak));
        let mut p = map(len);
        if p.is_null() {
            // Out of memory: give back every cached block, without this request counted as
            // live meanwhile, and try once more.
            self.with_cache(|c| c.live -= len);
            self.release_cache();
            p = map(len);
            if !p.is_null() {
                self.with_cache(|c| {
                    c.live += len;
                    c.peak = c.peak.max(c.live);
                });
            }
        }
        if !p.is_null() {
            self.mapped.fetch_add(1, Ordering::SeqCst);
        }
        (p, false)
    }

    /// Keeps a freed block, evicting the oldest ones past the cap; unmaps what it does not
    /// keep.
    fn put(&self, addr: *mut u8, len: usize) {
        let cap = self.cache_cap();
        let over = |c: &Cache| c.len == SLOTS || c.bytes + len > cap;
        let mut freed = false;
        self.drain(|c, evicted| {
            if !std::mem::replace(&mut freed, true) {
                c.live -= len;
                if len > cap {
                    // The first hold: `evicted` is empty.
                    evicted.push((addr as usize, len));
                    return true;
                }
            }
            if !c.evict(evicted, over) {
                return false;
            }
            let newest = c.len;
            c.insert(newest, (addr as usize, len));
            true
        });
    }

    /// Returns every cached block to the kernel.
    pub fn release_cache(&self) {
        self.drain(|c, evicted| {
            let done = c.evict(evicted, |_| true);
            if done {
                // The next phase sets its own peak.
                c.peak = c.live;
            }
            done
        });
    }

    /// Runs `step` under the lock until it says it is done, unmapping what it evicted
    /// after each hold (a hold evicts at most [`EVICT_BATCH`] blocks).
    fn drain(&self, mut step: impl FnMut(&mut Cache, &mut Evicted) -> bool) {
        let mut evicted = Evicted::new();
        loop {
            let done = self.with_cache(|c| step(c, &mut evicted));
            evicted.unmap();
            if done {
                return;
            }
        }
    }
}

/// `ORCHESTRATE_ALLOC_CACHE_MB` in bytes, if set to a number. Read with `getenv`, which does
/// not allocate (this runs inside the allocator); it bypasses std's lock on the environment,
/// so it is read once, at the first large free, and setting it from inside the program is
/// not supported.
fn configured_cache_bytes() -> Option<usize> {
    // SAFETY: a NUL-terminated name; the value, if any, is a NUL-terminated string that
    // nothing here modifies.
    let value = unsafe { libc::getenv(c"ORCHESTRATE_ALLOC_CACHE_MB".as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: see above.
    let text = unsafe { std::ffi::CStr::from_ptr(value) }.to_str().ok()?;
    let mebibytes: usize = text.trim().parse().ok()?;
    Some(mebibytes.saturating_mul(1 << 20))
}

/// `len` bytes mapped at a 2 MiB boundary, with huge pages asked for; null on failure.
fn map(len: usize) -> *mut u8 {
    let Some(padded) = len.checked_add(HUGE_PAGE) else {
        return ptr::null_mut();
    };
    // SAFETY: an anonymous private mapping touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            ptr::null_mut(),
            padded,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    // Map one huge page more than asked and cut the ends off, so the block starts on a huge
    // page boundary and every 2 MiB of it can be one huge page.
    let start = (raw as usize).next_multiple_of(HUGE_PAGE);
    let head = start - raw as usize;
    if head > 0 {
        unmap(raw as *mut u8, head);
    }
    // head < HUGE_PAGE, so there is always a tail.
    unmap((start + len) as *mut u8, HUGE_PAGE - head);
    // SAFETY: the range was just mapped. Failure (a kernel without transparent huge pages)
    // only means 4 KiB pages.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    start as *mut u8
}

/// The start of the block holding `p`.
///
/// # Safety
/// `p` is a large block's pointer that [`TensorAlloc::colored`] returned.
unsafe fn base_of(p: *mut u8) -> *mut u8 {
    // SAFETY: `colored` wrote the block's start in the word before `p`.
    unsafe { p.cast::<usize>().sub(1).read() as *mut u8 }
}

fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: callers pass a range this allocator mapped and no longer hands out.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

// Every block starts at a multiple of `GRANULE` (a mapping's 2 MiB boundary, or a split at a
// multiple of `GRANULE` into one) and the caller's bytes a multiple of `COLOR_STEP` past it,
// so at least `ALIGN`-aligned.
const _: () = assert!(GRANULE.is_multiple_of(ALIGN) && COLOR_STEP.is_multiple_of(ALIGN));

// SAFETY: large blocks are disjoint ranges of private mappings, aligned to `ALIGN` (above,
// the most they are asked for), each handed out to one owner at a time; everything else is
// `System`'s.
unsafe impl GlobalAlloc for TensorAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.block_len(layout) {
            Some(len) => self.colored(self.obtain(len).0),
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.block_len(layout) {
            Some(len) => {
                let (base, reused) = self.obtain(len);
                let p = self.colored(base);
                if reused {
                    // SAFETY: `p` is a block of `len >= layout.size()` bytes owned by the caller.
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match self.block_len(layout) {
            // SAFETY: `p` came from `colored`.
            Some(len) => self.put(unsafe { base_of(p) }, len),
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (self.block_len(layout), self.block_len(new_layout)) {
            // SAFETY: forwarded with the caller's guarantees.
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            (Some(old), Some(new)) if old == new => p,
            _ => {
                // SAFETY: `new_layout` is valid (above); the copy stays within both blocks.
                unsafe {
                    let q = self.alloc(new_layout);
                    if !q.is_null() {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                    q
                }
            }
        }
    }
}

// SAFETY: forwards to `TENSOR_ALLOC`, a `GlobalAlloc` (above).
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { TENSOR_ALLOC.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { TENSOR_ALLOC.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { TENSOR_ALLOC.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { TENSOR_ALLOC.realloc(p, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 64).unwrap()
    }

    /// The length of the block a request of `bytes` takes.
    fn block(bytes: usize) -> usize {
        TensorAlloc::new().block_len(layout(bytes)).unwrap()
    }

    #[test]
    fn a_freed_block_serves_the_next_request_of_its_size() {
        let a = TensorAlloc::new();
        unsafe {
            let p = a.alloc(layout(9 * MIB));
            assert_eq!(
                base_of(p) as usize % HUGE_PAGE,
                0,
                "a mapping starts on a huge page"
            );
            assert_eq!(p as usize % 64, 0);
            p.write_bytes(7, 9 * MIB);
            a.dealloc(p, layout(9 * MIB));
            assert_eq!(a.cached_bytes(), block(9 * MIB), "kept");
            // A zeroed request of the same size gets the block back, without the 7s.
            let q = a.alloc_zeroed(layout(9 * MIB));
            assert_eq!(base_of(q), base_of(p));
            assert_ne!(q, p, "at another offset");
            assert_eq!(a.cached_bytes(), 0);
            assert!(std::slice::from_raw_parts(q, 9 * MIB)
                .iter()
                .all(|&b| b == 0));
            a.dealloc(q, layout(9 * MIB));
            // A smaller request splits the block: its head, the tail stays cached.
            let r = a.alloc(layout(3 * MIB));
            assert_eq!(base_of(r), base_of(p));
            assert_eq!(a.cached_bytes(), block(9 * MIB) - block(3 * MIB));
            a.dealloc(r, layout(3 * MIB));
            assert_eq!(a.cached_bytes(), block(9 * MIB));
            a.release_cache();
            assert_eq!(a.cached_bytes(), 0);

            // A tail shorter than any block this allocator hands out is returned at once.
            let p = a.alloc(layout(5 * MIB));
            a.dealloc(p, layout(5 * MIB));
            let r = a.alloc(layout(3 * MIB));
            assert_eq!(base_of(r), base_of(p));
            assert_eq!(a.cached_bytes(), 0, "the 2 MiB tail can serve nothing");
            a.dealloc(r, layout(3 * MIB));
            a.release_cache();
        }
    }

    #[test]
    fn the_cache_stays_within_its_cap_evicting_the_oldest() {
        let a = TensorAlloc::with_cache_cap(2 * block(4 * MIB));
        unsafe {
            let blocks: Vec<*mut u8> = (0..3).map(|_| a.alloc(layout(4 * MIB))).collect();
            for &p in &blocks {
                a.dealloc(p, layout(4 * MIB));
                assert!(a.cached_bytes() <= 2 * block(4 * MIB));
            }
            assert_eq!(a.cached_bytes(), 2 * block(4 * MIB));
            // The first freed was evicted (unmapped): the newest comes back first.
            let p = a.alloc(layout(4 * MIB));
            let q = a.alloc(layout(4 * MIB));
            assert_eq!(base_of(p), base_of(blocks[2]));
            assert_eq!(base_of(q), base_of(blocks[1]));
            // Larger than the whole cache: unmapped on free, never kept.
            let big = a.alloc(layout(10 * MIB));
            a.dealloc(big, layout(10 * MIB));
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(p, layout(4 * MIB));
            a.dealloc(q, layout(4 * MIB));
            a.release_cache();
        }
    }

    #[test]
    fn a_miss_returns_cached_blocks_rather_than_grow_past_the_peak() {
        let a = TensorAlloc::new();
        unsafe {
            let p = a.alloc(layout(4 * MIB));
            let q = a.alloc(layout(4 * MIB));
            a.dealloc(p, layout(4 * MIB));
            a.dealloc(q, layout(4 * MIB));
            assert_eq!(
                a.cached_bytes(),
                2 * block(4 * MIB),
                "the peak was both live"
            );
            // 9 MiB live and both cached would be past the peak (no cached block is large
            // enough to split): both go back before a new one is mapped.
            let r = a.alloc(layout(9 * MIB));
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(r, layout(9 * MIB));
            assert_eq!(a.cached_bytes(), block(9 * MIB));
            a.release_cache();
            assert_eq!(a.cached_bytes(), 0);
        }
    }

    #[test]
    fn evictions_larger_than_one_batch_all_happen() {
        let a = TensorAlloc::new();
        let n = 3 * EVICT_BATCH / 2;
        let cache_n_blocks = || unsafe {
            let blocks: Vec<*mut u8> = (0..n).map(|_| a.alloc(layout(2 * MIB))).collect();
            for &p in &blocks {
                a.dealloc(p, layout(2 * MIB));
            }
            assert_eq!(a.cached_bytes(), n * block(2 * MIB));
        };
        cache_n_blocks();
        a.release_cache();
        assert_eq!(a.cached_bytes(), 0);
        cache_n_blocks();
        unsafe {
            // Larger than the peak so far and than any cached block: all of them go.
            let big = a.alloc(layout(n * block(2 * MIB)));
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(big, layout(n * block(2 * MIB)));
        }
        a.release_cache();
    }

    #[test]
    fn growing_and_shrinking_keeps_the_contents() {
        let a = TensorAlloc::new();
        unsafe {
            // Small (system) -> large (mapped) -> larger -> small again.
            let mut size = 1000;
            let mut p = a.alloc(layout(size));
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            for new_size in [3 * MIB, 9 * MIB, 500] {
                p = a.realloc(p, layout(size), new_size);
                size = new_size;
                assert!(!p.is_null());
                for i in 0..500 {
                    assert_eq!(*p.add(i), i as u8, "byte {i} after resizing to {size}");
                }
            }
            a.dealloc(p, layout(500));
            a.release_cache();
        }
    }

    #[test]
    fn threads_sharing_the_cache_never_share_a_block() {
        static SHARED: TensorAlloc = TensorAlloc::new();
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                scope.spawn(move || unsafe {
                    for round in 0..50 {
                        // Sizes that differ by thread and round: exact reuse, splits, misses.
                        let size = (2 + (t as usize + round) % 5) * MIB;
                        let p = SHARED.alloc(layout(size));
                        p.write_bytes(t, size);
                        std::thread::yield_now();
                        let mine = std::slice::from_raw_parts(p, size);
                        assert!(mine.iter().all(|&b| b == t), "thread {t} round {round}");
                        SHARED.dealloc(p, layout(size));
                    }
                });
            }
        });
        SHARED.release_cache();
        assert_eq!(SHARED.cached_bytes(), 0);
    }

    #[test]
    fn small_and_overaligned_blocks_go_to_the_system() {
        let a = TensorAlloc::new();
        unsafe {
            let small = a.alloc(layout(64 * 1024));
            a.dealloc(small, layout(64 * 1024));
            let odd = Layout::from_size_align(4 * MIB, 4096).unwrap();
            let p = a.alloc(odd);
            assert_eq!(p as usize % 4096, 0);
            a.dealloc(p, odd);
            assert_eq!(a.cached_bytes(), 0, "neither was kept");
            assert_eq!(a.mapped_blocks(), 0);
        }
    }

    #[test]
    fn switching_to_the_system_is_refused_once_a_block_is_mapped() {
        let fresh = TensorAlloc::new();
        assert!(fresh.system_only());
        unsafe {
            let p = fresh.alloc(layout(4 * MIB));
            fresh.dealloc(p, layout(4 * MIB));
        }
        assert_eq!(fresh.cached_bytes(), 0, "system-only: nothing kept");

        let used = TensorAlloc::new();
        unsafe {
            let p = used.alloc(layout(4 * MIB));
            assert!(!used.system_only());
            used.dealloc(p, layout(4 * MIB));
        }
        used.release_cache();
    }
}
