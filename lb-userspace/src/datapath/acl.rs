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
use crate::bpf_batch::{batch_unsupported, delete_batch_of, update_batch_of};

/// Prefixes per batch update.
const BATCH: usize = 4096;
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
    /// Inserts `keys[i] -> values[i]` into the trie `name`: in batches of
    /// [`BATCH`] (one syscall each), one by one where the kernel has no
    /// batch update for tries.
    fn trie_insert<K: aya::Pod>(
        &mut self,
        name: &'static str,
        keys: &[Key<K>],
        values: &[u32],
    ) -> Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let max = self.sizes.acl_entries;
        let fd = match self.map(name) {
            aya::maps::Map::LpmTrie(d) => d.fd().as_fd().as_raw_fd(),
            _ => unreachable!("{name} is an LPM trie"),
        };
        let full = |e: &std::io::Error| e.kind() == std::io::ErrorKind::StorageFull;
        let mut done = 0;
        while self.acl_batch && done < keys.len() {
            let end = (done + BATCH).min(keys.len());
            match update_batch_of(fd, &keys[done..end], &values[done..end]) {
                Ok(()) => done = end,
                Err(e) if full(&e) => return Err(DatapathError::AclFull { name, max }),
                Err(e) if batch_unsupported(&e) && done == 0 => {
                    log::info!("{name}: no batch updates for LPM tries here; one by one");
                    self.acl_batch = false;
                }
                Err(e) => return Err(DatapathError::TrieBatch { name, source: e }),
            }
        }
        let mut trie: LpmTrie<&mut MapData, K, u32> =
            LpmTrie::try_from(self.map_mut(name)).map_err(map_err(name))?;
        for (k, v) in keys[done..].iter().zip(&values[done..]) {
            trie.insert(k, v, 0).map_err(insert_err(name, max))?;
        }
        Ok(())
    }

    /// Deletes `keys` from the trie `name` (absent ones are no error), in
    /// batches where the kernel can.
    fn trie_delete<K: aya::Pod>(&mut self, name: &'static str, keys: &[Key<K>]) -> Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = match self.map(name) {
            aya::maps::Map::LpmTrie(d) => d.fd().as_fd().as_raw_fd(),
            _ => unreachable!("{name} is an LPM trie"),
        };
        let absent = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let mut done = 0;
        while self.acl_batch && done < keys.len() {
            let end = (done + BATCH).min(keys.len());
            match delete_batch_of(fd, &keys[done..end]) {
                Ok(()) => done = end,
                // Skip the absent key the kernel stopped at.
                Err((e, n)) if absent(&e) => done += n + 1,
                Err((e, 0)) if batch_unsupported(&e) && done == 0 => {
                    log::info!("{name}: no batch deletes for LPM tries here; one by one");
                    self.acl_batch = false;
                }
                Err((e, _)) => return Err(DatapathError::TrieBatch { name, source: e }),
            }
        }
        let mut trie: LpmTrie<&mut MapData, K, u32> =
            LpmTrie::try_from(self.map_mut(name)).map_err(map_err(name))?;
        for k in &keys[done.min(keys.len())..] {
            match trie.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e)) if absent(&e.io_error) => {}
                Err(source) => return Err(DatapathError::Map { name, source }),
            }
        }
        Ok(())
    }
}

impl AclMaps for Datapath {
    type AclError = DatapathError;

    fn acl_insert(&mut self, index: u32, bank: u32, entries: &BTreeMap<Cidr, u32>) -> Result<()> {
        let tag = acl_tag(index, bank);
        let (mut k4, mut v4, mut k6, mut v6) = (vec![], vec![], vec![], vec![]);
        for (c, v) in entries {
            match c.addr {
                IpAddr::V4(a) => {
                    k4.push(key4(tag, c, a));
                    v4.push(*v);
                }
                IpAddr::V6(a) => {
                    k6.push(key6(tag, c, a));
                    v6.push(*v);
                }
            }
        }
        self.trie_insert(map_names::ACL4, &k4, &v4)?;
        self.trie_insert(map_names::ACL6, &k6, &v6)
    }

    fn acl_delete(
        &mut self,
        index: u32,
        bank: u32,
        prefixes: &mut dyn Iterator<Item = Cidr>,
    ) -> Result<()> {
        let tag = acl_tag(index, bank);
        let (mut k4, mut k6) = (vec![], vec![]);
        for c in prefixes {
            match c.addr {
                IpAddr::V4(a) => k4.push(key4(tag, &c, a)),
                IpAddr::V6(a) => k6.push(key6(tag, &c, a)),
            }
        }
        self.trie_delete(map_names::ACL4, &k4)?;
        self.trie_delete(map_names::ACL6, &k6)
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
