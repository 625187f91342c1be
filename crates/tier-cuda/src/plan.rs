//! Turning a copy's runs into as few driver copies as possible, and laying
//! them out in staging buffers. Pure arithmetic, tested without a GPU.

use std::ops::Range;

/// One rectangular copy: `height` rows of `width` bytes, row `i` from
/// `src + i * src_pitch` to `dst + i * dst_pitch`. A height of 1 is a plain
/// contiguous copy (the pitches are then meaningless).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rect {
    pub src: u64,
    pub dst: u64,
    pub src_pitch: u64,
    pub dst_pitch: u64,
    pub width: u64,
    pub height: u64,
}

impl Rect {
    fn single(src: u64, dst: u64, len: u64) -> Self {
        Rect { src, dst, src_pitch: len, dst_pitch: len, width: len, height: 1 }
    }
}

/// Groups `(src, dst, len)` pieces, in order, into rectangles: consecutive
/// pieces of one length whose source and destination advance by constant
/// pitches become one 2D copy (`cuMemcpy2D`); the rest stay 1D. Pitches
/// above `max_pitch` are not grouped. Pieces of length 0 are dropped.
pub(crate) fn group_rects(pieces: impl IntoIterator<Item = (u64, u64, u64)>, max_pitch: u64) -> Vec<Rect> {
    let mut out: Vec<Rect> = Vec::new();
    for (src, dst, len) in pieces {
        if len == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            if last.width == len && src > last.src && dst > last.dst {
                let (sp, dp) = (src - last.src, dst - last.dst);
                if last.height == 1 {
                    // A second row fixes the pitches.
                    if sp >= len && dp >= len && sp <= max_pitch && dp <= max_pitch {
                        *last = Rect { src_pitch: sp, dst_pitch: dp, height: 2, ..*last };
                        continue;
                    }
                } else if src == last.src + last.height * last.src_pitch
                    && dst == last.dst + last.height * last.dst_pitch
                {
                    last.height += 1;
                    continue;
                }
            }
        }
        out.push(Rect::single(src, dst, len));
    }
    out
}

/// A piece of a staged copy: `len` bytes at `far` on the host or disk side,
/// at `gpu` on the GPU side, and at `slot` in the staging buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub far: u64,
    pub gpu: u64,
    pub slot: u64,
    pub len: u64,
}

/// What one staging buffer carries at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Load {
    /// Indexes into the piece list.
    pub pieces: Range<usize>,
    /// For reads from disk: the one far range read into the slot from its
    /// start, gaps between pieces included. `None` when pieces are moved one
    /// by one.
    pub span: Option<(u64, u64)>,
}

/// How pieces are laid out in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Back to back: slot bytes hold only the copied bytes.
    Tight,
    /// As on the far side, gaps of up to `max_gap` bytes included, so that
    /// one read fetches many pieces.
    Spans { max_gap: u64 },
}

/// Splits `(far, gpu, len)` runs (ascending on both sides, as a view's runs
/// are) into slot-sized loads.
pub(crate) fn pack(
    runs: impl IntoIterator<Item = (u64, u64, u64)>,
    slot_bytes: u64,
    layout: Layout,
) -> (Vec<Piece>, Vec<Load>) {
    assert!(slot_bytes > 0, "staging slots hold at least one byte");
    let mut pieces: Vec<Piece> = Vec::new();
    let mut loads: Vec<Load> = Vec::new();
    // The open load: first piece index, far start, bytes of slot used.
    let mut open: Option<(usize, u64, u64)> = None;
    let close = |open: &mut Option<(usize, u64, u64)>, pieces: &Vec<Piece>, loads: &mut Vec<Load>| {
        if let Some((first, start, used)) = open.take() {
            let span = match layout {
                Layout::Tight => None,
                Layout::Spans { .. } => Some((start, used)),
            };
            loads.push(Load { pieces: first..pieces.len(), span });
        }
    };
    for (mut far, mut gpu, mut rem) in runs {
        while rem > 0 {
            let Some((_, start, used)) = open else {
                open = Some((pieces.len(), far, 0));
                continue;
            };
            let at = match layout {
                Layout::Tight => Some(used),
                Layout::Spans { max_gap } => {
                    let end = start + used;
                    (far >= end && far - end <= max_gap && far - start < slot_bytes).then_some(far - start)
                }
            };
            let Some(at) = at.filter(|&at| at < slot_bytes) else {
                close(&mut open, &pieces, &mut loads);
                continue;
            };
            let take = rem.min(slot_bytes - at);
            pieces.push(Piece { far, gpu, slot: at, len: take });
            open = open.map(|(first, start, _)| (first, start, at + take));
            far += take;
            gpu += take;
            rem -= take;
        }
    }
    close(&mut open, &pieces, &mut loads);
    (pieces, loads)
}

