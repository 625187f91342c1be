//! Random byte mutations of a valid `data.pkl` and of a whole torch.save
//! archive never panic the reader: it answers `Ok` or `Err`, and every range
//! it hands back lies inside the file.

use std::path::{Path, PathBuf};

use checkpoint::pytorch::{read_pickle, read_tensors};
use proptest::prelude::*;

fn archive() -> Vec<u8> {
    let root = match std::env::var_os("TIERLM_REPO_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    std::fs::read(root.join("fixtures/pytorch/tiny-opt-bin/pytorch_model.bin")).unwrap()
}

/// The archive's first entry, `archive/data.pkl`, read off its local header.
fn data_pkl(zip: &[u8]) -> std::ops::Range<usize> {
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([zip[at], zip[at + 1]]));
    let size = u32::from_le_bytes([zip[18], zip[19], zip[20], zip[21]]) as usize;
    let start = 30 + u16_at(26) + u16_at(28);
    assert_eq!(&zip[30..30 + u16_at(26)], b"archive/data.pkl");
    start..start + size
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    // Positions are fractions of the length, so one strategy fits any input.
    let edit = prop_oneof![
        6 => (any::<u32>(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p as usize, b)),
        1 => (any::<u32>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p as usize, b)),
        1 => any::<u32>().prop_map(|p| Edit::Remove(p as usize)),
        1 => any::<u32>().prop_map(|p| Edit::Truncate(p as usize)),
    ];
    prop::collection::vec(edit, 1..6)
}

/// Applies `edits` inside `region` of `bytes` (positions wrap into it).
fn apply(mut bytes: Vec<u8>, region: std::ops::Range<usize>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let span = region.end.min(bytes.len()).saturating_sub(region.start).max(1);
        let at = |p: usize| (region.start + p % span).min(bytes.len());
        match *e {
            Edit::Set(p, b) => {
                let i = at(p);
                if i < bytes.len() {
                    bytes[i] = b;
                }
            }
            Edit::Insert(p, b) => {
                let i = at(p);
                bytes.insert(i, b);
            }
            Edit::Remove(p) => {
                let i = at(p);
                if i < bytes.len() {
                    bytes.remove(i);
                }
            }
            Edit::Truncate(p) => {
                let i = at(p);
                bytes.truncate(i);
            }
        }
    }
    bytes
}

fn check_archive(buf: &[u8]) {
    if let Ok(tensors) = read_tensors(Path::new("mutated.bin"), buf) {
        for t in tensors {
            assert!(t.range.start <= t.range.end && t.range.end <= buf.len(), "{t:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_pickles_never_panic(edits in edits()) {
        let zip = archive();
        let pkl = zip[data_pkl(&zip)].to_vec();
        let len = pkl.len();
        let mutated = apply(pkl, 0..len, &edits);
        let _ = read_pickle(Path::new("mutated.bin"), &mutated);
    }

    #[test]
    fn random_pickles_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = read_pickle(Path::new("random.bin"), &bytes);
    }

    #[test]
    fn mutated_archives_never_panic(edits in edits(), region in 0..3usize) {
        let zip = archive();
        let len = zip.len();
        let pkl = data_pkl(&zip);
        // Where a mutation changes what is read: the local header and the
        // pickle, the central directory and end records, or anywhere.
        let region = match region {
            0 => 0..pkl.end,
            1 => len.saturating_sub(4096)..len,
            _ => 0..len,
        };
        check_archive(&apply(zip, region, &edits));
    }
}

#[test]
fn the_unmutated_inputs_are_valid() {
    let zip = archive();
    assert!(read_pickle(Path::new("x"), &zip[data_pkl(&zip)]).unwrap().len() > 30);
    assert!(read_tensors(Path::new("x"), &zip).unwrap().len() > 30);
}
