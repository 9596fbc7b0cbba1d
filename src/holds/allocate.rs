//! Best available: which adjacent free seats to offer a party. A pure
//! function of the grid, what is free, and the party size; the hold
//! transaction only tries its candidates.
//!
//! Blocks are ranked as the contract says: (1) row, nearest the stage
//! first; (2) blocks that strand no seat before blocks that do; (3) the
//! distance of the block's centre from the row's centre; (4) the lower
//! first column.

use crate::schedules::Seat;

/// Which seats of a grid are free: not held, not sold, not blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeMap {
    rows: i16,
    cols: i16,
    /// Row-major, `rows * cols`.
    free: Vec<bool>,
}

impl FreeMap {
    /// Every seat free but the `unavailable` ones (outside the grid: ignored).
    pub fn new(rows: i16, cols: i16, unavailable: impl IntoIterator<Item = Seat>) -> Self {
        let mut map = Self {
            rows,
            cols,
            free: vec![
                true;
                usize::try_from(rows).unwrap_or(0) * usize::try_from(cols).unwrap_or(0)
            ],
        };
        for seat in unavailable {
            if let Some(i) = map.index(seat.row, seat.col) {
                map.free[i] = false;
            }
        }
        map
    }

    fn index(&self, row: i16, col: i16) -> Option<usize> {
        ((1..=self.rows).contains(&row) && (1..=self.cols).contains(&col))
            .then(|| (row as usize - 1) * self.cols as usize + (col as usize - 1))
    }

    /// Free and inside the grid.
    pub fn is_free(&self, row: i16, col: i16) -> bool {
        self.index(row, col).is_some_and(|i| self.free[i])
    }

    /// The longest run of adjacent free seats in any row (0 when none).
    pub fn largest_block(&self) -> u16 {
        let mut best = 0u16;
        for row in 1..=self.rows {
            let mut run = 0u16;
            for col in 1..=self.cols {
                run = if self.is_free(row, col) { run + 1 } else { 0 };
                best = best.max(run);
            }
        }
        best
    }

    /// Whether holding `first..=last` of `row` would leave a single free
    /// seat beside it with no free neighbour on its other side.
    fn strands(&self, row: i16, first: i16, last: i16) -> bool {
        let left = first - 1;
        let right = last + 1;
        (self.is_free(row, left) && !self.is_free(row, left - 1))
            || (self.is_free(row, right) && !self.is_free(row, right + 1))
    }
}

/// A candidate: `quantity` adjacent seats of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub row: i16,
    pub first: i16,
    pub last: i16,
}

impl Block {
    pub fn seats(&self) -> Vec<Seat> {
        (self.first..=self.last)
            .map(|col| Seat { row: self.row, col })
            .collect()
    }
}

/// The rank of a block: smaller is better. Distances are doubled so they
/// stay integers: |(first + last) - (cols + 1)| = 2 x |centre - row centre|.
fn rank(map: &FreeMap, b: &Block) -> (i16, bool, i32, i16) {
    let doubled_distance = (i32::from(b.first) + i32::from(b.last) - i32::from(map.cols) - 1).abs();
    (
        b.row,
        map.strands(b.row, b.first, b.last),
        doubled_distance,
        b.first,
    )
}