/// Pieces merged where they are contiguous both on the far side and in the
/// slot: the calls a CPU copy or a disk request needs.
pub(crate) fn far_extents(pieces: &[Piece]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for p in pieces {
        match out.last_mut() {
            Some((far, slot, len)) if *far + *len == p.far && *slot + *len == p.slot => *len += p.len,
            _ => out.push((p.far, p.slot, p.len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn regular_strides_become_one_rect() {
        let pieces = (0..5).map(|i| (i * 100, i * 10, 10));
        let r = group_rects(pieces, u64::MAX);
        assert_eq!(r, vec![Rect { src: 0, dst: 0, src_pitch: 100, dst_pitch: 10, width: 10, height: 5 }]);
    }

    #[test]
    fn irregular_pieces_split() {
        let r = group_rects([(0, 0, 10), (100, 10, 10), (150, 20, 10), (200, 30, 10), (250, 40, 4)], u64::MAX);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].height, 2);
        assert_eq!((r[1].src, r[1].height, r[1].src_pitch), (150, 2, 50));
        assert_eq!((r[2].width, r[2].height), (4, 1));
        let r = group_rects([(0, 0, 10), (1 << 40, 10, 10)], 1 << 31);
        assert_eq!(r.len(), 2, "pitches over the limit stay 1D");
    }

    #[test]
    fn tight_packing_splits_runs_across_slots() {
        let (pieces, loads) = pack([(0, 1000, 10), (50, 2000, 25)], 16, Layout::Tight);
        assert_eq!(loads.len(), 3);
        assert_eq!(
            pieces[loads[0].pieces.clone()],
            [Piece { far: 0, gpu: 1000, slot: 0, len: 10 }, Piece { far: 50, gpu: 2000, slot: 10, len: 6 }]
        );
        assert_eq!(pieces[loads[1].pieces.clone()], [Piece { far: 56, gpu: 2006, slot: 0, len: 16 }]);
        assert_eq!(pieces[loads[2].pieces.clone()], [Piece { far: 72, gpu: 2022, slot: 0, len: 3 }]);
        assert!(loads.iter().all(|l| l.span.is_none()));
    }

    #[test]
    fn spans_include_small_gaps_only() {
        let runs = [(0, 0, 4), (8, 4, 4), (100, 8, 4)];
        let (pieces, loads) = pack(runs, 64, Layout::Spans { max_gap: 10 });
        assert_eq!(loads.len(), 2);
        assert_eq!(loads[0].span, Some((0, 12)));
        assert_eq!(pieces[1], Piece { far: 8, gpu: 4, slot: 8, len: 4 });
        assert_eq!(loads[1].span, Some((100, 4)));
    }

    #[test]
    fn extents_merge_contiguous_pieces() {
        let pieces = [
            Piece { far: 0, gpu: 0, slot: 0, len: 4 },
            Piece { far: 4, gpu: 100, slot: 4, len: 4 },
            Piece { far: 20, gpu: 200, slot: 8, len: 4 },
        ];
        assert_eq!(far_extents(&pieces), vec![(0, 0, 8), (20, 8, 4)]);
    }

    /// Runs as a view produces them: ascending, disjoint on both sides.
    fn runs_strategy() -> impl Strategy<Value = Vec<(u64, u64, u64)>> {
        prop::collection::vec((0u64..50, 0u64..50, 1u64..300), 0..40).prop_map(|v| {
            let (mut f, mut g) = (0, 0);
            v.into_iter()
                .map(|(gf, gg, len)| {
                    f += gf;
                    g += gg;
                    let run = (f, g, len);
                    f += len;
                    g += len;
                    run
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn packing_covers_every_byte_once(runs in runs_strategy(), slot in 1u64..200, gap in 0u64..64, spans in any::<bool>()) {
            let layout = if spans { Layout::Spans { max_gap: gap } } else { Layout::Tight };
            let (pieces, loads) = pack(runs.iter().copied(), slot, layout);
            // Every byte of every run appears once, in order.
            let expect: Vec<(u64, u64)> = runs.iter().flat_map(|&(f, g, l)| (0..l).map(move |i| (f + i, g + i))).collect();
            let got: Vec<(u64, u64)> = pieces.iter().flat_map(|p| (0..p.len).map(move |i| (p.far + i, p.gpu + i))).collect();
            prop_assert_eq!(expect, got);
            // Loads tile the pieces, and every piece fits its slot.
            let mut next = 0;
            for l in &loads {
                prop_assert_eq!(l.pieces.start, next);
                prop_assert!(!l.pieces.is_empty());
                next = l.pieces.end;
                let mut used_end = 0;
                for p in &pieces[l.pieces.clone()] {
                    prop_assert!(p.slot + p.len <= slot);
                    prop_assert!(p.slot >= used_end, "pieces in a slot do not overlap");
                    used_end = p.slot + p.len;
                    if let Some((start, len)) = l.span {
                        prop_assert_eq!(p.far - start, p.slot);
                        prop_assert!(p.slot + p.len <= len);
                    }
                }
            }
            prop_assert_eq!(next, pieces.len());
        }

        #[test]
        fn rects_cover_the_pieces(runs in runs_strategy()) {
            let rects = group_rects(runs.iter().copied(), 1 << 31);
            let got: Vec<(u64, u64)> = rects.iter().flat_map(|r| (0..r.height).flat_map(move |h| (0..r.width).map(move |i| (r.src + h * r.src_pitch + i, r.dst + h * r.dst_pitch + i)))).collect();
            let expect: Vec<(u64, u64)> = runs.iter().flat_map(|&(s, d, l)| (0..l).map(move |i| (s + i, d + i))).collect();
            prop_assert_eq!(got, expect);
            for r in &rects {
                prop_assert!(r.height == 1 || (r.src_pitch >= r.width && r.dst_pitch >= r.width));
            }
        }
    }
}
