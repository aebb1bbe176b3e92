use super::*;

fn c(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn acl(allow: &[&str], deny: &[&str]) -> VipAcl {
    VipAcl {
        allow: allow.iter().map(|s| c(s)).collect(),
        deny: deny.iter().map(|s| c(s)).collect(),
    }
}

#[test]
fn the_longest_prefix_of_either_list_decides_and_else_the_default() {
    let a = acl(&["198.18.0.0/16", "198.18.5.128/25"], &["198.18.5.0/24"]);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        a.decide(ip("198.18.1.1")),
        AclDecision {
            allowed: true,
            by: Some(c("198.18.0.0/16"))
        }
    );
    assert_eq!(a.decide(ip("198.18.5.1")).by, Some(c("198.18.5.0/24")));
    assert!(!a.decide(ip("198.18.5.1")).allowed);
    assert!(a.decide(ip("198.18.5.200")).allowed);
    // An allow list denies what it does not name; a deny list alone
    // allows it.
    assert_eq!(
        a.decide(ip("198.19.0.1")),
        AclDecision {
            allowed: false,
            by: None
        }
    );
    assert!(
        acl(&[], &["198.18.0.0/15"])
            .decide(ip("198.20.0.1"))
            .allowed
    );
}

/// An ACL writer that records, after every single write, what a packet
/// would see: the word and the prefixes of the bank in force.
#[derive(Default)]
struct Recorder {
    words: BTreeMap<u32, u32>,
    prefixes: BTreeMap<(u32, u32, Cidr), u32>,
    seen: Vec<Option<BTreeMap<Cidr, u32>>>,
    fail_insert: bool,
    fail_word: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("injected")]
struct Injected;

impl Recorder {
    fn record(&mut self) {
        let in_force = self.words.get(&0).filter(|w| **w != 0).map(|w| {
            self.prefixes
                .iter()
                .filter(|((i, b, _), _)| *i == 0 && *b == acl_bank(*w))
                .map(|((_, _, c), v)| (*c, *v))
                .collect()
        });
        self.seen.push(in_force);
    }
}

impl AclMaps for Recorder {
    type AclError = Injected;
    fn acl_insert(&mut self, i: u32, b: u32, e: &BTreeMap<Cidr, u32>) -> Result<(), Injected> {
        if self.fail_insert {
            // Half goes in, then the trie is full.
            for (c, v) in e.iter().take(e.len() / 2) {
                self.prefixes.insert((i, b, *c), *v);
            }
            return Err(Injected);
        }
        for (c, v) in e {
            self.prefixes.insert((i, b, *c), *v);
            self.record();
        }
        Ok(())
    }
    fn acl_delete(
        &mut self,
        i: u32,
        b: u32,
        p: &mut dyn Iterator<Item = Cidr>,
    ) -> Result<(), Injected> {
        for c in p {
            self.prefixes.remove(&(i, b, c));
            self.record();
        }
        Ok(())
    }
    fn acl_set_word(&mut self, i: u32, w: u32) -> Result<(), Injected> {
        if self.fail_word {
            return Err(Injected);
        }
        self.words.insert(i, w);
        self.record();
        Ok(())
    }
    fn acl_read(&self) -> Result<AclState, Injected> {
        Ok(AclState::from_maps(
            self.words.iter().map(|(i, w)| (*i, *w)),
            self.prefixes.iter().map(|((i, b, c), v)| (*i, *b, *c, *v)),
        ))
    }
}

