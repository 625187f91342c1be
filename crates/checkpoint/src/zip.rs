//! Just enough of the zip format to find the stored entries of a
//! `torch.save` archive in a memory-mapped file: the end of central
//! directory record (and its ZIP64 form), the central directory, and each
//! entry's local header for where its data starts. Nothing is decompressed:
//! torch writes every entry stored, and an entry that is not is refused when
//! it is read. Every size and offset comes from the file, so all arithmetic
//! on them is checked and every read is bounds-checked; a failure is a
//! plain reason string that the caller wraps with the file's path.

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const CENTRAL_LEN: usize = 46;
const LOCAL_SIG: u32 = 0x0403_4b50;
const LOCAL_LEN: usize = 30;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// The most a zip comment (and so the search for the EOCD) spans.
const MAX_COMMENT: usize = u16::MAX as usize;

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's name, as stored.
    pub name: String,
    /// Compression method (0 = stored).
    pub method: u16,
    /// General purpose flags (bit 0 = encrypted).
    pub flags: u16,
    /// Where the entry's data starts in the file.
    pub data_start: usize,
    /// The entry's stored (compressed) size; for a stored entry, its length.
    pub len: usize,
}

impl Entry {
    /// The byte range of a stored entry's data, or why it cannot be read
    /// in place.
    pub fn stored_range(&self) -> Result<std::ops::Range<usize>, String> {
        if self.flags & 1 != 0 {
            return Err(format!("zip entry {} is encrypted", self.name));
        }
        if self.method != 0 {
            return Err(format!(
                "zip entry {} is compressed (method {}); torch.save stores entries uncompressed, so this archive was \
                 rewritten by another tool",
                self.name, self.method
            ));
        }
        // `parse` checked that the range lies inside the file.
        Ok(self.data_start..self.data_start + self.len)
    }
}

fn read<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], String> {
    at.checked_add(N).and_then(|end| buf.get(at..end)).and_then(|s| s.try_into().ok()).ok_or_else(|| {
        format!("truncated zip: a record at byte {at} runs past the end of the file ({} bytes)", buf.len())
    })
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, String> {
    read::<2>(buf, at).map(u16::from_le_bytes)
}

fn u32_at(buf: &[u8], at: usize) -> Result<u32, String> {
    read::<4>(buf, at).map(u32::from_le_bytes)
}

fn u64_at(buf: &[u8], at: usize) -> Result<u64, String> {
    read::<8>(buf, at).map(u64::from_le_bytes)
}

fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("zip {what} {v} does not fit in this machine's address space"))
}

fn add(a: usize, b: usize, what: &str) -> Result<usize, String> {
    a.checked_add(b).ok_or_else(|| format!("zip {what} overflows"))
}

/// Where the central directory is and how many entries it holds.
struct Directory {
    offset: usize,
    size: usize,
    entries: u64,
}

/// Finds the end of central directory record, searching back over at most
/// a maximal comment, and follows it to the ZIP64 record where there is one.
fn find_directory(buf: &[u8]) -> Result<Directory, String> {
    let last = buf.len().checked_sub(EOCD_LEN).ok_or_else(|| {
        format!("truncated zip: {} bytes, too short for the end of central directory record", buf.len())
    })?;
    let first = last.saturating_sub(MAX_COMMENT);
    let eocd = (first..=last)
        .rev()
        .find(|&at| u32_at(buf, at) == Ok(EOCD_SIG))
        .ok_or("truncated or corrupt zip: no end of central directory record (was the download cut short?)")?;
    let entries16 = u16_at(buf, eocd + 10)?;
    let size32 = u32_at(buf, eocd + 12)?;
    let offset32 = u32_at(buf, eocd + 16)?;

    let locator = eocd.checked_sub(ZIP64_LOCATOR_LEN);
    let zip64 = match locator {
        Some(at) if u32_at(buf, at) == Ok(ZIP64_LOCATOR_SIG) => Some(at),
        _ => None,
    };
    match zip64 {
        Some(loc) => {
            let record = to_usize(u64_at(buf, loc + 8)?, "ZIP64 end of central directory offset")?;
            if u32_at(buf, record)? != ZIP64_EOCD_SIG {
                return Err(format!("corrupt zip: no ZIP64 end of central directory record at byte {record}"));
            }
            let entries = u64_at(buf, add(record, 32, "ZIP64 record offset")?)?;
            let size = to_usize(u64_at(buf, add(record, 40, "ZIP64 record offset")?)?, "central directory size")?;
            let offset = to_usize(u64_at(buf, add(record, 48, "ZIP64 record offset")?)?, "central directory offset")?;
            Ok(Directory { offset, size, entries })
        }
        None => {
            if entries16 == u16::MAX || size32 == u32::MAX || offset32 == u32::MAX {
                return Err("corrupt zip: the end of central directory record needs ZIP64, and there is no ZIP64 \
                            locator before it"
                    .into());
            }
            Ok(Directory { offset: offset32 as usize, size: size32 as usize, entries: u64::from(entries16) })
        }
    }
}