/// Every free block of `quantity` seats, best first; at most `limit`.
pub fn best_blocks(map: &FreeMap, quantity: u16, limit: usize) -> Vec<Block> {
    let Ok(len) = i16::try_from(quantity) else {
        return Vec::new();
    };
    if len < 1 || len > map.cols {
        return Vec::new();
    }
    let mut blocks = Vec::new();
    for row in 1..=map.rows {
        let mut run = 0i16;
        for col in 1..=map.cols {
            run = if map.is_free(row, col) { run + 1 } else { 0 };
            if run >= len {
                blocks.push(Block {
                    row,
                    first: col - len + 1,
                    last: col,
                });
            }
        }
        // Rows are ranked first: once a row has candidates, later rows
        // only matter when these run out.
        if blocks.len() >= limit {
            break;
        }
    }
    blocks.sort_by_key(|b| rank(map, b));
    blocks.truncate(limit);
    blocks
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn map(rows: &[&str]) -> FreeMap {
        // `.` free, `x` taken or blocked.
        let cols = rows[0].len() as i16;
        let taken = rows.iter().enumerate().flat_map(|(r, line)| {
            line.chars()
                .enumerate()
                .filter(|(_, c)| *c == 'x')
                .map(move |(c, _)| Seat {
                    row: r as i16 + 1,
                    col: c as i16 + 1,
                })
        });
        FreeMap::new(rows.len() as i16, cols, taken)
    }

    fn first(m: &FreeMap, q: u16) -> Option<(i16, i16, i16)> {
        best_blocks(m, q, 16)
            .first()
            .map(|b| (b.row, b.first, b.last))
    }

    #[test]
    fn front_centre_first() {
        assert_eq!(first(&map(&["........", "........"]), 2), Some((1, 4, 5)));
        assert_eq!(first(&map(&["xxxxxxxx", "........"]), 3), Some((2, 3, 5)));
        // Equal distance: the lower first column.
        assert_eq!(first(&map(&["......."]), 2), Some((1, 3, 4)));
    }

    #[test]
    fn avoids_stranding_a_single_seat() {
        // Centre block 4-5 would strand seat 3 (seat 2 is taken); 3-4 and
        // 5-6 strand nothing and are as far from the centre: the lower.
        assert_eq!(first(&map(&[".x......"]), 2), Some((1, 3, 4)));
        // A row end counts as taken: seat 1 stranded by holding 2-3.
        assert_eq!(first(&map(&["....xxxx"]), 2), Some((1, 3, 4)));
        // Nothing avoids it in row 1: still row 1 (row comes first).
        assert_eq!(first(&map(&["..x..x..", "........"]), 1), Some((1, 4, 4)));
    }

    #[test]
    fn no_block_and_largest_block() {
        let m = map(&["x..x..x", "..x.x.."]);
        assert_eq!(first(&m, 3), None);
        assert_eq!(m.largest_block(), 2);
        assert_eq!(first(&map(&["...."]), 5), None);
        assert_eq!(map(&["xx", "xx"]).largest_block(), 0);
    }

    fn arb_map() -> impl Strategy<Value = FreeMap> {
        (1i16..=5, 1i16..=12).prop_flat_map(|(rows, cols)| {
            proptest::collection::vec(proptest::bool::weighted(0.35), (rows * cols) as usize)
                .prop_map(move |taken| {
                    let seats = taken
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| **t)
                        .map(|(i, _)| Seat {
                            row: (i as i16) / cols + 1,
                            col: (i as i16) % cols + 1,
                        });
                    FreeMap::new(rows, cols, seats)
                })
        })
    }

    /// Every block of the grid, by brute force.
    fn all_blocks(m: &FreeMap, q: i16) -> Vec<Block> {
        let mut out = Vec::new();
        for row in 1..=m.rows {
            for first in 1..=m.cols - q + 1 {
                let last = first + q - 1;
                if (first..=last).all(|c| m.is_free(row, c)) {
                    out.push(Block { row, first, last });
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn blocks_are_free_adjacent_in_grid_and_best_by_the_score(m in arb_map(), q in 1u16..=4) {
            let got = best_blocks(&m, q, usize::MAX);
            let all = all_blocks(&m, q as i16);
            prop_assert_eq!(got.len(), all.len());
            for b in &got {
                prop_assert_eq!(b.last - b.first + 1, q as i16);
                prop_assert!(b.row >= 1 && b.row <= m.rows && b.first >= 1 && b.last <= m.cols);
                prop_assert!((b.first..=b.last).all(|c| m.is_free(b.row, c)));
            }
            for w in got.windows(2) {
                prop_assert!(rank(&m, &w[0]) <= rank(&m, &w[1]));
            }
            if let Some(best) = got.first() {
                // Orphan-free whenever its row offers an orphan-free block.
                let row_has_clean = all.iter().any(|b| b.row == best.row && !m.strands(b.row, b.first, b.last));
                if row_has_clean {
                    prop_assert!(!m.strands(best.row, best.first, best.last));
                }
                // No better block anywhere.
                prop_assert!(all.iter().all(|b| rank(&m, best) <= rank(&m, b)));
            }
            // A bounded search returns the same prefix.
            let few = best_blocks(&m, q, 3);
            prop_assert_eq!(&few[..], &got[..got.len().min(3)]);
            // largest_block agrees with brute force.
            let largest = (1..=m.cols).rev().find(|&n| !all_blocks(&m, n).is_empty()).unwrap_or(0);
            prop_assert_eq!(m.largest_block(), largest as u16);
        }
    }
}
