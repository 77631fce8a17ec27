//! Single-threaded `gemm` products on strided views of f32 slices, for the flex kernels
//! that split a larger product into blocks and run the blocks in parallel themselves.
//! Outputs may be uninitialised (see `written`): `gemm` writes them without reading.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::output::written;
use super::simd::vectorized;

/// A strided matrix view of an f32 slice: element `(i, j)` at
/// `offset + i * row_stride + j * column_stride`.
#[derive(Clone, Copy)]
pub(super) struct Matrix<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    columns: usize,
    row_stride: usize,
    column_stride: usize,
}

impl<'a> Matrix<'a> {
    /// Rows `rows` of the row-major matrix `data` with `width` columns.
    pub(super) fn rows_of(data: &'a [f32], width: usize, rows: Range<usize>) -> Self {
        Self::strided(data, rows.start * width, [rows.len(), width], [width, 1])
    }

    /// The `[rows, columns]` matrix whose element `(i, j)` is at
    /// `offset + i * row_stride + j * column_stride` of `data`.
    pub(super) fn strided(
        data: &'a [f32],
        offset: usize,
        [rows, columns]: [usize; 2],
        [row_stride, column_stride]: [usize; 2],
    ) -> Self {
        Self {
            data,
            offset,
            rows,
            columns,
            row_stride,
            column_stride,
        }
    }

    /// Matrix `e` (`[d_in, d_out]`) of the row-major stack `[E, d_in, d_out]`.
    pub(super) fn expert(data: &'a [f32], e: usize, d_in: usize, d_out: usize) -> Self {
        Self::rows_of(data, d_out, e * d_in..(e + 1) * d_in)
    }

    /// `[rows, columns]`.
    pub(super) fn shape(&self) -> [usize; 2] {
        [self.rows, self.columns]
    }

