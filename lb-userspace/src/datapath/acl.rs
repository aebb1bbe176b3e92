//! The ACL maps (ACL4, ACL6, VIP_ACL) behind [`AclMaps`]: prefixes in and
//! out of a VIP's bank, its word, and reading all of it back after a
//! restart.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{
    Array, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    acl::{ACL_TAG_BITS, AclData4, AclData6, acl_data4, acl_data6, acl_tag},
    map_names,
};

use super::{Datapath, DatapathError, Result, map_err};
use crate::acl::{AclMaps, AclState, Cidr};

/// A trie that refused an insert because it is full names the setting.
fn insert_err(name: &'static str, max: u32) -> impl FnOnce(MapError) -> DatapathError {
    move |source| match &source {
        MapError::SyscallError(e) if e.io_error.kind() == std::io::ErrorKind::StorageFull => {
            DatapathError::AclFull { name, max }
        }
        _ => DatapathError::Map { name, source },
    }
}

fn key4(tag: [u8; 4], c: &Cidr, a: std::net::Ipv4Addr) -> Key<AclData4> {
    Key::new(
        ACL_TAG_BITS + c.prefix_len as u32,
        acl_data4(tag, a.octets()),
    )
}

fn key6(tag: [u8; 4], c: &Cidr, a: std::net::Ipv6Addr) -> Key<AclData6> {
    Key::new(
        ACL_TAG_BITS + c.prefix_len as u32,
        acl_data6(tag, a.octets()),
    )
}

/// (VIP index, bank) of a key's tag.
fn untag(data: &[u8]) -> (u32, u32) {
    let tag = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    (tag >> 1, tag & 1)
}

impl Datapath {
    fn acl4_mut(&mut self) -> Result<LpmTrie<&mut MapData, AclData4, u32>> {
        LpmTrie::try_from(self.map_mut(map_names::ACL4)).map_err(map_err(map_names::ACL4))
    }

    fn acl6_mut(&mut self) -> Result<LpmTrie<&mut MapData, AclData6, u32>> {
        LpmTrie::try_from(self.map_mut(map_names::ACL6)).map_err(map_err(map_names::ACL6))
    }
}

impl AclMaps for Datapath {
    type AclError = DatapathError;

    fn acl_insert(&mut self, index: u32, bank: u32, entries: &BTreeMap<Cidr, u32>) -> Result<()> {
        let tag = acl_tag(index, bank);
        let max = self.sizes.acl_entries;
        let mut v4 = self.acl4_mut()?;
        for (c, v) in entries {
            if let IpAddr::V4(a) = c.addr {
                v4.insert(&key4(tag, c, a), v, 0)
                    .map_err(insert_err(map_names::ACL4, max))?;
            }
        }
        let mut v6 = self.acl6_mut()?;
        for (c, v) in entries {
            if let IpAddr::V6(a) = c.addr {
                v6.insert(&key6(tag, c, a), v, 0)
                    .map_err(insert_err(map_names::ACL6, max))?;
            }
        }
        Ok(())
    }

    fn acl_delete(
        &mut self,
        index: u32,
        bank: u32,
        prefixes: &mut dyn Iterator<Item = Cidr>,
    ) -> Result<()> {
        let tag = acl_tag(index, bank);
        let absent = |r: std::result::Result<(), MapError>, name| match r {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            Err(source) => Err(DatapathError::Map { name, source }),
        };
        for c in prefixes {
            match c.addr {
                IpAddr::V4(a) => {
                    absent(self.acl4_mut()?.remove(&key4(tag, &c, a)), map_names::ACL4)?
                }
                IpAddr::V6(a) => {
                    absent(self.acl6_mut()?.remove(&key6(tag, &c, a)), map_names::ACL6)?
                }
            }
        }
        Ok(())
    }

    fn acl_set_word(&mut self, index: u32, word: u32) -> Result<()> {
        let mut words: Array<&mut MapData, u32> = Array::try_from(self.map_mut(map_names::VIP_ACL))
            .map_err(map_err(map_names::VIP_ACL))?;
        words
            .set(index, word, 0)
            .map_err(map_err(map_names::VIP_ACL))
    }

    fn acl_read(&self) -> Result<AclState> {
        let words: Array<&MapData, u32> =
            Array::try_from(self.map(map_names::VIP_ACL)).map_err(map_err(map_names::VIP_ACL))?;
        let words = (0..words.len())
            .map(|i| words.get(&i, 0).map(|w| (i, w)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIP_ACL))?;
        let mut entries = Vec::new();
        let v4: LpmTrie<&MapData, AclData4, u32> =
            LpmTrie::try_from(self.map(map_names::ACL4)).map_err(map_err(map_names::ACL4))?;
        for kv in v4.iter() {
            let (k, v) = kv.map_err(map_err(map_names::ACL4))?;
            let d = k.data();
            let (index, bank) = untag(&d);
            let addr = IpAddr::from([d[4], d[5], d[6], d[7]]);
            let c = Cidr::new(addr, (k.prefix_len() - ACL_TAG_BITS) as u8)
                .map_err(DatapathError::Object)?;
            entries.push((index, bank, c, v));
        }
        let v6: LpmTrie<&MapData, AclData6, u32> =
            LpmTrie::try_from(self.map(map_names::ACL6)).map_err(map_err(map_names::ACL6))?;
        for kv in v6.iter() {
            let (k, v) = kv.map_err(map_err(map_names::ACL6))?;
            let d = k.data();
            let (index, bank) = untag(&d);
            let mut a = [0u8; 16];
            a.copy_from_slice(&d[4..20]);
            let c = Cidr::new(IpAddr::from(a), (k.prefix_len() - ACL_TAG_BITS) as u8)
                .map_err(DatapathError::Object)?;
            entries.push((index, bank, c, v));
        }
        Ok(AclState::from_maps(words, entries))
    }
}
