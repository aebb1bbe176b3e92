//! Ethernet MAC addresses: the one parser and the one formatter of the
//! project.
//!
//! Text form: six octets of exactly two hex digits each, separated by `:`
//! or by `-` (not mixed), any case, e.g. `02:00:00:00:00:11` or
//! `02-00-00-00-00-AB`. Displayed lowercase with `:`.

use std::{fmt, str::FromStr};

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// The error of [`MacAddr::from_str`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets like \"02:00:00:00:00:11\"")]
pub struct ParseMacError(pub String);

impl MacAddr {
    /// The bytes, in wire order.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Neither all zeros nor a group (multicast or broadcast) address.
    pub fn is_unicast(self) -> bool {
        self.0 != [0; 6] && self.0[0] & 1 == 0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(mac: MacAddr) -> Self {
        mac.0
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_owned());
        let separator = if s.contains('-') { '-' } else { ':' };
        let mut mac = [0u8; 6];
        let mut parts = s.split(separator);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        match parts.next() {
            None => Ok(MacAddr(mac)),
            Some(_) => Err(err()),
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<[u8; 6]> {
        s.parse::<MacAddr>().ok().map(MacAddr::octets)
    }

    #[test]
    fn parses_colons_and_dashes_in_any_case() {
        assert_eq!(parse("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse("02-00-00-00-00-AB"), Some([2, 0, 0, 0, 0, 0xab]));
        assert_eq!(parse("FF:ff:Ff:fF:ff:ff"), Some([0xff; 6]));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "02:00:0a:ff:00:01:",
            "zz:00:0a:ff:00:01",
            "02:00:00:00:00:1g",
            "2:0:0:0:0:1",
            "002:00:00:00:00:01",
            "+2:00:00:00:00:01",
            "02-00:00:00:00:01",
            "02:00:00:00:00:01 ",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            "02:00".parse::<MacAddr>().unwrap_err().to_string(),
            "invalid MAC address \"02:00\": expected six hex octets like \"02:00:00:00:00:11\""
        );
    }

    #[test]
    fn displays_lowercase_with_colons() {
        let mac = MacAddr([2, 0, 0x0a, 0xff, 0, 0x11]);
        assert_eq!(mac.to_string(), "02:00:0a:ff:00:11");
        assert_eq!(format!("{mac}").parse::<MacAddr>(), Ok(mac));
        assert_eq!(MacAddr::default().to_string(), "00:00:00:00:00:00");
    }

    #[test]
    fn unicast() {
        assert!(MacAddr([2, 0, 0, 0, 0, 0x11]).is_unicast());
        assert!(!MacAddr([0; 6]).is_unicast());
        assert!(!MacAddr([0xff; 6]).is_unicast());
        assert!(!MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_unicast());
        assert_eq!(
            <[u8; 6]>::from(MacAddr::from([1, 2, 3, 4, 5, 6])),
            [1, 2, 3, 4, 5, 6]
        );
    }
}