    /// The transpose (strides swapped, no copy).
    pub(super) fn transpose(self) -> Self {
        Self {
            rows: self.columns,
            columns: self.rows,
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `rows` of this matrix.
    pub(super) fn rows(self, rows: Range<usize>) -> Self {
        Self {
            offset: self.offset + rows.start * self.row_stride,
            rows: rows.len(),
            ..self
        }
    }

    /// Columns `columns` of this matrix.
    pub(super) fn columns(self, columns: Range<usize>) -> Self {
        self.transpose().rows(columns).transpose()
    }

    /// The elements as a row-major `[rows, columns]` slice: borrowed when they already are
    /// one, else copied in one parallel pass over tiles of rows. For the linear layers'
    /// input gradients (`grad w^T` over many blocks of rows) the copy costs less than
    /// `gemm` gathering the strided view again for every block it packs; for the output
    /// head's large weight it cost more, so that product reads the view.
    pub(super) fn row_major(self) -> Cow<'a, [f32]> {
        assert!(self.in_bounds(), "matmul: view out of bounds");
        let len = self.rows * self.columns;
        if self.column_stride == 1 && (self.row_stride == self.columns || self.rows <= 1) {
            return Cow::Borrowed(&self.data[self.offset..self.offset + len]);
        }
        if len == 0 {
            return Cow::Owned(Vec::new());
        }
        const TILE: usize = 64;
        let columns = self.columns;
        // SAFETY: the tiles cover every row, and `copy_rows_into` writes each tile whole.
        Cow::Owned(unsafe {
            written(len, |out| {
                out.par_chunks_mut(TILE * columns)
                    .enumerate()
                    .for_each(|(tile, out)| self.copy_rows_into(tile * TILE, out));
            })
        })
    }

    /// Writes rows `first..` of this matrix into `out` (row-major, as many rows as it
    /// holds) on this thread, in blocks of BLOCK columns, row by row: for a transposed
    /// view the BLOCK elements of an output row lie in BLOCK different lines of `data`,
    /// so their cache misses overlap, and the next rows of the block read the same lines
    /// again from L1. (Filling a column at a time waited for one line per column: the
    /// weights are no longer in cache by the backward pass.) Callers copy some 64 rows at
    /// a time, so that those lines stay in L1.
    pub(super) fn copy_rows_into(&self, first: usize, out: &mut [MaybeUninit<f32>]) {
        const BLOCK: usize = 16;
        let columns = self.columns;
        let rows = out.len() / columns.max(1);
        assert!(
            self.in_bounds() && first + rows <= self.rows && rows * columns == out.len(),
            "matmul: copy out of bounds"
        );
        let element = |i: usize, j: usize| {
            self.data[self.offset + i * self.row_stride + j * self.column_stride]
        };
        for start in (0..columns).step_by(BLOCK) {
            let block = start..(start + BLOCK).min(columns);
            for r in 0..rows {
                for j in block.clone() {
                    out[r * columns + j].write(element(first + r, j));
                }
            }
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.columns == 0
            || self.offset
                + (self.rows - 1) * self.row_stride
                + (self.columns - 1) * self.column_stride
                < self.data.len()
    }
}

/// `out = lhs rhs` with `out` row-major `[lhs.rows, rhs.columns]`, written whole; returns
/// `out`, now initialised.
pub(super) fn matmul_into<'o>(
    out: &'o mut [MaybeUninit<f32>],
    lhs: Matrix,
    rhs: Matrix,
) -> &'o mut [f32] {
    assert_eq!(out.len(), lhs.rows * rhs.columns, "matmul: output size");
    gemm_into(out, rhs.columns, lhs, rhs, 1.0, gemm::Parallelism::None);
    // SAFETY: gemm wrote all `lhs.rows * rhs.columns` elements (`columns` apart per row),
    // the whole of `out` (asserted above).
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `out = lhs rhs` like [`matmul_into`], with gemm splitting the product over rayon's
/// threads: for a product the caller cannot split into independent blocks itself (a
/// long inner dimension, a narrow output).
pub(super) fn parallel_matmul_into(out: &mut [MaybeUninit<f32>], lhs: Matrix, rhs: Matrix) {
    assert_eq!(out.len(), lhs.rows * rhs.columns, "matmul: output size");
    gemm_into(out, rhs.columns, lhs, rhs, 1.0, gemm::Parallelism::Rayon(0));
}

/// `out = scale * lhs rhs`, where output row `i` starts at `out[i * out_stride]` (so `out`
/// can be a block of columns of a wider row-major matrix). One thread: the callers
/// parallelise over blocks.
pub(super) fn scaled_matmul_into(
    out: &mut [MaybeUninit<f32>],
    out_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
) {
    gemm_into(out, out_stride, lhs, rhs, scale, gemm::Parallelism::None);
}

/// [`scaled_matmul_into`] on `parallelism`'s threads.
fn gemm_into(
    out: &mut [MaybeUninit<f32>],
    out_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    assert_eq!(lhs.columns, rhs.rows, "matmul: inner dimensions differ");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    let (rows, columns) = (lhs.rows, rhs.columns);
    if rows == 0 || columns == 0 {
        return;
    }
    assert!(
        columns <= out_stride && (rows - 1) * out_stride + columns <= out.len(),
        "matmul: output out of bounds"
    );
    if rows <= FEW_ROWS && rhs.column_stride == 1 {
        return few_rows_matmul_into(out, out_stride, lhs, rhs, scale);
    }
    let stride = |s: usize| s as isize;
    // SAFETY: the asserts above keep every element gemm reads inside `lhs.data` and
    // `rhs.data` and every element it writes (`rows` rows of `columns`, `out_stride`
    // apart) inside `out`; `out` is borrowed mutably, so it aliases neither input. With
    // `read_dst` false gemm never reads `out`, which may be uninitialised.
    unsafe {
        gemm::gemm(
            rows,
            columns,
            lhs.columns,
            out.as_mut_ptr().cast::<f32>(),
            1,
            stride(out_stride),
            false,
            lhs.data.as_ptr().add(lhs.offset),
            stride(lhs.column_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr().add(rhs.offset),
            stride(rhs.column_stride),
            stride(rhs.row_stride),
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Products with at most this many rows skip `gemm` (see [`few_rows_matmul_into`]).
const FEW_ROWS: usize = 4;

/// Columns of a few-rows product summed at a time: [`FEW_ROWS`] rows of them fill 8 KiB
/// of L1 at most.
const FEW_ROWS_BLOCK: usize = 512;

/// A few-rows product reading at least this many elements of `rhs` is split into blocks
/// of columns over rayon's threads: one core streams a large `rhs` (the output head's
/// weight) from memory more slowly than the product computes.
const FEW_ROWS_PARALLEL_READ: usize = 1 << 17;

/// `out = scale * lhs rhs` for a product of at most [`FEW_ROWS`] rows (a decoding step's
/// tokens) and a row-major `rhs`, as [`gemm_into`] asks. `gemm` packs `rhs` into panels
/// before it multiplies, which for one row costs as much as the product; here each row
/// of `rhs` is read once, in blocks of columns whose running sums stay in L1.
fn few_rows_matmul_into(
    out: &mut [MaybeUninit<f32>],
    out_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
) {
    let rows = lhs.rows;
    // Column by column, as the kernel reads it (`row_major` would split this small copy
    // over threads).
    let left: Vec<f32> = (0..lhs.columns)
        .flat_map(|k| {
            (0..rows)
                .map(move |i| lhs.data[lhs.offset + i * lhs.row_stride + k * lhs.column_stride])
        })
        .collect();
    let product =
        |columns: Range<usize>, out: &mut [MaybeUninit<f32>], out_stride: usize| match rows {
            1 => few_rows_kernel::<1>(out, out_stride, &left, rhs.columns(columns), scale),
            2 => few_rows_kernel::<2>(out, out_stride, &left, rhs.columns(columns), scale),
            3 => few_rows_kernel::<3>(out, out_stride, &left, rhs.columns(columns), scale),
            _ => few_rows_kernel::<FEW_ROWS>(out, out_stride, &left, rhs.columns(columns), scale),
        };
    if rhs.rows * rhs.columns < FEW_ROWS_PARALLEL_READ || rayon::current_num_threads() == 1 {
        return product(0..rhs.columns, out, out_stride);
    }
    // Each block of columns into its own buffer, then into place.
    let blocks: Vec<Vec<f32>> = (0..rhs.columns.div_ceil(FEW_ROWS_BLOCK))
        .into_par_iter()
        .map(|b| {
            let start = b * FEW_ROWS_BLOCK;
            let width = FEW_ROWS_BLOCK.min(rhs.columns - start);
            // SAFETY: the product writes its `rows x width` output whole.
            unsafe {
                written(rows * width, |block| {
                    product(start..start + width, block, width)
                })
            }
        })
        .collect();
    for (b, block) in blocks.iter().enumerate() {
        let width = block.len() / rows;
        for (i, row) in block.chunks_exact(width).enumerate() {
            let at = i * out_stride + b * FEW_ROWS_BLOCK;
            for (out, &value) in out[at..at + width].iter_mut().zip(row) {
                out.write(value);
            }
        }
    }
}

/// [`few_rows_matmul_into`] for exactly `ROWS` rows, whose left side `left` is stored
/// column by column (`left[k * ROWS + i]` is row `i`, column `k`).
fn few_rows_kernel<const ROWS: usize>(
    out: &mut [MaybeUninit<f32>],
    out_stride: usize,
    left: &[f32],
    rhs: Matrix,
    scale: f32,
) {
    assert_eq!(left.len(), ROWS * rhs.rows, "matmul: rows");
    vectorized(
        #[inline(always)]
        || {
            let mut sums = [[0.0f32; FEW_ROWS_BLOCK]; ROWS];
            for start in (0..rhs.columns).step_by(FEW_ROWS_BLOCK) {
                let width = FEW_ROWS_BLOCK.min(rhs.columns - start);
                for row in sums.iter_mut() {
                    row[..width].fill(0.0);
                }
                for (k, left) in left.chunks_exact(ROWS).enumerate() {
                    let at = rhs.offset + k * rhs.row_stride + start;
                    let right = &rhs.data[at..at + width];
                    for (row, &a) in sums.iter_mut().zip(left) {
                        for (sum, &b) in row[..width].iter_mut().zip(right) {
                            *sum += a * b;
                        }
                    }
                }
                for (i, row) in sums.iter().enumerate() {
                    let at = i * out_stride + start;
                    for (out, &sum) in out[at..at + width].iter_mut().zip(&row[..width]) {
                        out.write(scale * sum);
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_row_products_equal_the_naive_sums() {
        let data: Vec<f32> = (0..200_000)
            .map(|v| ((v * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        // Row counts on both sides of FEW_ROWS, widths around the block of columns, a
        // transposed left side, an output wider than the product, and a product split
        // over threads.
        for (rows, inner, columns) in [
            (1, 3, 5),
            (2, 16, 513),
            (3, 7, 1030),
            (4, 33, 64),
            (6, 9, 20),
            // Large enough to be split over threads (FEW_ROWS_PARALLEL_READ).
            (1, 128, 1100),
        ] {
            let lhs = Matrix::rows_of(&data, rows, 0..inner).transpose();
            let rhs = Matrix::strided(&data, 5, [inner, columns], [columns + 3, 1]);
            let stride = columns + 2;
            let mut out = vec![MaybeUninit::new(f32::NAN); rows * stride];
            scaled_matmul_into(&mut out, stride, lhs, rhs, 0.5);
            for i in 0..rows {
                for j in 0..columns {
                    let want: f32 = (0..inner)
                        .map(|k| data[k * rows + i] * data[5 + k * (columns + 3) + j])
                        .sum::<f32>()
                        * 0.5;
                    // SAFETY: the product wrote every column < `columns` of each row.
                    let got = unsafe { out[i * stride + j].assume_init() };
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{inner}x{columns} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn row_major_reads_views_in_order() {
        let data: Vec<f32> = (0..120).map(|v| v as f32).collect();
        // Rows 1..4 and columns 2..9 of a row-major [10, 12], transposed: [7, 3].
        let view = Matrix::rows_of(&data, 12, 1..4).columns(2..9).transpose();
        let expected: Vec<f32> = (0..7)
            .flat_map(|j| (1..4).map(move |i| (i * 12 + 2 + j) as f32))
            .collect();
        assert_eq!(&*view.row_major(), &expected[..]);
        // A transpose over more than one tile of rows and block of columns: [70, 20] from
        // a row-major [20, 70].
        let wide: Vec<f32> = (0..1400).map(|v| v as f32).collect();
        let transposed = Matrix::rows_of(&wide, 70, 0..20).transpose().row_major();
        for i in 0..70 {
            for j in 0..20 {
                assert_eq!(transposed[i * 20 + j], wide[j * 70 + i], "({i}, {j})");
            }
        }
        // Contiguous rows are borrowed, not copied.
        let rows = Matrix::rows_of(&data, 12, 1..4).row_major();
        assert!(matches!(rows, Cow::Borrowed(r) if r == &data[12..48]));
    }
}
