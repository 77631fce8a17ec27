//! Outputs the kernels write in place: vectors handed to them uninitialised (products and
//! row loops write every element, so zero-filling first would be a wasted pass over
//! memory), and the parallel row loop most elementwise kernels run in.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::vectorized;

/// Rows handed to one rayon task: enough work to amortise the task, small enough to
/// balance two to sixteen cores.
pub(super) const ROWS_PER_TASK: usize = 16;

/// Elements per rayon task in elementwise kernels.
pub(super) const ELEMENTWISE_CHUNK: usize = 4096;

/// A vector of `len` f32 that `write` initialises through the uninitialised slice it gets,
/// for outputs that products and row loops write whole, which zero-filling first would
/// only slow down.
///
/// # Safety
/// `write` must initialise every one of the `len` elements.
pub(super) unsafe fn written(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    // SAFETY: the caller's `write` initialises the one vector.
    let [values] = unsafe { written_all([len], |[values]| write(values)) };
    values
}

/// Two vectors of `lens` f32 that `write` initialises together, as [`written`] does one.
///
/// # Safety
/// `write` must initialise every element of both.
pub(super) unsafe fn written_pair(
    lens: [usize; 2],
    write: impl FnOnce(&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: the caller's `write` initialises both.
    let [first, second] = unsafe { written_all(lens, |[first, second]| write(first, second)) };
    (first, second)
}

/// `N` vectors of `lens` f32 that `write` initialises together, as [`written`] does one.
///
/// # Safety
/// `write` must initialise every element of each.
pub(super) unsafe fn written_all<const N: usize>(
    lens: [usize; N],
    write: impl FnOnce([&mut [MaybeUninit<f32>]; N]),
) -> [Vec<f32>; N] {
    let mut values = lens.map(Vec::with_capacity);
    let mut index = 0;
    let slices = values.each_mut().map(|v| {
        let slice = &mut v.spare_capacity_mut()[..lens[index]];
        index += 1;
        slice
    });
    write(slices);
    for (v, len) in values.iter_mut().zip(lens) {
        // SAFETY: the caller's `write` initialised the first `len` elements.
        unsafe { v.set_len(len) };
    }
    values
}

/// A vector of `rows * len` f32 whose rows `kernel(row, output_row)` writes, in parallel
/// and [`vectorized`] (`kernel` must be `#[inline(always)]`).
///
/// # Safety
/// `kernel` must initialise every element of each row it is given (see [`write_row`]).
pub(super) unsafe fn par_rows(
    rows: usize,
    len: usize,
    kernel: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: the chunks tile the output, and the caller's `kernel` writes each row whole.
    unsafe {
        written(rows * len, |output| {
            if len == 0 {
                return;
            }
            output
                .par_chunks_mut(len * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(chunk, rows)| {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (i, out) in rows.chunks_mut(len).enumerate() {
                                kernel(chunk * ROWS_PER_TASK + i, out);
                            }
                        },
                    )
                });
        })
    }
}

/// Writes `values` into `row`, which they must fill exactly, and returns it initialised.
#[inline(always)]
pub(super) fn write_row(
    row: &mut [MaybeUninit<f32>],
    values: impl IntoIterator<Item = f32>,
) -> &mut [f32] {
    let mut count = 0;
    for (slot, value) in row.iter_mut().zip(values) {
        slot.write(value);
        count += 1;
    }
    assert_eq!(count, row.len(), "a row written in part");
    // SAFETY: every element was written above.
    unsafe { assume_init(row) }
}

/// `slice` as initialised f32.
///
/// # Safety
/// Every element of `slice` must have been written.
#[inline(always)]
pub(super) unsafe fn assume_init(slice: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller guarantees initialisation.
    unsafe { &mut *(slice as *mut [MaybeUninit<f32>] as *mut [f32]) }
}
