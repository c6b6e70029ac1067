//! What a manifest from another edge would cost in memory, counted on its
//! protobuf wire bytes before prost decodes it.
//!
//! prost turns every element of a repeated field into a value of its own:
//! a 2-byte empty entry becomes a `ManifestEntry` of a few hundred bytes,
//! a 1-byte empty block hash a `Vec`. A 64 MiB message could so decode into
//! gigabytes. [`manifest_cost`] walks the wire format (no allocation) and
//! charges each entry, block, xattr and byte what it will take, so a
//! manifest past a budget is refused before anything is built.

/// Fixed cost charged per decoded entry (the struct and its map slot).
pub const PER_ENTRY: u64 = 256;
/// Per element of a repeated field inside an entry (a `Vec` and its slot;
/// a block hash is 24 + 32 bytes).
pub const PER_ELEMENT: u64 = 56;

/// Why the bytes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not the protobuf wire format.
    #[error("malformed at byte {0}")]
    Malformed(usize),
    /// More entries than allowed.
    #[error("{0} entries, more than {1}")]
    TooManyEntries(u64, u64),
    /// It would take more memory than allowed.
    #[error("it would take {0} bytes of memory, more than {1}")]
    TooBig(u64, u64),
}

/// A protobuf field as the wire has it.
enum Field<'a> {
    Varint,
    Fixed,
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or(WireError::Malformed(*at))?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError::Malformed(*at))
}

/// The fields of a message, in order: (number, value).
fn fields(b: &[u8]) -> impl Iterator<Item = Result<(u64, Field<'_>), WireError>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= b.len() {
            return None;
        }
        let r = (|| {
            let key = varint(b, &mut at)?;
            let f = match key & 7 {
                0 => {
                    varint(b, &mut at)?;
                    Field::Varint
                }
                1 | 5 => {
                    at += if key & 7 == 1 { 8 } else { 4 };
                    if at > b.len() {
                        return Err(WireError::Malformed(b.len()));
                    }
                    Field::Fixed
                }
                2 => {
                    let len = varint(b, &mut at)?;
                    let end = usize::try_from(len)
                        .ok()
                        .and_then(|l| at.checked_add(l))
                        .filter(|&e| e <= b.len())
                        .ok_or(WireError::Malformed(at))?;
                    let s = &b[at..end];
                    at = end;
                    Field::Bytes(s)
                }
                _ => return Err(WireError::Malformed(at)),
            };
            Ok((key >> 3, f))
        })();
        if r.is_err() {
            at = b.len();
        }
        Some(r)
    })
}

/// The memory a `PersistedManifest` in `b` would take decoded (an
/// estimate from above), refused past `max_entries` entries or `max_bytes`.
pub fn manifest_cost(b: &[u8], max_entries: u64, max_bytes: u64) -> Result<u64, WireError> {
    let (mut entries, mut cost) = (0u64, b.len() as u64);
    for f in fields(b) {
        let (n, f) = f?;
        // 4: entries, 5: local (parallel bookkeeping).
        if let (4 | 5, Field::Bytes(e)) = (n, f) {
            if n == 4 {
                entries += 1;
                if entries > max_entries {
                    return Err(WireError::TooManyEntries(entries, max_entries));
                }
            }
            cost += PER_ENTRY;
            for g in fields(e) {
                let (_, g) = g?;
                if let Field::Bytes(_) = g {
                    cost += PER_ELEMENT;
                }
            }
            if cost > max_bytes {
                return Err(WireError::TooBig(cost, max_bytes));
            }
        }
    }
    Ok(cost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_proto::v1 as pb;
    use prost::Message;

    fn manifest(entries: usize, blocks: usize) -> Vec<u8> {
        pb::PersistedManifest {
            version: 1,
            block_size: 4096,
            root: vec![0; 32],
            entries: (0..entries)
                .map(|i| pb::ManifestEntry {
                    path: format!("f{i}").into_bytes(),
                    blocks: vec![vec![7; 32]; blocks],
                    ..Default::default()
                })
                .collect(),
            local: Vec::new(),
            clean: true,
        }
        .encode_to_vec()
    }

    #[test]
    fn a_manifest_is_charged_per_entry_and_element_and_refused_past_its_limits() {
        let b = manifest(10, 3);
        let c = manifest_cost(&b, 100, 1 << 30).unwrap();
        // Each entry: its fixed cost, a path and three hashes.
        assert!(c >= 10 * (PER_ENTRY + 4 * PER_ELEMENT), "{c}");
        assert_eq!(
            manifest_cost(&b, 9, 1 << 30),
            Err(WireError::TooManyEntries(10, 9))
        );
        assert!(matches!(
            manifest_cost(&b, 100, 2000),
            Err(WireError::TooBig(_, 2000))
        ));
        // Empty repeated elements cost what they will take, not their bytes.
        let empties = pb::PersistedManifest {
            entries: vec![
                pb::ManifestEntry {
                    blocks: vec![Vec::new(); 100_000],
                    ..Default::default()
                };
                1
            ],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(empties.len() < 300_000);
        assert!(manifest_cost(&empties, 10, 1 << 30).unwrap() >= 100_000 * PER_ELEMENT);
    }

    #[test]
    fn malformed_wire_bytes_are_refused_without_panicking() {
        for b in [
            &[0x22, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[0x0b],
            &[0x09, 1, 2],
            &[0xff; 11],
        ] {
            assert!(
                matches!(manifest_cost(b, 10, 1 << 30), Err(WireError::Malformed(_))),
                "{b:?}"
            );
        }
        assert_eq!(manifest_cost(&[], 10, 100), Ok(0));
    }
}
