//! The order key `(hlc, origin_region, event_id)` that places an entry in a storage
//! timeline identically in every region, and its byte encoding: HLC big-endian, the region
//! name followed by a zero byte (region names never contain one), then the 16 id bytes.
//! Byte order equals tuple order, so the store can range-scan timelines by key.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::{EventId, Hlc, ModelError, RegionId};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey {
    pub hlc: Hlc,
    pub origin: RegionId,
    pub event_id: EventId,
}

impl OrderKey {
    pub fn new(hlc: Hlc, origin: RegionId, event_id: EventId) -> Self {
        Self {
            hlc,
            origin,
            event_id,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.origin.as_str().len() + 1 + 16);
        out.extend_from_slice(&self.hlc.0.to_be_bytes());
        out.extend_from_slice(self.origin.as_str().as_bytes());
        out.push(0);
        out.extend_from_slice(self.event_id.as_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ModelError> {
        let bad = || ModelError::invalid("cursor", "not a cursor issued by this service");
        if b.len() < 8 + 1 + 1 + 16 {
            return Err(bad());
        }
        let hlc = Hlc(u64::from_be_bytes(b[..8].try_into().map_err(|_| bad())?));
        let rest = &b[8..];
        let nul = rest.iter().position(|&c| c == 0).ok_or_else(bad)?;
        let region = std::str::from_utf8(&rest[..nul]).map_err(|_| bad())?;
        let origin = RegionId::parse(region).map_err(|_| bad())?;
        let id = &rest[nul + 1..];
        if id.len() != 16 {
            return Err(bad());
        }
        Ok(Self {
            hlc,
            origin,
            event_id: EventId::from_bytes(id)?,
        })
    }

    /// The opaque cursor string clients see for this key.
    pub fn cursor(&self) -> Cursor {
        Cursor(URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

/// An opaque position in a storage timeline, as handed to clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor(String);

impl Cursor {
    pub fn parse(s: &str) -> Result<OrderKey, ModelError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| ModelError::invalid("cursor", "not a cursor issued by this service"))?;
        OrderKey::from_bytes(&bytes)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Cursor> for String {
    fn from(c: Cursor) -> String {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = OrderKey> {
        (any::<u64>(), "[a-z0-9-]{1,6}", any::<[u8; 16]>()).prop_map(|(h, r, id)| {
            OrderKey::new(
                Hlc(h),
                RegionId::parse(r).unwrap(),
                EventId::from_bytes(&id).unwrap(),
            )
        })
    }

    proptest! {
        #[test]
        fn bytes_sort_like_tuples(a in key(), b in key()) {
            prop_assert_eq!(a.cmp(&b), a.to_bytes().cmp(&b.to_bytes()));
        }

        #[test]
        fn bytes_and_cursors_round_trip(a in key()) {
            prop_assert_eq!(OrderKey::from_bytes(&a.to_bytes()).unwrap(), a.clone());
            prop_assert_eq!(Cursor::parse(a.cursor().as_str()).unwrap(), a);
        }

        #[test]
        fn garbage_cursors_are_rejected_not_panicked_on(s in ".{0,64}") {
            let _ = Cursor::parse(&s);
        }
    }

    #[test]
    fn same_hlc_prefix_regions_order_like_strings() {
        let id = EventId::from_bytes(&[0xff; 16]).unwrap();
        let a = OrderKey::new(Hlc(5), RegionId::parse("a").unwrap(), id);
        let ab = OrderKey::new(
            Hlc(5),
            RegionId::parse("ab").unwrap(),
            EventId::from_bytes(&[0; 16]).unwrap(),
        );
        assert!(a < ab);
        assert!(a.to_bytes() < ab.to_bytes());
    }
}