#[test]
fn a_switch_shows_packets_the_old_acl_or_the_new_one_never_a_mix() {
    let mut m = Recorder::default();
    let mut st = AclState::default();
    let a = acl(&["198.18.0.0/16"], &["198.18.1.0/24"]);
    let b = acl(&["198.18.0.0/16", "198.18.2.0/24"], &["198.18.3.0/24"]);
    sync(&mut m, &mut st, 0, &a).unwrap();
    // Nothing is in force until the word is stored, then all of `a`.
    assert!(m.seen.iter().rev().skip(1).all(Option::is_none));
    assert_eq!(m.seen.last().unwrap().as_ref(), Some(&a.entries()));
    m.seen.clear();
    sync(&mut m, &mut st, 0, &b).unwrap();
    for s in &m.seen {
        let s = s.as_ref().expect("an ACL stays in force");
        assert!(*s == a.entries() || *s == b.entries(), "a mix: {s:?}");
    }
    assert_eq!(m.seen.last().unwrap().as_ref(), Some(&b.entries()));
    // The old bank is empty again and the state read back equals ours.
    assert_eq!(m.prefixes.len(), b.len());
    assert_eq!(m.acl_read().unwrap(), st);
    // Unchanged: no write.
    m.seen.clear();
    sync(&mut m, &mut st, 0, &b).unwrap();
    assert!(m.seen.is_empty());
    // Removed: the word goes to 0 first.
    sync(&mut m, &mut st, 0, &VipAcl::default()).unwrap();
    assert_eq!(m.seen[0], None);
    assert!(m.prefixes.is_empty());
    assert!(st.is_empty());
}

#[test]
fn a_failed_insert_leaves_the_acl_in_force_and_no_leftovers() {
    let mut m = Recorder::default();
    let mut st = AclState::default();
    let a = acl(&["198.18.0.0/16"], &[]);
    sync(&mut m, &mut st, 0, &a).unwrap();
    let word = m.words[&0];
    m.fail_insert = true;
    let big = acl(&["198.18.0.0/16", "198.18.2.0/24", "198.18.4.0/24"], &[]);
    assert!(sync(&mut m, &mut st, 0, &big).is_err());
    assert_eq!(m.words[&0], word);
    assert_eq!(m.acl_read().unwrap(), st);
    assert_eq!(st.vips[&0].prefixes, a.entries());
}

#[test]
fn leftovers_of_an_interrupted_switch_are_cleared_before_the_bank_is_reused() {
    let mut m = Recorder::default();
    let a = acl(&["198.18.0.0/16"], &[]);
    let mut st = AclState::default();
    sync(&mut m, &mut st, 0, &a).unwrap();
    // An agent died after filling bank 1 and before the flip.
    m.prefixes.insert((0, 1, c("198.18.9.0/24")), ACL_DENY);
    let mut st = m.acl_read().unwrap();
    assert_eq!(st.stale.len(), 1);
    let b = acl(&["198.18.0.0/16"], &["198.18.1.0/24"]);
    sync(&mut m, &mut st, 0, &b).unwrap();
    assert_eq!(st.vips[&0].prefixes, b.entries());
    assert_eq!(m.prefixes.len(), b.len(), "{:?}", m.prefixes);
    // A VIP gone: its ACL and any leftover of its index.
    m.prefixes.insert((5, 0, c("198.18.9.0/24")), ACL_DENY);
    let mut st = m.acl_read().unwrap();
    prune(&mut m, &mut st, &BTreeSet::new()).unwrap();
    assert!(m.prefixes.is_empty());
    assert!(m.words.values().all(|w| *w == 0));
}

#[test]
fn a_failed_switch_keeps_the_old_acl_and_the_next_sync_clears_the_new_bank() {
    let mut m = Recorder::default();
    let mut st = AclState::default();
    let a = acl(&["198.18.0.0/16"], &[]);
    let b = acl(&["198.18.0.0/16"], &["198.18.1.0/24"]);
    sync(&mut m, &mut st, 0, &a).unwrap();
    m.fail_word = true;
    assert!(sync(&mut m, &mut st, 0, &b).is_err());
    assert_eq!(st.vips[&0].prefixes, a.entries(), "a still in force");
    assert_eq!(
        m.acl_read().unwrap(),
        st,
        "the new bank is known as a leftover"
    );
    m.fail_word = false;
    sync(&mut m, &mut st, 0, &b).unwrap();
    assert_eq!(st.vips[&0].prefixes, b.entries());
    assert!(st.stale.is_empty());
    assert_eq!(m.prefixes.len(), b.len());
}
