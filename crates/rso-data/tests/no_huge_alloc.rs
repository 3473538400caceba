//! Lying headers and gzip bombs must not make the readers allocate what the header claims.
//! Its own test binary: the global allocator records the largest single allocation.

mod common;

use common::{gz, idx_bytes, write};
use rso_data::read_idx;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Largest;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc`, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// The largest single allocation made while `f` runs.
fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let out = f();
    (out, LARGEST.load(Ordering::Relaxed))
}

#[test]
fn lying_headers_and_gzip_bombs_allocate_little() {
    let dir = tempfile::tempdir().unwrap();
    // 2^31 images of 28×28 in a 100-byte file, raw and gzip'd.
    let huge = idx_bytes(&[1 << 31, 28, 28], &[0; 84]);
    let raw = write(dir.path(), "huge-idx3-ubyte", &huge);
    let gzd = write(dir.path(), "huge-idx3-ubyte.gz", &gz(&huge));
    // A header the gzip size bound cannot rule out (2000×28×28 = 1.5 MB, under 1032× the size
    // of this 3 KB gzip file) over a short stream: the reader must grow its buffer with the
    // data, not allocate from the header.
    let mut x = 0x9e37_79b9u32;
    let noise: Vec<u8> = (0..3000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let lying = gz(&idx_bytes(&[2000, 28, 28], &noise));
    assert!(
        lying.len() * 1032 > 2000 * 784,
        "the size bound would catch this file"
    );
    let lying = write(dir.path(), "lying-idx3-ubyte.gz", &lying);
    // A bomb: 8 MiB of zeros (a few KiB compressed) behind a header that claims one image.
    let mut bomb = idx_bytes(&[1, 28, 28], &[]);
    bomb.resize(bomb.len() + (8 << 20), 0);
    let bomb = write(dir.path(), "bomb-idx3-ubyte.gz", &gz(&bomb));
    drop(huge);

    for (path, want) in [
        (&raw, "truncated"),
        (&gzd, "truncated"),
        (&lying, "truncated"),
        (&bomb, "trailing bytes"),
    ] {
        let (r, largest) = largest_during(|| read_idx(path));
        let msg = r.expect_err("hostile file accepted").to_string();
        assert!(msg.contains(want), "{msg}");
        assert!(
            largest < 1 << 20,
            "{}: largest allocation {largest} bytes",
            path.display()
        );
        eprintln!(
            "{}: largest allocation {largest} bytes: {msg}",
            path.display()
        );
    }
}