/// The values a ZIP64 extra field holds for the central directory fields
/// that were saturated, in the order the format fixes.
fn zip64_extra(extra: &[u8], usize_max: bool, csize_max: bool, offset_max: bool) -> Result<[Option<u64>; 3], String> {
    let mut at = 0usize;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at)?;
        let len = usize::from(u16_at(extra, at + 2)?);
        let body_start = at + 4;
        let body_end = add(body_start, len, "extra field length")?;
        let body = extra.get(body_start..body_end).ok_or("corrupt zip: an extra field runs past its entry")?;
        if id == ZIP64_EXTRA_ID {
            let mut out = [None; 3];
            let mut pos = 0usize;
            for (slot, wanted) in out.iter_mut().zip([usize_max, csize_max, offset_max]) {
                if wanted {
                    *slot = Some(u64_at(body, pos).map_err(|_| "corrupt zip: a ZIP64 extra field is too short")?);
                    pos += 8;
                }
            }
            return Ok(out);
        }
        at = body_end;
    }
    Err("corrupt zip: an entry's sizes or offset need a ZIP64 extra field, and it has none".into())
}

/// Every entry of the zip archive `buf`, with its data's place checked to
/// lie inside `buf`.
pub fn parse(buf: &[u8]) -> Result<Vec<Entry>, String> {
    let dir = find_directory(buf)?;
    let dir_end = add(dir.offset, dir.size, "central directory end")?;
    if dir_end > buf.len() {
        return Err(format!(
            "truncated zip: the central directory claims bytes {}..{dir_end} of a {}-byte file",
            dir.offset,
            buf.len()
        ));
    }
    // Each entry takes at least CENTRAL_LEN bytes, so a count beyond that is
    // a lie; nothing is allocated from the claimed count.
    if dir.entries > (dir.size / CENTRAL_LEN) as u64 {
        return Err(format!("corrupt zip: the central directory claims {} entries in {} bytes", dir.entries, dir.size));
    }
    let mut entries = Vec::new();
    let mut at = dir.offset;
    for _ in 0..dir.entries {
        if u32_at(buf, at)? != CENTRAL_SIG {
            return Err(format!("corrupt zip: no central directory entry at byte {at}"));
        }
        let flags = u16_at(buf, at + 8)?;
        let method = u16_at(buf, at + 10)?;
        let csize32 = u32_at(buf, at + 20)?;
        let usize32 = u32_at(buf, at + 24)?;
        let name_len = usize::from(u16_at(buf, at + 28)?);
        let extra_len = usize::from(u16_at(buf, at + 30)?);
        let comment_len = usize::from(u16_at(buf, at + 32)?);
        let local32 = u32_at(buf, at + 42)?;
        let name_start = at + CENTRAL_LEN;
        let extra_start = add(name_start, name_len, "entry name")?;
        let extra_end = add(extra_start, extra_len, "entry extra field")?;
        let next = add(extra_end, comment_len, "entry comment")?;
        if next > dir_end {
            return Err(format!("corrupt zip: the central directory entry at byte {at} runs past the directory"));
        }
        let name = std::str::from_utf8(&buf[name_start..extra_start])
            .map_err(|_| format!("corrupt zip: the entry name at byte {name_start} is not UTF-8"))?
            .to_string();
        let (csize, local) = if csize32 == u32::MAX || usize32 == u32::MAX || local32 == u32::MAX {
            let [_, c, l] = zip64_extra(
                &buf[extra_start..extra_end],
                usize32 == u32::MAX,
                csize32 == u32::MAX,
                local32 == u32::MAX,
            )
            .map_err(|e| format!("{e} (entry {name})"))?;
            (c.unwrap_or(u64::from(csize32)), l.unwrap_or(u64::from(local32)))
        } else {
            (u64::from(csize32), u64::from(local32))
        };
        let local = to_usize(local, "local header offset")?;
        let len = to_usize(csize, "entry size")?;
        if u32_at(buf, local).map_err(|e| format!("{e} (entry {name})"))? != LOCAL_SIG {
            return Err(format!("corrupt zip: no local header for entry {name} at byte {local}"));
        }
        // The local header's own name and extra lengths fix where the data
        // starts (torch pads the local extra field to align tensor data).
        let local_name = usize::from(u16_at(buf, local + 26)?);
        let local_extra = usize::from(u16_at(buf, local + 28)?);
        let data_start =
            add(add(add(local, LOCAL_LEN, "data offset")?, local_name, "data offset")?, local_extra, "data offset")?;
        let data_end = add(data_start, len, "entry end")?;
        if data_end > buf.len() {
            return Err(format!(
                "truncated zip: entry {name} claims bytes {data_start}..{data_end} of a {}-byte file",
                buf.len()
            ));
        }
        entries.push(Entry { name, method, flags, data_start, len });
        at = next;
    }
    Ok(entries)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A zip writer for tests: stored entries, with the sizes and offsets
    /// optionally written the ZIP64 way (saturated fields + extra fields +
    /// the ZIP64 end records) even where they would fit, and optional
    /// padding in the local extra field as torch writes it.
    pub(crate) fn build_zip(entries: &[(&str, &[u8])], zip64: bool, pad_to: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let local = out.len();
            let base = local + LOCAL_LEN + name.len();
            let mut extra = Vec::new();
            if zip64 {
                extra.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
                extra.extend_from_slice(&16u16.to_le_bytes());
                extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
            }
            if pad_to > 1 {
                let start = base + extra.len() + 4;
                let pad = (pad_to - start % pad_to) % pad_to;
                extra.extend_from_slice(&0x4246u16.to_le_bytes());
                extra.extend_from_slice(&(pad as u16).to_le_bytes());
                extra.extend(std::iter::repeat_n(b'Z', pad));
            }
            let size32 = if zip64 { u32::MAX } else { data.len() as u32 };
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            out.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&size32.to_le_bytes());
            out.extend_from_slice(&size32.to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&extra);
            out.extend_from_slice(data);

            let mut cextra = Vec::new();
            if zip64 {
                cextra.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
                cextra.extend_from_slice(&24u16.to_le_bytes());
                cextra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                cextra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                cextra.extend_from_slice(&(local as u64).to_le_bytes());
            }
            central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            central.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(cextra.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 10]);
            central.extend_from_slice(&(if zip64 { u32::MAX } else { local as u32 }).to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&cextra);
        }
        let cd_offset = out.len();
        out.extend_from_slice(&central);
        let n = entries.len();
        if zip64 {
            let record = out.len();
            out.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(central.len() as u64).to_le_bytes());
            out.extend_from_slice(&(cd_offset as u64).to_le_bytes());
            out.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(record as u64).to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let (n16, size32, off32) =
            if zip64 { (u16::MAX, u32::MAX, u32::MAX) } else { (n as u16, central.len() as u32, cd_offset as u32) };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&off32.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn data_of<'a>(buf: &'a [u8], entries: &[Entry], name: &str) -> &'a [u8] {
        let e = entries.iter().find(|e| e.name == name).unwrap();
        &buf[e.stored_range().unwrap()]
    }

    #[test]
    fn reads_plain_and_zip64_archives_with_padding() {
        for zip64 in [false, true] {
            for pad in [0, 64] {
                let buf = build_zip(
                    &[("a/data.pkl", b"pickle"), ("a/data/0", &[1, 2, 3, 4]), ("a/version", b"3\n")],
                    zip64,
                    pad,
                );
                let entries = parse(&buf).unwrap();
                assert_eq!(entries.len(), 3, "zip64 {zip64}");
                assert_eq!(data_of(&buf, &entries, "a/data.pkl"), b"pickle");
                assert_eq!(data_of(&buf, &entries, "a/data/0"), &[1, 2, 3, 4]);
                assert_eq!(data_of(&buf, &entries, "a/version"), b"3\n");
                if pad > 0 {
                    let e = entries.iter().find(|e| e.name == "a/data/0").unwrap();
                    assert_eq!(e.data_start % pad, 0);
                }
            }
        }
    }

    #[test]
    fn zip64_sizes_near_two_to_the_64_are_refused() {
        let mut buf = build_zip(&[("a/data/0", &[1, 2, 3, 4])], true, 0);
        // The central directory's extra field: id, len, usize, csize, offset.
        let cd = buf.windows(4).position(|w| w == CENTRAL_SIG.to_le_bytes()).unwrap();
        let extra = cd + CENTRAL_LEN + "a/data/0".len();
        buf[extra + 12..extra + 20].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        let err = parse(&buf).unwrap_err();
        assert!(err.contains("overflows") || err.contains("does not fit") || err.contains("truncated"), "{err}");
        // And the central directory's offset in the ZIP64 record.
        let mut buf = build_zip(&[("a/data/0", &[1, 2, 3, 4])], true, 0);
        let rec = buf.windows(4).rposition(|w| w == ZIP64_EOCD_SIG.to_le_bytes()).unwrap();
        buf[rec + 48..rec + 56].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&buf).is_err());
        // A count of entries the directory cannot hold.
        let mut buf = build_zip(&[("a/data/0", &[1, 2, 3, 4])], true, 0);
        let rec = buf.windows(4).rposition(|w| w == ZIP64_EOCD_SIG.to_le_bytes()).unwrap();
        buf[rec + 32..rec + 40].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(&buf).unwrap_err().contains("claims"));
    }

    #[test]
    fn truncations_and_garbage_are_errors() {
        let buf = build_zip(&[("a/data.pkl", b"pickle"), ("a/data/0", &[0; 100])], false, 64);
        for cut in [0, 1, 10, buf.len() / 2, buf.len() - 1] {
            assert!(parse(&buf[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(b"not a zip at all, just some bytes of text").unwrap_err().contains("no end of central"));
    }

    #[test]
    fn compressed_entries_are_refused_when_read() {
        let e = Entry { name: "x".into(), method: 8, flags: 0, data_start: 0, len: 0 };
        assert!(e.stored_range().unwrap_err().contains("compressed (method 8)"));
    }
}
